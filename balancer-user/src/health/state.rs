//! Rise/fall hysteresis: when a server's check results change its state, and how soon
//! it is checked again.
//!
//! Pure logic, no clock: the scheduler feeds results in and sleeps for
//! [`HealthState::next_interval`]; tests walk through sequences without waiting.
//!
//! The counting follows the contract's wording, which is simpler than HAProxy's single
//! health counter: a server goes DOWN after `fall` *consecutive* failures and UP after
//! `rise` *consecutive* successes. (HAProxy's counter moves one step per result, so an
//! interleaved success only takes back one failure; here it clears them all.)

use std::fmt;
use std::time::Duration;

/// A change of a server's state, to be logged with the check result that caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::Up => "UP",
            Transition::Down => "DOWN",
        })
    }
}

/// The health of one checked server.
///
/// A new server starts UP, like HAProxy's default `init-state`: traffic flows from the
/// start, and a dead server is taken out after `fall` failed checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive successes while down.
    successes: u32,
    /// Consecutive failures while up.
    failures: u32,
}

impl HealthState {
    /// `rise` and `fall` below 1 are taken as 1 (the configuration refuses them anyway).
    pub fn new(rise: u32, fall: u32) -> HealthState {
        HealthState {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            successes: 0,
            failures: 0,
        }
    }

    /// Counts one check result; returns the state change it causes, if any.
    pub fn record(&mut self, passed: bool) -> Option<Transition> {
        match (self.up, passed) {
            (true, true) => {
                self.failures = 0;
                None
            }
            (true, false) => {
                self.failures += 1;
                (self.failures >= self.fall).then(|| self.switch(false))
            }
            (false, true) => {
                self.successes += 1;
                (self.successes >= self.rise).then(|| self.switch(true))
            }
            (false, false) => {
                self.successes = 0;
                None
            }
        }
    }

    /// For a failure seen outside the checks, such as a client connection that could not
    /// reach the server: it counts exactly like one failed check (`record(false)`), so
    /// one refused client connection cannot take a server out by itself when `fall` is
    /// above 1, and the checks keep the last word.
    pub fn force_down(&mut self) -> Option<Transition> {
        self.record(false)
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// New thresholds from a reload; the state and the counts so far are kept, so a DOWN
    /// server stays DOWN until its checks say otherwise.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Consecutive failures counted towards `fall` (0 while down).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Consecutive successes counted towards `rise` (0 while up).
    pub fn successes(&self) -> u32 {
        self.successes
    }

    /// Whether the last results point towards a state change that has not happened yet.
    pub fn change_pending(&self) -> bool {
        if self.up {
            self.failures > 0
        } else {
            self.successes > 0
        }
    }

    /// How long to wait before the next check, as HAProxy chooses it: `fastinter` while
    /// a change is pending, so that it is confirmed (or dismissed) quickly; `downinter`
    /// while down with nothing pending, to spare a dead server; `inter` otherwise.
    pub fn next_interval(
        &self,
        inter: Duration,
        fastinter: Duration,
        downinter: Duration,
    ) -> Duration {
        match (self.up, self.change_pending()) {
            (_, true) => fastinter,
            (true, false) => inter,
            (false, false) => downinter,
        }
    }

    fn switch(&mut self, up: bool) -> Transition {
        self.up = up;
        self.successes = 0;
        self.failures = 0;
        if up { Transition::Up } else { Transition::Down }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTER: Duration = Duration::from_secs(2);
    const FAST: Duration = Duration::from_secs(1);
    const DOWN: Duration = Duration::from_secs(5);

    fn interval(state: &HealthState) -> Duration {
        state.next_interval(INTER, FAST, DOWN)
    }

    #[test]
    fn starts_up() {
        let state = HealthState::new(2, 3);
        assert!(state.is_up());
        assert!(!state.change_pending());
        assert_eq!(interval(&state), INTER);
    }

    #[test]
    fn goes_down_after_fall_failures_and_up_after_rise_successes() {
        let mut state = HealthState::new(2, 3);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), Some(Transition::Down));
        assert!(!state.is_up());
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(true), Some(Transition::Up));
        assert!(state.is_up());
        assert_eq!(state.record(true), None);
    }

    #[test]
    fn success_while_up_resets_the_failures() {
        let mut state = HealthState::new(2, 3);
        let results = [false, false, true, false, false, true, false, false];
        for passed in results {
            assert_eq!(state.record(passed), None, "{state:?}");
        }
        assert!(state.is_up());
        assert_eq!(state.failures(), 2);
        assert_eq!(state.record(false), Some(Transition::Down));
    }

    #[test]
    fn failure_while_down_resets_the_successes() {
        let mut state = HealthState::new(3, 1);
        assert_eq!(state.record(false), Some(Transition::Down));
        for passed in [true, true, false, true, true, false] {
            assert_eq!(state.record(passed), None, "{state:?}");
        }
        assert!(!state.is_up());
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(true), None);
        assert_eq!(state.record(true), Some(Transition::Up));
    }

    #[test]
    fn rise_and_fall_of_one_switch_at_once() {
        let mut state = HealthState::new(1, 1);
        assert_eq!(state.record(false), Some(Transition::Down));
        assert_eq!(state.record(true), Some(Transition::Up));
        // Zero is taken as one.
        let mut zero = HealthState::new(0, 0);
        assert_eq!(zero.record(false), Some(Transition::Down));
        assert_eq!((zero.rise(), zero.fall()), (1, 1));
    }

    #[test]
    fn force_down_counts_as_one_failure() {
        let mut forced = HealthState::new(2, 3);
        let mut checked = HealthState::new(2, 3);
        for _ in 0..2 {
            assert_eq!(forced.force_down(), checked.record(false));
            assert_eq!(forced, checked);
        }
        assert_eq!(forced.force_down(), Some(Transition::Down));
        assert_eq!(forced.force_down(), None);
    }

    /// inter=2s fastinter=1s downinter=5s, rise 2, fall 3: a server fails, goes down,
    /// recovers with a hiccup, and comes back up.
    #[test]
    fn interval_at_each_step() {
        let mut state = HealthState::new(2, 3);
        assert_eq!(interval(&state), INTER);
        let steps = [
            // (check passed, expected transition, expected up, next interval)
            (true, None, true, INTER),
            (false, None, true, FAST),
            (false, None, true, FAST),
            (true, None, true, INTER),
            (false, None, true, FAST),
            (false, None, true, FAST),
            (false, Some(Transition::Down), false, DOWN),
            (false, None, false, DOWN),
            (true, None, false, FAST),
            (false, None, false, DOWN),
            (true, None, false, FAST),
            (true, Some(Transition::Up), true, INTER),
            (true, None, true, INTER),
        ];
        for (index, (passed, transition, up, next)) in steps.into_iter().enumerate() {
            assert_eq!(state.record(passed), transition, "step {index}");
            assert_eq!(state.is_up(), up, "step {index}");
            assert_eq!(interval(&state), next, "step {index}");
        }
    }

    #[test]
    fn transitions_display_as_states() {
        assert_eq!(Transition::Up.to_string(), "UP");
        assert_eq!(Transition::Down.to_string(), "DOWN");
    }
}
