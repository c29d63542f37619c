//! Least connections, as HAProxy's `balance leastconn`: the new client goes to the eligible
//! server with the fewest open sessions relative to its weight, so a server of weight 2 is
//! expected to carry twice the sessions of a server of weight 1. Suited to long sessions,
//! where round-robin lets slow servers pile up clients.
//!
//! Loads are compared as `sessions / weight` without floats: `a` is less loaded than `b`
//! when `sessions_a * weight_b < sessions_b * weight_a` (in `u64`, which cannot overflow for
//! two `u32` products). Servers with the same load are taken in turn: the scan starts just
//! after the previously chosen server, so idle servers of equal load still alternate, as in
//! HAProxy where a server that was just used is queued behind its equals. A server of
//! weight 0 is never picked.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Selector};

/// Weighted least connections, ties taken round-robin.
#[derive(Debug, Default)]
pub struct LeastConnections {
    /// Where the next scan starts: one past the last chosen server (wrapped on use).
    next: AtomicUsize,
}

impl LeastConnections {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Whether `a` carries fewer sessions per unit of weight than `b` (both weights non-zero).
fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    u64::from(a.sessions) * u64::from(b.weight) < u64::from(b.sessions) * u64::from(a.weight)
}

impl Selector for LeastConnections {
    fn pick(&self, servers: &[Candidate], _client: IpAddr) -> Option<usize> {
        let count = servers.len();
        if count == 0 {
            return None;
        }
        // Racing picks may start from the same place; that only affects which of two equally
        // loaded servers is chosen, so relaxed ordering is enough.
        let start = self.next.load(Ordering::Relaxed) % count;
        let mut best: Option<usize> = None;
        for index in (start..count).chain(0..start) {
            let server = &servers[index];
            if !server.eligible || server.weight == 0 {
                continue;
            }
            if best.is_none_or(|b| less_loaded(server, &servers[b])) {
                best = Some(index);
            }
        }
        let chosen = best?;
        self.next.store(chosen + 1, Ordering::Relaxed);
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn server(weight: u32, sessions: u32) -> Candidate {
        Candidate {
            weight,
            sessions,
            ..Candidate::up()
        }
    }

    fn down() -> Candidate {
        Candidate {
            eligible: false,
            ..Candidate::up()
        }
    }

    fn picks(selector: &LeastConnections, servers: &[Candidate], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| selector.pick(servers, CLIENT).expect("a server"))
            .collect()
    }

    /// Picks `n` times, opening a session on each chosen server as the proxy would.
    fn picks_with_sessions(servers: &mut [Candidate], n: usize) -> Vec<usize> {
        let lc = LeastConnections::new();
        (0..n)
            .map(|_| {
                let chosen = lc.pick(servers, CLIENT).expect("a server");
                servers[chosen].sessions += 1;
                chosen
            })
            .collect()
    }

    #[test]
    fn the_server_with_fewest_sessions_is_chosen() {
        let lc = LeastConnections::new();
        let servers = [server(1, 5), server(1, 2), server(1, 7)];
        assert_eq!(picks(&lc, &servers, 4), [1, 1, 1, 1]);
    }

    #[test]
    fn sessions_are_compared_relative_to_weight() {
        let lc = LeastConnections::new();
        // 4/1 against 6/3 = 2: the heavier server is less loaded.
        assert_eq!(lc.pick(&[server(1, 4), server(3, 6)], CLIENT), Some(1));
        // 2/1 against 9/3 = 3: the light server is less loaded.
        assert_eq!(lc.pick(&[server(1, 2), server(3, 9)], CLIENT), Some(0));
    }

    #[test]
    fn equal_idle_servers_alternate() {
        let lc = LeastConnections::new();
        let servers = [server(1, 0), server(1, 0), server(1, 0)];
        assert_eq!(picks(&lc, &servers, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn ties_rotate_among_the_tied_servers_only() {
        let lc = LeastConnections::new();
        // 0 and 2 tie at one session; 1 is busier and never chosen.
        let servers = [server(1, 1), server(1, 3), server(1, 1)];
        assert_eq!(picks(&lc, &servers, 4), [0, 2, 0, 2]);
        // Equal ratios tie too: 2/1 and 4/2.
        let lc = LeastConnections::new();
        let servers = [server(1, 2), server(2, 4)];
        assert_eq!(picks(&lc, &servers, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn open_sessions_spread_in_proportion_to_weight() {
        let mut servers = [server(1, 0), server(3, 0)];
        let chosen = picks_with_sessions(&mut servers, 400);
        assert_eq!(chosen.iter().filter(|&&c| c == 0).count(), 100);
        assert_eq!(servers[0].sessions, 100);
        assert_eq!(servers[1].sessions, 300);
    }

    #[test]
    fn ineligible_and_zero_weight_servers_are_skipped() {
        let lc = LeastConnections::new();
        // The idle servers are down or weight 0; the busy one is the only choice.
        let servers = [down(), server(0, 0), server(1, 9)];
        assert_eq!(picks(&lc, &servers, 3), [2, 2, 2]);
    }

    #[test]
    fn nothing_eligible_gives_none() {
        let lc = LeastConnections::new();
        assert_eq!(lc.pick(&[], CLIENT), None);
        assert_eq!(lc.pick(&[down(), server(0, 0)], CLIENT), None);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let lc = LeastConnections::new();
        let servers = [server(u32::MAX, u32::MAX), server(u32::MAX, u32::MAX - 1)];
        assert_eq!(lc.pick(&servers, CLIENT), Some(1));
        let servers = [server(1, u32::MAX), server(u32::MAX, u32::MAX)];
        assert_eq!(lc.pick(&servers, CLIENT), Some(1));
    }

    #[test]
    fn a_shrinking_server_list_does_not_panic() {
        let lc = LeastConnections::new();
        let many = [server(1, 0); 5];
        assert_eq!(picks(&lc, &many, 5), [0, 1, 2, 3, 4]);
        // The cursor now points past the end of a shorter list.
        assert_eq!(lc.pick(&[server(1, 0), server(1, 0)], CLIENT), Some(1));
    }
}
