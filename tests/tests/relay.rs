//! The relay's contract, against the real daemon, for the kernel relay and the user-space
//! relay alike: every byte arrives in order, half-closes travel both ways, resets close both
//! sides, and nothing (fds, map entries) is left behind.
//!
//! Kernel-relay tests configure `relay = "sockmap"`: the kernel relay must load on these
//! machines, so they fail rather than fall back.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, ProxyInfo, digest_until_eof, pattern_digest, read_line, reset, send_pattern,
};
use mxlb_tests::mxlb::{
    Finished, Mxlb, RelayKind, ServerEntry, log_field, log_text, pin_path, with_global_keys,
};

const MIB: u64 = 1024 * 1024;
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

mxlb_tests::for_each_relay!(
    large_message_arrives_intact,
    server_half_closes_first,
    client_reset_closes_both_sides,
    server_reset_closes_both_sides,
    server_closing_after_banner_loses_nothing,
    client_talking_first_arrives_in_order,
    silent_client_is_closed_at_the_idle_timeout,
    connect_timeout_fires_and_the_client_gets_421,
);

/// Starts mxlb in front of one backend; returns it with its fd count once idle.
fn start_mxlb(
    test: &str,
    relay: RelayKind,
    backend: SocketAddr,
    send_proxy: &str,
) -> anyhow::Result<(Mxlb, usize)> {
    start_mxlb_with(test, relay, backend, send_proxy, "", &[])
}

/// [`start_mxlb`] with extra `[global]` keys and environment variables.
fn start_mxlb_with(
    test: &str,
    relay: RelayKind,
    backend: SocketAddr,
    send_proxy: &str,
    global_keys: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Mxlb, usize)> {
    let listen = mxlb_tests::free_addr();
    let pins = pin_path(&format!("{test}-{relay:?}"));
    let text = sink_config(relay, &pins, listen, backend, send_proxy, "");
    let text = text.replacen("[global]\n", &format!("[global]\n{global_keys}"), 1);
    let mxlb = Mxlb::start_with_env(&text, listen, &pins, env)?;
    let expected = match relay {
        RelayKind::Kernel | RelayKind::Adaptive => "relay: kernel",
        RelayKind::UserSpace => "relay: user space",
    };
    ensure!(
        mxlb.log().contains(expected),
        "expected {expected:?} in:\n{}",
        mxlb.log()
    );
    let fds = mxlb.fd_count()?;
    Ok((mxlb, fds))
}

/// A configuration with one server, `sink`, and `listener_keys` for the listener.
fn sink_config(
    relay: RelayKind,
    pins: &std::path::Path,
    listen: SocketAddr,
    backend: SocketAddr,
    send_proxy: &str,
    listener_keys: &str,
) -> String {
    mxlb_tests::mxlb::config_with_listener_keys(
        relay,
        pins,
        listen,
        &[ServerEntry {
            name: "sink",
            addr: backend,
            send_proxy,
        }],
        listener_keys,
    )
}

/// The daemon's log line for the connection from `client`.
fn finished_line(mxlb: &Mxlb, client: SocketAddr) -> anyhow::Result<String> {
    Ok(finished(mxlb, client)?.line)
}

/// The daemon's log line for the connection from `client`, parsed.
fn finished(mxlb: &Mxlb, client: SocketAddr) -> anyhow::Result<Finished> {
    mxlb.finished_for(client, REPORT_TIMEOUT)
}

/// A connection that moved fewer bytes than `kernel_relay_after` (32 KiB in full reads):
/// with `kernel_relay_after = 0` (`RelayKind::Kernel`) the kernel carried every byte (no
/// direction can fall `max_inflight` behind with so few); the adaptive relay cannot have
/// handed it over, and the user-space relay never does.
fn assert_short_connection(relay: RelayKind, finished: &Finished) -> anyhow::Result<()> {
    ensure!(
        finished.total() < 32 * 1024,
        "not a short connection: {}",
        finished.line
    );
    match relay {
        RelayKind::Kernel => ensure!(
            finished.kernel_bytes > 0
                && finished.kernel_bytes == finished.total()
                && finished.relay == "kernel",
            "the kernel carried every byte: {}",
            finished.line
        ),
        RelayKind::Adaptive | RelayKind::UserSpace => ensure!(
            finished.kernel_bytes == 0 && finished.relay == "user",
            "relayed in user space: {}",
            finished.line
        ),
    }
    Ok(())
}

