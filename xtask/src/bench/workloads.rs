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
}

pub const SESSIONS: u32 = 20;
pub const MESSAGE_BYTES: u32 = 2048;

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::SessionPerMessage, Workload::ManyPerSession];

    pub fn id(self) -> &'static str {
        match self {
            Workload::SessionPerMessage => "w1-session-per-message",
            Workload::ManyPerSession => "w2-many-per-session",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::SessionPerMessage => "1: one session per message",
            Workload::ManyPerSession => "2: many messages per session (-d)",
        }
    }

    /// Messages per measurement in the full run (`--quick` sends a tenth).
    pub fn messages(self) -> u32 {
        match self {
            Workload::SessionPerMessage => 10_000,
            Workload::ManyPerSession => 20_000,
        }
    }
}

/// The smtp-source command for `messages` messages over `sessions` parallel sessions.
pub fn command(workload: Workload, target: SocketAddr, sessions: u32, messages: u32) -> Command {
    let mut c = Command::new(tools::SMTP_SOURCE);
    if workload == Workload::ManyPerSession {
        c.arg("-d");
    }
    c.args(["-s", &sessions.to_string()])
        .args(["-m", &messages.to_string()])
        .args(["-l", &MESSAGE_BYTES.to_string()])
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
        let mut c = command(workload, *target, SESSIONS / n, messages / n);
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
