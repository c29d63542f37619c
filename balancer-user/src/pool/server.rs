//! One server at run time: health, the operator's admin state, open sessions and counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::balance::Candidate;
use crate::config::Server;
use crate::health::{CheckResult, CheckSpec, HealthState, Transition};
use crate::limits::{Gauge, Slot};
use crate::relay::{LiveTraffic, Relay, Transfer};
use crate::stats::model::CHECKS_OFF;
use crate::stats::{AdminState, ServerStats};

/// What the stats call a server's status: the operator's state overrides health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Up,
    Down,
    Drain,
    Maint,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::Down => "DOWN",
            Status::Drain => "DRAIN",
            Status::Maint => "MAINT",
        }
    }
}

/// One server at run time.
pub struct ServerRuntime {
    pub config: Server,
    /// How this server is checked; `None`: never checked, always up.
    pub(super) check: Option<CheckSpec>,
    /// Health, admin state and counters: shared with the runtime of the same server in
    /// an earlier configuration, so a reload keeps them.
    state: Arc<ServerState>,
}

/// What a server keeps across reloads.
struct ServerState {
    health: Mutex<HealthState>,
    last_check: Mutex<Option<CheckResult>>,
    admin: Mutex<AdminState>,
    /// A weight set at run time, in force instead of the file's until a reload gives the
    /// server another weight in the file (or the next restart).
    runtime_weight: Mutex<Option<u32>>,
    /// The status last seen, since when, and the DOWN time accumulated before it.
    status: Mutex<StatusHistory>,
    /// Sessions open or connecting, with the server's `maxconn` as the ceiling.
    sessions: Arc<Gauge>,
    /// Sessions being relayed, by id, and the totals of finished ones: one lock, so a
    /// snapshot never counts a session twice or not at all.
    traffic: Mutex<TrafficBook>,
    next_session: AtomicU64,
    connect_errors: AtomicU64,
    /// Failed health checks (HAProxy's Chk).
    checks_failed: AtomicU64,
    /// UP to DOWN transitions (HAProxy's Dwn).
    down_transitions: AtomicU64,
}

struct StatusHistory {
    status: Status,
    since: Instant,
    /// `since` on the wall clock, for the timestamp the stats show.
    since_wall: SystemTime,
    downtime: Duration,
}

#[derive(Default)]
struct TrafficBook {
    live: HashMap<u64, Arc<LiveTraffic>>,
    sessions_total: u64,
    bytes_in: u64,
    bytes_out: u64,
    kernel_bytes: u64,
}

impl ServerRuntime {
    pub(super) fn new(config: Server, check: Option<CheckSpec>, rise: u32, fall: u32) -> Self {
        let state = ServerState {
            sessions: Arc::new(Gauge::new(config.maxconn)),
            health: Mutex::new(HealthState::new(rise, fall)),
            last_check: Mutex::new(None),
            admin: Mutex::new(AdminState::Ready),
            runtime_weight: Mutex::new(None),
            status: Mutex::new(StatusHistory {
                status: Status::Up,
                since: Instant::now(),
                since_wall: SystemTime::now(),
                downtime: Duration::ZERO,
            }),
            traffic: Mutex::new(TrafficBook::default()),
            next_session: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            down_transitions: AtomicU64::new(0),
        };
        ServerRuntime {
            config,
            check,
            state: Arc::new(state),
        }
    }

    /// The same server under a reloaded configuration: new settings, the state so far
    /// (health, admin state, sessions and counters). Sessions opened before the reload
    /// count against the new `maxconn`. A weight set at run time stays unless the file
    /// now gives the server a different weight: that edit is the operator's newer word.
    pub(super) fn reconfigured(
        &self,
        config: Server,
        check: Option<CheckSpec>,
        rise: u32,
        fall: u32,
    ) -> ServerRuntime {
        self.state.sessions.set_limit(config.maxconn);
        lock(&self.state.health).set_thresholds(rise, fall);
        if config.weight != self.config.weight {
            lock(&self.state.runtime_weight).take();
        }
        let server = ServerRuntime {
            config,
            check,
            state: self.state.clone(),
        };
        // Turning checks off (or on) can change the status by itself.
        server.note_status();
        server
    }

    /// Healthy (or unchecked), whatever the operator says.
    pub fn is_up(&self) -> bool {
        self.check.is_none() || lock(&self.state.health).is_up()
    }

    pub fn admin_state(&self) -> AdminState {
        *lock(&self.state.admin)
    }

    pub fn status(&self) -> Status {
        match self.admin_state() {
            AdminState::Maint => Status::Maint,
            AdminState::Drain => Status::Drain,
            AdminState::Ready if self.is_up() => Status::Up,
            AdminState::Ready => Status::Down,
        }
    }

    /// May take new clients: healthy and ready.
    pub fn takes_clients(&self) -> bool {
        self.admin_state() == AdminState::Ready && self.is_up()
    }

    /// Sessions currently open (or connecting) to this server.
    pub fn sessions(&self) -> u32 {
        self.state.sessions.open()
    }

