//! Helpers for the chaos tests (`tests/tests/chaos_*.rs`): a hand-driven SMTP client that
//! can stop in the middle of DATA, what a client saw when the other side went away, the
//! processes to kill (one smtpd session, a whole Postfix instance), misbehaving backends
//! and the daemon's kernel objects after a crash.
//!
//! The rule every chaos test checks: a client gets `250` only for a message the server
//! received whole; anything else ends in a 4xx or a closed/reset connection the sender
//! retries.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::mxlb::{Mxlb, RelayKind};
use crate::postfix::PostfixInstance;

/// What a client saw at the end of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A complete SMTP reply: its code and text (all lines).
    Reply(u16, String),
    /// The connection ended in order (EOF) before a complete reply.
    Closed,
    /// The connection was reset (ECONNRESET, or EPIPE on a write after a reset).
    Reset,
    /// Nothing within the client's read timeout.
    TimedOut,
    /// Bytes that are no SMTP reply (what a sender takes for a broken server).
    NotSmtp(String),
}

impl Seen {
    /// Classifies an I/O result: an EOF or reset is a fact to assert, not a test error.
    pub fn from_io<T>(result: io::Result<T>, ok: impl FnOnce(T) -> Seen) -> Seen {
        match result {
            Ok(value) => ok(value),
            Err(error) => Seen::from_error(&error),
        }
    }

    pub fn from_error(error: &io::Error) -> Seen {
        match error.kind() {
            io::ErrorKind::UnexpectedEof => Seen::Closed,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Seen::Reset,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Seen::TimedOut,
            io::ErrorKind::InvalidData => Seen::NotSmtp(error.to_string()),
            // Any other error is reported as a reset with nothing to tell them apart.
            _ => Seen::Reset,
        }
    }

    /// A positive completion reply (2xx): what a sender takes for "the server has it".
    pub fn is_positive(&self) -> bool {
        matches!(self, Seen::Reply(code, _) if (200..300).contains(code))
    }

    /// What the rule allows for a message the server did not get whole: a 4xx, or the
    /// connection gone (closed or reset).
    pub fn is_retryable_failure(&self) -> bool {
        match self {
            Seen::Reply(code, _) => (400..500).contains(code),
            Seen::Closed | Seen::Reset | Seen::NotSmtp(_) => true,
            Seen::TimedOut => false,
        }
    }
}

/// A hand-driven SMTP client: every step is the test's choice, so it can stop in the
/// middle of DATA, stall, or carry on after the server went away.
pub struct SmtpClient {
    pub stream: TcpStream,
}

impl SmtpClient {
    /// Connects to `server` from `local_ip` (a 127.x address that names this client in the
    /// PROXY header and so in Postfix's log), with a read timeout of `timeout`.
    pub fn connect_from(server: SocketAddr, local_ip: IpAddr, timeout: Duration) -> Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.bind(&SocketAddr::new(local_ip, 0).into())?;
        socket
            .connect_timeout(&server.into(), timeout)
            .with_context(|| format!("connecting to {server} from {local_ip}"))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(SmtpClient { stream })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Reads one (possibly multi-line) reply. An EOF before its last line is
    /// `UnexpectedEof`.
    pub fn reply(&mut self) -> io::Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let line = crate::backend::read_line(&mut self.stream)?;
            if !line.ends_with("\r\n") {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection ended inside a reply: {text}{line:?}"),
                ));
            }
            text.push_str(&line);
            let bytes = line.as_bytes();
            let code = line
                .get(..3)
                .and_then(|code| code.parse::<u16>().ok())
                .filter(|_| bytes.len() >= 5);
            let Some(code) = code else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not an SMTP reply line: {line:?}"),
                ));
            };
            if bytes[3] == b' ' {
                return Ok((code, text));
            }
        }
    }

    /// The next reply as [`Seen`].
    pub fn seen(&mut self) -> Seen {
        Seen::from_io(self.reply(), |(code, text)| Seen::Reply(code, text))
    }

    /// Sends `line` (CRLF added) and reads the reply, which must have code `expect`.
    pub fn command(&mut self, line: &str, expect: u16) -> Result<String> {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .with_context(|| format!("sending {line}"))?;
        let (code, text) = self.reply().with_context(|| format!("reply to {line}"))?;
        ensure!(code == expect, "{line}: expected {expect}, got {text}");
        Ok(text)
    }

    /// Banner, EHLO, MAIL, RCPT, DATA: returns the banner once the server said 354.
    pub fn start_data(&mut self, to: &str) -> Result<String> {
        let (code, banner) = self.reply().context("banner")?;
        ensure!(code == 220, "banner: {banner}");
        self.command("EHLO chaos.example.test", 250)?;
        self.command(
            &format!("MAIL FROM:<chaos@{}>", crate::postfix::MAIL_DOMAIN),
            250,
        )?;
        self.command(&format!("RCPT TO:<{to}>"), 250)?;
        self.command("DATA", 354)?;
        Ok(banner)
    }
}

