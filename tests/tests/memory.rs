//! Bounded memory for the kernel relay: a peer that stops reading must not let the other
//! side pile bytes into kernel memory (as the kernel's redirect path alone would: about
//! 1 GiB in two seconds, see ../shared/research/sockmap.md, pitfall 4). The sender is slowed
//! by ordinary TCP flow control, and once the peer reads again every byte arrives, in order.
//!
//! `global.max_inflight` (4 MiB here, the default) bounds what waits between mxlb's two
//! sockets; past it the verdict holds that direction's bytes in the sending socket (TCP
//! closes its window) while the daemon relays what was held, and the kernel resumes once
//! the daemon has caught up (docs/architecture.md, "Bounded memory"). The tests measure the system (MemAvailable)
//! and the sender's progress; they run one at a time, since memory is a machine-wide number.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, PatternCheck, digest_until_eof, pattern_digest, read_line,
};
use mxlb_tests::free_addr;
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, config, pin_path};

const MIB: u64 = 1 << 20;
const PUSH: u64 = 1 << 30;
/// How long the reader stops reading, as in the issue: 10 s.
const STALL: Duration = Duration::from_secs(10);
/// The bound these tests configure (`global.max_inflight`).
const MAX_INFLIGHT: u64 = 4 * MIB;

/// Memory is a machine-wide number: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn mem_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .context("no MemAvailable")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn sysctl_max(name: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))?;
    text.split_whitespace()
        .last()
        .context("empty sysctl")?
        .parse()
        .context("sysctl value")
}

/// What any TCP proxy may hold for one connection whose reader stalls: the relay's own
/// bound plus the socket buffers the kernel grants (two receive and two send buffers on the
/// path: sender, mxlb's two sockets, receiver).
fn per_connection_bound() -> Result<u64> {
    Ok(MAX_INFLIGHT + 2 * sysctl_max("tcp_rmem")? + 2 * sysctl_max("tcp_wmem")?)
}

/// Writes the 1 GiB pattern (seed 7), counting progress as it goes.
fn push(mut stream: impl Write, progress: &AtomicU64) -> std::io::Result<Digest256> {
    struct Counting<'a, W>(W, &'a AtomicU64);
    impl<W: Write> Write for Counting<'_, W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    mxlb_tests::backend::send_pattern(&mut Counting(&mut stream, progress), 7, PUSH)
}

fn start(test: &str, backend: SocketAddr) -> Result<Mxlb> {
    let listen = free_addr();
    let pins = pin_path(test);
    let text = config(
        RelayKind::Kernel,
        &pins,
        listen,
        &[ServerEntry {
            name: "slow",
            addr: backend,
            send_proxy: "v1",
        }],
    )
    .replacen("[global]\n", "[global]\nmax_inflight = \"4MiB\"\n", 1);
    Mxlb::start(&text, listen, &pins)
}

/// Watches the stalled phase: the sender stops (TCP blocks it) well within the bound, and
/// the machine's available memory drops by no more than that.
fn check_stalled(progress: &AtomicU64, before: u64) -> Result<String> {
    let bound = per_connection_bound()?;
    thread::sleep(Duration::from_secs(5));
    let sent_at_5s = progress.load(Ordering::Relaxed);
    let used_at_5s = before.saturating_sub(mem_available()?);
    thread::sleep(Duration::from_secs(4));
    let sent_at_9s = progress.load(Ordering::Relaxed);
    let used_at_9s = before.saturating_sub(mem_available()?);
    let report = format!(
        "sender pushed {} MiB by 5 s and {} MiB by 9 s of the stall; MemAvailable fell by {} \
         then {} MiB; bound {} MiB (max_inflight {} MiB + socket buffers)",
        sent_at_5s / MIB,
        sent_at_9s / MIB,
        used_at_5s / MIB,
        used_at_9s / MIB,
        bound / MIB,
        MAX_INFLIGHT / MIB
    );
    eprintln!("{report}");
    // The bytes the sender got in are exactly what the system holds for this connection (the
    // receiver has read nothing): that is the precise measure. MemAvailable also moves with
    // everything else on the machine, so it only has to stay far from what the unbounded
    // redirect path would take (all of the 1 GiB).
    ensure!(
        sent_at_9s - sent_at_5s < MIB,
        "the sender is not blocked: {report}"
    );
    ensure!(sent_at_9s <= bound, "more than the bound got in: {report}");
    ensure!(
        used_at_9s < PUSH / 4,
        "memory grew as if unbounded: {report}"
    );
    Ok(report)
}

