//! Server selection: which server gets the next client.
//!
//! Each algorithm sits behind [`Selector`] in its own file, so adding one does not touch the
//! proxy core. Selectors see servers by index into the listener's server list, with what
//! they need to know about each ([`Candidate`]). Backup servers are handled once, here, for
//! every algorithm: [`pick`] offers the algorithm the normal servers, or only the backups
//! when no normal server is eligible.

mod roundrobin;

pub use roundrobin::WeightedRoundRobin;

use std::net::IpAddr;

use crate::config::Balance;

/// A server as the selector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Relative share of new clients; 0 never receives any.
    pub weight: u32,
    /// Whether the server may receive clients now (up, not drained).
    pub eligible: bool,
    /// Used only when no normal server is eligible.
    pub backup: bool,
    /// Sessions currently open to this server (for leastconn).
    pub sessions: u32,
}

impl Candidate {
    /// An eligible normal server with weight 1 and no sessions.
    pub fn up() -> Candidate {
        Candidate {
            weight: 1,
            eligible: true,
            backup: false,
            sessions: 0,
        }
    }
}

/// Picks the server for a new client among the candidates whose `eligible` is set.
///
/// Implementations may ignore `backup` (the caller has already cleared `eligible` on the
/// tier not in use) and must skip servers with weight 0.
pub trait Selector: Send + Sync {
    /// The index of the chosen server, or `None` when no server is eligible.
    fn pick(&self, servers: &[Candidate], client: IpAddr) -> Option<usize>;
}

/// The selector for a listener's `balance` setting.
pub fn selector_for(balance: Balance) -> Box<dyn Selector> {
    match balance {
        Balance::RoundRobin | Balance::LeastConn | Balance::Source | Balance::First => {
            Box::new(WeightedRoundRobin::new())
        }
    }
}

/// Picks with `selector` among the normal servers, or among the backups when no normal
/// server is eligible (HAProxy's behaviour with `option allbackups`).
pub fn pick(selector: &dyn Selector, servers: &[Candidate], client: IpAddr) -> Option<usize> {
    let usable = |c: &Candidate| c.eligible && c.weight > 0;
    let use_backups = !servers.iter().any(|c| !c.backup && usable(c));
    let tier: Vec<Candidate> = servers
        .iter()
        .map(|c| Candidate {
            eligible: usable(c) && c.backup == use_backups,
            ..*c
        })
        .collect();
    selector.pick(&tier, client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn backups_only_when_no_normal_server_is_eligible() {
        let rr = WeightedRoundRobin::new();
        let backup = Candidate {
            backup: true,
            ..Candidate::up()
        };
        let down = Candidate {
            eligible: false,
            ..Candidate::up()
        };
        let servers = [Candidate::up(), backup];
        assert_eq!(pick(&rr, &servers, CLIENT), Some(0));
        assert_eq!(pick(&rr, &servers, CLIENT), Some(0));
        let servers = [down, backup, backup];
        let picks: Vec<_> = (0..4).map(|_| pick(&rr, &servers, CLIENT)).collect();
        assert_eq!(picks, [Some(1), Some(2), Some(1), Some(2)]);
        assert_eq!(pick(&rr, &[down], CLIENT), None);
    }

    #[test]
    fn a_zero_weight_normal_server_does_not_hide_the_backups() {
        let rr = WeightedRoundRobin::new();
        let servers = [
            Candidate {
                weight: 0,
                ..Candidate::up()
            },
            Candidate {
                backup: true,
                ..Candidate::up()
            },
        ];
        assert_eq!(pick(&rr, &servers, CLIENT), Some(1));
    }
}