/// A message for [`SmtpClient`]: headers naming it and the digest of its body, in the
/// form a Maildir stores (LF), and the same on the wire (CRLF).
pub struct Message {
    pub subject: String,
    /// CRLF lines, without the terminating `.` line.
    pub wire: Vec<u8>,
}

impl Message {
    /// `size` bytes of hex body in 76-character lines (no line starts with `.`, so nothing
    /// needs dot-stuffing), content drawn from `seed`.
    pub fn new(subject: &str, seed: u64, size: usize) -> Message {
        let mut raw = vec![0u8; size.div_ceil(2)];
        crate::backend::Pattern::new(seed).fill(&mut raw);
        let hex: Vec<u8> = raw
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .take(size)
            .collect();
        let mut body = Vec::with_capacity(size + size / 76 + 1);
        for line in hex.chunks(76) {
            body.extend_from_slice(line);
            body.push(b'\n');
        }
        let digest = crate::sha256_hex(&body);
        let headers = format!(
            "From: <chaos@example.test>\nTo: <user@example.test>\nSubject: {subject}\n\
             {}: {digest}\n\n",
            crate::swaks::BODY_DIGEST_HEADER
        );
        let mut lf = headers.into_bytes();
        lf.extend_from_slice(&body);
        let mut wire = Vec::with_capacity(lf.len() * 102 / 100);
        for &byte in &lf {
            if byte == b'\n' {
                wire.push(b'\r');
            }
            wire.push(byte);
        }
        Message {
            subject: subject.to_owned(),
            wire,
        }
    }
}

/// A distinct client address per test file (`block`), relay and step, so that Postfix's
/// log names the session: `127.0.{block + 1..3}.{step}`.
pub fn client_ip(block: u8, relay: RelayKind, step: u8) -> IpAddr {
    let relay = match relay {
        RelayKind::Kernel => 1,
        RelayKind::Adaptive => 2,
        RelayKind::UserSpace => 3,
    };
    IpAddr::V4(Ipv4Addr::new(127, 0, block + relay, step))
}

/// Writes `bytes` in `chunk`-sized writes, sleeping `pause` before each: a sender paced
/// like a network link. Stops at the first error.
pub fn write_paced(
    stream: &mut impl Write,
    bytes: &[u8],
    chunk: usize,
    pause: Duration,
) -> io::Result<()> {
    for piece in bytes.chunks(chunk) {
        thread::sleep(pause);
        stream.write_all(piece)?;
    }
    Ok(())
}

/// The end of DATA after `rest` of the message: the rest, the closing dot, and the
/// server's verdict as the client sees it. The message sent so far (with `rest`) ends in
/// CRLF, as [`Message::wire`] does. A write that fails is a reset or close the
/// client saw; then whatever is still readable tells which.
pub fn finish_data(client: &mut SmtpClient, rest: &[u8]) -> Seen {
    let written = client
        .stream
        .write_all(rest)
        .and_then(|()| client.stream.write_all(b".\r\n"));
    match written {
        Ok(()) => client.seen(),
        Err(error) => match client.seen() {
            // A reply that was already on its way (a 4xx or 5xx before the reset) counts.
            reply @ Seen::Reply(..) => reply,
            _ => Seen::from_error(&error),
        },
    }
}