    /// The weight selection uses: one set at run time, else the file's.
    pub fn weight(&self) -> u32 {
        lock(&self.state.runtime_weight).unwrap_or(self.config.weight)
    }

    /// Sets the weight until a reload changes the file's weight for this server (or the
    /// next restart); returns the weight in force before.
    pub(super) fn set_weight(&self, weight: u32) -> u32 {
        let mut runtime = lock(&self.state.runtime_weight);
        let previous = runtime.unwrap_or(self.config.weight);
        *runtime = Some(weight);
        previous
    }

    pub(super) fn candidate(&self) -> Candidate {
        Candidate {
            weight: self.weight(),
            eligible: self.takes_clients(),
            backup: self.config.backup,
            sessions: self.sessions(),
            full: !self.state.sessions.has_room(),
        }
    }

    /// A place among this server's sessions, taken before connecting so that concurrent
    /// clients cannot overshoot its `maxconn`; `None` when it is full. Given back if the
    /// connect fails, or with the session.
    pub fn reserve(&self) -> Option<Reservation> {
        self.state.sessions.try_acquire().map(Reservation)
    }

    /// Feeds a check result (or a failed client connect) into the health state.
    pub(super) fn record_health(&self, passed: bool) -> Option<Transition> {
        let transition = lock(&self.state.health).record(passed);
        if transition == Some(Transition::Down) {
            self.state.down_transitions.fetch_add(1, Ordering::Relaxed);
        }
        self.note_status();
        transition
    }

