//! Chaos on the daemon itself, in each relay (`Kernel`: sockmap with
//! `kernel_relay_after = 0`; `Adaptive`: sockmap with the default hand-over after 32 KiB;
//! `UserSpace`), with real Postfix behind it.
//!
//! - SIGKILL in the middle of DATA, then a start over the same `pin_path`: the client gets
//!   no reply and its connection ends, Postfix delivers nothing of it; the new daemon
//!   replaces the dead one's pins, the kernel frees the dead one's program and maps, and
//!   after a transfer through the new daemon no pin, map entry or descriptor is left over.
//! - SIGTERM with sessions open: the listener closes at once (a new connect is refused), a
//!   transfer that completes within `grace` is delivered whole, a stalled one is cut when
//!   `grace` is over, and the daemon exits 0 saying so.
//! - A transfer busy all the time and longer than `timeout_idle` is not cut; in the kernel
//!   relay the daemon sees that activity only through the kernel's counters.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, Pattern, digest_until_eof, pattern_digest, read_line,
};
use mxlb_tests::chaos::{
    Message, PINS, Seen, SmtpClient, delivered, finish_data, kernel_object_exists, pinned_id,
    pinned_key_counts, pins_under, process_alive, read_all_seen, wait_until_clean, write_paced,
};
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config, config_with_listener_keys, log_text, pin_path,
    session_lines,
};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, is_listening, wait_until};

mxlb_tests::for_each_relay!(
    sigkill_mid_data_then_restart_over_the_pins,
    sigterm_finishes_within_grace_and_cuts_the_rest,
    busy_transfer_outlives_timeout_idle,
);

/// This file's block of client addresses (see `mxlb_tests::chaos::client_ip`).
fn client_ip(relay: RelayKind, step: u8) -> IpAddr {
    mxlb_tests::chaos::client_ip(40, relay, step)
}

/// One Postfix smtpd (PROXY v1) and its server entry.
fn postfix_backend() -> Result<(PostfixInstance, ServerEntry<'static>)> {
    let postfix = PostfixInstance::start(&[SmtpdService::with_proxy("mail1", free_addr())])?;
    let entry = ServerEntry {
        name: "mail1",
        addr: postfix.services()[0].addr,
        send_proxy: "v1",
    };
    Ok((postfix, entry))
}

fn signal(mxlb: &Mxlb, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(mxlb.pid() as libc::pid_t, signal);
    }
}

/// Waits until Postfix has logged the end of the session from `ip` (`disconnect from`).
fn wait_session_end(postfix: &PostfixInstance, ip: IpAddr) -> Result<()> {
    let needle = format!("disconnect from unknown[{ip}]");
    postfix.wait_for_log(&needle, Duration::from_secs(20), |log| {
        log.contains(&needle)
    })
}

/// Kernel ids of a daemon's pinned program and maps, by pin name.
fn pinned_ids(pins: &Path) -> Result<Vec<(&'static str, &'static str, u64)>> {
    PINS.iter()
        .map(|&name| {
            let kind = if name == "mxlb_verdict" {
                "prog"
            } else {
                "map"
            };
            Ok((name, kind, pinned_id(kind, &pins.join(name))?))
        })
        .collect()
}

