//! Log throttling: a flood of refused clients or failing accepts must not turn into a
//! flood of log lines (which costs disk and CPU exactly when the daemon is busiest). At most
//! one line per interval gets through; the next one says how many were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one event per `interval` is let through.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: log now, and say that `n` lines were held back since the last one.
    /// `None`: hold this one back (it is counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            state.suppressed += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// `" (N more suppressed)"` after a log message, or nothing when none were.
pub fn suppressed_note(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more suppressed)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_with_a_count_of_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(throttle.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(throttle.allow(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(throttle.allow(t0 + Duration::from_millis(1000)), Some(5));
        assert_eq!(throttle.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(throttle.allow(t0 + Duration::from_secs(60)), Some(1));
        assert_eq!(throttle.allow(t0 + Duration::from_secs(61)), Some(0));
    }

    #[test]
    fn notes() {
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(12), " (12 more suppressed)");
    }
}
