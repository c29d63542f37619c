//! What the stats endpoints show: a snapshot of every listener and server, built by the
//! daemon on request, serialised as `/api/stats` and rendered as HTML and Prometheus text.
//!
//! Field names are the contract's (`../shared/design/interface.md`); `bytes_in` counts
//! client-to-server bytes, `bytes_out` server-to-client, including what the kernel relayed.

use serde::{Deserialize, Serialize};

/// Everything the stats endpoints know, at one instant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// mxlb's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: f64,
    /// `kernel` or `userspace`.
    pub relay: String,
    /// Client connections open now, over all listeners.
    pub conns_cur: u64,
    /// `global.maxconn`: the most client connections open at once.
    pub maxconn: u64,
    /// Configuration reloads (SIGHUP) applied since the start.
    #[serde(default)]
    pub reloads: u64,
    /// Reloads refused (a file that does not parse, an address that cannot be bound); the
    /// configuration in force stayed.
    #[serde(default)]
    pub reload_failures: u64,
    /// Connections whose byte conservation check failed (the relay reset both sides). It
    /// must stay 0; anything else is a bug worth a report.
    #[serde(default)]
    pub integrity_errors: u64,
    pub listeners: Vec<ListenerStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ListenerStats {
    pub name: String,
    pub bind: Vec<String>,
    /// `roundrobin`, `leastconn`, `source` or `first`.
    pub balance: String,
    pub sessions_cur: u64,
    pub sessions_max: u64,
    /// The listener's `maxconn`.
    pub sessions_limit: u64,
    pub sessions_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Clients answered `421 4.3.0` because no server could take them.
    pub refused_no_server: u64,
    /// Clients answered `421 4.7.0` because a connection limit was reached (or `421 4.3.2`
    /// when the daemon was out of descriptors), by limit. Those refused by `global`,
    /// `listener` and the per-source limits are not counted as sessions.
    pub refused_limits: RefusedLimits,
    /// Failed `accept` calls (out of descriptors or memory, mostly).
    pub accept_errors: u64,
    /// Connections closed because an `accept_proxy` listener got no usable PROXY header.
    #[serde(default)]
    pub bad_proxy_headers: u64,
    /// Client sources (addresses or blocks) the per-source limits track now.
    pub sources_tracked: u64,
    pub servers: Vec<ServerStats>,
}

/// Refused clients by the limit that refused them; the field names are the `reason` label
/// of `mxlb_listener_refused_total`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedLimits {
    /// `global.maxconn`.
    pub global: u64,
    /// The listener's `maxconn`.
    pub listener: u64,
    /// Every server that is up was at its `maxconn`.
    pub server: u64,
    /// `max_conn_per_source`.
    pub source_conn: u64,
    /// `max_rate_per_source`.
    pub source_rate: u64,
    /// The daemon was out of descriptors or memory for the server connection.
    pub resources: u64,
}

impl RefusedLimits {
    /// `(reason, count)` in a fixed order.
    pub fn by_reason(&self) -> [(&'static str, u64); 6] {
        [
            ("global", self.global),
            ("listener", self.listener),
            ("server", self.server),
            ("source_conn", self.source_conn),
            ("source_rate", self.source_rate),
            ("resources", self.resources),
        ]
    }

    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServerStats {
    pub name: String,
    pub addr: String,
    /// `UP`, `DOWN`, `DRAIN` or `MAINT`: maintenance and drain override health.
    pub status: String,
    /// What the operator set: `ready`, `drain` or `maint`.
    pub admin_state: String,
    /// Whether health checks run for this server (`false`: always considered up).
    pub checked: bool,
    /// The last check as HAProxy shows it, e.g. `L7OK/250 in 1ms`; `None` before the first.
    pub check_status: Option<String>,
    /// The last check's detail, e.g. `250 mail1.example` or `Connection refused`.
    pub check_detail: Option<String>,
    /// The weight selection uses now: the file's, or one set at run time
    /// (`POST /api/servers/{listen}/{server}/weight`).
    pub weight: u32,
    /// The weight the configuration file gives; differs from `weight` after a runtime
    /// change.
    #[serde(default)]
    pub config_weight: u32,
    pub backup: bool,
    pub sessions_cur: u64,
    pub sessions_max: u64,
    /// The server's `maxconn`; 0: no limit.
    pub sessions_limit: u64,
    pub sessions_total: u64,
    /// Client-to-server bytes, finished and live sessions.
    pub bytes_in: u64,
    /// Server-to-client bytes, finished and live sessions.
    pub bytes_out: u64,
    /// The part of `bytes_in` + `bytes_out` the kernel relay moved (counted by the eBPF
    /// program, not estimated).
    pub kernel_bytes: u64,
    /// Failed connect attempts to this server.
    pub connect_errors: u64,
    /// Seconds since the last change of `status` (HAProxy's LastChg).
    pub last_change_secs: f64,
    /// When `status` last changed, RFC 3339 in UTC (`2026-12-02T05:40:00Z`); the daemon's
    /// start for a server that never changed.
    #[serde(default)]
    pub last_change_at: String,
    /// Total seconds spent DOWN since start (HAProxy's Downtime).
    pub downtime_secs: f64,
    /// Health checks that failed since start (HAProxy's Chk). Failed client connects are
    /// `connect_errors`, not counted here.
    #[serde(default)]
    pub checks_failed: u64,
    /// Times the server went from UP to DOWN since start (HAProxy's Dwn).
    #[serde(default)]
    pub down_transitions: u64,
}

/// What the check column shows for a server in maintenance: its checks do not run, so
/// the last result (from before) is not shown as if it were current.
pub const CHECKS_OFF: &str = "MAINT (checks off)";

impl ServerStats {
    /// The check column of the page and of `mxlb status`: the last check as HAProxy words
    /// it, [`CHECKS_OFF`] in maintenance, `pending` before the first check, `no check`.
    pub fn check_shown(&self) -> &str {
        match &self.check_status {
            Some(status) => status,
            None if self.checked => "pending",
            None => "no check",
        }
    }
}

/// The operator's say over a server, set through the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes clients when healthy.
    Ready,
    /// No new clients; established sessions continue; checks continue.
    Drain,
    /// No new clients and no checks.
    Maint,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

/// Why an admin request could not be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no listener named {0:?}")]
    UnknownListener(String),
    #[error("listener {listener:?} has no server named {server:?}")]
    UnknownServer { listener: String, server: String },
    #[error("weight must be between 0 and {max} (as in the configuration), not {weight}")]
    WeightOutOfRange { weight: u64, max: u32 },
}

/// What the stats server needs from the daemon.
pub trait StatsSource: Send + Sync + 'static {
    /// The current numbers.
    fn snapshot(&self) -> StatsSnapshot;
    /// Applies an admin state change.
    fn set_state(&self, listener: &str, server: &str, state: AdminState) -> Result<(), AdminError>;
    /// Sets a server's weight until the next restart, or until a reload gives that server
    /// a different weight in the file. `weight` is within `0..=MAX_WEIGHT` already.
    fn set_weight(&self, listener: &str, server: &str, weight: u32) -> Result<(), AdminError>;
    /// The configuration in force, as TOML (`GET /api/config`), its admin token redacted.
    fn running_config(&self) -> String;
}