/// Client → server: the backend stops reading for 10 s while the client pushes 1 GiB.
#[test]
fn stalled_backend_bounds_memory_and_loses_nothing() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 slow\r\n")?;
        thread::sleep(STALL);
        Ok(digest_until_eof(&mut stream)?)
    })?;
    let mxlb = start("stall-in", backend.addr)?;
    let mut client = TcpStream::connect(mxlb.listen)?;
    ensure!(read_line(&mut client)? == "220 slow\r\n");

    let before = mem_available()?;
    let progress = Arc::new(AtomicU64::new(0));
    let writer = client.try_clone()?;
    let counter = progress.clone();
    let sender = thread::spawn(move || -> std::io::Result<Digest256> {
        let sent = push(&writer, &counter)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    check_stalled(&progress, before)?;

    let sent = sender.join().expect("sender thread")?;
    let received: Digest256 = backend.next_report(Duration::from_secs(120))?;
    ensure!(
        received == sent,
        "every byte, in order: sent {sent:?}, received {received:?}"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?;
    Ok(())
}

/// Server → client: the client stops reading for 10 s while the server pushes 1 GiB.
#[test]
fn stalled_client_bounds_memory_and_loses_nothing() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let progress = Arc::new(AtomicU64::new(0));
    let counter = progress.clone();
    let backend = Backend::spawn(move |stream, _| {
        let sent = push(&stream, &counter)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(sent)
    })?;
    let mxlb = start("stall-out", backend.addr)?;
    let before = mem_available()?;
    let mut client = TcpStream::connect(mxlb.listen)?;
    check_stalled(&progress, before)?;
    // The client has not read for 9 s; make it the full stall.
    thread::sleep(STALL - Duration::from_secs(9));

    let received = mxlb_tests::backend::digest_until_eof(&mut client)?;
    let sent: Digest256 = backend.next_report(Duration::from_secs(120))?;
    ensure!(received == sent, "every byte, in order");
    ensure!(sent == pattern_digest(7, PUSH));
    Ok(())
}

/// 200 connections whose backends all stall while their clients push: the memory they pin
/// together stays within 200 × the per-connection bound, and every byte arrives afterwards.
#[test]
fn two_hundred_stalled_connections_stay_bounded() -> Result<()> {
    const CONNECTIONS: usize = 200;
    const EACH: u64 = 24 * MIB;
    const SHORT_STALL: Duration = Duration::from_secs(5);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One pattern for every stream, so each backend connection can check its bytes as
    // they arrive and report where a stream first went wrong.
    const SEED: u64 = 13;
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 slow\r\n")?;
        thread::sleep(SHORT_STALL);
        Ok(read_in_bursts_checking(
            &mut stream,
            SEED,
            usize::MAX,
            Duration::ZERO,
        )?)
    })?;
    let mxlb = start("stall-200", backend.addr)?;
    let listen = mxlb.listen;
    let before = mem_available()?;
    let progress = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let progress = progress.clone();
        senders.push(thread::spawn(move || -> Result<Digest256> {
            let mut client = TcpStream::connect(listen)?;
            ensure!(read_line(&mut client)? == "220 slow\r\n");
            let sent = push_n(&client, &progress, SEED, EACH)?;
            client.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            client.read_to_end(&mut rest)?;
            Ok(sent)
        }));
    }
    thread::sleep(SHORT_STALL - Duration::from_secs(1));
    let pushed = progress.load(Ordering::Relaxed);
    let used = before.saturating_sub(mem_available()?);
    let bound = CONNECTIONS as u64 * per_connection_bound()?;
    let report = format!(
        "{CONNECTIONS} stalled connections: clients pushed {} MiB in total ({} KiB each on \
         average), MemAvailable fell by {} MiB; bound {} MiB",
        pushed / MIB,
        pushed / CONNECTIONS as u64 / 1024,
        used / MIB,
        bound / MIB
    );
    eprintln!("{report}");
    ensure!(pushed <= bound, "{report}");
    // Kernel memory per byte held is the data plus skb overhead: allow twice the bytes
    // pushed, plus what 200 idle connections and the test itself cost.
    ensure!(used <= 2 * pushed + 256 * MIB, "{report}");

    for sender in senders {
        sender.join().expect("sender thread")?;
    }
    let mut failures = Vec::new();
    for _ in 0..CONNECTIONS {
        let (received, first_diff): (u64, Option<u64>) =
            backend.next_report(Duration::from_secs(120))?;
        if received != EACH || first_diff.is_some() {
            failures.push((received, first_diff));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {CONNECTIONS} streams differ (bytes received of {EACH}, first difference): \
         {failures:?}; {} holds. {}",
        failures.len(),
        mxlb.log_lines("peer behind: holding the direction").len(),
        tcp_memory_report()
    );
    drop(mxlb);
    Ok(())
}

