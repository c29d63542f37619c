//! Chaos on the server side and from hostile clients, against the real daemon, in each
//! relay (`Kernel`: sockmap with `kernel_relay_after = 0`; `Adaptive`: sockmap with the
//! default hand-over after 32 KiB; `UserSpace`).
//!
//! The rule: a client gets `250` only for a message the server received whole; otherwise
//! it gets a 4xx or a closed/reset connection, and retries. Each test states what the
//! client sees and asserts exactly that, then checks the daemon is still alive, logged
//! the session, counted no integrity error and gave back every descriptor and map entry.
//!
//! - Postfix killed in the middle of DATA: first one smtpd process (`kill -9` of the
//!   process serving the session), then a whole Postfix instance (its process group).
//! - Backends that accept and never speak, send garbage, or reset right after the banner:
//!   what a client relayed to them sees, and that health checks mark them DOWN, after
//!   which clients get mxlb's `421`.
//! - An RST storm: many clients that reset (SO_LINGER 0) before the banner, after it, with
//!   the banner unread, and in the middle of a transfer.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::backend::{
    Backend, digest_until_eof, pattern_digest, read_line, reset, send_pattern,
};
use mxlb_tests::chaos::{
    BadBackend, BadKind, Message, RESET_BANNER, Seen, SmtpClient, daemon_alive, delivered,
    finish_data, garbage, idle_fd_count, kill_and_wait, kill_postfix_instance, read_all_seen,
    smtpd_pid_for, wait_until_clean,
};
use mxlb_tests::mxlb::http::{get_json, server};
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path, with_stats,
};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, wait_until};

mxlb_tests::for_each_relay!(
    postfix_killed_mid_data_gets_no_250,
    bad_backends_give_clients_a_close_then_go_down,
    rst_storm_leaves_nothing_behind,
);

/// Fast health checks: every 200 ms, DOWN after two failures.
const CHECK_KEYS: &str = "[listen.check]\ntype = \"smtp\"\nverb = \"EHLO\"\n\
    domain = \"lb.example.test\"\ninter = \"200ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n";

/// This file's block of client addresses (see `mxlb_tests::chaos::client_ip`).
fn client_ip(relay: RelayKind, step: u8) -> IpAddr {
    mxlb_tests::chaos::client_ip(30, relay, step)
}

/// Which of `postfixes` serves the session from `ip`, and the smtpd pid serving it.
fn session_owner(postfixes: &[&PostfixInstance], ip: IpAddr) -> Result<(usize, i32)> {
    let needle = format!("connect from unknown[{ip}]");
    let index = wait_until(
        "Postfix to log the session",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(postfixes.iter().position(|p| p.maillog().contains(&needle))),
    )?;
    Ok((index, smtpd_pid_for(postfixes[index], ip)?))
}

/// Sends the first part of `message` in DATA through mxlb from `ip`, kills what `kill`
/// says on the server side, then sends the rest and the closing dot: what did the client
/// see? Returns it with the client (still open) and the index of the instance that had
/// the session.
fn kill_in_data(
    listen: SocketAddr,
    ip: IpAddr,
    message: &Message,
    postfixes: &[&PostfixInstance],
    kill: impl FnOnce(&PostfixInstance, i32) -> Result<()>,
) -> Result<(Seen, SmtpClient, usize)> {
    let mut client = SmtpClient::connect_from(listen, ip, Duration::from_secs(30))?;
    client.start_data("user@example.test")?;
    // 300 kB before the kill: past `kernel_relay_after`, so the adaptive relay has handed
    // the connection to the kernel by then.
    let (head, rest) = message.wire.split_at(300_000);
    client.stream.write_all(head)?;
    let (index, pid) = session_owner(postfixes, ip)?;
    // Let the head reach smtpd, so the kill is in the middle of DATA, not before it.
    thread::sleep(Duration::from_millis(300));
    kill(postfixes[index], pid)?;
    let seen = finish_data(&mut client, rest);
    Ok((seen, client, index))
}

