//! A randomized stress test of the hand-overs between the user-space relay and the kernel
//! relay: does any byte get duplicated, lost or reordered when a connection enters the
//! kernel (after `kernel_relay_after` bytes in full reads) or a direction is held because
//! a receiver fell `max_inflight` behind, and resumed?
//!
//! Several daemons run side by side, one per configuration around the hand-over point:
//! `kernel_relay_after` 0, 1 KiB, 16 KiB, 32 KiB (the default) and 48 KiB, some with a
//! small `max_inflight` (256 KiB, 1 MiB) so stalled receivers make the daemon hold
//! directions mid-stream, and one user-space daemon as the control (the kernel daemons say
//! `relay = "sockmap"`, so they fail rather than fall back). 5,000 connections, 64 at a
//! time, go through them (about a minute on 2 CPUs with a debug daemon). On each, a
//! scripted backend and a scripted client send each other a pattern stream (seeded per
//! connection and direction) of a size near the daemon's threshold (exactly, a few bytes
//! either side, ± 16 KiB) or of a few MiB, in writes of 1 byte to 256 KiB with random
//! pauses, while the receiving side reads in random sizes and now and then stalls for
//! 200–1500 ms; the half-closes come in a random order. Every receiver checks each byte
//! against the pattern as it arrives, and at the end byte counts and SHA-256 digests are
//! compared both ways. A failure names the connection, the daemon, the direction, the byte
//! count and the offset of the first wrong byte.
//!
//! Afterwards, per daemon: the `connection finished` log lines must give each connection's
//! exact byte counts and a clean end; on the kernel daemons most connections that were
//! expected to reach the kernel must show `kernel_bytes > 0` (the user-space daemon none);
//! `/api/stats` must show no `integrity_errors` (when the daemon has that counter); and the
//! daemon must stop cleanly.
//!
//! One exception, on the kernel daemons only: a connection where the ledger caught the
//! kernel relaying more of a stream than TCP received ("source at kernel relay") and reset
//! both sides. Linux 6.18's verdict read path hands over a retransmitted segment that
//! overlaps bytes already received whole (docs/architecture.md, "Overlapping
//! retransmissions"); held directions put the receive buffers under pressure, segments get
//! dropped and retransmitted, and before the verdict cut such stale heads off about one
//! connection in 5,000-10,000 met it here; 0 in 40,000 since (8 rounds). The exception stays
//! until CI history agrees: such a connection is printed and counted (and must match
//! `integrity_errors` exactly); anything else fails.
//!
//! Replay: the seed is printed at the start; `MXLB_STRESS_SEED=<seed>` reruns the same plan
//! (sizes, write and read sizes, pauses, stalls, half-close orders; the timing of course
//! differs). `MXLB_STRESS_ROUNDS=<n>` repeats the whole run n times (round r uses seed + r)
//! and stops at the first failing round; `MXLB_STRESS_ONLY=<id>,<id>…` runs only those
//! connections of the plan (a failure names them: `conn #<id>`); `MXLB_STRESS_CONNECTIONS`
//! and `MXLB_STRESS_CONCURRENCY` change the load (the plan depends on the seed and on
//! `MXLB_STRESS_CONNECTIONS`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mxlb_tests::backend::{Backend, Pattern, PatternCheck};
use mxlb_tests::mxlb::http::get_json;
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path, with_global_keys, with_stats,
};
use sha2::{Digest, Sha256};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Connections per round, over all daemons (`MXLB_STRESS_CONNECTIONS`).
const CONNECTIONS: usize = 5000;
/// Connections open at once (`MXLB_STRESS_CONCURRENCY`).
const CONCURRENCY: usize = 64;
/// A socket on which nothing moved for this long is taken as hung.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client waits for its backend's account of the same connection.
const REPORT_TIMEOUT: Duration = Duration::from_secs(90);
/// The user-space relay's read buffer: only full reads count towards `kernel_relay_after`.
const RELAY_READ: u64 = 16 * KIB;
/// The ledger's words when the kernel relayed more of a socket's stream than its TCP
/// received: the 6.18 read path duplicating an overlapping retransmission.
const KERNEL_DUPLICATE: &str = "source at kernel relay";

/// What the daemon logs for a kernel-relayed connection that fell `max_inflight` behind.
const LEFT_KERNEL: &str = "peer behind: holding the direction";

/// One daemon configuration under test.
struct DaemonSpec {
    name: &'static str,
    relay: RelayKind,
    /// `kernel_relay_after` in bytes (unused by the user-space daemon).
    threshold: u64,
    /// Extra `[global]` keys.
    global_keys: &'static str,
    /// The PROXY header version the daemon sends its backend.
    send_proxy: &'static str,
}