fn large_message_arrives_intact(relay: RelayKind) -> anyhow::Result<()> {
    const MESSAGE: u64 = 256 * MIB;
    const REPLY: u64 = MIB;
    // The backend reads everything, then answers with a megabyte of its own and closes.
    let backend = Backend::spawn(|mut stream, info| {
        stream.write_all(b"220 sink ready\r\n")?;
        let received = digest_until_eof(&mut stream)?;
        send_pattern(&mut stream, 2, REPLY)?;
        stream.shutdown(Shutdown::Write)?;
        Ok((received, info))
    })?;
    // Unbounded (max_inflight = 0), to show the pure kernel path: this client can push
    // faster than the backend digests, and with the default bound the connection would
    // leave the kernel once the backend fell 4 MiB behind (memory.rs tests that).
    let (mxlb, idle_fds) = start_mxlb_with(
        "large",
        relay,
        backend.addr,
        "v2",
        "max_inflight = 0\n",
        &[],
    )?;

    let mut client = TcpStream::connect(mxlb.listen)?;
    assert_eq!(read_line(&mut client)?, "220 sink ready\r\n");
    let cpu_before = mxlb.cpu_time()?;
    let started = Instant::now();
    // Two halves with different seeds; the backend digests them as one stream.
    send_pattern(&mut client, 1, MESSAGE / 2)?;
    if relay.is_kernel() {
        // Halfway through, the kernel's own counters show the bytes took the kernel path.
        let entries = mxlb.map_entries("mxlb_traffic")?;
        let redirected = entries.iter().map(|e| e.u64_field(0)).max().unwrap_or(0);
        ensure!(
            redirected >= MESSAGE / 4,
            "mxlb_traffic shows only {redirected} bytes redirected after {} sent: {entries:?}",
            MESSAGE / 2
        );
    }
    send_pattern(&mut client, 3, MESSAGE / 2)?;
    client.shutdown(Shutdown::Write)?;
    let reply = digest_until_eof(&mut client)?;
    let elapsed = started.elapsed();
    let cpu = mxlb.cpu_time()? - cpu_before;

    let (received, info): (Digest256, ProxyInfo) = backend.next_report(REPORT_TIMEOUT)?;
    let expected = two_halves_digest(MESSAGE / 2);
    assert_eq!(
        received, expected,
        "the backend must receive every byte, in order"
    );
    assert_eq!(
        reply,
        pattern_digest(2, REPLY),
        "the client must receive every reply byte"
    );
    assert_eq!(
        info.source,
        client.local_addr()?,
        "PROXY header names the real client"
    );

    let line = finished_line(&mxlb, client.local_addr()?)?;
    assert!(line.contains(&format!("bytes_in={MESSAGE}")), "{line}");
    assert!(
        line.contains(&format!("bytes_out={}", REPLY + 16)),
        "{line}"
    );
    assert!(line.contains("ended=closed"), "{line}");
    let share = cpu.as_secs_f64() / elapsed.as_secs_f64();
    let kernel_bytes = log_field(&line, "kernel_bytes")?;
    let kernel_share = kernel_bytes as f64 / (MESSAGE + REPLY + 16) as f64;
    eprintln!(
        "{relay:?}: {} MiB in {elapsed:?} ({:.0} MiB/s); daemon CPU {cpu:?} = {:.1}% of the \
         transfer; the kernel moved {:.1}% of the bytes",
        MESSAGE / MIB,
        (MESSAGE / MIB) as f64 / elapsed.as_secs_f64(),
        share * 100.0,
        kernel_share * 100.0
    );
    // Paired at once, unbounded: the kernel carried every byte. Adaptive: the banner and
    // the first 32 KiB went through the daemon.
    let path = match relay {
        RelayKind::Kernel => "kernel",
        RelayKind::Adaptive => "user+kernel",
        RelayKind::UserSpace => "user",
    };
    ensure!(log_text(&line, "relay")? == path, "{line}");
    if relay.is_kernel() {
        // The bytes did not pass through the daemon: the kernel's own counters say so, and
        // the daemon's CPU stays a small fraction of the transfer.
        assert!(
            kernel_share >= 0.99,
            "kernel moved only {kernel_bytes} bytes: {line}"
        );
        assert!(
            share < 0.10,
            "daemon used {cpu:?} CPU over a {elapsed:?} kernel-relayed transfer"
        );
    } else {
        assert_eq!(kernel_bytes, 0, "{line}");
    }
    drop(client);
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

/// Digest of pattern seed 1 then pattern seed 3, `half` bytes each, as one stream.
fn two_halves_digest(half: u64) -> Digest256 {
    let mut both = ChainedPatterns::default();
    send_pattern(&mut both, 1, half).expect("sink");
    send_pattern(&mut both, 3, half).expect("sink");
    both.finish()
}

/// A writer that digests everything written to it.
#[derive(Default)]
struct ChainedPatterns {
    hasher: sha2::Sha256,
    bytes: u64,
}

impl Write for ChainedPatterns {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChainedPatterns {
    fn finish(self) -> Digest256 {
        use sha2::Digest;
        Digest256 {
            bytes: self.bytes,
            sha256: self
                .hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }
}

fn server_half_closes_first(relay: RelayKind) -> anyhow::Result<()> {
    const EACH_WAY: u64 = 8 * MIB;
    // The server talks first and half-closes, then still reads what the client sends.
    let backend = Backend::spawn(|mut stream, _| {
        send_pattern(&mut stream, 5, EACH_WAY)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(digest_until_eof(&mut stream)?)
    })?;
    let (mxlb, idle_fds) = start_mxlb("srvhalf", relay, backend.addr, "v1")?;

    let mut client = TcpStream::connect(mxlb.listen)?;
    let from_server = digest_until_eof(&mut client)?;
    assert_eq!(
        from_server,
        pattern_digest(5, EACH_WAY),
        "server's bytes, then its FIN"
    );
    let sent = send_pattern(&mut client, 6, EACH_WAY)?;
    client.shutdown(Shutdown::Write)?;
    let received: Digest256 = backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(
        received, sent,
        "client's bytes after the server's half-close"
    );

    let finished = finished(&mxlb, client.local_addr()?)?;
    let line = &finished.line;
    assert!(line.contains("ended=closed"), "{line}");
    ensure!(
        finished.bytes_in == EACH_WAY && finished.bytes_out == EACH_WAY,
        "{line}"
    );
    eprintln!(
        "{relay:?}: the kernel carried {:.2}% of the bytes",
        finished.kernel_share() * 100.0
    );
    match relay {
        // Paired at once: the kernel carries both directions, the client's 8 MiB after the
        // server's half-close too (the sockets stay paired until both directions are
        // done); measured: every byte. The daemon relays only what a held direction (a
        // reader `max_inflight` behind, on a loaded machine) leaves to it.
        RelayKind::Kernel => ensure!(
            finished.kernel_share() >= 0.5,
            "the kernel carried too little: {line}"
        ),
        // Handed over once the server's stream filled 32 KiB of full reads, with both
        // directions still open.
        RelayKind::Adaptive => ensure!(
            finished.kernel_bytes > 0,
            "the kernel carried nothing: {line}"
        ),
        RelayKind::UserSpace => ensure!(finished.kernel_bytes == 0, "{line}"),
    }
    drop(client);
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

fn client_reset_closes_both_sides(relay: RelayKind) -> anyhow::Result<()> {
    // The server answers, then waits for the session to end and says how it ended: `None`
    // for an EOF, else the error's kind.
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 hello\r\n")?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut sink = Vec::new();
        let ended = stream.read_to_end(&mut sink);
        Ok((sink.len(), ended.err().map(|error| error.kind())))
    })?;
    let (mxlb, idle_fds) = start_mxlb("clireset", relay, backend.addr, "v1")?;

    let mut client = TcpStream::connect(mxlb.listen)?;
    assert_eq!(read_line(&mut client)?, "220 hello\r\n");
    client.write_all(b"EHLO reset.test\r\n")?;
    let client_addr = client.local_addr()?;
    std::thread::sleep(Duration::from_millis(100));
    reset(client);

    let (bytes, ended): (usize, Option<std::io::ErrorKind>) =
        backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(
        bytes,
        "EHLO reset.test\r\n".len(),
        "bytes sent before the reset arrive"
    );
    // A FIN (what mxlb sends today) or a reset both end the server's session; a read
    // timeout means mxlb left the server's side open.
    assert!(
        matches!(ended, None | Some(std::io::ErrorKind::ConnectionReset)),
        "the server's session ended: {ended:?}"
    );
    let finished = finished(&mxlb, client_addr)?;
    assert!(
        finished.line.contains("ended=client-reset"),
        "{}",
        finished.line
    );
    // The banner and the EHLO moved before the reset: with `RelayKind::Kernel`, by the
    // kernel (too few bytes for the adaptive relay to hand over).
    ensure!(
        finished.total() == ("220 hello\r\n".len() + "EHLO reset.test\r\n".len()) as u64,
        "{}",
        finished.line
    );
    assert_short_connection(relay, &finished)?;
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

fn server_reset_closes_both_sides(relay: RelayKind) -> anyhow::Result<()> {
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 about to reset\r\n")?;
        std::thread::sleep(Duration::from_millis(200));
        reset(stream);
        Ok(())
    })?;
    let (mxlb, idle_fds) = start_mxlb("srvreset", relay, backend.addr, "v2")?;

    let mut client = TcpStream::connect(mxlb.listen)?;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    assert_eq!(read_line(&mut client)?, "220 about to reset\r\n");
    backend.next_report(REPORT_TIMEOUT)?;
    // The client's connection ends (FIN or reset), it does not hang.
    let mut rest = Vec::new();
    let ended = client.read_to_end(&mut rest);
    ensure!(
        rest.is_empty(),
        "no bytes after the banner, got {rest:?} ({ended:?})"
    );
    if let Err(error) = &ended {
        ensure!(
            error.kind() != std::io::ErrorKind::WouldBlock
                && error.kind() != std::io::ErrorKind::TimedOut,
            "client was left hanging after the server reset"
        );
    }
    let finished = finished(&mxlb, client.local_addr().context("client address")?)?;
    let line = &finished.line;
    assert!(line.contains("ended=server-reset"), "{line}");
    // The banner moved before the reset (200 ms later, long after the pairing): with
    // `RelayKind::Kernel`, by the kernel.
    ensure!(
        finished.bytes_out == "220 about to reset\r\n".len() as u64 && finished.bytes_in == 0,
        "{line}"
    );
    assert_short_connection(relay, &finished)?;
    drop(client);
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

fn server_closing_after_banner_loses_nothing(relay: RelayKind) -> anyhow::Result<()> {
    const BANNER: &[u8] = b"421 4.3.2 shutting down, closing right away\r\n";
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(BANNER)?;
        Ok(())
        // Dropping the stream closes it right after the banner, with a FIN.
    })?;
    let (mxlb, idle_fds) = start_mxlb("bannerclose", relay, backend.addr, "v1")?;

    for _ in 0..20 {
        let mut client = TcpStream::connect(mxlb.listen)?;
        client.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut received = Vec::new();
        client.read_to_end(&mut received)?;
        assert_eq!(received, BANNER, "the whole banner, then EOF");
        backend.next_report(REPORT_TIMEOUT)?;
    }
    let finished = mxlb.wait_finished(20, REPORT_TIMEOUT)?;
    // A server that closed before its socket was paired is refused by the kernel and the
    // pair is relayed in user space, whole (architecture.md, "A refused socket"); one paired
    // in time has its banner relayed by the kernel. Which of the two happens is a race, so
    // with `RelayKind::Kernel` each banner went one way or the other, never in part.
    for finished in &finished {
        ensure!(
            finished.bytes_out == BANNER.len() as u64 && finished.bytes_in == 0,
            "{}",
            finished.line
        );
        match relay {
            RelayKind::Kernel => ensure!(
                finished.kernel_bytes == 0 || finished.kernel_bytes == finished.bytes_out,
                "the banner went by the kernel or by the daemon, whole: {}",
                finished.line
            ),
            RelayKind::Adaptive | RelayKind::UserSpace => {
                ensure!(finished.kernel_bytes == 0, "{}", finished.line)
            }
        }
    }
    if relay == RelayKind::Kernel {
        let in_kernel = finished.iter().filter(|f| f.kernel_bytes > 0).count();
        eprintln!("{in_kernel} of 20 banners went by the kernel");
    }
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

/// A client that sends before the server's banner (an SMTP "early talker", or pipelining)
/// while pairing is slowed down by fault injection: its bytes pile up in the client socket
/// before the verdict is attached, and must still arrive once each, in order.
fn client_talking_first_arrives_in_order(relay: RelayKind) -> anyhow::Result<()> {
    const EARLY: u64 = 4 * MIB;
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 late banner\r\n")?;
        let received = digest_until_eof(&mut stream)?;
        stream.write_all(format!("250 {}\r\n", received.sha256).as_bytes())?;
        Ok(received)
    })?;
    let (mxlb, idle_fds) = start_mxlb_with(
        "early",
        relay,
        backend.addr,
        "v2",
        "",
        &[("MXLB_FAULT_PAIRING_DELAY_MS", "300")],
    )?;

    let mut client = TcpStream::connect(mxlb.listen)?;
    let mut writer = client.try_clone()?;
    // Paced, so bytes keep arriving while the pairing is paused (a burst would just wait in
    // the receive queue until the pairing is complete).
    let sender = std::thread::spawn(move || -> std::io::Result<Digest256> {
        let sent = send_pattern(&mut Paced(&mut writer), 9, EARLY)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut replies = String::new();
    client.read_to_string(&mut replies)?;
    let sent = sender.join().expect("sender thread")?;
    let received: Digest256 = backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(received, sent, "every early byte arrives, in order");
    assert_eq!(
        replies,
        format!("220 late banner\r\n250 {}\r\n", sent.sha256)
    );

    if relay == RelayKind::Kernel {
        // The early bytes waited in the client socket's queue; attaching the verdict ran it
        // over them. (The adaptive relay hands over only once user space has read the
        // client's queue dry, so it may find nothing queued.)
        let queued = mxlb.log_lines("verdict run over bytes queued before it was attached");
        assert!(
            queued.iter().any(|line| line.contains("side=Client")),
            "the queued early bytes went through the verdict: {queued:?}"
        );
        // The verdict's own diagnostics reach the daemon's log (debug level, via aya-log).
        assert!(
            !mxlb.log_lines("mxlb::ebpf: mxlb: socket").is_empty(),
            "eBPF diagnostics forwarded: {}",
            mxlb.log()
        );
    }
    let finished = finished(&mxlb, client.local_addr()?)?;
    let line = &finished.line;
    assert!(line.contains(&format!("bytes_in={EARLY}")), "{line}");
    eprintln!(
        "{relay:?}: the kernel carried {:.2}% of the bytes",
        finished.kernel_share() * 100.0
    );
    match relay {
        // Paired at once (after the injected delay): the early bytes waited in the
        // client's queue and went through the verdict, and so did the rest (measured:
        // every byte). The daemon relays only what a held direction leaves it, should the
        // backend fall `max_inflight` behind on a loaded machine.
        RelayKind::Kernel => ensure!(
            finished.kernel_share() >= 0.9,
            "the kernel carried too little: {line}"
        ),
        // Handed over after 32 KiB of full reads (plus whatever the delayed pairing let
        // the daemon relay meanwhile): most of the stream went by the kernel.
        RelayKind::Adaptive => ensure!(
            finished.kernel_bytes >= EARLY / 2,
            "the kernel carried too little: {line}"
        ),
        RelayKind::UserSpace => ensure!(finished.kernel_bytes == 0, "{line}"),
    }
    drop(client);
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

/// A writer that sends at most 64 KiB per 10 ms.
struct Paced<'a>(&'a mut TcpStream);

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(10));
        self.0.write(&buf[..buf.len().min(64 * 1024)])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// mxlb in front of `backend` with `timeout_idle = "1s"` and `hostname = "mx.test.example"`.
