//! Events per sliding window, estimated from two fixed periods, as HAProxy's `conn_rate`
//! (`freq_ctr`): the count of the current period plus the previous period's count weighted
//! by the share of it that still lies inside the window. Two counters per source instead of
//! a timestamp per event, so memory does not grow with the limit.
//!
//! Periods start at a source's first event (and again at the first event after a quiet
//! window), not on the wall clock, so a short burst is never split over a period boundary:
//! N events in quick succession are counted as N.

use std::time::{Duration, Instant};

/// The recent events of one source. The window is passed in, so it is not stored per source.
#[derive(Clone, Copy, Debug)]
pub struct WindowRate {
    /// Start of the current period.
    start: Instant,
    current: u32,
    previous: u32,
}

impl WindowRate {
    pub fn new(now: Instant) -> WindowRate {
        WindowRate {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    /// Moves the periods forward to the one that holds `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed < window {
            return;
        }
        if elapsed < window * 2 {
            self.previous = self.current;
            self.start += window;
        } else {
            self.previous = 0;
            self.start = now;
        }
        self.current = 0;
    }

    /// Estimated events within the last `window` before `now`.
    pub fn count(&mut self, now: Instant, window: Duration) -> u32 {
        self.roll(now, window);
        let into = now.saturating_duration_since(self.start).min(window);
        let left = (window - into).as_nanos();
        let weighted = u128::from(self.previous) * left / window.as_nanos().max(1);
        // At most `previous`, so it fits.
        self.current
            .saturating_add(u32::try_from(weighted).unwrap_or(u32::MAX))
    }

    /// Counts one event at `now`. The first event after a quiet window starts a period.
    pub fn record(&mut self, now: Instant, window: Duration) {
        self.roll(now, window);
        if self.current == 0 && self.previous == 0 {
            self.start = now;
        }
        self.current = self.current.saturating_add(1);
    }

    /// No event within the last window: the state can be forgotten without changing any
    /// future answer.
    pub fn is_idle(&mut self, now: Instant, window: Duration) -> bool {
        self.roll(now, window);
        self.current == 0 && self.previous == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    fn after(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn counts_a_burst_exactly() {
        let t0 = Instant::now();
        let mut rate = WindowRate::new(t0);
        for i in 0..5 {
            assert_eq!(rate.count(after(t0, i), WINDOW), i as u32);
            rate.record(after(t0, i), WINDOW);
        }
        assert_eq!(rate.count(after(t0, 9_999), WINDOW), 5);
    }

    #[test]
    fn the_previous_period_fades_out_over_the_window() {
        let t0 = Instant::now();
        let mut rate = WindowRate::new(t0);
        for _ in 0..10 {
            rate.record(t0, WINDOW);
        }
        // 10 events at t0: at 10 s they are all still within the window's weighted share.
        assert_eq!(rate.count(after(t0, 10_000), WINDOW), 10);
        assert_eq!(rate.count(after(t0, 12_500), WINDOW), 7);
        assert_eq!(rate.count(after(t0, 15_000), WINDOW), 5);
        rate.record(after(t0, 15_000), WINDOW);
        assert_eq!(rate.count(after(t0, 15_000), WINDOW), 6);
        assert_eq!(rate.count(after(t0, 19_999), WINDOW), 1);
        // The event at 15 s is the previous period's now, and fades in turn.
        assert_eq!(rate.count(after(t0, 20_000), WINDOW), 1);
        assert_eq!(rate.count(after(t0, 29_999), WINDOW), 0);
        assert!(rate.is_idle(after(t0, 30_000), WINDOW));
    }

    #[test]
    fn a_long_silence_forgets_everything() {
        let t0 = Instant::now();
        let mut rate = WindowRate::new(t0);
        rate.record(t0, WINDOW);
        assert!(!rate.is_idle(after(t0, 19_000), WINDOW));
        assert_eq!(rate.count(after(t0, 60_000), WINDOW), 0);
        assert!(rate.is_idle(after(t0, 60_000), WINDOW));
        // A new period starts at the next event.
        rate.record(after(t0, 61_000), WINDOW);
        assert_eq!(rate.count(after(t0, 70_999), WINDOW), 1);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut rate = WindowRate::new(t0);
        rate.record(t0, WINDOW);
        assert_eq!(rate.count(t0 - Duration::from_secs(5), WINDOW), 1);
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let t0 = Instant::now();
        let mut rate = WindowRate {
            start: t0,
            current: u32::MAX,
            previous: u32::MAX,
        };
        rate.record(t0, WINDOW);
        assert_eq!(rate.count(t0, WINDOW), u32::MAX);
    }
}
