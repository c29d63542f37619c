//! The stats port under attack while mail flows (issue 11, "Hostile input").
//!
//! A real daemon relays pattern sessions from several clients to two backends, each
//! checked end to end by SHA-256, while the stats port takes:
//!
//! - a **slowloris**: hundreds of connections that send a request's headers a byte at a
//!   time, one byte a second, reopened as soon as the daemon closes them;
//! - a **request flood**: parallel keep-alive loops of `GET /api/stats`, `GET /` and
//!   `GET /metrics`;
//! - **oversized requests**: a body past the 4 KiB limit, one of 1 MiB, 16 KiB of headers,
//!   too many header fields.
//!
//! Then the slowloris stops and the flood goes on alone. What must hold: every mail
//! session completes intact, during the attack too; the daemon's descriptors stay within
//! its idle count + `[stats] maxconn` + the mail sessions'; each slowloris connection is
//! answered a 503 at once or closed at `[stats] timeout` with nothing sent; each flood or
//! oversized request is served, refused (503, 413, 431) or closed, and none hangs; after
//! the attack a plain `GET /api/stats` works and counts every mail session and byte; the
//! stats port's own counters agree with what the clients saw, and the daemon built far
//! fewer snapshots than it answered requests.
//!
//! Run with `--nocapture` for the numbers (requests served and refused, descriptor peak,
//! mail throughput per phase).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::backend::{Backend, Digest256, digest_until_eof, read_line, send_pattern};
use mxlb_tests::free_addr;
use mxlb_tests::mxlb::http::{get, get_json};
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, config, pin_path, with_stats};

const BANNER: &[u8] = b"220 flood test\r\n";
const REPLY: &[u8] = b"250 received\r\n";
/// The admin token: the oversized bodies go to the admin route, past authentication.
const TOKEN: &str = "flood-admin-token";

/// `[stats] maxconn`: the default, left unset in the configuration.
const MAXCONN: usize = 64;
/// `[stats] timeout`, shortened so the slowloris cycles a few times in a short test.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

const MAIL_CLIENTS: usize = 4;
const SLOWLORIS: usize = 300;
const FLOODERS: usize = 6;
/// Requests a flooder sends on one keep-alive connection before opening another.
const REQUESTS_PER_CONNECTION: usize = 25;

/// Mail alone (the baseline), the full attack, the flood alone, mail alone again.
const BASELINE: Duration = Duration::from_secs(2);
const FULL_ATTACK: Duration = Duration::from_secs(6);
const FLOOD_ALONE: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(1);

/// Far past every limit and short of a hang: no answer, close or mail session may take
/// longer.
const HANG: Duration = Duration::from_secs(20);

#[test]
fn userspace_relay_keeps_mail_flowing_under_a_stats_attack() -> Result<()> {
    attack(RelayKind::UserSpace)
}

#[test]
fn kernel_relay_keeps_mail_flowing_under_a_stats_attack() -> Result<()> {
    attack(RelayKind::Adaptive)
}