/// Whether `message` (by subject) was delivered to `postfix`'s Maildir.
pub fn delivered(postfix: &PostfixInstance, subject: &str) -> Result<bool> {
    Ok(postfix
        .messages()?
        .iter()
        .any(|m| m.subject().as_deref() == Some(subject)))
}

/// The pid of the smtpd process that serves the session Postfix logged as coming from
/// `client_ip` (the address in the PROXY header): from its
/// `<service>/smtpd[PID]: connect from unknown[IP]` line.
pub fn smtpd_pid_for(postfix: &PostfixInstance, client_ip: IpAddr) -> Result<i32> {
    let needle = format!("connect from unknown[{client_ip}]");
    postfix.wait_for_log(&needle, Duration::from_secs(10), |log| {
        log.contains(&needle)
    })?;
    let log = postfix.maillog();
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(&needle))
        .context("connect line vanished")?;
    let pid = line
        .split_once("/smtpd[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
        .with_context(|| format!("no smtpd pid in {line}"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("smtpd {pid} is not running"))?;
    ensure!(
        exe.ends_with("smtpd"),
        "pid {pid} is {}, not smtpd",
        exe.display()
    );
    Ok(pid)
}

/// SIGKILLs one process and waits until it is gone (or a zombie).
pub fn kill_and_wait(pid: i32) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        bail!("kill {pid}: {}", io::Error::last_os_error());
    }
    crate::wait_until(
        "the killed process to go",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || Ok((!process_alive(pid)).then_some(())),
    )
}

/// Alive and not a zombie.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// SIGKILLs every process of a Postfix instance at once: its master and the master's
/// process group (the master calls setsid(), so the group is the instance's daemons and
/// nothing else). The instance's own stop on drop then finds nothing to stop.
pub fn kill_postfix_instance(postfix: &PostfixInstance) -> Result<()> {
    let pid_file = postfix.dir().join("queue/pid/master.pid");
    let master: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .context("master.pid")?;
    let exe = std::fs::read_link(format!("/proc/{master}/exe"))?;
    ensure!(exe.ends_with("master"), "pid {master} is {}", exe.display());
    let members = group_members(master);
    ensure!(!members.is_empty(), "no process in group {master}");
    // SAFETY: kill has no memory-safety preconditions; a negative pid names the group.
    if unsafe { libc::kill(-master, libc::SIGKILL) } != 0 {
        bail!("kill -{master}: {}", io::Error::last_os_error());
    }
    crate::wait_until(
        "every Postfix process to go",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(members.iter().all(|&pid| !process_alive(pid)).then_some(())),
    )
}

/// Processes whose process group is `group`.
fn group_members(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                    .and_then(|pgrp| pgrp.parse::<i32>().ok())
                    == Some(group)
            })
        })
        .collect()
}

/// The pins a kernel-relay daemon makes under `pin_path`: the program and every map
/// (`balancer_common`'s names).
pub const PINS: [&str; 6] = [
    "mxlb_control",
    "mxlb_events",
    "mxlb_peers",
    "mxlb_socks",
    "mxlb_traffic",
    "mxlb_verdict",
];

/// The kernel-relay maps that hold one entry per relayed socket.
pub const PER_SOCKET_MAPS: [&str; 4] = ["mxlb_socks", "mxlb_peers", "mxlb_traffic", "mxlb_control"];