fn start_with_idle_timeout(
    test: &str,
    relay: RelayKind,
    backend: SocketAddr,
) -> anyhow::Result<Mxlb> {
    let listen = mxlb_tests::free_addr();
    let pins = pin_path(test);
    let text = sink_config(
        relay,
        &pins,
        listen,
        backend,
        "v1",
        "timeout_idle = \"1s\"\n",
    );
    let text = with_global_keys(&text, "hostname = \"mx.test.example\"\n");
    Mxlb::start(&text, listen, &pins)
}

/// A client that never sends anything after the banner is closed at `timeout_idle`. Where
/// the daemon relayed the banner itself (user space, and the adaptive relay before any
/// hand-over), it knows the client waits at a command boundary and tells it
/// `421 4.4.2 <hostname> Error: timeout exceeded` first, as Postfix does; where the kernel
/// relayed it, the daemon knows nothing of the dialogue and says nothing.
fn silent_client_is_closed_at_the_idle_timeout(relay: RelayKind) -> anyhow::Result<()> {
    // The server's side is closed at the idle timeout too, with a FIN (mxlb has read the
    // banner, nothing is left unread): an error here (a reset, a read timeout) fails the
    // report.
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 say something\r\n")?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut sink = Vec::new();
        stream
            .read_to_end(&mut sink)
            .context("the server's side ends with an EOF")?;
        Ok(sink.len())
    })?;
    let mxlb = start_with_idle_timeout(&format!("idle-{relay:?}"), relay, backend.addr)?;
    let idle_fds = mxlb.fd_count()?;
    let mut client = TcpStream::connect(mxlb.listen)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    assert_eq!(read_line(&mut client)?, "220 say something\r\n");
    let mut rest = Vec::new();
    let ended = client.read_to_end(&mut rest);
    let told: &[u8] = match relay {
        RelayKind::Kernel => b"",
        RelayKind::Adaptive | RelayKind::UserSpace => {
            b"421 4.4.2 mx.test.example Error: timeout exceeded\r\n"
        }
    };
    ensure!(
        rest == told && ended.is_ok(),
        "the daemon closed the idle connection after {:?}: {ended:?} {:?}",
        String::from_utf8_lossy(told),
        String::from_utf8_lossy(&rest)
    );
    let received: usize = backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(received, 0);
    let finished = finished(&mxlb, client.local_addr()?)?;
    assert!(
        finished.line.contains("ended=idle-timeout"),
        "{}",
        finished.line
    );
    // Only the banner moved: with `RelayKind::Kernel`, by the kernel.
    ensure!(
        finished.bytes_out == "220 say something\r\n".len() as u64,
        "{}",
        finished.line
    );
    assert_short_connection(relay, &finished)?;
    drop(client);
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}