const DAEMONS: [DaemonSpec; 8] = [
    DaemonSpec {
        name: "after0",
        relay: RelayKind::Kernel,
        threshold: 0,
        global_keys: "",
        send_proxy: "v1",
    },
    DaemonSpec {
        name: "after0-inflight256k",
        relay: RelayKind::Kernel,
        threshold: 0,
        global_keys: "max_inflight = \"256KiB\"\n",
        send_proxy: "v2",
    },
    DaemonSpec {
        name: "after1k-inflight1m",
        relay: RelayKind::Adaptive,
        threshold: KIB,
        global_keys: "kernel_relay_after = \"1KiB\"\nmax_inflight = \"1MiB\"\n",
        send_proxy: "v1",
    },
    DaemonSpec {
        name: "after16k-inflight256k",
        relay: RelayKind::Adaptive,
        threshold: 16 * KIB,
        global_keys: "kernel_relay_after = \"16KiB\"\nmax_inflight = \"256KiB\"\n",
        send_proxy: "v2",
    },
    DaemonSpec {
        name: "after32k-default",
        relay: RelayKind::Adaptive,
        threshold: 32 * KIB,
        global_keys: "",
        send_proxy: "v1",
    },
    DaemonSpec {
        name: "after32k-inflight256k",
        relay: RelayKind::Adaptive,
        threshold: 32 * KIB,
        global_keys: "kernel_relay_after = \"32KiB\"\nmax_inflight = \"256KiB\"\n",
        send_proxy: "v2",
    },
    DaemonSpec {
        name: "after48k-inflight1m",
        relay: RelayKind::Adaptive,
        threshold: 48 * KIB,
        global_keys: "kernel_relay_after = \"48KiB\"\nmax_inflight = \"1MiB\"\n",
        send_proxy: "v1",
    },
    DaemonSpec {
        name: "userspace",
        relay: RelayKind::UserSpace,
        threshold: 0,
        global_keys: "",
        send_proxy: "v2",
    },
];

impl DaemonSpec {
    fn describe(&self) -> String {
        if self.relay.is_kernel() {
            let keys = self.global_keys.trim().replace('\n', ", ");
            format!(
                "daemon {} (kernel relay, kernel_relay_after {} B{}{keys})",
                self.name,
                self.threshold,
                if keys.is_empty() { "" } else { ", " }
            )
        } else {
            format!("daemon {} (user-space relay)", self.name)
        }
    }
}

#[test]
fn handover_stress() {
    let seed = env_text("MXLB_STRESS_SEED")
        .map(|text| parse_u64(&text).expect("MXLB_STRESS_SEED: a number (decimal or 0x hex)"))
        .unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970");
            splitmix(now.as_nanos() as u64 ^ u64::from(std::process::id()))
        });
    let rounds = env_number("MXLB_STRESS_ROUNDS", 1);
    let connections = env_number("MXLB_STRESS_CONNECTIONS", CONNECTIONS);
    let concurrency = env_number("MXLB_STRESS_CONCURRENCY", CONCURRENCY).max(1);
    eprintln!(
        "handover stress: MXLB_STRESS_SEED={seed} MXLB_STRESS_ROUNDS={rounds} \
         ({connections} connections per round, {concurrency} at a time)"
    );
    let started = Instant::now();
    for round in 0..rounds {
        let round_seed = seed.wrapping_add(round as u64);
        eprintln!("round {}/{rounds}: seed {round_seed}", round + 1);
        let failures = run_round(round, round_seed, connections, concurrency)
            .unwrap_or_else(|error| vec![format!("the round could not run: {error:#}")]);
        if !failures.is_empty() {
            let mut report = format!(
                "handover stress, round {} of {rounds}: {} failure(s); replay with \
                 MXLB_STRESS_SEED={round_seed} MXLB_STRESS_ROUNDS=1\n",
                round + 1,
                failures.len()
            );
            for failure in failures.iter().take(60) {
                let _ = writeln!(report, "- {failure}");
            }
            if failures.len() > 60 {
                let _ = writeln!(report, "- … and {} more", failures.len() - 60);
            }
            panic!("{report}");
        }
    }
    eprintln!(
        "handover stress: {rounds} round(s) clean in {:.1?} (seed {seed})",
        started.elapsed()
    );
}

fn env_number(name: &str, default: usize) -> usize {
    env_text(name).map_or(default, |text| {
        parse_u64(&text).unwrap_or_else(|| panic!("{name}: not a number: {text:?}")) as usize
    })
}

/// An environment variable's value, if set and not empty.
fn env_text(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|text| !text.trim().is_empty())
}

/// `MXLB_STRESS_ONLY`: the connection ids (comma-separated) to run, out of the full plan.
fn only_connections() -> Option<Vec<usize>> {
    let text = env_text("MXLB_STRESS_ONLY")?;
    Some(
        text.split(',')
            .map(|id| {
                parse_u64(id).unwrap_or_else(|| panic!("MXLB_STRESS_ONLY: not an id: {id:?}"))
                    as usize
            })
            .collect(),
    )
}

