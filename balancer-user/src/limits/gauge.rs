//! A count of open connections with a ceiling, for `maxconn` at every level (process,
//! listener, server). Taking a place and checking the ceiling is one atomic step, so
//! concurrent accepts can never overshoot it; the place is given back when its [`Slot`]
//! drops, on every path out of a session, panics and cancelled tasks included.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Open connections, their peak, and the ceiling.
#[derive(Debug)]
pub struct Gauge {
    open: AtomicU32,
    peak: AtomicU32,
    /// 0: no ceiling. A reload may change it; places already taken stay taken.
    limit: AtomicU32,
}

impl Gauge {
    /// A gauge that admits at most `limit` at once; 0 means no limit.
    pub fn new(limit: u32) -> Gauge {
        Gauge {
            open: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
        }
    }

    /// A place, or `None` when the gauge is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit();
        let before = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (limit == 0 || open < limit).then(|| open.saturating_add(1))
            })
            .ok()?;
        self.peak.fetch_max(before + 1, Ordering::Relaxed);
        Some(Slot(self.clone()))
    }

    /// Places taken now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// The most places ever taken at once.
    pub fn peak(&self) -> u32 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The ceiling; 0: none.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A new ceiling (a reload). Lowering it below the places taken refuses newcomers
    /// until enough have left; nobody is cut off.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Whether a place is free right now (it may be gone by the time it is asked for).
    pub fn has_room(&self) -> bool {
        let limit = self.limit();
        limit == 0 || self.open() < limit
    }
}

/// One place in a [`Gauge`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_gives_back() {
        let gauge = Arc::new(Gauge::new(2));
        let a = gauge.try_acquire().expect("first");
        let b = gauge.try_acquire().expect("second");
        assert!(gauge.try_acquire().is_none());
        assert!(!gauge.has_room());
        assert_eq!((gauge.open(), gauge.peak(), gauge.limit()), (2, 2, 2));
        drop(a);
        assert!(gauge.has_room());
        let c = gauge.try_acquire().expect("room again");
        drop((b, c));
        assert_eq!((gauge.open(), gauge.peak()), (0, 2));
    }

    #[test]
    fn a_lowered_limit_keeps_what_is_taken_and_refuses_newcomers() {
        let gauge = Arc::new(Gauge::new(3));
        let taken: Vec<_> = (0..3).filter_map(|_| gauge.try_acquire()).collect();
        gauge.set_limit(1);
        assert_eq!(gauge.open(), 3);
        assert!(gauge.try_acquire().is_none());
        drop(taken);
        let one = gauge.try_acquire().expect("room under the new limit");
        assert!(gauge.try_acquire().is_none());
        gauge.set_limit(0);
        assert!(gauge.try_acquire().is_some());
        drop(one);
    }

    #[test]
    fn zero_is_unlimited() {
        let gauge = Arc::new(Gauge::new(0));
        let slots: Vec<_> = (0..1000).filter_map(|_| gauge.try_acquire()).collect();
        assert_eq!(slots.len(), 1000);
        assert!(gauge.has_room());
    }

    #[test]
    fn concurrent_acquires_never_overshoot() {
        let gauge = Arc::new(Gauge::new(100));
        let taken: Vec<Vec<Slot>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| (0..50).filter_map(|_| gauge.try_acquire()).collect()))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect()
        });
        assert_eq!(taken.iter().map(Vec::len).sum::<usize>(), 100);
        assert_eq!(gauge.peak(), 100);
        drop(taken);
        assert_eq!(gauge.open(), 0);
    }
}