/// The kernel's TCP memory counters that matter when a stream is damaged under load:
/// pressure episodes, receive-queue prunes and drops.
fn tcp_memory_report() -> String {
    let Ok(netstat) = std::fs::read_to_string("/proc/net/netstat") else {
        return String::new();
    };
    let mut lines = netstat.lines();
    let mut report = Vec::new();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            let wanted = [
                "TCPMemoryPressures",
                "PruneCalled",
                "RcvPruned",
                "OfoPruned",
                "TCPRcvQDrop",
                "TCPBacklogDrop",
            ];
            if wanted.contains(&name) {
                report.push(format!("{name}={value}"));
            }
        }
    }
    format!("Kernel TCP counters since boot: {}", report.join(" "))
}

/// Writes `total` pattern bytes (seed `seed`), counting progress.
fn push_n(stream: &TcpStream, progress: &AtomicU64, seed: u64, total: u64) -> Result<Digest256> {
    struct Counting<'a>(&'a TcpStream, &'a AtomicU64);
    impl Write for Counting<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = (&*self.0).write(buf)?;
            self.1.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    Ok(mxlb_tests::backend::send_pattern(
        &mut Counting(stream, progress),
        seed,
        total,
    )?)
}

/// Compares a stream with the pattern as it arrives, reading in bursts with pauses in
/// between (a backend that keeps falling behind and catching up). Returns the byte count
/// and the offset of the first byte that differs, if any.
fn read_in_bursts_checking(
    stream: &mut TcpStream,
    seed: u64,
    burst: usize,
    pause: Duration,
) -> std::io::Result<(u64, Option<u64>)> {
    let mut check = PatternCheck::new(seed);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut in_burst = 0usize;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok(check.report());
        }
        check.update(&buffer[..n]);
        in_burst += n;
        if in_burst >= burst {
            in_burst = 0;
            thread::sleep(pause);
        }
    }
}

/// Backends that read 256 KiB, pause 5 ms, and so on, while 20 clients push 64 MiB each:
/// the backends keep falling behind, so connections leave the kernel relay mid-stream
/// (pause, drain, hand over to user space), and every byte arrives once, in order.
#[test]
fn stop_and_go_backends_get_every_byte_in_order() -> Result<()> {
    const TOTAL: u64 = 64 * MIB;
    const CONNECTIONS: u64 = 20;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = Backend::spawn(|mut stream, _| {
        stream.write_all(b"220 stop and go\r\n")?;
        Ok(read_in_bursts_checking(
            &mut stream,
            11,
            256 * 1024,
            Duration::from_millis(5),
        )?)
    })?;
    let mxlb = start("stop-and-go", backend.addr)?;
    let listen = mxlb.listen;
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            thread::spawn(move || -> Result<Digest256> {
                let mut client = TcpStream::connect(listen)?;
                ensure!(read_line(&mut client)? == "220 stop and go\r\n");
                let progress = AtomicU64::new(0);
                let sent = push_n(&client, &progress, 11, TOTAL)?;
                client.shutdown(Shutdown::Write)?;
                let mut rest = Vec::new();
                client.read_to_end(&mut rest)?;
                Ok(sent)
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread")?;
    }
    let mut failures = Vec::new();
    for _ in 0..CONNECTIONS {
        let (received, first_diff): (u64, Option<u64>) =
            backend.next_report(Duration::from_secs(120))?;
        if received != TOTAL || first_diff.is_some() {
            failures.push((received, first_diff));
        }
    }
    let left = mxlb.log_lines("peer behind: holding the direction").len();
    ensure!(
        failures.is_empty(),
        "{} of {CONNECTIONS} streams differ (bytes received, first difference): {failures:?}; \
         {left} holds",
        failures.len()
    );
    eprintln!("{left} holds over {CONNECTIONS} connections");
    ensure!(left > 0, "no direction was held: the bound never acted");
    Ok(())
}
