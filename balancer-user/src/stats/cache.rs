//! The snapshot the stats endpoints serve, shared between requests instead of rebuilt for
//! each one.
//!
//! Building a [`StatsSnapshot`] takes the locks sessions take (each server's traffic book,
//! its status history, the listener's source table) and asks the relay for every live
//! session's bytes: O(live sessions) work under locks a session start or end also needs.
//! Rebuilt per request, a flood of `GET /api/stats` would be a lever on the mail relay.
//!
//! So rebuilds draw on a budget: [`REBUILD_BURST`] at once, refilled at one per
//! [`REBUILD_EVERY`]. A request that finds a token gets a fresh snapshot; one that finds
//! none shares the latest one ([`Arc`], with its JSON, HTML and OpenMetrics renderings made
//! once, on first use). Under any request rate the daemon builds at most
//! `REBUILD_BURST + t / REBUILD_EVERY` snapshots in a time `t` (5 a second past the
//! burst), and a shared snapshot is at most `REBUILD_EVERY` old (plus the time one build
//! takes): when the budget is spent, the next token comes within that time and the request
//! holding it rebuilds.
//!
//! Why a budget and not a plain time window: a person or a script that asks, changes
//! something (connects a client, finishes a transfer) and asks again a moment later must
//! see the change; a window would hand them the answer from before. Requests at a human or
//! scraper pace never run out of tokens and always get a fresh snapshot; only a flood
//! reads a snapshot up to `REBUILD_EVERY` old. An admin change ([`SnapshotCache::invalidate`])
//! drops the shared snapshot, so the next request rebuilds whatever the budget, and the
//! admin answer shows the state just set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;

use super::model::{StatsSnapshot, StatsSource};
use super::server::{PortCounters, PortStats};
use super::{html, prometheus};

/// Rebuilds allowed back to back before requests start sharing snapshots.
pub const REBUILD_BURST: u32 = 10;

/// One rebuild token comes back per this time: the most a shared snapshot lags behind.
pub const REBUILD_EVERY: Duration = Duration::from_millis(200);

/// One snapshot with its renderings, each made at most once.
pub struct Cached {
    pub snapshot: StatsSnapshot,
    /// The stats port's own counters when the snapshot was built.
    pub port: PortStats,
    json: OnceLock<Bytes>,
    html: OnceLock<Bytes>,
    metrics: OnceLock<Bytes>,
}

impl Cached {
    fn new(snapshot: StatsSnapshot, port: PortStats) -> Cached {
        Cached {
            snapshot,
            port,
            json: OnceLock::new(),
            html: OnceLock::new(),
            metrics: OnceLock::new(),
        }
    }

    /// `/api/stats`.
    pub fn json(&self) -> Bytes {
        self.json
            .get_or_init(|| match serde_json::to_vec(&self.snapshot) {
                Ok(json) => Bytes::from(json),
                // Plain numbers and strings: serialising cannot fail short of a bug.
                Err(error) => {
                    tracing::error!(%error, "stats: serialising the snapshot failed");
                    Bytes::from_static(b"{}")
                }
            })
            .clone()
    }

    /// `/`.
    pub fn html(&self) -> Bytes {
        self.html
            .get_or_init(|| Bytes::from(html::render(&self.snapshot)))
            .clone()
    }

    /// `/metrics`.
    pub fn metrics(&self) -> Bytes {
        self.metrics
            .get_or_init(|| Bytes::from(prometheus::render_with_port(&self.snapshot, &self.port)))
            .clone()
    }
}

/// The latest snapshot and the rebuild budget.
pub struct SnapshotCache {
    source: Arc<dyn StatsSource>,
    counters: Arc<PortCounters>,
    built: AtomicU64,
    state: Mutex<State>,
}

struct State {
    latest: Option<Arc<Cached>>,
    /// Rebuild tokens left, at most [`REBUILD_BURST`].
    tokens: u32,
    /// When the last token was added (or the budget was last full).
    refilled: Instant,
}

impl SnapshotCache {
    pub fn new(source: Arc<dyn StatsSource>, counters: Arc<PortCounters>) -> SnapshotCache {
        SnapshotCache {
            source,
            counters,
            built: AtomicU64::new(0),
            state: Mutex::new(State {
                latest: None,
                tokens: REBUILD_BURST,
                refilled: Instant::now(),
            }),
        }
    }

    /// The daemon behind the cache, for admin changes.
    pub fn source(&self) -> &dyn StatsSource {
        self.source.as_ref()
    }

    /// A fresh snapshot if the budget allows, else the latest one.
    pub fn get(&self) -> Arc<Cached> {
        self.get_at(Instant::now())
    }

    fn get_at(&self, now: Instant) -> Arc<Cached> {
        let mut state = self.lock();
        state.refill(now);
        if let Some(latest) = &state.latest
            && state.tokens == 0
        {
            return latest.clone();
        }
        state.tokens = state.tokens.saturating_sub(1);
        // Built under the lock: concurrent requests that find no token wait for this one
        // rather than each building their own.
        let snapshot = self.source.snapshot();
        self.built.fetch_add(1, Ordering::Relaxed);
        let fresh = Arc::new(Cached::new(snapshot, self.port_stats()));
        state.latest = Some(fresh.clone());
        fresh
    }

