//! Weighted round-robin, in the "smooth" form NGINX uses: over any window of
//! `sum(weights)` picks each server gets exactly its weight, and picks of a heavy server are
//! spread out rather than bunched (weights 5,1,1 give a a b a c a a, not a a a a a b c).

use std::net::IpAddr;
use std::sync::Mutex;

use super::{Candidate, Selector};

/// Smooth weighted round-robin over the eligible servers.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    /// Per-server running score; grown on demand to the server count.
    current: Mutex<Vec<i64>>,
}

impl WeightedRoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Selector for WeightedRoundRobin {
    fn pick(&self, servers: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.resize(servers.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (index, server) in servers.iter().enumerate() {
            if !server.eligible || server.weight == 0 {
                continue;
            }
            let weight = i64::from(server.weight);
            current[index] += weight;
            total += weight;
            if best.is_none_or(|b| current[index] > current[b]) {
                best = Some(index);
            }
        }
        let chosen = best?;
        current[chosen] -= total;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn up(weight: u32) -> Candidate {
        Candidate {
            weight,
            ..Candidate::up()
        }
    }

    fn picks(selector: &WeightedRoundRobin, servers: &[Candidate], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| selector.pick(servers, CLIENT).expect("a server"))
            .collect()
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = WeightedRoundRobin::new();
        assert_eq!(picks(&rr, &[up(1), up(1)], 6), [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn weights_are_honoured_and_spread_out() {
        let rr = WeightedRoundRobin::new();
        assert_eq!(picks(&rr, &[up(5), up(1), up(1)], 7), [0, 0, 1, 0, 2, 0, 0]);
        let rr = WeightedRoundRobin::new();
        let servers = [up(3), up(2), up(1)];
        let window = picks(&rr, &servers, 600);
        for (index, server) in servers.iter().enumerate() {
            let count = window.iter().filter(|&&p| p == index).count();
            assert_eq!(count, 100 * server.weight as usize);
        }
    }

    #[test]
    fn ineligible_and_zero_weight_servers_are_skipped() {
        let rr = WeightedRoundRobin::new();
        let servers = [
            up(1),
            Candidate {
                eligible: false,
                ..Candidate::up()
            },
            up(0),
            up(1),
        ];
        assert_eq!(picks(&rr, &servers, 4), [0, 3, 0, 3]);
    }

    #[test]
    fn nothing_eligible_gives_none() {
        let rr = WeightedRoundRobin::new();
        let servers = [Candidate {
            eligible: false,
            ..Candidate::up()
        }];
        assert_eq!(rr.pick(&servers, CLIENT), None);
        assert_eq!(rr.pick(&[], CLIENT), None);
    }
}