/// One attack at a time: the numbers of one are not blurred by the other, and two
/// daemons under attack on a small machine would only measure the machine.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn attack(relay: RelayKind) -> Result<()> {
    let _serial = one_at_a_time();
    let backends = [pattern_backend()?, pattern_backend()?];
    let listen = free_addr();
    let stats = free_addr();
    let pins = pin_path(&format!("stats-flood-{relay:?}"));
    let servers = [
        ServerEntry {
            name: "one",
            addr: backends[0].addr,
            send_proxy: "v1",
        },
        ServerEntry {
            name: "two",
            addr: backends[1].addr,
            send_proxy: "v2",
        },
    ];
    let text = with_stats(&config(relay, &pins, listen, &servers), stats, Some(TOKEN)).replacen(
        "[stats]\n",
        &format!("[stats]\ntimeout = \"{}ms\"\n", STATS_TIMEOUT.as_millis()),
        1,
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let idle_fds = mxlb.fd_count()?;
    let started = Instant::now();

    let mail = Mail::default();
    let phase = Phase::new();
    let attack = Attack::default();
    let fd_peak = AtomicUsize::new(idle_fds);
    let pid = mxlb.pid();
    let (mail, phase, attack, fd_peak) = (&mail, &phase, &attack, &fd_peak);
    let cpu = thread::scope(|scope| -> Result<ThreadCpu> {
        let mailers: Vec<_> = (0..MAIL_CLIENTS)
            .map(|client| scope.spawn(move || mail.client(listen, client, phase)))
            .collect();
        let fds = scope.spawn(move || watch_fds(pid, fd_peak, phase));
        thread::sleep(BASELINE);

        let cpu_before = thread_cpu(pid)?;
        phase.set(Stage::FullAttack);
        let slowloris = scope.spawn(move || slowloris(stats, phase, attack));
        let flooders: Vec<_> = (0..FLOODERS)
            .map(|n| scope.spawn(move || flood(stats, n, phase, attack)))
            .collect();
        let oversized = scope.spawn(move || oversized(stats, phase, attack));
        thread::sleep(FULL_ATTACK);

        phase.set(Stage::FloodAlone);
        join(slowloris, "slowloris")?;
        thread::sleep(FLOOD_ALONE);

        phase.set(Stage::After);
        let cpu_attack = thread_cpu(pid)?.since(&cpu_before);
        for flooder in flooders {
            join(flooder, "flooder")?;
        }
        join(oversized, "oversized")?;
        thread::sleep(AFTER);

        phase.set(Stage::Done);
        for mailer in mailers {
            join(mailer, "mail client")?;
        }
        join(fds, "fd watch")?;
        Ok(cpu_attack)
    })?;
    let elapsed = started.elapsed();

    // Every mail session went through intact, during the attack as before and after it.
    let expected = mail.expected();
    let mut received = Vec::new();
    let deadline = Instant::now() + HANG;
    while received.len() < expected.len() && Instant::now() < deadline {
        for backend in &backends {
            if let Ok(report) = backend.next_report(Duration::from_millis(50)) {
                received.push(report);
            }
        }
    }
    received.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    ensure!(
        received == expected,
        "the backends received other bytes than the clients sent"
    );
    for stage in [Stage::Baseline, Stage::FullAttack, Stage::FloodAlone] {
        ensure!(
            mail.sessions_in(stage) >= MAIL_CLIENTS as u64,
            "mail kept flowing during {stage:?}: {} sessions",
            mail.sessions_in(stage)
        );
    }

    // The slowloris: refused at once or closed at the timeout, never answered, never kept.
    let slow = attack
        .slow
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    ensure!(slow.answered == 0, "{slow:?}");
    ensure!(
        slow.longest < STATS_TIMEOUT + Duration::from_secs(5),
        "a slowloris connection lived {:?} (timeout {STATS_TIMEOUT:?}): {slow:?}",
        slow.longest
    );
    ensure!(
        slow.timed_out >= MAXCONN as u64 / 2,
        "the slowloris held places until the timeout: {slow:?}"
    );
    ensure!(slow.refused > 0, "the slowloris hit the cap: {slow:?}");

    // The flood and the oversized requests: answered within the caps, none hung.
    let flood = attack
        .flood
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    ensure!(flood.other.is_empty(), "{flood:?}");
    ensure!(flood.slowest < HANG, "{flood:?}");
    ensure!(
        flood.served[1] > flood.refused[1] + flood.closed[1],
        "with the slowloris gone, the flood is served: {flood:?}"
    );
    let big = attack
        .oversized
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    ensure!(big.other.is_empty(), "{big:?}");
    ensure!(
        big.body_413 > 0 && big.header_431 > 0 && big.count_431 > 0,
        "each limit answered at least once: {big:?}"
    );

    // The daemon's descriptors: idle + the stats port's cap (and one being refused) + the
    // mail sessions (two sockets each, and a client's next session may open before its
    // last one's sockets are closed).
    let peak = fd_peak.load(Ordering::SeqCst);
    let bound = idle_fds + MAXCONN + 1 + 4 * MAIL_CLIENTS + 4;
    ensure!(
        peak <= bound,
        "descriptor peak {peak} over {bound} (idle {idle_fds})"
    );

    // After the attack: the page works and its numbers are right.
    let sessions = mail.sessions.load(Ordering::SeqCst);
    let bytes = mail.bytes.load(Ordering::SeqCst);
    mxlb.wait_for_log_count("connection finished", sessions as usize, HANG)?;
    let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
    let total = |field: &str| -> u64 {
        snapshot["listeners"][0]["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s[field].as_u64().unwrap_or(u64::MAX / 4))
            .sum()
    };
    ensure!(
        total("sessions_total") == sessions && total("bytes_in") == bytes,
        "{sessions} sessions of {bytes} bytes: {snapshot}"
    );
    ensure!(
        snapshot["integrity_errors"] == 0 && snapshot["conns_cur"] == 0,
        "{snapshot}"
    );
    let (status, metrics) = get(&format!("http://{stats}/metrics"))?;
    ensure!(status == 200, "/metrics: {status}");
    let metric = |name: &str| -> Result<u64> {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .with_context(|| format!("no {name} in\n{metrics}"))?;
        Ok(line[name.len() + 1..].parse()?)
    };
    let refused = metric("mxlb_stats_connections_refused_total")?;
    let seen_refused = slow.refused + flood.refused.iter().sum::<u64>() + big.refused;
    ensure!(
        refused >= seen_refused,
        "the daemon counted {refused} refusals, the clients saw {seen_refused} 503s"
    );
    let timed_out = metric("mxlb_stats_connections_timed_out_total")?;
    ensure!(
        timed_out >= slow.timed_out,
        "the daemon counted {timed_out} timeouts, the slowloris saw {}",
        slow.timed_out
    );
    // The snapshot budget: 10 at once, then one per 200 ms, whatever the request rate.
    let built = metric("mxlb_stats_snapshots_total")?;
    let budget = 10 + (elapsed.as_millis() / 200) as u64 + 1;
    let served: u64 = flood.served.iter().sum();
    ensure!(
        built <= budget && built < served,
        "{built} snapshots for {served} flood answers (budget {budget})"
    );

    mxlb.wait_until_clean(idle_fds, relay.is_kernel())?;
    eprintln!(
        "stats flood, {relay:?} relay, {elapsed:.1?}:\n\
         \x20 slowloris: {slow:?}\n\
         \x20 flood (full attack, flood alone): {flood:?}\n\
         \x20 oversized: {big:?}\n\
         \x20 daemon: refused {refused}, timed out {timed_out}, snapshots built {built}\n\
         \x20 descriptors: idle {idle_fds}, peak {peak}, bound {bound}\n\
         \x20 daemon CPU during the attack: {cpu:?}\n\
         \x20 mail: {sessions} sessions, {} MiB; {}",
        bytes >> 20,
        mail.throughput()
    );
    Ok(())
}

/// The daemon's CPU time so far: its stats thread's and all its other threads'.
#[derive(Debug)]
struct ThreadCpu {
    stats: Duration,
    others: Duration,
}

impl ThreadCpu {
    fn since(&self, before: &ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            stats: self.stats.saturating_sub(before.stats),
            others: self.others.saturating_sub(before.others),
        }
    }
}