#[test]
fn idle_client_is_not_told_421_inside_a_line_a_reply_or_data_in_user_space() -> anyhow::Result<()> {
    idle_client_is_not_told_421_inside_a_line_a_reply_or_data(RelayKind::UserSpace)
}

#[test]
fn idle_client_is_not_told_421_inside_a_line_a_reply_or_data_before_the_hand_over()
-> anyhow::Result<()> {
    idle_client_is_not_told_421_inside_a_line_a_reply_or_data(RelayKind::Adaptive)
}

/// Where the idle timeout's `421` could land inside something else, the client is only
/// closed on: a client idle in the middle of its command line, a server idle in the middle
/// of a multi-line reply, a client idle inside DATA (complete lines, no `.` yet), a client
/// waiting for the reply to its command, a client about to start TLS.
fn idle_client_is_not_told_421_inside_a_line_a_reply_or_data(
    relay: RelayKind,
) -> anyhow::Result<()> {
    // The connections come one after the other; each gets its own script.
    let connections = std::sync::atomic::AtomicUsize::new(0);
    let backend = Backend::spawn(move |mut stream, _| {
        match connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => stream.write_all(b"220 mx\r\n")?,
            1 => stream.write_all(b"220-mx says more\r\n")?,
            2 => {
                stream.write_all(b"220 mx\r\n")?;
                ensure!(read_line(&mut stream)? == "DATA\r\n");
                stream.write_all(b"354 go ahead\r\n")?;
            }
            // A command the server takes its time over: its reply, not ours, is due.
            3 => {
                stream.write_all(b"220 mx\r\n")?;
                ensure!(read_line(&mut stream)? == "NOOP\r\n");
            }
            _ => {
                stream.write_all(b"220 mx\r\n")?;
                ensure!(read_line(&mut stream)? == "STARTTLS\r\n");
                stream.write_all(b"220 2.0.0 Ready to start TLS\r\n")?;
            }
        }
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink)?;
        Ok(sink.len())
    })?;
    let mxlb = start_with_idle_timeout(&format!("idle-no-421-{relay:?}"), relay, backend.addr)?;
    let listen = mxlb.listen;
    let cases: [(&str, &str, &[&[u8]]); 5] = [
        ("220 mx\r\n", "", &[b"EHLO exa"]),
        ("220-mx says more\r\n", "", &[]),
        (
            "220 mx\r\n",
            "354 go ahead\r\n",
            &[b"DATA\r\n", b"Subject: idle\r\n\r\nfirst line\r\n"],
        ),
        ("220 mx\r\n", "", &[b"NOOP\r\n"]),
        // After an accepted STARTTLS the stream is TLS: no plain-text line belongs there.
        (
            "220 mx\r\n",
            "220 2.0.0 Ready to start TLS\r\n",
            &[b"STARTTLS\r\n"],
        ),
    ];
    for (banner, reply, sent) in cases {
        let mut client = TcpStream::connect(listen)?;
        client.set_read_timeout(Some(Duration::from_secs(30)))?;
        ensure!(read_line(&mut client)? == banner);
        for (i, bytes) in sent.iter().enumerate() {
            client.write_all(bytes)?;
            if i == 0 && !reply.is_empty() {
                ensure!(read_line(&mut client)? == reply);
            }
        }
        let mut rest = Vec::new();
        let ended = client.read_to_end(&mut rest);
        ensure!(
            rest.is_empty() && ended.is_ok(),
            "after {banner:?}: closed without a reply, got {ended:?} {:?}",
            String::from_utf8_lossy(&rest)
        );
        let finished = finished(&mxlb, client.local_addr()?)?;
        ensure!(
            finished.ended == "idle-timeout" && finished.relay == "user",
            "{}",
            finished.line
        );
        backend.next_report(REPORT_TIMEOUT)?;
    }
    Ok(())
}

