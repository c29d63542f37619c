//! Upgrades that refuse nobody (`mxlb upgrade`), in each relay, with real Postfix behind
//! the daemon and real clients in front of it.
//!
//! Three back-to-back upgrades while two `smtp-source` loops send one message per session
//! without pause. Before each upgrade a hand-driven client is in the middle of a 24 MiB
//! DATA through the running daemon; the upgrade happens with half of it sent, the rest is
//! sent once the old daemon has said it handed over. Expected:
//! - every `smtp-source` session succeeds: no connect is refused or reset, no message
//!   fails, and messages went on completing during each upgrade;
//! - each large message gets its 250 from the old daemon, which relayed all of it (with
//!   the kernel relay, the kernel carried bytes of it), then exits 0 by itself;
//! - Postfix holds exactly the messages sent, once each, bodies intact;
//! - each new daemon served on the sockets taken over (client listener and stats port),
//!   the pins are the newest daemon's, and after the last one stops no pin is left.
//!
//! Also: `mxlb run` refuses to start while a daemon serves the upgrade socket,
//! `mxlb upgrade` with nobody to take over from exits with an error, binding nothing, and
//! it takes nothing from a socket that another user than root serves.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::chaos::{Message, PINS, Seen, SmtpClient, finish_data, pins_under};
use mxlb_tests::mxlb::http::get_json;
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, binary, config, pin_path, two_proxy_backends, with_stats,
};
use mxlb_tests::postfix::{MAIL_DOMAIN, PostfixInstance};
use mxlb_tests::smtp_source::SmtpSource;
use mxlb_tests::{delivery, free_addr, run_command};

mxlb_tests::for_each_relay!(three_upgrades_under_load);

const UPGRADES: u8 = 3;
/// Concurrent `smtp-source` loops.
const SENDERS: usize = 2;
/// The message in flight across each upgrade.
const LARGE: usize = 24 << 20;
/// Time for everything the old daemon still relays after it handed over.
const GRACE: &str = "60s";

/// This file's block of client addresses (see `mxlb_tests::chaos::client_ip`).
fn client_ip(relay: RelayKind, step: u8) -> IpAddr {
    mxlb_tests::chaos::client_ip(50, relay, step)
}

/// A message one sender loop sent, and whether `smtp-source` said it was accepted.
struct Sent {
    subject: String,
    body: Vec<u8>,
    outcome: Result<(), String>,
}

/// One `smtp-source` loop: a session per message, until `stop`.
fn sender_loop(
    server: SocketAddr,
    relay: RelayKind,
    sender: usize,
    dir: &Path,
    stop: &AtomicBool,
    completed: &AtomicUsize,
) -> Result<Vec<Sent>> {
    let mut sent = Vec::new();
    let path = dir.join(format!("sender-{sender}.eml"));
    while !stop.load(Ordering::Relaxed) {
        let number = sent.len();
        let subject = format!("upgrade {relay:?} sender {sender} message {number}");
        let mut body = Vec::new();
        for line in 0..40 {
            writeln!(
                body,
                "{subject} line {line}: the quick brown fox jumps over the dog"
            )?;
        }
        let mut file = format!(
            "From: <sender@{MAIL_DOMAIN}>\nTo: <user@{MAIL_DOMAIN}>\nSubject: {subject}\n\n"
        )
        .into_bytes();
        file.extend_from_slice(&body);
        std::fs::write(&path, &file)?;
        let mut source = SmtpSource::new(server);
        source.timeout = Duration::from_secs(30);
        let outcome = source
            .send_file(&path)
            .map(|_| ())
            .map_err(|error| format!("{error:#}"));
        completed.fetch_add(1, Ordering::Relaxed);
        sent.push(Sent {
            subject,
            body: SmtpSource::delivered_body(&body),
            outcome,
        });
    }
    Ok(sent)
}

/// `config` with a long grace and `socket` as `global.upgrade_socket`.
fn with_upgrade_socket(config: &str, socket: &Path) -> String {
    config.replace(
        "grace = \"2s\"\n",
        &format!(
            "grace = \"{GRACE}\"\nupgrade_socket = \"{}\"\n",
            socket.display()
        ),
    )
}