fn thread_cpu(pid: u32) -> Result<ThreadCpu> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut cpu = ThreadCpu {
        stats: Duration::ZERO,
        others: Duration::ZERO,
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended since the listing counts for nothing.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue;
        };
        let (name, rest) = stat
            .split_once(" (")
            .and_then(|(_, rest)| rest.rsplit_once(") "))
            .context("odd /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        let time = Duration::from_nanos(ticks * 1_000_000_000 / per_second);
        if name == "mxlb-stats" {
            cpu.stats += time;
        } else {
            cpu.others += time;
        }
    }
    Ok(cpu)
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, Result<T>>, what: &str) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("{what} panicked"))?
        .with_context(|| what.to_owned())
}

/// A backend that greets, takes everything to EOF, answers and closes.
fn pattern_backend() -> Result<Backend<Digest256>> {
    Backend::spawn(|mut stream, _| {
        stream.write_all(BANNER)?;
        let received = digest_until_eof(&mut stream)?;
        stream.write_all(REPLY)?;
        Ok(received)
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Baseline,
    FullAttack,
    FloodAlone,
    After,
    Done,
}

const STAGES: [Stage; 4] = [
    Stage::Baseline,
    Stage::FullAttack,
    Stage::FloodAlone,
    Stage::After,
];

/// The test's current stage, with when each began.
struct Phase {
    stage: Mutex<(Stage, Vec<Instant>)>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            stage: Mutex::new((Stage::Baseline, vec![Instant::now()])),
        }
    }

    fn set(&self, stage: Stage) {
        let mut guard = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 = stage;
        guard.1.push(Instant::now());
    }

    fn get(&self) -> Stage {
        self.stage.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn duration(&self, stage: Stage) -> Duration {
        let guard = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        let i = stage as usize;
        match (guard.1.get(i), guard.1.get(i + 1)) {
            (Some(start), Some(end)) => *end - *start,
            _ => Duration::ZERO,
        }
    }
}

/// The mail side: sessions and bytes by stage, and the digest of every session sent.
#[derive(Default)]
struct Mail {
    sessions: AtomicU64,
    bytes: AtomicU64,
    by_stage: Mutex<[(u64, u64); 4]>,
    sent: Mutex<Vec<Digest256>>,
    phase_lengths: Mutex<Vec<Duration>>,
}

impl Mail {
    /// Sessions back to back until the test is done.
    fn client(&self, listen: SocketAddr, client: usize, phase: &Phase) -> Result<()> {
        let mut n = 0u64;
        while phase.get() != Stage::Done {
            let seed = (client as u64) << 32 | n;
            // 16 KiB to 1 MiB: under and over the adaptive relay's hand-over point.
            let size = 16 * 1024 + seed.wrapping_mul(0x9E37_79B9) % (1 << 20);
            let stage = phase.get();
            let digest = session(listen, seed, size)
                .with_context(|| format!("mail client {client}, session {n}, during {stage:?}"))?;
            self.sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(digest);
            self.sessions.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(size, Ordering::SeqCst);
            if let Some(slot) = self
                .by_stage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(stage as usize)
            {
                slot.0 += 1;
                slot.1 += size;
            }
            n += 1;
        }
        let mut lengths = self.phase_lengths.lock().unwrap_or_else(|e| e.into_inner());
        if lengths.is_empty() {
            *lengths = STAGES.iter().map(|&s| phase.duration(s)).collect();
        }
        Ok(())
    }

    fn sessions_in(&self, stage: Stage) -> u64 {
        self.by_stage.lock().unwrap_or_else(|e| e.into_inner())[stage as usize].0
    }

    /// Every session's digest, sorted as the backends' reports are compared.
    fn expected(&self) -> Vec<Digest256> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
        sent.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        sent
    }

    fn throughput(&self) -> String {
        let by_stage = *self.by_stage.lock().unwrap_or_else(|e| e.into_inner());
        let lengths = self.phase_lengths.lock().unwrap_or_else(|e| e.into_inner());
        STAGES
            .iter()
            .zip(by_stage)
            .zip(lengths.iter())
            .map(|((stage, (sessions, bytes)), length)| {
                let seconds = length.as_secs_f64().max(0.001);
                format!(
                    "{stage:?}: {sessions} sessions ({:.0}/s), {:.1} MiB/s",
                    sessions as f64 / seconds,
                    bytes as f64 / seconds / f64::from(1 << 20)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One mail-like session: banner, `size` pattern bytes, half-close, the reply.
fn session(listen: SocketAddr, seed: u64, size: u64) -> Result<Digest256> {
    let mut client = TcpStream::connect_timeout(&listen, HANG)?;
    client.set_read_timeout(Some(HANG))?;
    client.set_write_timeout(Some(HANG))?;
    ensure!(read_line(&mut client)?.as_bytes() == BANNER, "banner");
    let sent = send_pattern(&mut client, seed, size)?;
    client.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    client.read_to_end(&mut reply)?;
    ensure!(reply == REPLY, "reply {reply:?}");
    Ok(sent)
}

/// Samples the daemon's descriptor count until the attack is over.
fn watch_fds(pid: u32, peak: &AtomicUsize, phase: &Phase) -> Result<()> {
    while phase.get() < Stage::After {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        peak.fetch_max(open, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Lowers the calling thread's CPU priority to the least (nice 19). The attackers share
/// this machine's CPUs with the mail clients and backends, which a real attacker does not:
/// at equal priority, the test's own attack threads would slow its mail clients down (and
/// with them the kernel relay, which runs in their system calls), whatever the daemon does.
fn attacker_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS as _, libc::gettid() as libc::id_t, 19);
    }
}

/// What the attackers saw.
#[derive(Default)]
struct Attack {
    slow: Mutex<SlowReport>,
    flood: Mutex<FloodReport>,
    oversized: Mutex<OversizedReport>,
}

#[derive(Clone, Debug, Default)]
struct SlowReport {
    opened: u64,
    /// Answered `503` and closed at once.
    refused: u64,
    /// Closed with nothing sent after at least half the timeout: the deadline.
    timed_out: u64,
    /// Closed with nothing sent sooner (a refusal whose 503 the reset overtook).
    closed_early: u64,
    /// Anything other than a 503: must stay 0.
    answered: u64,
    /// Still open when the slowloris stopped.
    open_at_end: u64,
    /// The longest any connection lived, closed or still open at the end.
    longest: Duration,
}

/// A slowloris connection: the request line and a header name sent, then a byte a second.
struct Slow {
    stream: TcpStream,
    opened: Instant,
    received: Vec<u8>,
}

/// The slowloris: [`SLOWLORIS`] connections kept open (each reopened when closed) until
/// the full attack is over.
fn slowloris(stats: SocketAddr, phase: &Phase, attack: &Attack) -> Result<()> {
    attacker_priority();
    let mut report = SlowReport::default();
    let mut open: Vec<Slow> = Vec::new();
    let mut last_byte = Instant::now();
    while phase.get() == Stage::FullAttack {
        let dribble = last_byte.elapsed() >= Duration::from_secs(1);
        if dribble {
            last_byte = Instant::now();
        }
        // Closed connections are replaced once a second, with the dribble: the slowloris
        // is slow, not a connection flood (the flooders are).
        while open.len() < SLOWLORIS && (dribble || report.opened == 0) {
            let mut stream = TcpStream::connect_timeout(&stats, HANG)?;
            // A refused connection may be closed before this reaches it.
            let _ = stream.write_all(b"GET /api/stats HTTP/1.1\r\nHost: slow\r\nX-Slow: ");
            stream.set_nonblocking(true)?;
            report.opened += 1;
            open.push(Slow {
                stream,
                opened: Instant::now(),
                received: Vec::new(),
            });
        }
        let mut still = Vec::with_capacity(open.len());
        for mut slow in open.drain(..) {
            let mut buffer = [0u8; 1024];
            let closed = match slow.stream.read(&mut buffer) {
                Ok(0) => true,
                Ok(n) => {
                    slow.received.extend_from_slice(&buffer[..n]);
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            let closed = closed
                || (dribble
                    && matches!(slow.stream.write(b"a"), Err(e) if e.kind() != ErrorKind::WouldBlock));
            if closed {
                let lived = slow.opened.elapsed();
                report.longest = report.longest.max(lived);
                if slow.received.starts_with(b"HTTP/1.1 503 ") {
                    report.refused += 1;
                } else if !slow.received.is_empty() {
                    report.answered += 1;
                } else if lived >= STATS_TIMEOUT / 2 {
                    report.timed_out += 1;
                } else {
                    report.closed_early += 1;
                }
            } else {
                still.push(slow);
            }
        }
        open = still;
        thread::sleep(Duration::from_millis(20));
    }
    for slow in &open {
        report.longest = report.longest.max(slow.opened.elapsed());
        if !slow.received.is_empty() && !slow.received.starts_with(b"HTTP/1.1 503 ") {
            report.answered += 1;
        }
    }
    report.open_at_end = open.len() as u64;
    *attack.slow.lock().unwrap_or_else(|e| e.into_inner()) = report;
    Ok(())
}

#[derive(Clone, Debug, Default)]
struct FloodReport {
    /// By stage: [full attack, flood alone].
    served: [u64; 2],
    refused: [u64; 2],
    /// Connections closed or reset before an answer (a refusal the reset overtook, or a
    /// kept-alive connection closed at the timeout just as a request left).
    closed: [u64; 2],
    /// Any other answer: must stay empty.
    other: Vec<String>,
    /// The longest wait for an answer or a close.
    slowest: Duration,
}

/// A flooder: keep-alive connections, each for [`REQUESTS_PER_CONNECTION`] requests,
/// back to back while the attack lasts.
fn flood(stats: SocketAddr, n: usize, phase: &Phase, attack: &Attack) -> Result<()> {
    attacker_priority();
    let paths = ["/api/stats", "/", "/metrics"];
    let mut report = FloodReport::default();
    let mut i = n;
    while let stage @ (Stage::FullAttack | Stage::FloodAlone) = phase.get() {
        let slot = usize::from(stage == Stage::FloodAlone);
        let mut stream = TcpStream::connect_timeout(&stats, HANG)?;
        stream.set_read_timeout(Some(HANG))?;
        stream.set_write_timeout(Some(HANG))?;
        for _ in 0..REQUESTS_PER_CONNECTION {
            i += 1;
            let path = paths[i % paths.len()];
            let asked = Instant::now();
            let request = format!("GET {path} HTTP/1.1\r\nHost: flood\r\n\r\n");
            let answer = stream
                .write_all(request.as_bytes())
                .map_err(anyhow::Error::from)
                .and_then(|()| read_answer(&mut stream));
            report.slowest = report.slowest.max(asked.elapsed());
            match answer {
                Ok(Some(200)) => report.served[slot] += 1,
                Ok(Some(503)) => {
                    report.refused[slot] += 1;
                    // Refused: try again shortly, as a client would after Retry-After.
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
                Ok(None) => {
                    report.closed[slot] += 1;
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
                Ok(Some(status)) => report.other.push(format!("{path}: {status}")),
                Err(e) => {
                    report.other.push(format!("{path}: {e:#}"));
                    break;
                }
            }
        }
    }
    let mut shared = attack.flood.lock().unwrap_or_else(|e| e.into_inner());
    for slot in 0..2 {
        shared.served[slot] += report.served[slot];
        shared.refused[slot] += report.refused[slot];
        shared.closed[slot] += report.closed[slot];
    }
    shared.other.extend(report.other);
    shared.slowest = shared.slowest.max(report.slowest);
    Ok(())
}

/// Reads one answer off a kept-alive connection: its status, after its whole body;
/// `None` if the connection was closed or reset first. A read that times out is an
/// error: something hung.
fn read_answer(stream: &mut TcpStream) -> Result<Option<u16>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => head.push(byte[0]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no answer within {HANG:?}")
            }
            Err(_) => return Ok(None),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line of {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("content-length in {head:?}"))?;
    let mut body = vec![0u8; length];
    match stream.read_exact(&mut body) {
        Ok(()) => Ok(Some(status)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("body not sent within {HANG:?}")
        }
        Err(_) => Ok(None),
    }
}

#[derive(Clone, Debug, Default)]
struct OversizedReport {
    /// A body past the 4 KiB limit: 413.
    body_413: u64,
    /// 16 KiB of headers: 431.
    header_431: u64,
    /// 40 header fields: 431.
    count_431: u64,
    /// A 1 MiB body: 413, or the connection closed under the writer.
    huge_body_refused: u64,
    /// 503 (the cap was full) or closed before the answer.
    refused: u64,
    closed: u64,
    /// Anything else (a 200, a hang): must stay empty.
    other: Vec<String>,
}

/// Oversized requests, one kind after the other, while the attack lasts.
fn oversized(stats: SocketAddr, phase: &Phase, attack: &Attack) -> Result<()> {
    attacker_priority();
    let mut report = OversizedReport::default();
    let big_header = "x".repeat(16 * 1024);
    let many_headers: String = (0..40).map(|i| format!("X-Many-{i}: {i}\r\n")).collect();
    let mut kind = 0usize;
    while matches!(phase.get(), Stage::FullAttack | Stage::FloodAlone) {
        kind += 1;
        let (request, body_len) = match kind % 4 {
            0 => (
                format!(
                    "POST /api/servers/smtp/one/state HTTP/1.1\r\nHost: big\r\n\
                     Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
                     Content-Length: 8192\r\n\r\n"
                ),
                8192,
            ),
            1 => (
                format!("GET /api/stats HTTP/1.1\r\nHost: big\r\nX-Big: {big_header}\r\n\r\n"),
                0,
            ),
            2 => (
                format!("GET /api/stats HTTP/1.1\r\nHost: big\r\n{many_headers}\r\n"),
                0,
            ),
            _ => (
                format!(
                    "POST /api/servers/smtp/one/state HTTP/1.1\r\nHost: big\r\n\
                     Authorization: Bearer {TOKEN}\r\nContent-Length: 1048576\r\n\r\n"
                ),
                1 << 20,
            ),
        };
        let mut stream = TcpStream::connect_timeout(&stats, HANG)?;
        stream.set_read_timeout(Some(HANG))?;
        stream.set_write_timeout(Some(HANG))?;
        let mut bytes = request.into_bytes();
        bytes.resize(bytes.len() + body_len, b'{');
        let written = stream.write_all(&bytes);
        let answer = read_answer(&mut stream);
        let expected = match kind % 4 {
            0 => &mut report.body_413,
            1 => &mut report.header_431,
            2 => &mut report.count_431,
            _ => &mut report.huge_body_refused,
        };
        match (kind % 4, answer, written) {
            (0 | 3, Ok(Some(413)), _) | (1 | 2, Ok(Some(431)), _) => *expected += 1,
            // The daemon may close on a writer that is still sending a refused body.
            (3, Ok(None), _) | (3, _, Err(_)) => *expected += 1,
            (_, Ok(Some(503)), _) => report.refused += 1,
            (_, Ok(None), _) => report.closed += 1,
            (k, Ok(Some(status)), _) => report.other.push(format!("kind {k}: {status}")),
            (k, Err(e), _) => report.other.push(format!("kind {k}: {e:#}")),
        }
        thread::sleep(Duration::from_millis(20));
    }
    *attack.oversized.lock().unwrap_or_else(|e| e.into_inner()) = report;
    Ok(())
}