/// The names under `pin_path`, sorted.
pub fn pins_under(pin_path: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(pin_path)
        .with_context(|| format!("listing {}", pin_path.display()))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

/// The kernel id of a pinned map or program (`bpftool … show pinned`).
pub fn pinned_id(kind: &str, pin: &Path) -> Result<u64> {
    let output = Command::new("bpftool")
        .args(["--json", kind, "show", "pinned"])
        .arg(pin)
        .output()?;
    ensure!(
        output.status.success(),
        "bpftool {kind} show pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    shown["id"]
        .as_u64()
        .with_context(|| format!("no id: {shown}"))
}

/// Whether the kernel still has the map or program with `id` (`bpftool … show id`).
pub fn kernel_object_exists(kind: &str, id: u64) -> Result<bool> {
    let output = Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()?;
    Ok(output.status.success())
}

/// Entries of the per-socket maps of a pin directory, read with bpftool (works for the
/// pins of a dead daemon too).
pub fn pinned_key_counts(pin_path: &Path) -> Result<Vec<(&'static str, usize)>> {
    PER_SOCKET_MAPS
        .iter()
        .map(|&map| {
            let path = pin_path.join(map);
            let output = Command::new("bpftool")
                .args(["--json", "map", "dump", "pinned"])
                .arg(&path)
                .output()?;
            ensure!(
                output.status.success(),
                "bpftool map dump {}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            let entries: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
            Ok((map, entries.len()))
        })
        .collect()
}

/// [`Mxlb::wait_until_clean`], and for the kernel relay `mxlb_control` empty too (the
/// fixture checks the other three maps).
pub fn wait_until_clean(mxlb: &Mxlb, fds: usize, kernel: bool) -> Result<()> {
    mxlb.wait_until_clean(fds, kernel)?;
    if kernel {
        let left = mxlb.map_key_count("mxlb_control")?;
        ensure!(left == 0, "{left} entries left in mxlb_control");
    }
    Ok(())
}

/// Whether the daemon's process still runs (it did not crash).
pub fn daemon_alive(mxlb: &Mxlb) -> bool {
    process_alive(mxlb.pid() as i32)
}

/// How a scripted bad backend misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadKind {
    /// Accepts, reads whatever comes, never writes a byte.
    Silent,
    /// Writes non-SMTP bytes at once, then reads until the peer closes.
    Garbage,
    /// Reads the PROXY header, sends a 220 banner and resets the connection.
    ResetAfterBanner,
}

/// The bytes [`BadKind::Garbage`] sends: binary, no CRLF, nothing like an SMTP reply.
pub fn garbage() -> Vec<u8> {
    let mut bytes = vec![0u8; 1000];
    crate::backend::Pattern::new(0xbad).fill(&mut bytes);
    // Not a reply line: make sure the first three bytes are no digits.
    bytes[0] = 0xff;
    bytes
}

/// The banner [`BadKind::ResetAfterBanner`] sends before its reset.
pub const RESET_BANNER: &[u8] = b"220 reset.test ESMTP about to reset\r\n";

/// A backend that misbehaves as `kind` says on every connection (health checks too).
pub struct BadBackend {
    pub addr: SocketAddr,
    pub kind: BadKind,
    accepted: Arc<AtomicUsize>,
}

impl BadBackend {
    pub fn start(kind: BadKind) -> Result<BadBackend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || misbehave(kind, stream));
            }
        });
        Ok(BadBackend {
            addr,
            kind,
            accepted,
        })
    }

    /// Connections accepted so far (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn misbehave(kind: BadKind, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    match kind {
        BadKind::Silent => {
            let _ = io::copy(&mut stream, &mut io::sink());
        }
        BadKind::Garbage => {
            let _ = stream.write_all(&garbage());
            let _ = io::copy(&mut stream, &mut io::sink());
        }
        BadKind::ResetAfterBanner => {
            if crate::backend::read_proxy_header(&mut stream).is_ok()
                && stream.write_all(RESET_BANNER).is_ok()
            {
                // Let the banner leave before the reset discards the send queue.
                thread::sleep(Duration::from_millis(50));
                crate::backend::reset(stream);
            }
        }
    }
}

/// Reads everything until EOF, a reset or the read timeout: the bytes, and how it ended.
pub fn read_all_seen(stream: &mut TcpStream) -> (Vec<u8>, Seen) {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (bytes, Seen::Closed),
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return (bytes, Seen::from_error(&error)),
        }
    }
}

/// The daemon's descriptor count when idle while health checks come and go (each holds a
/// socket for a moment, a silent server's for the whole check timeout): the least of the
/// counts sampled over `window`, which must cover a pause between two checks.
pub fn idle_fd_count(mxlb: &Mxlb, window: Duration) -> Result<usize> {
    let deadline = std::time::Instant::now() + window;
    let mut least = mxlb.fd_count()?;
    while std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        least = least.min(mxlb.fd_count()?);
    }
    Ok(least)
}
