//! Workload 4's own measurements: 1,000 sessions opened through the balancer and left
//! idle (after the 220 banner), the memory they cost, and the latency of one SMTP round
//! trip. The sessions stay open while workload 2 runs through the same balancer.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Idle sessions per measurement.
pub const SESSIONS: usize = 1000;
/// NOOP round trips timed per measurement (over the first idle sessions, one each).
pub const ROUND_TRIPS: usize = 1000;

/// Median, 90th and 99th percentile, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut micros: Vec<f64>) -> Percentiles {
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// What one measurement of workload 4 found besides throughput and CPU.
#[derive(Clone, Copy, Debug)]
pub struct IdleMetrics {
    pub sessions: usize,
    /// Growth of the balancer's resident memory (all its processes) per idle session, KiB;
    /// `None` without a balancer (direct).
    pub balancer_kib: Option<f64>,
    /// Growth of the machine's used memory (MemTotal − MemAvailable) per idle session, KiB:
    /// sockets of client, balancer and backends, and the backends' own state included.
    pub system_kib: f64,
    /// Connect until the 220 banner has arrived: accept, pick, connect, relay.
    pub banner: Percentiles,
    /// `NOOP` until its `250` reply, over an established session.
    pub noop: Percentiles,
}

/// Open idle sessions; dropping this closes them.
pub struct IdleSessions {
    _open: Vec<TcpStream>,
}

/// Opens [`SESSIONS`] sessions round-robin over `targets`, one after the other, timing
/// each banner; times a NOOP on each of the first [`ROUND_TRIPS`]; measures memory.
pub fn open(
    targets: &[SocketAddr],
    balancer_pid: Option<u32>,
) -> Result<(IdleSessions, IdleMetrics)> {
    let mut sessions = Vec::with_capacity(SESSIONS);
    let mut banner = Vec::with_capacity(SESSIONS);
    // Memory is measured over the second half only: the first half uses up whatever a
    // fresh process already has resident but free (a start-up's freed allocations), which
    // would otherwise make sessions look free.
    let (mut rss_half, mut used_half) = (None, 0.0);
    for i in 0..SESSIONS {
        if i == SESSIONS / 2 {
            settle();
            rss_half = balancer_pid.map(tree_rss_kib).transpose()?;
            used_half = used_memory_kib()?;
        }
        let target = targets[i % targets.len()];
        let started = Instant::now();
        let stream =
            TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let line = read_line(&stream)?;
        banner.push(started.elapsed().as_secs_f64() * 1e6);
        if !line.starts_with("220") {
            bail!("idle session {i} through {target}: expected a 220 banner, got {line:?}");
        }
        sessions.push(stream);
    }
    let mut noop = Vec::with_capacity(ROUND_TRIPS);
    for stream in sessions.iter_mut().take(ROUND_TRIPS) {
        let started = Instant::now();
        stream.write_all(b"NOOP\r\n")?;
        let line = read_line(stream)?;
        noop.push(started.elapsed().as_secs_f64() * 1e6);
        if !line.starts_with("250") {
            bail!("NOOP: expected 250, got {line:?}");
        }
    }
    settle();
    let per_session = |before: f64, after: f64| (after - before) / (SESSIONS - SESSIONS / 2) as f64;
    let balancer_kib = match (balancer_pid, rss_half) {
        (Some(pid), Some(before)) => Some(per_session(before, tree_rss_kib(pid)?)),
        _ => None,
    };
    let system_kib = per_session(used_half, used_memory_kib()?);
    let metrics = IdleMetrics {
        sessions: SESSIONS,
        balancer_kib,
        system_kib,
        banner: Percentiles::of(banner),
        noop: Percentiles::of(noop),
    };
    Ok((IdleSessions { _open: sessions }, metrics))
}

/// Lets the balancer finish what the last sessions started (lazy allocations, deferred
/// frees) before memory is read.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// One CRLF-terminated reply line (byte by byte: nothing after it is consumed).
fn read_line(stream: &TcpStream) -> Result<String> {
    let mut line = String::new();
    BufReader::with_capacity(1, stream).read_line(&mut line)?;
    Ok(line)
}

/// Resident memory of a process and all its descendants (NGINX's workers, say), KiB.
fn tree_rss_kib(root: u32) -> Result<f64> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // The field after the parenthesised command name is the state, then the parent.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
        {
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    let mut total = 0.0;
    for pid in tree {
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            total += field_kib(&status, "VmRSS:").unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// MemTotal − MemAvailable, KiB.
fn used_memory_kib() -> Result<f64> {
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    let total = field_kib(&meminfo, "MemTotal:").context("no MemTotal")?;
    let available = field_kib(&meminfo, "MemAvailable:").context("no MemAvailable")?;
    Ok(total - available)
}

fn field_kib(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
