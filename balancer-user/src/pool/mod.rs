//! A listener's servers at run time: health, open sessions, the operator's admin state, and
//! which of them may take the next client.
//!
//! Health has one owner per server, a `HealthState` behind a mutex, fed by two sources: the
//! server's scheduled checks ([`monitor`]) and failed connects of real clients, which count
//! as failed checks at once (like HAProxy's `observe layer4`) so a dead server stops getting
//! clients before its next check is due.

mod monitor;
mod server;

pub use server::{Reservation, ServerRuntime, SessionGuard, Status};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::accept_proxy::HeaderError;
use crate::balance::Candidate;
use crate::config::{Balance, Listener};
use crate::health::{CheckResult, CheckSpec, Transition};
use crate::limits::{Gauge, Refusals, Throttle, suppressed_note};
use crate::relay::Relay;
use crate::stats::{AdminError, AdminState, ListenerStats};

/// The servers of one listener, and the listener's own counters.
pub struct Pool {
    pub listener: String,
    pub servers: Vec<Arc<ServerRuntime>>,
    bind: Vec<String>,
    balance: Balance,
    /// Clients being served, with the listener's `maxconn` as the ceiling.
    pub sessions: Arc<Gauge>,
    /// Kept across reloads, with `sessions` and the servers' own state.
    counters: Arc<ListenerCounters>,
}

/// A listener's totals since the daemon started.
struct ListenerCounters {
    sessions_total: AtomicU64,
    refused_no_server: AtomicU64,
    /// Clients refused by a connection limit.
    refusals: Refusals,
    accept_errors: AtomicU64,
    /// Connections closed for a missing or bad PROXY header (`accept_proxy`).
    bad_proxy_headers: AtomicU64,
    bad_proxy_header_log: Throttle,
}

impl Default for ListenerCounters {
    fn default() -> Self {
        ListenerCounters {
            sessions_total: AtomicU64::default(),
            refused_no_server: AtomicU64::default(),
            refusals: Refusals::default(),
            accept_errors: AtomicU64::default(),
            bad_proxy_headers: AtomicU64::default(),
            bad_proxy_header_log: Throttle::new(Duration::from_secs(1)),
        }
    }
}

impl Pool {
    pub fn new(listener: &Listener) -> Pool {
        let sessions = Arc::new(Gauge::new(listener.maxconn));
        Pool::build(listener, &[], sessions, Arc::default())
    }

    /// This listener's pool under a reloaded configuration. A server keeps its health,
    /// admin state and counters when its name and address are unchanged (its other
    /// settings may change); a server with a new name or address starts afresh, as a new
    /// server does at start. The listener's counters and open sessions carry over.
    pub fn reconfigured(&self, listener: &Listener) -> Pool {
        self.sessions.set_limit(listener.maxconn);
        Pool::build(
            listener,
            &self.servers,
            self.sessions.clone(),
            self.counters.clone(),
        )
    }

    /// The pool of `listener`, each server continuing the one of `previous` that is the
    /// same server ([`same_server`]), if any.
    fn build(
        listener: &Listener,
        previous: &[Arc<ServerRuntime>],
        sessions: Arc<Gauge>,
        counters: Arc<ListenerCounters>,
    ) -> Pool {
        Pool {
            listener: listener.name.clone(),
            servers: listener
                .servers
                .iter()
                .map(|server| {
                    let before = previous.iter().find(|old| same_server(&old.config, server));
                    Arc::new(server_runtime(listener, server, before.map(AsRef::as_ref)))
                })
                .collect(),
            bind: listener.bind.iter().map(ToString::to_string).collect(),
            balance: listener.balance,
            sessions,
            counters,
        }
    }

    /// Clients refused by a connection limit.
    pub fn refusals(&self) -> &Refusals {
        &self.counters.refusals
    }

