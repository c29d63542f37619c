//! First available, as HAProxy's `balance first`: every new client goes to the first
//! eligible server in configuration order (lowest index) with a weight above 0, so the
//! other servers stay idle until it is unavailable. Useful to keep few servers busy.
//!
//! As in HAProxy, a server is only available below its `maxconn`, so clients spill over to
//! the next server once the first is full: [`super::pick`] offers full servers as
//! ineligible, so "the first eligible server" is the first one below its limit.

use std::net::IpAddr;

use super::{Candidate, Selector};

/// The first eligible server in configuration order.
#[derive(Clone, Copy, Debug, Default)]
pub struct First;

impl First {
    pub fn new() -> Self {
        Self
    }
}

impl Selector for First {
    fn pick(&self, servers: &[Candidate], _client: IpAddr) -> Option<usize> {
        servers.iter().position(|s| s.eligible && s.weight > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn down() -> Candidate {
        Candidate {
            eligible: false,
            ..Candidate::up()
        }
    }

    fn server(weight: u32, sessions: u32) -> Candidate {
        Candidate {
            weight,
            sessions,
            ..Candidate::up()
        }
    }

    #[test]
    fn the_first_server_always_gets_the_client() {
        let first = First::new();
        let servers = [Candidate::up(), Candidate::up(), Candidate::up()];
        for _ in 0..5 {
            assert_eq!(first.pick(&servers, CLIENT), Some(0));
        }
        assert_eq!(
            first.pick(&servers, IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Some(0)
        );
    }

    #[test]
    fn weight_and_sessions_do_not_matter_above_zero() {
        let first = First::new();
        let servers = [server(1, 1000), server(100, 0)];
        assert_eq!(first.pick(&servers, CLIENT), Some(0));
    }

    #[test]
    fn ineligible_and_zero_weight_servers_are_skipped() {
        let first = First::new();
        let servers = [down(), server(0, 0), Candidate::up(), Candidate::up()];
        assert_eq!(first.pick(&servers, CLIENT), Some(2));
    }

    #[test]
    fn nothing_eligible_gives_none() {
        let first = First::new();
        assert_eq!(first.pick(&[], CLIENT), None);
        assert_eq!(first.pick(&[down(), server(0, 0)], CLIENT), None);
    }
}