    /// Drops the shared snapshot: the next [`get`](Self::get) builds one, budget or not.
    pub fn invalidate(&self) {
        self.lock().latest = None;
    }

    /// Snapshots built so far.
    pub fn built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    fn port_stats(&self) -> PortStats {
        PortStats {
            // This build counts: the number shown includes the snapshot it is in.
            snapshots_built: self.built(),
            ..self.counters.stats()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few plain fields, consistent after any panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn refill(&mut self, now: Instant) {
        if self.tokens >= REBUILD_BURST {
            self.refilled = now;
            return;
        }
        let periods =
            now.saturating_duration_since(self.refilled).as_nanos() / REBUILD_EVERY.as_nanos();
        if periods == 0 {
            return;
        }
        let added = u32::try_from(periods).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(added).min(REBUILD_BURST);
        // Keep the remainder of a partial period, so the rate is exact.
        self.refilled += REBUILD_EVERY * added.min(REBUILD_BURST);
        if self.tokens >= REBUILD_BURST {
            self.refilled = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::stats::model::{AdminError, AdminState};
    use crate::stats::prometheus::tests::sample;
    use crate::stats::server::Limits;

    /// A source whose snapshots say how many were taken before them (in `uptime_secs`).
    struct Counting(AtomicU64);

    impl StatsSource for Counting {
        fn snapshot(&self) -> StatsSnapshot {
            let mut snapshot = sample();
            snapshot.uptime_secs = self.0.fetch_add(1, Ordering::Relaxed) as f64;
            snapshot
        }

        fn set_state(&self, _: &str, _: &str, _: AdminState) -> Result<(), AdminError> {
            Ok(())
        }

        fn set_weight(&self, _: &str, _: &str, _: u32) -> Result<(), AdminError> {
            Ok(())
        }

        fn running_config(&self) -> String {
            String::new()
        }
    }

    fn cache() -> SnapshotCache {
        let counters = Arc::new(PortCounters::new(Limits::default()));
        SnapshotCache::new(Arc::new(Counting(AtomicU64::new(0))), counters)
    }

    #[test]
    fn fresh_until_the_burst_is_spent_then_shared_within_the_window() {
        let cache = cache();
        let t0 = Instant::now();
        // A person's pace: every request gets its own snapshot.
        for n in 0..REBUILD_BURST {
            assert_eq!(cache.get_at(t0).snapshot.uptime_secs, f64::from(n));
        }
        // A flood: the same snapshot, not even a copy of it.
        let shared = cache.get_at(t0);
        assert_eq!(shared.snapshot.uptime_secs, f64::from(REBUILD_BURST - 1));
        let within = t0 + REBUILD_EVERY - Duration::from_millis(1);
        for _ in 0..1000 {
            assert!(Arc::ptr_eq(&shared, &cache.get_at(within)));
        }
        // A window later, the next request builds, and the one after shares it again.
        let later = t0 + REBUILD_EVERY;
        let next = cache.get_at(later);
        assert!(!Arc::ptr_eq(&shared, &next));
        assert_eq!(next.snapshot.uptime_secs, f64::from(REBUILD_BURST));
        assert!(Arc::ptr_eq(&next, &cache.get_at(later)));
        assert_eq!(cache.built(), u64::from(REBUILD_BURST) + 1);
    }

    #[test]
    fn builds_are_bounded_under_a_flood() {
        let cache = cache();
        let t0 = Instant::now();
        // 10 000 requests a second for 3 seconds.
        for i in 0..30_000u32 {
            cache.get_at(t0 + Duration::from_micros(100) * i);
        }
        let window = t0 + Duration::from_secs(3);
        let bound = u64::from(REBUILD_BURST) + (3_000 / REBUILD_EVERY.as_millis() as u64);
        assert!(cache.built() <= bound, "{} > {bound}", cache.built());
        // And the budget refills: after a quiet while, a burst of fresh snapshots again.
        let quiet = window + REBUILD_EVERY * REBUILD_BURST;
        let before = cache.built();
        for _ in 0..REBUILD_BURST {
            cache.get_at(quiet);
        }
        assert_eq!(cache.built(), before + u64::from(REBUILD_BURST));
    }

    #[test]
    fn invalidate_forces_a_fresh_snapshot() {
        let cache = cache();
        let t0 = Instant::now();
        for _ in 0..REBUILD_BURST {
            cache.get_at(t0);
        }
        let shared = cache.get_at(t0);
        cache.invalidate();
        let fresh = cache.get_at(t0);
        assert!(!Arc::ptr_eq(&shared, &fresh));
        assert!(Arc::ptr_eq(&fresh, &cache.get_at(t0)));
    }

    #[test]
    fn renderings_are_made_once_per_snapshot() {
        let cache = cache();
        let cached = cache.get();
        let (json, html, metrics) = (cached.json(), cached.html(), cached.metrics());
        // The same bytes, not a new rendering.
        assert_eq!(json.as_ptr(), cached.json().as_ptr());
        assert_eq!(html.as_ptr(), cached.html().as_ptr());
        assert_eq!(metrics.as_ptr(), cached.metrics().as_ptr());
        let parsed: StatsSnapshot = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed, cached.snapshot);
        assert!(
            std::str::from_utf8(&metrics)
                .unwrap()
                .contains("mxlb_stats_snapshots_total 1\n")
        );
    }
}