fn three_upgrades_under_load(relay: RelayKind) -> Result<()> {
    let (postfix, servers) = two_proxy_backends()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("upgrade.sock");
    let listen = free_addr();
    let stats = free_addr();
    let pins = pin_path(&format!("upgrade-{}", format!("{relay:?}").to_lowercase()));
    let text = with_stats(
        &with_upgrade_socket(&config(relay, &pins, listen, &servers), &socket),
        stats,
        None,
    );
    let mut daemon = Mxlb::start(&text, listen, &pins)?;
    let stats_url = format!("http://{stats}/api/stats");

    refuses_a_second_run(&daemon)?;

    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (stop, completed) = (stop.clone(), completed.clone());
            let dir = dir.path().to_owned();
            thread::spawn(move || sender_loop(listen, relay, sender, &dir, &stop, &completed))
        })
        .collect();

    let mut large = Vec::new();
    let mut during_upgrades = Vec::new();
    for step in 1..=UPGRADES {
        let subject = format!("upgrade {relay:?} large message {step}");
        let message = Message::new(&subject, u64::from(step), LARGE);
        let mut client =
            SmtpClient::connect_from(listen, client_ip(relay, step), Duration::from_secs(60))?;
        let client_addr = client.local_addr()?;
        client.start_data(&format!("user@{MAIL_DOMAIN}"))?;
        let half = message.wire.len() / 2;
        client.stream.write_all(&message.wire[..half])?;

        let before = completed.load(Ordering::Relaxed);
        let next = daemon
            .upgrade()
            .with_context(|| format!("upgrade {step}"))?;
        daemon.wait_for_log_count("upgrade: handed over", 1, Duration::from_secs(10))?;
        next.wait_for_log_count("serving the socket taken over", 1, Duration::from_secs(1))?;
        let answered = get_json(&stats_url).context("the stats port after the upgrade")?;
        ensure!(answered["version"].is_string(), "stats: {answered}");

        // The old daemon still relays the session it accepted.
        let seen = finish_data(&mut client, &message.wire[half..]);
        ensure!(
            matches!(seen, Seen::Reply(250, _)),
            "upgrade {step}: the message in flight got {seen:?}"
        );
        client.command("QUIT", 221)?;
        drop(client);
        let finished = daemon.finished_for(client_addr, Duration::from_secs(10))?;
        ensure!(
            finished.bytes_in >= message.wire.len() as u64,
            "upgrade {step}: the old daemon relayed {} bytes of {}: {}",
            finished.bytes_in,
            message.wire.len(),
            finished.line
        );
        if relay.is_kernel() {
            ensure!(
                finished.kernel_bytes > 0,
                "upgrade {step}: the kernel carried nothing of the message in flight: {}",
                finished.line
            );
        }
        let status = daemon.wait_exit(Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "upgrade {step}: the old daemon exited with {status}"
        );
        ensure!(
            !daemon.log_lines("stopped").is_empty()
                && daemon.log_lines("grace period over").is_empty(),
            "upgrade {step}: the old daemon did not drain cleanly:\n{}",
            daemon.log()
        );
        during_upgrades.push(completed.load(Ordering::Relaxed) - before);
        if relay.is_kernel() {
            ensure!(
                pins_under(&pins)? == PINS,
                "upgrade {step}: pins after the old daemon left: {:?}",
                pins_under(&pins)?
            );
        }
        large.push((subject, message));
        daemon = next;
    }

    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for sender in senders {
        sent.extend(sender.join().expect("sender thread")?);
    }
    let status = daemon.stop()?;
    ensure!(status.success(), "the last daemon exited with {status}");
    ensure!(
        !pins.exists(),
        "pins left after the last daemon stopped: {}",
        pins.display()
    );

    let failed: Vec<String> = sent
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", s.subject))
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} messages failed:\n{}",
        failed.len(),
        sent.len(),
        failed.join("\n")
    );
    println!(
        "{relay:?}: {} messages sent by smtp-source, none failed; completed during each \
         upgrade: {during_upgrades:?}",
        sent.len()
    );
    ensure!(
        during_upgrades.iter().all(|&n| n > 0),
        "no message completed during an upgrade ({during_upgrades:?}): the senders did not \
         overlap the upgrades"
    );
    all_delivered_once(&postfix, &sent, &large)
}

/// Postfix holds each message sent exactly once, body intact, and nothing else.
fn all_delivered_once(
    postfix: &PostfixInstance,
    sent: &[Sent],
    large: &[(String, Message)],
) -> Result<()> {
    let expected = sent.len() + large.len();
    let delivered = postfix.wait_for_messages(expected, Duration::from_secs(60))?;
    let mut by_subject: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for message in &delivered {
        by_subject
            .entry(message.subject().unwrap_or_default())
            .or_default()
            .push(message);
    }
    ensure!(
        delivered.len() == expected && by_subject.len() == expected,
        "sent {expected} messages, Postfix holds {} under {} subjects",
        delivered.len(),
        by_subject.len()
    );
    for message in sent {
        let copies = by_subject
            .get(&message.subject)
            .map_or(&[][..], Vec::as_slice);
        ensure!(
            copies.len() == 1,
            "{}: delivered {} times",
            message.subject,
            copies.len()
        );
        ensure!(
            copies[0].body() == message.body,
            "{}: body changed in transit",
            message.subject
        );
    }
    for (subject, _) in large {
        let copies = by_subject.get(subject).map_or(&[][..], Vec::as_slice);
        ensure!(
            copies.len() == 1,
            "{subject}: delivered {} times",
            copies.len()
        );
        ensure!(
            copies[0].body_intact(),
            "{subject}: body changed in transit"
        );
    }
    Ok(())
}

/// `mxlb run` with the running daemon's configuration stops before binding anything.
fn refuses_a_second_run(daemon: &Mxlb) -> Result<()> {
    let output = run_command(
        Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(daemon.config_path()),
        Duration::from_secs(20),
    )?;
    ensure!(
        !output.status.success() && output.output.contains("already serves upgrades"),
        "a second `mxlb run` was not refused: {output:?}"
    );
    Ok(())
}