/// A server that never answers the SYN (its accept queue is full): the connect gives up at
/// `timeout_connect`, and with no other server the client gets 421 from mxlb.
fn connect_timeout_fires_and_the_client_gets_421(relay: RelayKind) -> anyhow::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(0)?;
    let blackhole = socket.local_addr()?.as_socket().context("inet address")?;
    // Fill the accept queue so further SYNs are dropped.
    let fillers: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&blackhole, Duration::from_millis(200)).ok())
        .collect();
    let listen = mxlb_tests::free_addr();
    let pins = pin_path(&format!("ctimeout-{relay:?}"));
    let text = mxlb_tests::mxlb::config(
        relay,
        &pins,
        listen,
        &[ServerEntry {
            name: "blackhole",
            addr: blackhole,
            send_proxy: "v1",
        }],
    )
    .replace(
        "timeout_connect = \"2s\"",
        "timeout_connect = \"300ms\"\nretries = 1",
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reply = String::new();
    client.read_to_string(&mut reply)?;
    ensure!(reply.starts_with("421 4.3.0 "), "{reply:?}");
    let failures = mxlb.wait_for_log_count("connect to", 2, REPORT_TIMEOUT)?;
    ensure!(
        failures
            .iter()
            .all(|line| line.contains("no answer within 300ms")),
        "{failures:?}"
    );
    drop(fillers);
    Ok(())
}