fn parse_u64(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

// ---------------------------------------------------------------------------------------
// Randomness: a splitmix64 generator, so the plan depends on the seed alone.

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent` %.
    fn percent(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

// ---------------------------------------------------------------------------------------
// The plan: what each connection does, drawn from the seed before anything runs.

/// How a side writes one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// 16–256 KiB writes, rare short pauses: a stream.
    Bulk,
    /// 1 byte to 256 KiB, skewed to both ends, pauses of up to 20 ms now and then.
    Mixed,
    /// Up to 2 KiB per write with frequent pauses: a conversation, which never fills a
    /// relay read (only for short directions).
    Small,
}

/// One direction of one connection.
#[derive(Clone, Debug)]
struct Flow {
    bytes: u64,
    /// Seed of the pattern stream.
    pattern: u64,
    style: Style,
    /// Seeds of the writer's and the reader's sizes and pauses.
    writer_seed: u64,
    reader_seed: u64,
    /// Pause before the first write.
    start_delay: Duration,
    /// Pause between the last write and the half-close.
    close_delay: Duration,
    /// Stalls of the receiving side: stop reading for this long once this many bytes
    /// arrived.
    stalls: Vec<(u64, Duration)>,
}

/// Who half-closes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseOrder {
    /// The client shuts its write side when done sending; the server only after it saw
    /// the client's EOF.
    ClientFirst,
    ServerFirst,
    /// Each side as soon as it is done sending.
    Independent,
}

#[derive(Debug)]
struct Plan {
    id: usize,
    daemon: usize,
    /// The client's own loopback address: unique per connection, so the backend (from the
    /// PROXY header) and the daemon's log line (`client=`) both name the connection.
    source: Ipv4Addr,
    /// Client → server.
    up: Flow,
    /// Server → client.
    down: Flow,
    close: CloseOrder,
}

impl Plan {
    fn describe(&self) -> String {
        format!(
            "up {} B {:?}, down {} B {:?}, {:?}, stalls up {:?} down {:?}",
            self.up.bytes,
            self.up.style,
            self.down.bytes,
            self.down.style,
            self.close,
            self.up.stalls,
            self.down.stalls
        )
    }

    /// Whether the daemon should have moved this connection to the kernel: the direction(s)
    /// that half-close first carry a stream well past the threshold, so full relay reads
    /// pass it while both directions are still open.
    fn expects_kernel(&self, threshold: u64) -> bool {
        let streams =
            |flow: &Flow| flow.style != Style::Small && flow.bytes >= threshold + 4 * RELAY_READ;
        match self.close {
            CloseOrder::ClientFirst => streams(&self.up),
            CloseOrder::ServerFirst => streams(&self.down),
            CloseOrder::Independent => streams(&self.up) && streams(&self.down),
        }
    }
}

fn make_plans(seed: u64, round: usize, connections: usize) -> Vec<Plan> {
    let mut rng = Rng::new(seed);
    (0..connections)
        .map(|id| {
            let daemon = rng.range(0, DAEMONS.len() as u64 - 1) as usize;
            let threshold = DAEMONS[daemon].threshold;
            // 127.<round + 10>.x.y, unique per connection of this run.
            let source = Ipv4Addr::new(
                127,
                10 + (round % 200) as u8,
                (id / 250) as u8,
                (id % 250 + 1) as u8,
            );
            let close = match rng.range(0, 2) {
                0 => CloseOrder::ClientFirst,
                1 => CloseOrder::ServerFirst,
                _ => CloseOrder::Independent,
            };
            Plan {
                id,
                daemon,
                source,
                up: make_flow(&mut rng, threshold),
                down: make_flow(&mut rng, threshold),
                close,
            }
        })
        .collect()
}

fn make_flow(rng: &mut Rng, threshold: u64) -> Flow {
    let jitter = |rng: &mut Rng| rng.range(0, 16) as i64 - 8;
    let near = |base: i64, offset: i64| (base + offset).max(0) as u64;
    let t = threshold as i64;
    let bytes = match rng.range(0, 99) {
        // At the threshold, a few bytes either side.
        0..=19 => near(t, jitter(rng)),
        // 16 KiB (one relay read) either side.
        20..=34 => {
            let side = if rng.percent(50) { 1 } else { -1 };
            near(t + side * RELAY_READ as i64, jitter(rng))
        }
        // Around a multiple of the relay read, past the threshold.
        35..=44 => near(
            t + rng.range(1, 4) as i64 * RELAY_READ as i64,
            jitter(rng) * rng.range(0, 1) as i64,
        ),
        // Short: a dialogue's worth.
        45..=59 => rng.range(0, 4 * KIB),
        // Anything up to the threshold + 128 KiB.
        60..=74 => rng.range(0, threshold + 128 * KIB),
        // A few MiB.
        _ => rng.range(MIB, 4 * MIB),
    };
    let style = match rng.range(0, 9) {
        0..=2 => Style::Bulk,
        3 if bytes <= 64 * KIB => Style::Small,
        _ => Style::Mixed,
    };
    let mut stalls = Vec::new();
    let stall_count = if bytes >= 256 * KIB {
        match rng.range(0, 9) {
            0..=2 => 0,
            3..=7 => 1,
            _ => 2,
        }
    } else {
        u64::from(rng.percent(15))
    };
    for _ in 0..stall_count {
        stalls.push((rng.range(0, bytes), rng.millis(200, 1500)));
    }
    stalls.sort();
    Flow {
        bytes,
        pattern: rng.next(),
        style,
        writer_seed: rng.next(),
        reader_seed: rng.next(),
        start_delay: if rng.percent(50) {
            Duration::ZERO
        } else {
            rng.millis(0, 30)
        },
        close_delay: if rng.percent(60) {
            Duration::ZERO
        } else {
            rng.millis(0, 50)
        },
        stalls,
    }
}

/// Size of the next write.
fn write_size(rng: &mut Rng, style: Style) -> u64 {
    match style {
        Style::Bulk => rng.range(16 * KIB, 256 * KIB),
        Style::Small => rng.range(1, 2 * KIB),
        Style::Mixed => match rng.range(0, 99) {
            0..=24 => rng.range(1, 64),
            25..=44 => rng.range(65, 4 * KIB),
            45..=64 => rng.range(4 * KIB, 64 * KIB),
            _ => rng.range(64 * KIB, 256 * KIB),
        },
    }
}

/// Pause after a write.
fn write_pause(rng: &mut Rng, style: Style) -> Option<Duration> {
    let percent = match style {
        Style::Bulk => 3,
        Style::Mixed => 20,
        Style::Small => 40,
    };
    rng.percent(percent).then(|| rng.millis(0, 20))
}

/// Size of the next read.
fn read_size(rng: &mut Rng) -> usize {
    (match rng.range(0, 99) {
        0..=9 => rng.range(1, 64),
        10..=29 => rng.range(65, 4 * KIB),
        _ => rng.range(4 * KIB, 256 * KIB),
    }) as usize
}

// ---------------------------------------------------------------------------------------
// One side of a connection (client or backend alike): a writer thread sends its flow, the
// calling thread reads and checks the other.

/// What one side sent.
#[derive(Debug, Default)]
struct Sent {
    bytes: u64,
    sha256: String,
    error: Option<String>,
}

/// What one side received.
#[derive(Debug, Default)]
struct Received {
    bytes: u64,
    first_diff: Option<u64>,
    sha256: String,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct SideOutcome {
    sent: Sent,
    received: Received,
}

/// The pattern stream, handed out in pieces of any size (the pattern itself comes in
/// 8-byte words, so it is generated in whole blocks).
struct PatternSource {
    pattern: Pattern,
    block: Vec<u8>,
    at: usize,
}

impl PatternSource {
    fn new(seed: u64) -> PatternSource {
        PatternSource {
            pattern: Pattern::new(seed),
            block: vec![0; 256 * KIB as usize],
            at: 256 * KIB as usize,
        }
    }

    fn take(&mut self, mut n: usize, out: &mut Vec<u8>) {
        while n > 0 {
            if self.at == self.block.len() {
                self.pattern.fill(&mut self.block);
                self.at = 0;
            }
            let piece = n.min(self.block.len() - self.at);
            out.extend_from_slice(&self.block[self.at..self.at + piece]);
            self.at += piece;
            n -= piece;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one side: sends `send`, reads and checks `receive`. With `shut_after_peer_eof` the
/// write side is shut only once the peer's EOF arrived (the peer closes first).
fn run_side(
    mut stream: TcpStream,
    send: &Flow,
    receive: &Flow,
    shut_after_peer_eof: bool,
) -> SideOutcome {
    let setup = stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.try_clone());
    let writer_stream = match setup {
        Ok(clone) => clone,
        Err(error) => {
            let error = Some(format!("socket set-up: {error}"));
            return SideOutcome {
                sent: Sent {
                    error: error.clone(),
                    ..Sent::default()
                },
                received: Received {
                    error,
                    ..Received::default()
                },
            };
        }
    };
    let (eof_seen, peer_eof) = mpsc::channel::<()>();
    let flow = send.clone();
    let writer =
        thread::spawn(move || write_flow(writer_stream, &flow, &peer_eof, shut_after_peer_eof));
    let received = read_flow(&mut stream, receive, eof_seen);
    if received.error.is_some() {
        // Unblock the writer: this connection is over.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = writer.join().unwrap_or_else(|_| Sent {
        error: Some("writer thread panicked".into()),
        ..Sent::default()
    });
    SideOutcome { sent, received }
}

fn write_flow(
    mut stream: TcpStream,
    flow: &Flow,
    peer_eof: &mpsc::Receiver<()>,
    shut_after_peer_eof: bool,
) -> Sent {
    let mut rng = Rng::new(flow.writer_seed);
    let mut source = PatternSource::new(flow.pattern);
    let mut hasher = Sha256::new();
    let mut chunk = Vec::with_capacity(256 * KIB as usize);
    let mut sent = 0u64;
    let mut run = || -> io::Result<()> {
        thread::sleep(flow.start_delay);
        while sent < flow.bytes {
            let n = write_size(&mut rng, flow.style).min(flow.bytes - sent);
            chunk.clear();
            source.take(n as usize, &mut chunk);
            stream.write_all(&chunk).map_err(|error| {
                io::Error::new(error.kind(), format!("write at offset {sent}: {error}"))
            })?;
            hasher.update(&chunk);
            sent += n;
            if let Some(pause) = write_pause(&mut rng, flow.style) {
                thread::sleep(pause);
            }
        }
        if shut_after_peer_eof {
            peer_eof
                .recv_timeout(REPORT_TIMEOUT)
                .map_err(|_| io::Error::other("the peer's EOF never came (or the read failed)"))?;
        }
        thread::sleep(flow.close_delay);
        stream.shutdown(Shutdown::Write)
    };
    let error = run().err().map(|error| error.to_string());
    Sent {
        bytes: sent,
        sha256: hex(&hasher.finalize()),
        error,
    }
}

fn read_flow(stream: &mut TcpStream, flow: &Flow, eof_seen: mpsc::Sender<()>) -> Received {
    let mut rng = Rng::new(flow.reader_seed);
    let mut check = PatternCheck::new(flow.pattern);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * KIB as usize];
    let mut stalls = flow.stalls.iter().peekable();
    let error = loop {
        if let Some(&&(at, stall)) = stalls.peek()
            && check.received >= at
        {
            thread::sleep(stall);
            stalls.next();
            continue;
        }
        let want = read_size(&mut rng);
        match stream.read(&mut buffer[..want]) {
            Ok(0) => {
                let _ = eof_seen.send(());
                break None;
            }
            Ok(n) => {
                check.update(&buffer[..n]);
                hasher.update(&buffer[..n]);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Some(format!(
                    "no byte and no EOF for {IO_TIMEOUT:?} after {} bytes",
                    check.received
                ));
            }
            Err(error) => break Some(format!("read after {} bytes: {error}", check.received)),
        }
        if rng.percent(10) {
            thread::sleep(rng.millis(0, 20));
        }
    };
    let (bytes, first_diff) = check.report();
    Received {
        bytes,
        first_diff,
        sha256: hex(&hasher.finalize()),
        error,
    }
}

// ---------------------------------------------------------------------------------------
// A round: daemons and backends up, every connection run, then the checks.

/// What the backend side of each connection reported, by connection id.
#[derive(Default)]
struct Results {
    done: Mutex<HashMap<usize, (SideOutcome, SocketAddr)>>,
    arrived: Condvar,
}

impl Results {
    fn put(&self, id: usize, outcome: SideOutcome, proxy_source: SocketAddr) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (outcome, proxy_source));
        self.arrived.notify_all();
    }

    fn take(&self, id: usize, timeout: Duration) -> Option<(SideOutcome, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(outcome) = done.remove(&id) {
                return Some(outcome);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            done = self
                .arrived
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

type Plans = Arc<Mutex<HashMap<IpAddr, Arc<Plan>>>>;

struct Daemon {
    spec: &'static DaemonSpec,
    mxlb: Mxlb,
    backend: Backend<()>,
    stats: SocketAddr,
}

/// How one connection went, from the client's side.
struct ConnectionRun {
    plan: Arc<Plan>,
    client: Option<SocketAddr>,
    failures: Vec<String>,
}

fn run_round(
    round: usize,
    seed: u64,
    connections: usize,
    concurrency: usize,
) -> Result<Vec<String>> {
    let started = Instant::now();
    let only = only_connections();
    let plans: Vec<Arc<Plan>> = make_plans(seed, round, connections)
        .into_iter()
        .filter(|plan| only.as_ref().is_none_or(|ids| ids.contains(&plan.id)))
        .map(Arc::new)
        .collect();
    let registry: Plans = Arc::default();
    let results = Arc::new(Results::default());

    let mut daemons = Vec::new();
    for spec in &DAEMONS {
        daemons.push(start_daemon(spec, round, &registry, &results)?);
    }
    let listens: Vec<SocketAddr> = daemons.iter().map(|d| d.mxlb.listen).collect();

    // Workers take the connections in plan order (the daemons interleave).
    let next = Arc::new(AtomicUsize::new(0));
    let plans = Arc::new(plans);
    let workers: Vec<_> = (0..concurrency.min(plans.len()))
        .map(|_| {
            let (next, plans, registry, results, listens) = (
                next.clone(),
                plans.clone(),
                registry.clone(),
                results.clone(),
                listens.clone(),
            );
            thread::spawn(move || {
                let mut runs = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(plan) = plans.get(index) else {
                        return runs;
                    };
                    registry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(IpAddr::V4(plan.source), plan.clone());
                    runs.push(run_connection(plan.clone(), listens[plan.daemon], &results));
                }
            })
        })
        .collect();
    let mut runs: Vec<ConnectionRun> = Vec::new();
    for worker in workers {
        runs.extend(worker.join().expect("connection worker panicked"));
    }
    runs.sort_by_key(|run| run.plan.id);
    let relayed: u64 = runs
        .iter()
        .map(|r| r.plan.up.bytes + r.plan.down.bytes)
        .sum();
    eprintln!(
        "  {} connections, {} MiB relayed, in {:.1?}",
        runs.len(),
        relayed / MIB,
        started.elapsed()
    );

    let mut failures = Vec::new();
    for (index, daemon) in daemons.into_iter().enumerate() {
        let mine: Vec<&ConnectionRun> =
            runs.iter().filter(|run| run.plan.daemon == index).collect();
        failures.extend(check_daemon(daemon, &mine));
    }
    Ok(failures)
}

fn start_daemon(
    spec: &'static DaemonSpec,
    round: usize,
    registry: &Plans,
    results: &Arc<Results>,
) -> Result<Daemon> {
    let (registry, results) = (registry.clone(), results.clone());
    let backend = Backend::spawn(move |stream, info| {
        let plan = registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&info.source.ip())
            .cloned()
            .with_context(|| format!("no plan for a connection from {}", info.source))?;
        let outcome = run_side(
            stream,
            &plan.down,
            &plan.up,
            plan.close == CloseOrder::ClientFirst,
        );
        results.put(plan.id, outcome, info.source);
        Ok(())
    })?;
    let listen = mxlb_tests::free_addr();
    let stats = mxlb_tests::free_addr();
    let pins = pin_path(&format!("handover-{}-r{round}", spec.name));
    let text = config_with_listener_keys(
        spec.relay,
        &pins,
        listen,
        &[ServerEntry {
            name: "scripted",
            addr: backend.addr,
            send_proxy: spec.send_proxy,
        }],
        // Far above any stall here: a connection the relay hung still ends, logged as such.
        "timeout_idle = \"2m\"\n",
    );
    let text = with_stats(&with_global_keys(&text, spec.global_keys), stats, None);
    let mxlb = Mxlb::start(&text, listen, &pins)
        .with_context(|| format!("starting {}:\n{text}", spec.describe()))?;
    let expected = if spec.relay.is_kernel() {
        "relay: kernel"
    } else {
        "relay: user space"
    };
    anyhow::ensure!(
        mxlb.log().contains(expected),
        "{}: expected {expected:?} in:\n{}",
        spec.describe(),
        mxlb.log()
    );
    Ok(Daemon {
        spec,
        mxlb,
        backend,
        stats,
    })
}

fn run_connection(plan: Arc<Plan>, listen: SocketAddr, results: &Results) -> ConnectionRun {
    let spec = &DAEMONS[plan.daemon];
    let name = |direction: &str| {
        format!(
            "conn #{} from {} via {}, {direction}",
            plan.id,
            plan.source,
            spec.describe()
        )
    };
    let mut failures = Vec::new();
    let stream = connect_from(plan.source, listen);
    let (client, outcome) = match stream {
        Ok(stream) => {
            let client = stream.local_addr().ok();
            let outcome = run_side(
                stream,
                &plan.up,
                &plan.down,
                plan.close == CloseOrder::ServerFirst,
            );
            (client, outcome)
        }
        Err(error) => {
            failures.push(format!("{}: cannot connect: {error:#}", name("connect")));
            return ConnectionRun {
                plan,
                client: None,
                failures,
            };
        }
    };
    let Some((server, proxy_source)) = results.take(plan.id, REPORT_TIMEOUT) else {
        failures.push(format!(
            "{}: no report from the backend within {REPORT_TIMEOUT:?} (client sent {} B, \
             received {} B{}); plan: {}",
            name("backend"),
            outcome.sent.bytes,
            outcome.received.bytes,
            outcome
                .received
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(", {e}")),
            plan.describe()
        ));
        return ConnectionRun {
            plan,
            client,
            failures,
        };
    };
    if Some(proxy_source) != client {
        failures.push(format!(
            "{}: the PROXY header names {proxy_source}, the client is {client:?}",
            name("proxy header")
        ));
    }
    for (direction, flow, sent, received) in [
        ("client→server", &plan.up, &outcome.sent, &server.received),
        ("server→client", &plan.down, &server.sent, &outcome.received),
    ] {
        if let Some(problem) = compare(flow, sent, received) {
            failures.push(format!(
                "{}: {problem}; plan: {}",
                name(direction),
                plan.describe()
            ));
        }
    }
    ConnectionRun {
        plan,
        client,
        failures,
    }
}

/// A client socket bound to its own loopback address.
fn connect_from(source: Ipv4Addr, listen: SocketAddr) -> Result<TcpStream> {
    mxlb_tests::connect_from(source.into(), listen, Duration::from_secs(10))
}

/// What is wrong with one direction, if anything.
fn compare(flow: &Flow, sent: &Sent, received: &Received) -> Option<String> {
    let mut problems = Vec::new();
    if let Some(at) = received.first_diff {
        problems.push(format!(
            "CORRUPT STREAM: first wrong byte at offset {at} ({} KiB + {}), {} bytes received \
             of {} sent",
            at / KIB,
            at % KIB,
            received.bytes,
            flow.bytes
        ));
    } else if received.bytes != flow.bytes {
        problems.push(format!(
            "{} bytes received of {} sent ({} B {}), every byte received matches the pattern",
            received.bytes,
            flow.bytes,
            received.bytes.abs_diff(flow.bytes),
            if received.bytes < flow.bytes {
                "missing at the end"
            } else {
                "extra at the end"
            }
        ));
    } else if received.error.is_none() && sent.error.is_none() && received.sha256 != sent.sha256 {
        problems.push(format!(
            "SHA-256 differs ({} sent, {} received) although the pattern check passed",
            sent.sha256, received.sha256
        ));
    }
    if let Some(error) = &sent.error {
        problems.push(format!("sender: {error} (after {} bytes)", sent.bytes));
    }
    if let Some(error) = &received.error {
        problems.push(format!("receiver: {error}"));
    }
    if sent.error.is_none() && sent.bytes != flow.bytes {
        problems.push(format!("sender wrote {} of {}", sent.bytes, flow.bytes));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The checks after the round, for one daemon: its log lines, its kernel share, its stats,
/// its exit. Returns the failures of its connections and its own.
fn check_daemon(daemon: Daemon, runs: &[&ConnectionRun]) -> Vec<String> {
    let Daemon {
        spec,
        mxlb,
        backend,
        stats,
    } = daemon;
    let describe = spec.describe();
    let mut failures = Vec::new();

    // Every connection's log line, found by the client's address.
    let expected_lines = runs.iter().filter(|run| run.client.is_some()).count();
    if let Err(error) = mxlb.wait_for_log_count(
        "connection finished",
        expected_lines,
        Duration::from_secs(60),
    ) {
        let error = format!("{error:#}");
        let short = error.lines().next().unwrap_or_default();
        failures.push(format!("{describe}: {short}"));
    }
    let lines: HashMap<String, String> = mxlb
        .log_lines("connection finished")
        .into_iter()
        .filter_map(|line| Some((field(&line, "client")?.to_owned(), line)))
        .collect();
    // Warnings and errors the daemon logged about a connection (an integrity error, a
    // failed relay), by client address.
    let mut complaints: HashMap<String, Vec<String>> = HashMap::new();
    for line in mxlb.log().lines() {
        if (line.contains(" WARN ") || line.contains(" ERROR "))
            && let Some(client) = field(line, "client")
        {
            complaints
                .entry(client.to_owned())
                .or_default()
                .push(line.trim().to_owned());
        }
    }

    let mut caught_duplicates = 0u64;
    let mut expected_kernel = 0usize;
    let mut expected_and_kernel = 0usize;
    let mut kernel_anyway = 0usize;
    let mut stayed_in_user_space = Vec::new();
    let mut kernel_bytes_total = 0u64;
    let mut bytes_total = 0u64;
    for run in runs {
        let plan = &run.plan;
        let line = run.client.and_then(|client| lines.get(&client.to_string()));
        let mut run_failures = run.failures.clone();
        let Some(line) = line else {
            if run.client.is_some() {
                run_failures.push(format!(
                    "conn #{} via {describe}: no `connection finished` line for client {:?}",
                    plan.id, run.client
                ));
            }
            failures.extend(run_failures);
            continue;
        };
        let number = |key: &str| field(line, key).and_then(|v| v.parse::<u64>().ok());
        let kernel_bytes = number("kernel_bytes").unwrap_or(0);
        kernel_bytes_total += kernel_bytes;
        bytes_total += plan.up.bytes + plan.down.bytes;
        if run.failures.is_empty() {
            // The daemon's own account must match what went through.
            let problems: Vec<String> = [
                ("bytes_in", number("bytes_in"), Some(plan.up.bytes)),
                ("bytes_out", number("bytes_out"), Some(plan.down.bytes)),
            ]
            .into_iter()
            .filter(|(_, got, want)| got != want)
            .map(|(key, got, want)| format!("{key} {got:?}, expected {want:?}"))
            .chain(
                (field(line, "ended") != Some("closed"))
                    .then(|| format!("ended={:?}", field(line, "ended"))),
            )
            .collect();
            if !problems.is_empty() {
                run_failures.push(format!(
                    "conn #{} via {describe}: the log line disagrees: {}",
                    plan.id,
                    problems.join(", ")
                ));
            }
        }
        if !spec.relay.is_kernel() && kernel_bytes > 0 {
            run_failures.push(format!(
                "conn #{} via {describe}: kernel_bytes={kernel_bytes} on the user-space relay",
                plan.id
            ));
        }
        if spec.relay.is_kernel() {
            if plan.expects_kernel(spec.threshold) {
                expected_kernel += 1;
                if kernel_bytes > 0 {
                    expected_and_kernel += 1;
                } else if stayed_in_user_space.len() < 3 {
                    stayed_in_user_space.push(format!(
                        "    e.g. conn #{}: {}\n      mxlb: {}",
                        plan.id,
                        plan.describe(),
                        line.trim()
                    ));
                }
            } else if kernel_bytes > 0 {
                kernel_anyway += 1;
            }
        }
        // The daemon's line goes with any failure of this connection.
        let client = run.client.map(|c| c.to_string()).unwrap_or_default();
        // The one failure the kernel relay is allowed, because Linux 6.18 causes it and the
        // ledger catches it: the verdict's read path relayed a retransmitted segment that
        // overlapped bytes already received twice (docs/architecture.md, "Overlapping
        // retransmissions"; cut off by the verdict since, none seen), the
        // ledger saw the source relay more than TCP received, and reset both sides. The
        // connection must have ended that way; anything else still fails.
        let caught = spec.relay.is_kernel()
            && field(line, "ended") == Some("integrity-error")
            && complaints
                .get(&client)
                .into_iter()
                .flatten()
                .all(|c| !c.contains("integrity:") || c.contains(KERNEL_DUPLICATE))
            && complaints
                .get(&client)
                .into_iter()
                .flatten()
                .any(|c| c.contains(KERNEL_DUPLICATE));
        if caught {
            caught_duplicates += 1;
            eprintln!(
                "  {describe}: conn #{} caught by the ledger (kernel read path duplicated a \
                 retransmission), reset: {}",
                plan.id,
                complaints
                    .get(&client)
                    .and_then(|c| c.first())
                    .map_or("", String::as_str)
            );
            continue;
        }
        for failure in &mut run_failures {
            for complaint in complaints.get(&client).into_iter().flatten() {
                let _ = write!(failure, "\n    mxlb: {complaint}");
            }
            let _ = write!(failure, "\n    mxlb: {}", line.trim());
        }
        failures.extend(run_failures);
    }
    let left_kernel = mxlb.log_lines(LEFT_KERNEL).len();
    eprintln!(
        "  {describe}: {} connections; {expected_and_kernel} of {expected_kernel} expected to \
         reach the kernel did (and {kernel_anyway} others); {left_kernel} holds \
         mid-stream; the kernel moved {} of {} MiB",
        runs.len(),
        kernel_bytes_total / MIB,
        bytes_total / MIB
    );
    if !stayed_in_user_space.is_empty() {
        eprintln!(
            "  expected in the kernel, but relayed in user space only:\n{}",
            stayed_in_user_space.join("\n")
        );
    }
    // "Most" needs a sample: a replay of a few connections (MXLB_STRESS_ONLY) only prints.
    if spec.relay.is_kernel() && expected_kernel >= 10 && expected_and_kernel * 2 <= expected_kernel
    {
        failures.push(format!(
            "{describe}: only {expected_and_kernel} of {expected_kernel} connections that \
             streamed past kernel_relay_after show kernel_bytes > 0: the kernel relay was \
             hardly used"
        ));
    }

    // The backend's reports: an error there (no PROXY header, no plan) came before the
    // connection's own checks could run.
    for _ in 0..runs.len() {
        match backend.next_report(Duration::from_millis(100)) {
            Ok(()) => {}
            Err(error) if format!("{error}").contains("did not finish a connection") => break,
            Err(error) => failures.push(format!("{describe}: backend: {error:#}")),
        }
    }

    // The daemon's own integrity counter, when it has one.
    match get_json(&format!("http://{stats}/api/stats")) {
        Ok(json) => match json.get("integrity_errors") {
            Some(value) => {
                if value.as_u64() != Some(caught_duplicates) {
                    failures.push(format!(
                        "{describe}: /api/stats integrity_errors = {value}, of which \
                         {caught_duplicates} kernel duplicates caught and reset"
                    ));
                }
            }
            // Not in this daemon yet: another change adds it. Nothing to check then.
            None => eprintln!("  {describe}: /api/stats has no integrity_errors (skipped)"),
        },
        Err(error) => failures.push(format!("{describe}: GET /api/stats: {error:#}")),
    }

    // The fixture's `stop` (through `Drop`) panics when the daemon logged integrity errors;
    // catch that, so this report keeps the connections' own details.
    // Only the caught kernel duplicates counted above: already judged.
    let only_caught = |message: &str| {
        caught_duplicates > 0
            && message.contains("integrity errors")
            && message
                .lines()
                .filter(|l| l.contains("integrity:"))
                .all(|l| l.contains(KERNEL_DUPLICATE))
    };
    let stopped = panic::catch_unwind(AssertUnwindSafe(|| mxlb.stop()));
    match stopped {
        Ok(Ok(status)) if status.success() => {}
        Ok(Err(error)) if only_caught(&format!("{error:#}")) => {}
        Ok(Ok(status)) => failures.push(format!("{describe}: mxlb exited with {status}")),
        Ok(Err(error)) => failures.push(format!("{describe}: stopping mxlb: {error:#}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            if !only_caught(message) {
                failures.push(format!("{describe}: on stop: {message}"));
            }
        }
    }
    failures
}

/// A `key=value` field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}
