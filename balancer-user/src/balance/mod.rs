//! Server selection: which server gets the next client.
//!
//! Each algorithm sits behind [`Selector`] in its own file, so adding one does not touch the
//! proxy core. Selectors see servers by index into the listener's server list, with what
//! they need to know about each ([`Candidate`]). Backup servers are handled once, here, for
//! every algorithm: [`pick`] offers the algorithm the normal servers, or only the backups
//! when no normal server is eligible.

mod first;
mod leastconn;
#[cfg(test)]
mod properties;
mod roundrobin;
mod source;

pub use first::First;
pub use leastconn::LeastConnections;
pub use roundrobin::WeightedRoundRobin;
pub use source::SourceHash;

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
    /// At its `maxconn`: up, but takes no new client until a session ends. Unlike an
    /// ineligible server, a full one keeps its tier in use (backups are for servers that
    /// are down, not busy).
    pub full: bool,
}

impl Candidate {
    /// An eligible normal server with weight 1 and no sessions.
    pub fn up() -> Candidate {
        Candidate {
            weight: 1,
            eligible: true,
            backup: false,
            sessions: 0,
            full: false,
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
        Balance::RoundRobin => Box::new(WeightedRoundRobin::new()),
        Balance::LeastConn => Box::new(LeastConnections::new()),
        Balance::Source => Box::new(SourceHash::new()),
        Balance::First => Box::new(First::new()),
    }
}

/// Picks with `selector` among the normal servers, or among the backups when no normal
/// server is eligible (HAProxy's behaviour with `option allbackups`). Full servers are
/// offered to the selector as ineligible, so every algorithm skips them; when every
/// eligible server of the tier in use is full, there is no pick.
pub fn pick(selector: &dyn Selector, servers: &[Candidate], client: IpAddr) -> Option<usize> {
    let usable = |c: &Candidate| c.eligible && c.weight > 0;
    let use_backups = !servers.iter().any(|c| !c.backup && usable(c));
    let tier: Vec<Candidate> = servers
        .iter()
        .map(|c| Candidate {
            eligible: usable(c) && !c.full && c.backup == use_backups,
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

    const ALL: [Balance; 4] = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::Source,
        Balance::First,
    ];

    fn client(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
    }

    fn with_sessions(sessions: u32) -> Candidate {
        Candidate {
            sessions,
            ..Candidate::up()
        }
    }

    /// The servers chosen for `clients` in turn.
    fn picks(balance: Balance, servers: &[Candidate], clients: &[IpAddr]) -> Vec<Option<usize>> {
        let selector = selector_for(balance);
        clients
            .iter()
            .map(|&c| pick(selector.as_ref(), servers, c))
            .collect()
    }

    #[test]
    fn roundrobin_takes_servers_in_turn() {
        let servers = [with_sessions(9), with_sessions(0)];
        let chosen = picks(Balance::RoundRobin, &servers, &[CLIENT; 4]);
        assert_eq!(chosen, [Some(0), Some(1), Some(0), Some(1)]);
    }

    #[test]
    fn leastconn_takes_the_least_loaded_server() {
        let servers = [with_sessions(9), with_sessions(2), with_sessions(5)];
        let chosen = picks(Balance::LeastConn, &servers, &[CLIENT; 3]);
        assert_eq!(chosen, [Some(1); 3]);
    }

    #[test]
    fn source_keeps_each_client_on_one_server() {
        let servers = [Candidate::up(), Candidate::up()];
        let clients: Vec<IpAddr> = (1..=40).map(client).collect();
        let chosen = picks(Balance::Source, &servers, &clients);
        // The same clients again, even through another selector, land where they did.
        assert_eq!(picks(Balance::Source, &servers, &clients), chosen);
        let selector = selector_for(Balance::Source);
        for (&c, &server) in clients.iter().zip(&chosen) {
            assert_eq!(pick(selector.as_ref(), &servers, c), server);
            assert_eq!(pick(selector.as_ref(), &servers, c), server);
        }
        // Different clients use both servers.
        assert!(chosen.contains(&Some(0)) && chosen.contains(&Some(1)));
    }

    #[test]
    fn first_always_takes_the_first_server() {
        let servers = [with_sessions(9), with_sessions(0), with_sessions(0)];
        let clients: Vec<IpAddr> = (1..=10).map(client).collect();
        assert_eq!(picks(Balance::First, &servers, &clients), [Some(0); 10]);
    }

    #[test]
    fn every_algorithm_falls_back_to_backups_and_skips_the_unusable() {
        let down = Candidate {
            eligible: false,
            ..Candidate::up()
        };
        let drained = Candidate {
            weight: 0,
            ..Candidate::up()
        };
        let backup = Candidate {
            backup: true,
            ..Candidate::up()
        };
        for balance in ALL {
            let selector = selector_for(balance);
            let s = selector.as_ref();
            assert_eq!(
                pick(s, &[down, drained, backup], CLIENT),
                Some(2),
                "{balance:?}"
            );
            assert_eq!(
                pick(s, &[backup, Candidate::up()], CLIENT),
                Some(1),
                "{balance:?}"
            );
            assert_eq!(pick(s, &[down, drained], CLIENT), None, "{balance:?}");
            assert_eq!(pick(s, &[], CLIENT), None, "{balance:?}");
        }
    }

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
    fn full_servers_are_skipped_without_falling_back_to_backups() {
        let full = Candidate {
            full: true,
            ..Candidate::up()
        };
        let backup = Candidate {
            backup: true,
            ..Candidate::up()
        };
        for balance in ALL {
            let selector = selector_for(balance);
            let s = selector.as_ref();
            assert_eq!(
                pick(s, &[full, Candidate::up()], CLIENT),
                Some(1),
                "{balance:?}"
            );
            assert_eq!(pick(s, &[full, full, backup], CLIENT), None, "{balance:?}");
            let full_backup = Candidate {
                full: true,
                ..backup
            };
            let down = Candidate {
                eligible: false,
                ..Candidate::up()
            };
            assert_eq!(
                pick(s, &[down, full_backup, backup], CLIENT),
                Some(2),
                "{balance:?}"
            );
        }
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