/// The daemon is SIGKILLed while a client is in the middle of DATA. Expected: the client
/// gets no reply to its closing dot, its connection ends (closed or reset, asserted and
/// printed), and Postfix, which saw its connection end in the middle of DATA, delivers
/// nothing. The pins stay behind (a killed daemon cannot remove them), with no socket left
/// in the sockhashes (the kernel unlinks a socket when it closes). A new daemon on the
/// same configuration starts over them (logging each replaced pin), the kernel frees the
/// dead daemon's program and maps once their pins are gone, the new daemon carries a
/// message whole, and afterwards its pins are exactly the documented set, its maps are
/// empty and its descriptors back to idle; a clean stop removes the pins.
fn sigkill_mid_data_then_restart_over_the_pins(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    let (postfix, entry) = postfix_backend()?;
    let listen = free_addr();
    let pins = pin_path(&format!("chaos-sigkill-{relay:?}"));
    let text = config(relay, &pins, listen, &[entry]);
    let first = Mxlb::start(&text, listen, &pins)?;
    let old_ids = if relay.is_kernel() {
        pinned_ids(&pins)?
    } else {
        Vec::new()
    };

    let ip = client_ip(relay, 1);
    let message = Message::new(&format!("chaos sigkill {relay:?}"), 11, 600_000);
    let mut client = SmtpClient::connect_from(listen, ip, Duration::from_secs(30))?;
    client.start_data("user@example.test")?;
    let (head, rest) = message.wire.split_at(300_000);
    client.stream.write_all(head)?;
    thread::sleep(Duration::from_millis(300));
    signal(&first, libc::SIGKILL);
    let pid = first.pid() as i32;
    wait_until(
        "the daemon to die",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || Ok((!process_alive(pid)).then_some(())),
    )?;
    let seen = finish_data(&mut client, rest);
    eprintln!("[{relay:?}] daemon SIGKILLed in DATA: the client saw {seen:?}");
    ensure!(
        matches!(seen, Seen::Closed | Seen::Reset),
        "expected the connection to end without a reply, the client saw {seen:?}"
    );
    drop(client);
    wait_session_end(&postfix, ip)?;
    let lost = postfix
        .maillog()
        .lines()
        .filter(|line| line.contains("lost connection after DATA"))
        .count();
    ensure!(lost == 1, "Postfix:\n{}", postfix.maillog());
    drop(first);

    if relay.is_kernel() {
        ensure!(pins_under(&pins)? == PINS, "{:?}", pins_under(&pins)?);
        let left = pinned_key_counts(&pins)?;
        eprintln!("[{relay:?}] entries in the dead daemon's maps: {left:?}");
        for (map, count) in &left {
            if matches!(*map, "mxlb_socks" | "mxlb_peers") {
                ensure!(*count == 0, "{count} sockets left in {map}");
            }
        }
    }

    // Started again, same configuration, same pins.
    let second = Mxlb::start(&text, listen, &pins)?;
    if relay.is_kernel() {
        let replaced = second
            .log_lines("removing a pin left by an earlier run")
            .len();
        ensure!(
            replaced == PINS.len(),
            "{replaced} pins replaced:\n{}",
            second.log()
        );
        ensure!(pins_under(&pins)? == PINS, "{:?}", pins_under(&pins)?);
        let new_ids = pinned_ids(&pins)?;
        for ((name, kind, old), (_, _, new)) in old_ids.iter().zip(&new_ids) {
            ensure!(old != new, "{name}: still {kind} {old}");
            wait_until(
                &format!("the kernel to free the dead daemon's {name} ({kind} {old})"),
                Duration::from_secs(10),
                Duration::from_millis(50),
                || Ok((!kernel_object_exists(kind, *old)?).then_some(())),
            )?;
        }
    }
    let idle_fds = second.fd_count()?;
    let after = Swaks::send(
        listen,
        client_ip(relay, 2),
        "user@example.test",
        &format!("chaos sigkill {relay:?} after"),
        None,
    )?;
    after.ensure_success()?;
    let messages = postfix.wait_for_messages(1, Duration::from_secs(30))?;
    ensure!(
        messages.len() == 1 && messages[0].body_intact(),
        "expected only the message sent after the restart: {:?}",
        messages.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    ensure!(!delivered(&postfix, &message.subject)?);
    wait_until_clean(&second, idle_fds, relay.is_kernel())?;
    if relay.is_kernel() {
        ensure!(pins_under(&pins)? == PINS, "{:?}", pins_under(&pins)?);
    }
    ensure!(second.stop()?.success());
    ensure!(!pins.exists(), "a clean stop removes the pins");
    eprintln!("[{relay:?}] sigkill and restart: {:?}", started.elapsed());
    Ok(())
}

const GRACE: Duration = Duration::from_secs(6);

/// SIGTERM with two sessions in DATA: one whose sender goes on paced for ~1.5 s, one that
/// stalls (`grace` = 6 s). Expected: the listener closes at once (a new connect is refused while the
/// sessions still run); the first finishes within `grace`: 250, QUIT answered, the
/// message delivered whole; the second is still open then, and is cut when `grace` is
/// over: its connection ends without a reply, Postfix delivers nothing of it. The daemon
/// logs the cut (`grace period over`, 1 session) and `stopped`, exits 0, and (kernel
/// relay) removes its pins.
fn sigterm_finishes_within_grace_and_cuts_the_rest(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    let (postfix, entry) = postfix_backend()?;
    let listen = free_addr();
    let pins = pin_path(&format!("chaos-sigterm-{relay:?}"));
    let (entry_name, entry_addr) = (entry.name, entry.addr);
    let text = config(relay, &pins, listen, &[entry]).replace(
        "grace = \"2s\"",
        &format!("grace = \"{}s\"", GRACE.as_secs()),
    );
    ensure!(
        text.contains(&format!("grace = \"{}s\"", GRACE.as_secs())),
        "{text}"
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;

    let finishing = Message::new(&format!("chaos sigterm {relay:?} finishing"), 21, 600_000);
    let stalled = Message::new(&format!("chaos sigterm {relay:?} stalled"), 22, 600_000);
    let (finishing_ip, stalled_ip) = (client_ip(relay, 1), client_ip(relay, 2));
    let mut first = SmtpClient::connect_from(listen, finishing_ip, Duration::from_secs(30))?;
    first.start_data("user@example.test")?;
    let mut second = SmtpClient::connect_from(listen, stalled_ip, Duration::from_secs(30))?;
    let stalled_client = second.local_addr()?;
    second.start_data("user@example.test")?;
    second.stream.write_all(&stalled.wire[..100_000])?;

    // The first sender goes on, paced: 60 writes of 10 kB, 25 ms apart.
    let wire = finishing.wire.clone();
    let sender = thread::spawn(move || -> Result<(Seen, SmtpClient)> {
        write_paced(&mut first.stream, &wire, 10_000, Duration::from_millis(25))?;
        let seen = finish_data(&mut first, b"");
        Ok((seen, first))
    });
    signal(&mxlb, libc::SIGTERM);
    let sigterm = Instant::now();

    // The listener goes at once; a new client is refused.
    wait_until(
        "the listener to close",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || Ok((!is_listening(listen)?).then_some(())),
    )?;
    let refused = TcpStream::connect_timeout(&listen, Duration::from_secs(5));
    ensure!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connect after SIGTERM: {refused:?}"
    );

    // The paced session finishes whole within grace.
    let (seen, mut first) = sender.join().expect("sender thread")?;
    ensure!(
        matches!(&seen, Seen::Reply(250, _)),
        "the session finishing within grace got {seen:?}"
    );
    first.command("QUIT", 221)?;
    let (rest, end) = read_all_seen(&mut first.stream);
    ensure!(rest.is_empty() && end == Seen::Closed, "{rest:?} {end:?}");
    // The sender closes its side too (until then the session is half open, and the daemon
    // rightly keeps relaying it).
    let client = first.local_addr()?;
    drop(first);
    let finished = mxlb.finished_for(client, Duration::from_secs(5))?;
    ensure!(finished.ended == "closed", "{}", finished.line);
    let finished_within = sigterm.elapsed();

    // The stalled one is still open at that point...
    second.stream.set_nonblocking(true)?;
    let mut byte = [0u8; 1];
    let probe = second.stream.read(&mut byte);
    ensure!(
        matches!(&probe, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the stalled session ended before grace was over: {probe:?}"
    );
    second.stream.set_nonblocking(false)?;
    // ...and is cut when grace is over (the bound only catches a hang).
    let (rest, cut) = read_all_seen(&mut second.stream);
    let cut_after = sigterm.elapsed();
    eprintln!(
        "[{relay:?}] SIGTERM: finishing session done after {finished_within:?}; stalled session \
         saw {cut:?} after {cut_after:?} (grace {GRACE:?})"
    );
    ensure!(
        rest.is_empty() && matches!(cut, Seen::Closed | Seen::Reset),
        "the stalled session: {rest:?} then {cut:?}"
    );
    ensure!(cut_after < GRACE + Duration::from_secs(10), "{cut_after:?}");

    let grace_over = mxlb.wait_for_log_count(
        "grace period over: closing remaining connections",
        1,
        Duration::from_secs(5),
    )?;
    ensure!(
        grace_over.len() == 1 && grace_over[0].contains("sessions=1"),
        "{}",
        mxlb.log()
    );
    // A line for the connection cut, naming its client and server, in its session.
    let cut = mxlb.log_lines("grace period over: connection cut");
    let server_field = format!("server={} server_addr={}", entry_name, entry_addr);
    ensure!(
        cut.len() == 1
            && cut[0].contains(&format!("client={stalled_client} "))
            && cut[0].contains(&server_field),
        "{}",
        mxlb.log()
    );
    let session = log_text(&cut[0], "session")?;
    let accepted = session_lines(&mxlb.log(), session);
    ensure!(
        accepted
            .iter()
            .any(|line| line.contains(&format!("accepted client={stalled_client} "))),
        "the cut line's session is the stalled client's: {accepted:#?}"
    );
    let status = mxlb.stop()?;
    ensure!(status.success(), "mxlb exited with {status}");
    // `stop` consumed the fixture: the log lines are checked through Postfix from here.
    ensure!(!pins.exists(), "the pins are removed on exit");

    let messages = postfix.wait_for_messages(1, Duration::from_secs(30))?;
    ensure!(
        messages.len() == 1
            && messages[0].subject().as_deref() == Some(finishing.subject.as_str())
            && messages[0].body_intact(),
        "expected the finishing message, whole: {:?}",
        messages.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    wait_session_end(&postfix, stalled_ip)?;
    let lost = format!("[{stalled_ip}]");
    ensure!(
        postfix
            .maillog()
            .lines()
            .any(|line| line.contains("lost connection after DATA") && line.contains(&lost)),
        "Postfix:\n{}",
        postfix.maillog()
    );
    ensure!(!delivered(&postfix, &stalled.subject)?);
    eprintln!("[{relay:?}] sigterm: {:?}", started.elapsed());
    Ok(())
}

const IDLE: &str = "timeout_idle = \"2s\"\n";
/// Each direction in turn streams for ~3 s (150 writes of 16 KiB, 20 ms apart), while
/// the other is silent: longer than `timeout_idle` either way.
const PACED_CHUNK: usize = 16 << 10;
const PACED_WRITES: usize = 150;
const PACED_PAUSE: Duration = Duration::from_millis(20);
const BANNER: &[u8] = b"220 busy.test\r\n";

fn paced_pattern(seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PACED_CHUNK * PACED_WRITES];
    Pattern::new(seed).fill(&mut bytes);
    bytes
}

/// `timeout_idle = 2s`, and a connection busy for ~6 s: the client streams for ~3 s, then
/// (after its half-close) the server streams back for ~3 s. Expected: not cut
/// (`ended=closed`), every byte both ways (digests), and in the kernel relay, which
/// carries nearly all of it without the daemon seeing a byte, the daemon judged the
/// activity from the kernel's counters correctly.
fn busy_transfer_outlives_timeout_idle(relay: RelayKind) -> Result<()> {
    let started = Instant::now();
    let backend = Backend::spawn(|mut stream, _| -> Result<Digest256> {
        stream.write_all(BANNER)?;
        let received = digest_until_eof(&mut stream)?;
        write_paced(&mut stream, &paced_pattern(2), PACED_CHUNK, PACED_PAUSE)?;
        Ok(received)
    })?;
    let listen = free_addr();
    let pins = pin_path(&format!("chaos-busy-{relay:?}"));
    let entry = ServerEntry {
        name: "busy",
        addr: backend.addr,
        send_proxy: "v2",
    };
    let text = config_with_listener_keys(relay, &pins, listen, &[entry], IDLE);
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let idle_fds = mxlb.fd_count()?;

    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    ensure!(read_line(&mut client)?.as_bytes() == BANNER);
    write_paced(&mut client, &paced_pattern(1), PACED_CHUNK, PACED_PAUSE)?;
    client.shutdown(Shutdown::Write)?;
    let returned = digest_until_eof(&mut client).context("the server's stream")?;
    let total = (PACED_CHUNK * PACED_WRITES) as u64;
    ensure!(returned == pattern_digest(2, total), "the server's stream");
    let received = backend.next_report(Duration::from_secs(30))?;
    ensure!(received == pattern_digest(1, total), "the client's stream");

    let finished = mxlb.finished_for(client.local_addr()?, Duration::from_secs(10))?;
    eprintln!(
        "[{relay:?}] busy for {:?}: {} (kernel share {:.3})",
        started.elapsed(),
        finished.line,
        finished.kernel_share()
    );
    ensure!(finished.ended == "closed", "{}", finished.line);
    ensure!(
        finished.bytes_in == total && finished.bytes_out == total + BANNER.len() as u64,
        "{}",
        finished.line
    );
    match relay {
        RelayKind::Kernel => ensure!(finished.kernel_share() >= 0.9, "{}", finished.line),
        RelayKind::Adaptive => ensure!(finished.kernel_share() >= 0.5, "{}", finished.line),
        RelayKind::UserSpace => ensure!(finished.kernel_bytes == 0, "{}", finished.line),
    }
    drop(client);
    wait_until_clean(&mxlb, idle_fds, relay.is_kernel())?;
    ensure!(mxlb.stop()?.success());
    Ok(())
}