/// A user-space configuration whose one server nobody serves (the daemon never gets to
/// use it), and the address it listens on.
fn config_without_backend(test: &str) -> (String, SocketAddr) {
    let listen = free_addr();
    let nobody = ServerEntry {
        name: "mail1",
        addr: free_addr(),
        send_proxy: "v1",
    };
    let text = config(RelayKind::UserSpace, &pin_path(test), listen, &[nobody]);
    (text, listen)
}

/// `mxlb upgrade --config path`, which is expected to exit on its own.
fn run_upgrade(path: &Path) -> Result<mxlb_tests::CommandOutput> {
    run_command(
        Command::new(binary())
            .arg("upgrade")
            .arg("--config")
            .arg(path),
        Duration::from_secs(20),
    )
}

#[test]
fn upgrade_without_a_running_daemon_fails_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("upgrade.sock");
    let (plain, listen) = config_without_backend("upgrade-alone");
    let path = dir.path().join("mxlb.toml");
    std::fs::write(&path, with_upgrade_socket(&plain, &socket))?;
    let output = run_upgrade(&path)?;
    ensure!(
        output.status.code() == Some(1)
            && output.output.contains("no running mxlb to take over from"),
        "`mxlb upgrade` with nobody serving: {output:?}"
    );
    ensure!(!mxlb_tests::is_listening(listen)?, "{listen} was bound");
    ensure!(!socket.exists(), "the upgrade socket was created");

    let without = dir.path().join("without.toml");
    std::fs::write(&without, plain)?;
    let output = run_upgrade(&without)?;
    ensure!(
        output.status.code() == Some(2)
            && output.output.contains("global.upgrade_socket is not set"),
        "`mxlb upgrade` without upgrade_socket: {output:?}"
    );
    Ok(())
}

/// `mxlb upgrade` takes sockets only from root: a socket another user put at the path
/// (here in a directory anyone may write to) is refused before anything is loaded.
#[test]
fn upgrade_takes_nothing_from_a_socket_that_is_not_roots() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let socket = dir.path().join("upgrade.sock");
    let mut squatter = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(
            "import socket, sys, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind(sys.argv[1]); s.listen()\n\
             print('listening', flush=True); time.sleep(60)\n",
        )
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a listener as nobody")?;
    let mut line = String::new();
    BufReader::new(squatter.stdout.take().context("stdout")?).read_line(&mut line)?;
    ensure!(line.trim() == "listening", "the squatter said {line:?}");

    let (plain, listen) = config_without_backend("upgrade-squat");
    let path = dir.path().join("mxlb.toml");
    std::fs::write(&path, with_upgrade_socket(&plain, &socket))?;
    let output = run_upgrade(&path);
    let _ = squatter.kill();
    let _ = squatter.wait();
    let output = output?;
    ensure!(
        output.status.code() == Some(1) && output.output.contains("not by root"),
        "`mxlb upgrade` against a socket of uid 65534: {output:?}"
    );
    ensure!(!mxlb_tests::is_listening(listen)?, "{listen} was bound");
    Ok(())
}

/// A new daemon that fails after it took the sockets (here: its configuration binds an
/// address that something else holds) leaves the old one serving as before: it still
/// accepts, its upgrade socket still answers, and the next upgrade goes through.
#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving() -> Result<()> {
    let (postfix, servers) = two_proxy_backends()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("upgrade.sock");
    let listen = free_addr();
    let pins = pin_path("upgrade-failed");
    let text = with_upgrade_socket(
        &config(RelayKind::UserSpace, &pins, listen, &servers),
        &socket,
    );
    let mut daemon = Mxlb::start(&text, listen, &pins)?;

    let taken = std::net::TcpListener::bind(free_addr())?;
    let busy = taken.local_addr()?;
    let failing = dir.path().join("failing.toml");
    std::fs::write(
        &failing,
        text.replace(
            &format!("bind = [\"{listen}\"]"),
            &format!("bind = [\"{listen}\", \"{busy}\"]"),
        ),
    )?;
    let output = run_command(
        Command::new(binary())
            .arg("upgrade")
            .arg("--config")
            .arg(&failing),
        Duration::from_secs(30),
    )?;
    ensure!(
        output.status.code() == Some(1) && output.output.contains(&busy.to_string()),
        "the failing upgrade: {output:?}"
    );
    daemon.wait_for_log_count("upgrade failed, serving on", 1, Duration::from_secs(10))?;
    ensure!(
        socket.exists(),
        "the failed upgrade took the upgrade socket's path with it"
    );
    delivery::send_round_robin(
        listen,
        &postfix,
        61..=62,
        IpAddr::from([127, 0, 0, 1]),
        false,
    )
    .context("mail through the old daemon after the failed upgrade")?;

    let next = daemon
        .upgrade()
        .context("the upgrade after the failed one")?;
    let status = daemon.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "the old daemon exited with {status}");
    let status = next.stop()?;
    ensure!(status.success(), "the new daemon exited with {status}");
    Ok(())
}
