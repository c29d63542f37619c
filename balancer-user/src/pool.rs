//! A listener's servers at run time: health, open sessions, and which of them may take the
//! next client.
//!
//! Health has one owner per server, [`HealthState`] behind a mutex, fed by two sources: the
//! server's scheduled checks ([`monitor`]) and failed connects of real clients, which count
//! as failed checks at once (like HAProxy's `observe layer4`) so a dead server stops getting
//! clients before its next check is due.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::balance::Candidate;
use crate::config::{Listener, Server};
use crate::health::{CheckResult, CheckSpec, CheckStatus, HealthState, Transition, run_check};

/// One server at run time.
pub struct ServerRuntime {
    pub config: Server,
    /// How this server is checked; `None`: never checked, always up.
    check: Option<CheckSpec>,
    health: Mutex<HealthState>,
    last_check: Mutex<Option<CheckResult>>,
    sessions: AtomicU32,
}

impl ServerRuntime {
    pub fn is_up(&self) -> bool {
        self.check.is_none() || self.health().is_up()
    }

    /// Sessions currently relayed to this server.
    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// The result of the last health check, if one ran.
    pub fn last_check(&self) -> Option<CheckResult> {
        lock(&self.last_check).clone()
    }

    /// Counts a session until the returned guard is dropped.
    pub fn open_session(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionGuard {
            server: self.clone(),
        }
    }

    fn health(&self) -> MutexGuard<'_, HealthState> {
        lock(&self.health)
    }

    fn candidate(&self) -> Candidate {
        Candidate {
            weight: self.config.weight,
            eligible: self.is_up(),
            backup: self.config.backup,
            sessions: self.sessions(),
        }
    }
}

/// Decrements the server's session count when the session ends.
pub struct SessionGuard {
    server: Arc<ServerRuntime>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.server.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The servers of one listener.
pub struct Pool {
    pub listener: String,
    pub servers: Vec<Arc<ServerRuntime>>,
}

impl Pool {
    pub fn new(listener: &Listener) -> Pool {
        let servers = listener
            .servers
            .iter()
            .map(|server| {
                Arc::new(ServerRuntime {
                    config: server.clone(),
                    check: CheckSpec::from_config(&listener.check, server),
                    health: Mutex::new(HealthState::new(listener.check.rise, listener.check.fall)),
                    last_check: Mutex::new(None),
                    sessions: AtomicU32::new(0),
                })
            })
            .collect();
        Pool {
            listener: listener.name.clone(),
            servers,
        }
    }

    /// What the selector needs to know about each server, in configuration order.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.servers.iter().map(|s| s.candidate()).collect()
    }

    /// Records a health check result; logs the result that changed the server's state.
    pub fn record_check(&self, server: &ServerRuntime, result: CheckResult) {
        let transition = server.health().record(result.passed());
        self.log_transition(server, transition, &result.describe());
        *lock(&server.last_check) = Some(result);
    }

    /// A real client could not connect: counts as a failed check at once.
    pub fn record_connect_failure(&self, server: &ServerRuntime, error: &std::io::Error) {
        if server.check.is_none() {
            return;
        }
        let transition = server.health().force_down();
        self.log_transition(
            server,
            transition,
            &format!("client connect failed: {error}"),
        );
    }

    fn log_transition(&self, server: &ServerRuntime, transition: Option<Transition>, why: &str) {
        let Some(transition) = transition else {
            return;
        };
        let (active, backup) = self.servers_up();
        let name = format!("{}/{}", self.listener, server.config.name);
        match transition {
            Transition::Up => info!(
                server = %name,
                "server {name} is UP ({why}); {active} active and {backup} backup servers online"
            ),
            Transition::Down => warn!(
                server = %name,
                "server {name} is DOWN ({why}); {active} active and {backup} backup servers left"
            ),
        }
    }

    fn servers_up(&self) -> (usize, usize) {
        let up = |backup: bool| {
            self.servers
                .iter()
                .filter(|s| s.config.backup == backup && s.is_up())
                .count()
        };
        (up(false), up(true))
    }

    /// Starts one health monitor per checked server; they stop with `stop`.
    pub fn start_monitors(self: &Arc<Self>, listener: &Listener, stop: &CancellationToken) {
        let count = self.servers.len().max(1) as u32;
        for (index, server) in self.servers.iter().enumerate() {
            let Some(spec) = server.check.clone() else {
                continue;
            };
            // Spread the first checks over one interval, as HAProxy does, so servers are not
            // all checked in the same instant.
            let first = listener.check.inter * index as u32 / count;
            tokio::spawn(monitor(
                self.clone(),
                server.clone(),
                spec,
                Intervals::from(listener),
                first,
                stop.clone(),
            ));
        }
    }
}

/// The check intervals of a listener.
#[derive(Clone, Copy)]
struct Intervals {
    inter: Duration,
    fastinter: Duration,
    downinter: Duration,
}

impl From<&Listener> for Intervals {
    fn from(listener: &Listener) -> Intervals {
        Intervals {
            inter: listener.check.inter,
            fastinter: listener.check.fastinter,
            downinter: listener.check.downinter,
        }
    }
}

/// Checks one server forever: check, record, wait the interval its state calls for.
async fn monitor(
    pool: Arc<Pool>,
    server: Arc<ServerRuntime>,
    spec: CheckSpec,
    intervals: Intervals,
    first: Duration,
    stop: CancellationToken,
) {
    let mut wait = first;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let result = run_check(&spec, server.config.addr).await;
        if result.status == CheckStatus::L7Ok || result.status == CheckStatus::L4Ok {
            tracing::trace!(server = %server.config.name, "check {result}");
        }
        pool.record_check(&server, result);
        wait = server.health().next_interval(
            intervals.inter,
            intervals.fastinter,
            intervals.downinter,
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
