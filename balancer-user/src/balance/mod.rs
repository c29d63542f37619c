//! Server selection: which server gets the next client.
//!
//! Each algorithm sits behind [`Selector`] in its own file, so adding one does not touch the
//! proxy core. Selectors see servers by index into the listener's server list and are told
//! which ones are currently eligible.

mod roundrobin;

pub use roundrobin::WeightedRoundRobin;

use std::net::IpAddr;

/// A server as the selector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Relative share of new clients; 0 never receives any.
    pub weight: u32,
    /// Whether the server may receive clients now (up, not drained).
    pub eligible: bool,
}

/// Picks the server for a new client.
pub trait Selector: Send + Sync {
    /// The index of the chosen server, or `None` when no server is eligible.
    fn pick(&self, servers: &[Candidate], client: IpAddr) -> Option<usize>;
}