/// The adaptive policy moves a connection to the kernel for a stream, not for a
/// conversation: 300 request/reply round trips of 1 KiB (300 KiB, far past
/// `kernel_relay_after`) stay in user space, while one 1 MiB burst on the next connection
/// goes to the kernel.
#[test]
fn adaptive_relay_pairs_streams_not_conversations() -> anyhow::Result<()> {
    const ROUND_TRIPS: usize = 300;
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 chatty\r\n")?;
        let mut request = [0u8; 1024];
        let mut received = 0u64;
        loop {
            match stream.read(&mut request)? {
                0 => return Ok(received),
                n => {
                    received += n as u64;
                    // One reply per complete 1 KiB request.
                    if received.is_multiple_of(1024) {
                        stream.write_all(b"250 ok\r\n")?;
                    }
                }
            }
        }
    })?;
    let (mxlb, idle_fds) = start_mxlb("adaptive-policy", RelayKind::Adaptive, backend.addr, "v1")?;

    let mut chatty = TcpStream::connect(mxlb.listen)?;
    chatty.set_read_timeout(Some(REPORT_TIMEOUT))?;
    assert_eq!(read_line(&mut chatty)?, "220 chatty\r\n");
    for _ in 0..ROUND_TRIPS {
        chatty.write_all(&[b'x'; 1024])?;
        assert_eq!(read_line(&mut chatty)?, "250 ok\r\n");
    }
    chatty.shutdown(Shutdown::Write)?;
    let received: u64 = backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(received, (ROUND_TRIPS * 1024) as u64);
    let chatted = finished(&mxlb, chatty.local_addr()?)?;
    ensure!(
        chatted.kernel_bytes == 0 && chatted.relay == "user",
        "a conversation stays in user space: {}",
        chatted.line
    );

    let mut bulky = TcpStream::connect(mxlb.listen)?;
    assert_eq!(read_line(&mut bulky)?, "220 chatty\r\n");
    // Paced like a sender across a network: the hand-over waits for a read that leaves
    // the client's queue whole, and a client that puts its whole message into the socket
    // buffers at once has it read by the daemon in one go before that (relay_until).
    send_pattern(&mut Paced(&mut bulky), 5, MIB)?;
    bulky.shutdown(Shutdown::Write)?;
    let received: u64 = backend.next_report(REPORT_TIMEOUT)?;
    assert_eq!(received, MIB);
    let streamed = finished(&mxlb, bulky.local_addr()?)?;
    // The banner and the first full reads went through the daemon, the rest the kernel.
    ensure!(
        streamed.kernel_bytes > MIB / 2 && streamed.relay == "user+kernel",
        "a stream moves to the kernel: {}",
        streamed.line
    );
    drop((chatty, bulky));
    mxlb.wait_until_clean(idle_fds, true)
}