/// Postfix dies in the middle of DATA, first one smtpd (the master lives on and spawns
/// another), then a whole instance (master and all). Expected each time: the client gets
/// no reply to its closing dot; its connection is reset (the smtpd socket closes with
/// unread data, which is a reset; the daemon passes a server reset on as a reset). The
/// daemon logs the session as `ended=server-reset`, the message is not delivered, health
/// checks take the dead instance DOWN, mail goes on to the other one, and nothing leaks.
fn postfix_killed_mid_data_gets_no_250(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    let first = PostfixInstance::start(&[SmtpdService::with_proxy("mail1", free_addr())])?;
    let second = PostfixInstance::start(&[SmtpdService::with_proxy("mail2", free_addr())])?;
    let postfixes = [&first, &second];
    let servers = [
        ServerEntry {
            name: "mail1",
            addr: first.services()[0].addr,
            send_proxy: "v1",
        },
        ServerEntry {
            name: "mail2",
            addr: second.services()[0].addr,
            send_proxy: "v2",
        },
    ];
    let listen = free_addr();
    let stats = free_addr();
    let pins = pin_path(&format!("chaos-kill-{relay:?}"));
    let text = config_with_listener_keys(relay, &pins, listen, &servers, CHECK_KEYS);
    let mxlb = Mxlb::start(&with_stats(&text, stats, None), listen, &pins)?;
    let idle_fds = idle_fd_count(&mxlb, Duration::from_secs(1))?;

    let mut killed_subjects = Vec::new();
    for (step, whole_instance) in [(1u8, false), (2, true)] {
        let ip = client_ip(relay, step);
        let message = Message::new(
            &format!("chaos kill {relay:?} step {step}"),
            u64::from(step),
            600_000,
        );
        let (seen, client, index) = kill_in_data(listen, ip, &message, &postfixes, |p, pid| {
            if whole_instance {
                kill_postfix_instance(p)
            } else {
                kill_and_wait(pid)
            }
        })?;
        let what = if whole_instance {
            "Postfix instance"
        } else {
            "smtpd"
        };
        eprintln!("[{relay:?}] {what} killed in DATA: the client saw {seen:?}");
        let finished = mxlb.finished_for(client.local_addr()?, Duration::from_secs(20))?;
        eprintln!("[{relay:?}] {}", finished.line);
        ensure!(
            matches!(seen, Seen::Closed | Seen::Reset),
            "{what} killed in DATA: expected the connection to end without a reply, the \
             client saw {seen:?}"
        );
        ensure!(finished.ended == "server-reset", "{}", finished.line);
        ensure!(finished.bytes_in >= 300_000, "{}", finished.line);
        killed_subjects.push((message.subject.clone(), index));
        drop(client);

        if whole_instance {
            // The dead instance goes DOWN on its checks; the other stays UP.
            let dead = ["mail1", "mail2"][index];
            mxlb.wait_for_log_count(
                &format!("server smtp/{dead} is DOWN"),
                1,
                Duration::from_secs(10),
            )?;
            let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
            let status = &server(&snapshot, "smtp", dead)?["status"];
            ensure!(status == "DOWN", "{dead}: {snapshot}");
            let alive = ["mail1", "mail2"][1 - index];
            ensure!(
                server(&snapshot, "smtp", alive)?["status"] == "UP",
                "{snapshot}"
            );
        }
    }

    // Mail goes on: a whole message through the daemon is delivered, intact, by an
    // instance that is alive.
    let living = postfixes
        .iter()
        .position(|p| mxlb_tests::chaos::process_alive(master_pid(p)))
        .context("no Postfix instance left")?;
    let after = Swaks::send(
        listen,
        client_ip(relay, 9),
        "user@example.test",
        &format!("chaos kill {relay:?} after"),
        None,
    )?;
    after.ensure_success()?;
    let messages = postfixes[living].wait_for_messages(1, Duration::from_secs(30))?;
    ensure!(
        messages.len() == 1 && messages[0].body_intact(),
        "expected only the message sent after the kills: {:?}",
        messages.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    // Neither killed message was delivered (the living instance has delivered everything
    // it accepted by now; the dead one took nothing whole).
    for (subject, index) in &killed_subjects {
        ensure!(
            !delivered(postfixes[*index], subject)?,
            "{subject} was delivered after its smtpd was killed"
        );
    }
    ensure!(daemon_alive(&mxlb), "the daemon died:\n{}", mxlb.log());
    wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
    let status = mxlb.stop()?;
    ensure!(status.success(), "mxlb exited with {status}");
    ensure!(
        !pins.exists(),
        "pins left at {} after a clean stop",
        pins.display()
    );
    eprintln!("[{relay:?}] kill in DATA: {:?}", started.elapsed());
    Ok(())
}

fn master_pid(postfix: &PostfixInstance) -> i32 {
    std::fs::read_to_string(postfix.dir().join("queue/pid/master.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(-1)
}

/// What a client relayed to each kind of bad backend sees (checks off, so mxlb sends it
/// there), then the same backends with health checks: all DOWN, and a client gets mxlb's
/// `421` at once.
///
/// - Silent (accepts, never speaks): nothing, then an orderly close at `timeout_idle`
///   (1 s); logged `ended=idle-timeout`.
/// - Garbage: exactly the backend's bytes (mxlb is a byte relay and does not judge
///   them); the client, like any SMTP sender, takes them for a broken server and closes;
///   logged `ended=closed`.
/// - Reset after the banner: the banner, then a reset from the kernel relay, an orderly
///   close from the user-space relay (see `expected` below); logged `ended=server-reset`.
fn bad_backends_give_clients_a_close_then_go_down(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    let kinds = [BadKind::Silent, BadKind::Garbage, BadKind::ResetAfterBanner];
    let backends: Vec<BadBackend> = kinds
        .iter()
        .map(|&kind| BadBackend::start(kind))
        .collect::<Result<_>>()?;

    for backend in &backends {
        let listen = free_addr();
        let pins = pin_path(&format!("chaos-bad-{relay:?}-{:?}", backend.kind));
        let entry = ServerEntry {
            name: "bad",
            addr: backend.addr,
            send_proxy: "v1",
        };
        let text =
            config_with_listener_keys(relay, &pins, listen, &[entry], "timeout_idle = \"1s\"\n");
        let mxlb = Mxlb::start(&text, listen, &pins)?;
        let idle_fds = mxlb.fd_count()?;
        let mut client = TcpStream::connect(listen)?;
        client.set_read_timeout(Some(Duration::from_secs(20)))?;
        let (bytes, seen, ended) = match backend.kind {
            BadKind::Silent => {
                let (bytes, seen) = read_all_seen(&mut client);
                (bytes, seen, "idle-timeout")
            }
            BadKind::Garbage => {
                let mut bytes = vec![0u8; garbage().len()];
                client.read_exact(&mut bytes)?;
                // What a sender does with a greeting that is no SMTP: give up and close.
                client.shutdown(std::net::Shutdown::Write)?;
                let (more, seen) = read_all_seen(&mut client);
                bytes.extend_from_slice(&more);
                (bytes, seen, "closed")
            }
            BadKind::ResetAfterBanner => {
                let (bytes, seen) = read_all_seen(&mut client);
                (bytes, seen, "server-reset")
            }
        };
        let expected: (Vec<u8>, Seen) = match backend.kind {
            BadKind::Silent => (Vec::new(), Seen::Closed),
            BadKind::Garbage => (garbage(), Seen::Closed),
            // The kernel relay passes a reset on as a reset; the user-space relay (where
            // an adaptive connection still is after 37 bytes) closes the client's side
            // with a FIN. Either way the sender retries.
            BadKind::ResetAfterBanner if relay == RelayKind::Kernel => {
                (RESET_BANNER.to_vec(), Seen::Reset)
            }
            BadKind::ResetAfterBanner => (RESET_BANNER.to_vec(), Seen::Closed),
        };
        eprintln!(
            "[{relay:?}] {:?} backend: the client got {} bytes, then {seen:?}",
            backend.kind,
            bytes.len()
        );
        ensure!(
            (bytes.as_slice(), &seen) == (expected.0.as_slice(), &expected.1),
            "{:?} backend: expected {} bytes then {:?}, got {} bytes ({:?}) then {seen:?}",
            backend.kind,
            expected.0.len(),
            expected.1,
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        let finished = mxlb.finished_for(client.local_addr()?, Duration::from_secs(20))?;
        eprintln!("[{relay:?}] {}", finished.line);
        ensure!(finished.ended == ended, "{}", finished.line);
        drop(client);
        ensure!(daemon_alive(&mxlb), "the daemon died:\n{}", mxlb.log());
        wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
        ensure!(mxlb.stop()?.success());
    }

    // The same three behind one listener with health checks: all go DOWN, and then a
    // client is told 421 by mxlb itself, never relayed to them.
    let names = ["silent", "garbage", "reset"];
    let entries: Vec<ServerEntry<'_>> = backends
        .iter()
        .zip(names)
        .map(|(backend, name)| ServerEntry {
            name,
            addr: backend.addr,
            send_proxy: "v1",
        })
        .collect();
    let listen = free_addr();
    let stats = free_addr();
    let pins = pin_path(&format!("chaos-bad-checked-{relay:?}"));
    let text = config_with_listener_keys(relay, &pins, listen, &entries, CHECK_KEYS);
    let mxlb = Mxlb::start(&with_stats(&text, stats, None), listen, &pins)?;
    for name in names {
        mxlb.wait_for_log_count(
            &format!("server smtp/{name} is DOWN"),
            1,
            Duration::from_secs(15),
        )?;
    }
    let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
    for (name, check) in names.into_iter().zip(["L7TOUT", "L7RSP", "L7RSP"]) {
        let entry = server(&snapshot, "smtp", name)?;
        eprintln!(
            "[{relay:?}] {name}: {} {}",
            entry["status"], entry["check_status"]
        );
        ensure!(entry["status"] == "DOWN", "{name}: {entry}");
        ensure!(
            entry["check_status"]
                .as_str()
                .is_some_and(|status| status.starts_with(check)),
            "{name}: expected {check}: {entry}"
        );
    }
    // A check of the silent server holds its socket for its whole 1 s timeout.
    let idle_fds = idle_fd_count(&mxlb, Duration::from_millis(2500))?;
    let mut client =
        SmtpClient::connect_from(listen, client_ip(relay, 20), Duration::from_secs(20))?;
    let seen = client.seen();
    ensure!(
        matches!(&seen, Seen::Reply(421, text) if text.contains("no mail server available")),
        "expected mxlb's 421, got {seen:?}"
    );
    let (rest, end) = read_all_seen(&mut client.stream);
    ensure!(
        rest.is_empty() && end == Seen::Closed,
        "after the 421: {rest:?} {end:?}"
    );
    // The client was not relayed, as the log says: no `connection finished` line, one
    // 421 line.
    // (The log is read from the daemon's stderr by a thread: wait for the line.)
    let refused = mxlb.wait_for_log_count(
        "no server available: replied 421",
        1,
        Duration::from_secs(5),
    )?;
    ensure!(refused.len() == 1, "{}", mxlb.log());
    ensure!(
        mxlb.finished()?.is_empty(),
        "a client was relayed to a DOWN server:\n{}",
        mxlb.log()
    );
    drop(client);
    wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
    ensure!(mxlb.stop()?.success());
    eprintln!("[{relay:?}] bad backends: {:?}", started.elapsed());
    Ok(())
}

/// Where in its life a storm client resets.
#[derive(Clone, Copy, Debug)]
enum ResetAt {
    /// Right after connect: before the banner, usually before mxlb has connected to the
    /// server or sent the PROXY header.
    Connect,
    /// After reading the banner.
    Banner,
    /// With the banner unread and bytes sent: the reset leaves data on both sides.
    Unread,
    /// In the middle of a 256 KiB transfer (with `Kernel`, in the kernel relay).
    MidTransfer,
}

const STORM_CLIENTS: usize = 160;
const BANNER: &str = "220 storm.test ESMTP\r\n";

/// Many clients that connect and reset (SO_LINGER 0) at every point of a session, four
/// at a time. Expected: the daemon survives, logs every session as `ended=client-reset`,
/// warns of nothing, counts no integrity error, gives back every descriptor and map entry,
/// and relays the next client's 1 MiB byte for byte.
fn rst_storm_leaves_nothing_behind(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    // The backend greets, digests whatever comes until EOF or reset, reports the digest
    // and sends a farewell.
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(BANNER.as_bytes())?;
        let digest = digest_until_eof(&mut stream)?;
        stream.write_all(b"221 bye\r\n")?;
        Ok(digest)
    })?;
    let listen = free_addr();
    let pins = pin_path(&format!("chaos-storm-{relay:?}"));
    let entry = ServerEntry {
        name: "sink",
        addr: backend.addr,
        send_proxy: "v2",
    };
    let mxlb = Mxlb::start(
        &config_with_listener_keys(relay, &pins, listen, &[entry], ""),
        listen,
        &pins,
    )?;
    let idle_fds = mxlb.fd_count()?;

    let (errors_to, errors) = mpsc::channel::<String>();
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let errors_to = errors_to.clone();
            thread::spawn(move || {
                for i in 0..STORM_CLIENTS / 4 {
                    let at = [
                        ResetAt::Connect,
                        ResetAt::Banner,
                        ResetAt::Unread,
                        ResetAt::MidTransfer,
                    ][(worker + i) % 4];
                    if let Err(error) = storm_client(listen, at, (worker * 1000 + i) as u64) {
                        let _ = errors_to.send(format!("{at:?}: {error:#}"));
                    }
                }
            })
        })
        .collect();
    drop(errors_to);
    for worker in workers {
        worker.join().expect("storm worker");
    }
    let errors: Vec<String> = errors.iter().collect();
    ensure!(errors.is_empty(), "storm clients failed: {errors:?}");

    ensure!(daemon_alive(&mxlb), "the daemon died:\n{}", mxlb.log());
    wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
    // The line comes after the session closed its sockets: wait for it, not only for the
    // descriptors.
    let finished = mxlb.wait_finished(STORM_CLIENTS, Duration::from_secs(10))?;
    let mut endings = std::collections::BTreeMap::<String, usize>::new();
    for f in &finished {
        *endings.entry(f.ended.clone()).or_default() += 1;
    }
    eprintln!(
        "[{relay:?}] storm of {STORM_CLIENTS} resetting clients: {} sessions logged, endings {endings:?}",
        finished.len()
    );
    // Every client was accepted and is logged as what it did: a client reset. Before the
    // fixes this found, clients gone before their PROXY header was written were logged as
    // `internal-error` with a `relay failed` warning, and (adaptive relay) clients that
    // reset just before the hand-over to the kernel as `integrity-error`.
    ensure!(
        finished.len() == STORM_CLIENTS,
        "{} sessions logged for {STORM_CLIENTS} clients",
        finished.len()
    );
    let unexpected: Vec<&str> = finished
        .iter()
        .filter(|f| f.ended != "client-reset")
        .map(|f| f.line.as_str())
        .collect();
    ensure!(
        unexpected.is_empty(),
        "unexpected endings:\n{}",
        unexpected.join("\n")
    );
    let warnings = mxlb.log_lines("relay failed");
    ensure!(warnings.is_empty(), "{}", warnings.join("\n"));

    // Still relaying, byte for byte.
    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    ensure!(read_line(&mut client)? == BANNER);
    let sent = send_pattern(&mut client, 77, 1 << 20)?;
    client.shutdown(std::net::Shutdown::Write)?;
    let mut farewell = String::new();
    client.read_to_string(&mut farewell)?;
    ensure!(farewell == "221 bye\r\n", "{farewell:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match backend.next_report(Duration::from_secs(5)) {
            Ok(digest) if digest == sent => break,
            // Reports of storm sessions that ended late.
            Ok(_) | Err(_) if Instant::now() < deadline => {}
            other => bail!("the backend never got the 1 MiB after the storm: {other:?}"),
        }
    }
    ensure!(sent == pattern_digest(77, 1 << 20));
    drop(client);
    wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
    ensure!(mxlb.stop()?.success());
    eprintln!("[{relay:?}] storm: {:?}", started.elapsed());
    Ok(())
}

fn storm_client(listen: SocketAddr, at: ResetAt, seed: u64) -> Result<()> {
    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    match at {
        ResetAt::Connect => {}
        ResetAt::Banner => {
            ensure!(read_line(&mut client)? == BANNER);
        }
        ResetAt::Unread => {
            client.write_all(b"EHLO storm.example.test\r\n")?;
        }
        ResetAt::MidTransfer => {
            ensure!(read_line(&mut client)? == BANNER);
            send_pattern(&mut client, seed, 256 << 10)?;
        }
    }
    reset(client);
    Ok(())
}
