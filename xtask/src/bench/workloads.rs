//! The client side: Postfix's smtp-source, 20 sessions in parallel, 2 KiB messages.
//! smtp-source disconnects after each message unless given `-d` (smtp-source(1)).

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::tools;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One SMTP session per message.
    SessionPerMessage,
    /// Many messages per session (`-d`).
    ManyPerSession,
    /// Bulk: 50 MiB messages, one after the other over one session per backend.
    Bulk,
    /// Workload 2 again, with 1,000 idle sessions open through the same balancer
    /// (`idle.rs` opens them and measures their memory and round-trip latency).
    IdleAndMany,
}

pub const SESSIONS: u32 = 20;
pub const MESSAGE_BYTES: u32 = 2048;
pub const BULK_BYTES: u32 = 50 << 20;

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::SessionPerMessage,
        Workload::ManyPerSession,
        Workload::Bulk,
        Workload::IdleAndMany,
    ];

    /// Sessions in parallel (split over the backends in the direct case).
    pub fn sessions(self) -> u32 {
        match self {
            Workload::Bulk => 2,
            _ => SESSIONS,
        }
    }

    /// Bytes per message.
    pub fn message_bytes(self) -> u32 {
        match self {
            Workload::Bulk => BULK_BYTES,
            _ => MESSAGE_BYTES,
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Workload::SessionPerMessage => "w1-session-per-message",
            Workload::ManyPerSession => "w2-many-per-session",
            Workload::Bulk => "w3-bulk",
            Workload::IdleAndMany => "w4-idle-and-many",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::SessionPerMessage => "1: one session per message",
            Workload::ManyPerSession => "2: many messages per session (-d)",
            Workload::Bulk => "3: bulk, 50 MiB messages (-d)",
            Workload::IdleAndMany => "4: workload 2 with 1,000 idle sessions open",
        }
    }

    /// Messages per measurement in the full run (`--quick` sends a tenth).
    pub fn messages(self) -> u32 {
        match self {
            Workload::SessionPerMessage => 10_000,
            Workload::ManyPerSession | Workload::IdleAndMany => 20_000,
            Workload::Bulk => 40,
        }
    }
}

/// The smtp-source command for `messages` messages over `sessions` parallel sessions.
pub fn command(workload: Workload, target: SocketAddr, sessions: u32, messages: u32) -> Command {
    let mut c = Command::new(tools::SMTP_SOURCE);
    if workload != Workload::SessionPerMessage {
        c.arg("-d");
    }
    c.args(["-s", &sessions.to_string()])
        .args(["-m", &messages.to_string()])
        .args(["-l", &workload.message_bytes().to_string()])
        .args(["-M", "bench.test"])
        .arg(target.to_string());
    c
}

/// Splits the load over the targets (the `direct` case: half the sessions and half the
/// messages to each backend), runs the clients together and returns the wall time.
pub fn run(
    workload: Workload,
    targets: &[SocketAddr],
    messages: u32,
    dir: &Path,
    timeout: Duration,
) -> Result<(Duration, Vec<String>)> {
    let n = targets.len() as u32;
    let mut lines = Vec::new();
    let mut children: Vec<(Child, String)> = Vec::new();
    let start = Instant::now();
    for (i, target) in targets.iter().enumerate() {
        let sessions = (workload.sessions() / n).max(1);
        let mut c = command(workload, *target, sessions, (messages / n).max(1));
        let line = crate::cmd::display(&c);
        let log = dir.join(format!("smtp-source-{i}.log"));
        let file = fs::File::create(&log)?;
        let child = c
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        children.push((child, log.display().to_string()));
        lines.push(line);
    }
    // Guard: smtp-source processes are killed if anything below fails.
    let mut guard = Clients(children);
    let mut done = vec![false; guard.0.len()];
    while done.iter().any(|d| !d) {
        for (i, (child, log)) in guard.0.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                done[i] = true;
                let output = fs::read_to_string(&*log).unwrap_or_default();
                if !status.success() || output.contains("fatal") || output.contains("warning") {
                    bail!("`{}` ended with {status}:\n{output}", lines[i]);
                }
            }
        }
        if start.elapsed() > timeout {
            bail!("smtp-source did not finish within {timeout:?}: {lines:?}");
        }
        thread::sleep(Duration::from_millis(2));
    }
    let wall = start.elapsed();
    guard.0.clear();
    Ok((wall, lines))
}

struct Clients(Vec<(Child, String)>);

impl Drop for Clients {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