/// Regression: `relay_until`, the user-space phase of the kernel relay (before the
/// hand-over), awaited a blocked write outside its idle timer, so a server that stopped
/// reading (a zero window) held the session for ever. The kernel relay with
/// `kernel_relay_after = 1GiB` keeps the connection in that phase; the user-space relay is
/// the control.
#[test]
fn zero_window_server_is_closed_at_the_idle_timeout_before_the_hand_over() -> anyhow::Result<()> {
    zero_window_server_is_closed_at_the_idle_timeout(RelayKind::Adaptive)
}

#[test]
fn zero_window_server_is_closed_at_the_idle_timeout_in_user_space() -> anyhow::Result<()> {
    zero_window_server_is_closed_at_the_idle_timeout(RelayKind::UserSpace)
}

/// A server that greets and then never reads, a client that pushes far more than every
/// socket buffer on the way can hold: the daemon's write to the server blocks for good,
/// and `timeout_idle` (2 s) must still end the connection.
fn zero_window_server_is_closed_at_the_idle_timeout(relay: RelayKind) -> anyhow::Result<()> {
    // More than the client's send buffer (tcp_wmem max 4 MiB), the daemon's receive buffer
    // (tcp_rmem max 32 MiB), its send buffer and the server's receive buffer together.
    const PUSHED: u64 = 256 * MIB;
    const DEADLINE: Duration = Duration::from_secs(60);
    // The server keeps its socket open, unread, until the test is over (`done` dropped).
    let (done, over) = std::sync::mpsc::channel::<()>();
    let over = std::sync::Mutex::new(over);
    let backend = Backend::spawn(move |mut stream, _| {
        stream.write_all(b"220 not listening\r\n")?;
        let over = over.lock().unwrap_or_else(|e| e.into_inner());
        let _ = over.recv_timeout(Duration::from_secs(300));
        drop(stream);
        Ok(())
    })?;
    let listen = mxlb_tests::free_addr();
    let pins = pin_path(&format!("zero-window-{relay:?}"));
    let text = mxlb_tests::mxlb::config_with_listener_keys(
        relay,
        &pins,
        listen,
        &[ServerEntry {
            name: "stalled",
            addr: backend.addr,
            send_proxy: "v1",
        }],
        "timeout_idle = \"2s\"\n",
    );
    let text = if relay.is_kernel() {
        // Never handed over: the connection stays in `relay_until` for good.
        mxlb_tests::mxlb::with_global_keys(&text, "kernel_relay_after = \"1GiB\"\n")
    } else {
        text
    };
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let idle_fds = mxlb.fd_count()?;

    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(DEADLINE))?;
    assert_eq!(read_line(&mut client)?, "220 not listening\r\n");
    let mut writer = client.try_clone()?;
    let pusher = std::thread::spawn(move || send_pattern(&mut writer, 77, PUSHED));

    // The daemon ends the connection: the client reads an EOF or a reset, not the timeout.
    let mut rest = Vec::new();
    let ended = client.read_to_end(&mut rest);
    ensure!(
        rest.is_empty()
            && !matches!(&ended, Err(e) if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )),
        "the connection to a zero-window server was not ended within {DEADLINE:?}: \
         {ended:?} {rest:?}\n{}",
        mxlb.log()
    );
    let finished = mxlb.finished_for(client.local_addr()?, DEADLINE)?;
    let line = &finished.line;
    ensure!(finished.ended == "idle-timeout", "{line}");
    // The server stopped taking bytes long before the client was done, and the kernel
    // relay never took the connection over.
    ensure!(
        finished.bytes_in < PUSHED && finished.kernel_bytes == 0,
        "{line}"
    );
    // The client's push fails: the daemon closed the connection under it.
    let deadline = Instant::now() + DEADLINE;
    while !pusher.is_finished() {
        ensure!(Instant::now() < deadline, "the client's write still blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pushed = pusher.join().expect("pusher thread");
    ensure!(pushed.is_err(), "the whole push went through: {pushed:?}");
    drop((client, done));
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())
}