    /// What the selector needs to know about each server, in configuration order.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.servers.iter().map(|s| s.candidate()).collect()
    }

    /// Counts an admitted client in the total (its place in [`Pool::sessions`] is held by
    /// the admission).
    pub fn count_session(&self) {
        self.counters.sessions_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A client was answered 421 because no server could take it.
    pub fn count_refused(&self) {
        self.counters
            .refused_no_server
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A connection on an `accept_proxy` listener came without a usable PROXY header and
    /// was closed: counted, and logged at most once a second.
    pub fn record_bad_proxy_header(&self, peer: SocketAddr, error: &HeaderError) {
        self.counters
            .bad_proxy_headers
            .fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.counters.bad_proxy_header_log.allow(Instant::now()) {
            warn!(
                listener = %self.listener, %peer,
                "closed a connection without a usable PROXY header: {error}{}",
                suppressed_note(suppressed)
            );
        }
    }

    /// An `accept` on one of the listener's sockets failed.
    pub fn count_accept_error(&self) {
        self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a health check result; logs results that move the server towards a state
    /// change, and the change itself.
    pub fn record_check(&self, server: &ServerRuntime, result: CheckResult) {
        if !result.passed() {
            server.count_failed_check();
        }
        let transition = server.record_health(result.passed());
        let why = result.describe();
        server.set_last_check(result);
        self.log_health(server, transition, &why);
    }

    /// A real client could not connect: counts as a failed check at once.
    pub fn record_connect_failure(&self, server: &ServerRuntime, error: &std::io::Error) {
        server.count_connect_error();
        if server.check.is_none() {
            return;
        }
        let transition = server.record_health(false);
        self.log_health(
            server,
            transition,
            &format!("client connect failed: {error}"),
        );
    }

    fn log_health(&self, server: &ServerRuntime, transition: Option<Transition>, why: &str) {
        let name = format!("{}/{}", self.listener, server.config.name);
        let (active, backup) = self.servers_up();
        match transition {
            Some(Transition::Up) => info!(
                server = %name,
                "server {name} is UP ({why}); {active} active and {backup} backup servers online"
            ),
            Some(Transition::Down) => warn!(
                server = %name,
                "server {name} is DOWN ({why}); {active} active and {backup} backup servers left"
            ),
            None => {
                if let Some((count, needed)) = server.health_change_pending() {
                    let (outcome, towards) = if server.is_up() {
                        ("failed", "DOWN")
                    } else {
                        ("succeeded", "UP")
                    };
                    // Debug, as HAProxy logs these only with `option log-health-checks`: at
                    // info, a flapping server would write a line every few seconds.
                    debug!(
                        server = %name,
                        "health check for {name} {outcome} ({why}); {count}/{needed} towards {towards}"
                    );
                }
            }
        }
    }

    fn servers_up(&self) -> (usize, usize) {
        let up = |backup: bool| {
            self.servers
                .iter()
                .filter(|s| s.config.backup == backup && s.takes_clients())
                .count()
        };
        (up(false), up(true))
    }

    /// The server called `name`.
    fn server(&self, name: &str) -> Result<&ServerRuntime, AdminError> {
        self.servers
            .iter()
            .find(|s| s.config.name == name)
            .map(AsRef::as_ref)
            .ok_or_else(|| AdminError::UnknownServer {
                listener: self.listener.clone(),
                server: name.to_owned(),
            })
    }

    /// Sets the operator's state of the server called `name`.
    pub fn set_admin_state(&self, name: &str, state: AdminState) -> Result<(), AdminError> {
        let server = self.server(name)?;
        let previous = server.set_admin_state(state);
        if previous != state {
            info!(
                server = %format!("{}/{name}", self.listener),
                "server {}/{name} set from {} to {} by the admin API; now {}",
                self.listener,
                previous.as_str(),
                state.as_str(),
                server.status().as_str()
            );
        }
        Ok(())
    }

    /// Sets the weight of the server called `name` (HAProxy's `set weight`), in force for
    /// the next pick.
    pub fn set_weight(&self, name: &str, weight: u32) -> Result<(), AdminError> {
        let previous = self.server(name)?.set_weight(weight);
        if previous != weight {
            info!(
                server = %format!("{}/{name}", self.listener),
                "server {}/{name} weight set from {previous} to {weight} by the admin API",
                self.listener,
            );
        }
        Ok(())
    }

    /// The numbers the stats show for this listener.
    pub fn stats(&self, relay: &Relay) -> ListenerStats {
        let servers: Vec<_> = self.servers.iter().map(|s| s.stats(relay)).collect();
        ListenerStats {
            name: self.listener.clone(),
            bind: self.bind.clone(),
            balance: self.balance.as_str().to_owned(),
            sessions_cur: u64::from(self.sessions.open()),
            sessions_max: u64::from(self.sessions.peak()),
            sessions_limit: u64::from(self.sessions.limit()),
            sessions_total: self.counters.sessions_total.load(Ordering::Relaxed),
            bytes_in: servers.iter().map(|s| s.bytes_in).sum(),
            bytes_out: servers.iter().map(|s| s.bytes_out).sum(),
            refused_no_server: self.counters.refused_no_server.load(Ordering::Relaxed),
            refused_limits: self.counters.refusals.stats(),
            accept_errors: self.counters.accept_errors.load(Ordering::Relaxed),
            bad_proxy_headers: self.counters.bad_proxy_headers.load(Ordering::Relaxed),
            // The frontend owns the per-source table and fills this in.
            sources_tracked: 0,
            servers,
        }
    }

    /// Starts one health monitor per checked server; they stop with `stop`.
    pub fn start_monitors(self: &Arc<Self>, listener: &Listener, stop: &CancellationToken) {
        monitor::start(self, listener, stop);
    }
}

/// Across a reload, a server is the same server when its name and its address are: it
/// keeps its state. Any other setting may change.
pub fn same_server(a: &crate::config::Server, b: &crate::config::Server) -> bool {
    a.name == b.name && a.addr == b.addr
}

/// A server's runtime under `listener`'s check settings: a continuation of `before` (the
/// same server in the previous configuration), if there is one.
fn server_runtime(
    listener: &Listener,
    server: &crate::config::Server,
    before: Option<&ServerRuntime>,
) -> ServerRuntime {
    let check = CheckSpec::from_config(&listener.check, server);
    let (rise, fall) = (listener.check.rise, listener.check.fall);
    match before {
        Some(before) => before.reconfigured(server.clone(), check, rise, fall),
        None => ServerRuntime::new(server.clone(), check, rise, fall),
    }
}