    /// Counts a failed health check (not a failed client connect: those are
    /// `connect_errors`).
    pub(super) fn count_failed_check(&self) {
        self.state.checks_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn health_change_pending(&self) -> Option<(u32, u32)> {
        let health = lock(&self.state.health);
        health.change_pending().then(|| {
            if health.is_up() {
                (health.failures(), health.fall())
            } else {
                (health.successes(), health.rise())
            }
        })
    }

    pub(super) fn next_check_in(
        &self,
        inter: Duration,
        fast: Duration,
        down: Duration,
    ) -> Duration {
        lock(&self.state.health).next_interval(inter, fast, down)
    }

    pub(super) fn set_last_check(&self, result: CheckResult) {
        *lock(&self.state.last_check) = Some(result);
    }

    pub(super) fn set_admin_state(&self, state: AdminState) -> AdminState {
        let previous = std::mem::replace(&mut *lock(&self.state.admin), state);
        if previous == AdminState::Maint && state != AdminState::Maint {
            // The last result predates the maintenance: show `pending` until a check
            // says how the server is now.
            lock(&self.state.last_check).take();
        }
        self.note_status();
        previous
    }

    pub(super) fn count_connect_error(&self) {
        self.state.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers when the status changed and accumulates time spent DOWN.
    fn note_status(&self) {
        let now = self.status();
        let mut history = lock(&self.state.status);
        if history.status != now {
            if history.status == Status::Down {
                let down_for = history.since.elapsed();
                history.downtime += down_for;
            }
            history.status = now;
            history.since = Instant::now();
            history.since_wall = SystemTime::now();
        }
    }

    /// Turns a reservation into a session, counted until the returned guard is finished
    /// or dropped.
    pub fn open_session(self: &Arc<Self>, reservation: Reservation) -> SessionGuard {
        let id = self.state.next_session.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(LiveTraffic::default());
        lock(&self.state.traffic).live.insert(id, live.clone());
        SessionGuard {
            server: self.clone(),
            _slot: reservation.0,
            id,
            live,
        }
    }

    /// The numbers the stats show for this server.
    pub fn stats(&self, relay: &Relay) -> ServerStats {
        let (sessions_total, bytes_in, bytes_out, kernel_bytes) = {
            let book = lock(&self.state.traffic);
            let mut totals = (
                book.sessions_total,
                book.bytes_in,
                book.bytes_out,
                book.kernel_bytes,
            );
            for live in book.live.values() {
                let now = live.transfer(relay, crate::relay::Termination::Closed);
                totals.1 += now.bytes_in;
                totals.2 += now.bytes_out;
                totals.3 += now.kernel;
            }
            totals
        };
        let status = self.status();
        let (last_change, last_change_at, downtime) = {
            let history = lock(&self.state.status);
            let current_down = if history.status == Status::Down {
                history.since.elapsed()
            } else {
                Duration::ZERO
            };
            (
                history.since.elapsed(),
                humantime::format_rfc3339_seconds(history.since_wall).to_string(),
                history.downtime + current_down,
            )
        };
        let last_check = lock(&self.state.last_check).clone();
        let checked = self.check.is_some();
        let (check_status, check_detail) = match last_check {
            // Maintenance stops the checks: the last result is history, said as such.
            _ if checked && status == Status::Maint => (
                Some(CHECKS_OFF.to_owned()),
                Some(match &last_check {
                    Some(check) => format!("the last check, before: {}", check.describe()),
                    None => "no check ran before".to_owned(),
                }),
            ),
            Some(check) => (Some(check.to_string()), Some(check.detail)),
            None => (None, None),
        };
        ServerStats {
            name: self.config.name.clone(),
            addr: self.config.addr.to_string(),
            status: status.as_str().to_owned(),
            admin_state: self.admin_state().as_str().to_owned(),
            checked,
            check_status,
            check_detail,
            weight: self.weight(),
            config_weight: self.config.weight,
            backup: self.config.backup,
            sessions_cur: u64::from(self.sessions()),
            sessions_max: u64::from(self.state.sessions.peak()),
            sessions_limit: u64::from(self.state.sessions.limit()),
            sessions_total,
            bytes_in,
            bytes_out,
            kernel_bytes,
            connect_errors: self.state.connect_errors.load(Ordering::Relaxed),
            last_change_secs: last_change.as_secs_f64(),
            last_change_at,
            downtime_secs: downtime.as_secs_f64(),
            checks_failed: self.state.checks_failed.load(Ordering::Relaxed),
            down_transitions: self.state.down_transitions.load(Ordering::Relaxed),
        }
    }
}

/// A session to a server: counted while it lives, its bytes visible to the stats as they
/// move, added to the server's totals when it finishes.
pub struct SessionGuard {
    server: Arc<ServerRuntime>,
    _slot: Slot,
    id: u64,
    pub live: Arc<LiveTraffic>,
}

/// A place taken among a server's sessions before connecting to it.
pub struct Reservation(Slot);

impl SessionGuard {
    /// Moves the finished session's bytes from "live" to the totals, in one step.
    pub fn finish(self, transfer: &Transfer) {
        let mut book = lock(&self.server.state.traffic);
        book.live.remove(&self.id);
        book.sessions_total += 1;
        book.bytes_in += transfer.bytes_in;
        book.bytes_out += transfer.bytes_out;
        book.kernel_bytes += transfer.kernel;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // Unfinished (the task was cancelled at shutdown): forget its live entry.
        lock(&self.server.state.traffic).live.remove(&self.id);
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Listener};
    use crate::health::CheckStatus;
    use crate::pool::Pool;
    use crate::stats::AdminError;

    /// One listener with servers `a` (weight `weight_of_a`) and `b`, checked.
    fn listener(weight_of_a: u32) -> Listener {
        let text = format!(
            "[[listen]]\nname = \"smtp\"\nbind = [\"127.0.0.1:2525\"]\n[listen.check]\n\
             [[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:10025\"\nweight = {weight_of_a}\n\
             [[listen.server]]\nname = \"b\"\naddr = \"127.0.0.1:10026\"\n"
        );
        let mut config = Config::parse(&text, "test.toml").unwrap();
        config.listeners.remove(0)
    }

    fn weights(pool: &Pool) -> Vec<u32> {
        pool.candidates().iter().map(|c| c.weight).collect()
    }

    #[test]
    fn a_runtime_weight_lasts_until_the_file_changes_that_weight() {
        let pool = Pool::new(&listener(1));
        pool.set_weight("a", 3).unwrap();
        assert_eq!(weights(&pool), [3, 1]);
        assert!(matches!(
            pool.set_weight("nope", 3),
            Err(AdminError::UnknownServer { .. })
        ));
        // The same file again (or a change elsewhere): the runtime weight stays.
        let same = pool.reconfigured(&listener(1));
        assert_eq!(weights(&same), [3, 1]);
        assert_eq!(same.servers[0].config.weight, 1);
        // The file gives `a` another weight: the file's word is the newer one.
        let edited = same.reconfigured(&listener(2));
        assert_eq!(weights(&edited), [2, 1]);
        edited.set_weight("a", 0).unwrap();
        assert_eq!(weights(&edited), [0, 1]);
    }

    #[test]
    fn leaving_maintenance_forgets_the_check_from_before() {
        let pool = Pool::new(&listener(1));
        let server = &pool.servers[0];
        let passed = CheckResult {
            status: CheckStatus::L7Ok,
            code: Some(250),
            duration: Duration::from_millis(1),
            detail: "250 ok".to_owned(),
        };
        pool.record_check(server, passed.clone());
        pool.set_admin_state("a", AdminState::Maint).unwrap();
        assert_eq!(*lock(&server.state.last_check), Some(passed));
        pool.set_admin_state("a", AdminState::Ready).unwrap();
        assert_eq!(*lock(&server.state.last_check), None);
    }

    #[test]
    fn failed_checks_and_down_transitions_are_counted() {
        let pool = Pool::new(&listener(1));
        let server = &pool.servers[0];
        let failed = CheckResult {
            status: CheckStatus::L4Con,
            code: None,
            duration: Duration::ZERO,
            detail: "Connection refused".to_owned(),
        };
        // fall = 3 by default: the third failure takes it down, later ones count too.
        for _ in 0..5 {
            pool.record_check(server, failed.clone());
        }
        let state = &server.state;
        assert_eq!(state.checks_failed.load(Ordering::Relaxed), 5);
        assert_eq!(state.down_transitions.load(Ordering::Relaxed), 1);
        // A failed client connect is a connect error, not a failed check.
        pool.record_connect_failure(server, &std::io::Error::other("refused"));
        assert_eq!(state.checks_failed.load(Ordering::Relaxed), 5);
    }
}
