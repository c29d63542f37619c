//! Source hashing, as HAProxy's `balance source`: a hash of the client's IP address picks the
//! server, so a client keeps reaching the same server (useful when an MTA greylists or rate
//! limits per client), in proportion to the servers' weights.
//!
//! Unlike HAProxy's default map-based hash, the mapping is made with weighted rendezvous
//! (highest random weight) hashing over the eligible servers, so it is stable when servers
//! go down and come back: every (client, server) pair gets a score that depends on nothing
//! else, and the client goes to the eligible server with the highest score. When a server
//! goes down, only its own clients move (each to its second-best server); when it comes
//! back, they return to it and nobody else moves. A weight change likewise moves only the
//! clients that the changed server gains or loses.
//!
//! Weights: the score is `weight / -ln(u)` where `u` in (0, 1) comes from the pair's hash.
//! `-ln(u)` is exponentially distributed, so `-ln(u) / weight` is exponential with rate
//! `weight`, and the smallest of these (the highest score) belongs to each server with
//! probability `weight / sum(weights)`. This is computed in `f64`: `ln` is the platform's
//! libm, which could in theory differ in the last bit between platforms, moving a client
//! whose two best scores agree to ~15 digits (a chance of roughly 1e-15 per client); an
//! integer fixed-point logarithm would remove that at the cost of clarity. `u` takes 52
//! hash bits and is offset by half a step, so it is never 0 or 1 and the score is always
//! finite and positive. Exactly equal scores go to the lower index.
//!
//! The hash is 64-bit FNV-1a (fixed, published constants) over the client address and the
//! server's index, finished with MurmurHash3's `fmix64` to spread FNV's weakly mixed bits
//! over the whole word. Everything is fixed in this file, so a client maps to the same
//! server in every run, every process, on every machine and after a Rust upgrade: neither
//! `RandomState` (random keys per process) nor `DefaultHasher` (fixed keys today, but its
//! algorithm may change between Rust releases) would guarantee that. The index is hashed as
//! a `u64` so 32- and 64-bit builds agree. IPv4-mapped IPv6 clients (`::ffff:a.b.c.d`, seen
//! on dual-stack sockets) are hashed as the IPv4 address, so they reach the same server as
//! the same client over IPv4.
//!
//! The server's identity in the hash is its index in the listener's server list: the
//! mapping survives restarts and reloads as long as the configured order of servers does
//! not change; inserting or reordering servers remaps clients.

use std::net::IpAddr;

use super::{Candidate, Selector};

/// Weighted rendezvous hashing of the client address.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceHash;

impl SourceHash {
    pub fn new() -> Self {
        Self
    }
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `bytes`, continuing from `state` (start with [`FNV_OFFSET_BASIS`]).
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The FNV-1a state after the client address: 4 bytes for IPv4 (including IPv4-mapped
/// IPv6), 16 for IPv6.
fn client_state(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(v4) => fnv1a(FNV_OFFSET_BASIS, &v4.octets()),
        IpAddr::V6(v6) => fnv1a(FNV_OFFSET_BASIS, &v6.octets()),
    }
}

/// Maps a hash into (0, 1): its top 52 bits plus half a step, which `f64` holds exactly.
fn unit_interval(hash: u64) -> f64 {
    ((hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64
}

/// The rendezvous score of server `index` of weight `weight` for the client.
fn score(client_state: u64, index: usize, weight: u32) -> f64 {
    let hash = fmix64(fnv1a(client_state, &(index as u64).to_le_bytes()));
    f64::from(weight) / -unit_interval(hash).ln()
}

impl Selector for SourceHash {
    fn pick(&self, servers: &[Candidate], client: IpAddr) -> Option<usize> {
        let state = client_state(client);
        let mut best: Option<(usize, f64)> = None;
        for (index, server) in servers.iter().enumerate() {
            if !server.eligible || server.weight == 0 {
                continue;
            }
            let score = score(state, index, server.weight);
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((index, score));
            }
        }
        best.map(|(index, _)| index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CLIENTS: u32 = 10_000;

    fn up(weight: u32) -> Candidate {
        Candidate {
            weight,
            ..Candidate::up()
        }
    }

    fn down(weight: u32) -> Candidate {
        Candidate {
            eligible: false,
            ..up(weight)
        }
    }

    /// Consecutive addresses from 10.0.0.0: little entropy, a fair test of the hash.
    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// Consecutive addresses from 2001:db8::.
    fn v6(n: u32) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(n)))
    }

    fn mapping(servers: &[Candidate], clients: impl Fn(u32) -> IpAddr) -> Vec<Option<usize>> {
        let sh = SourceHash::new();
        (0..CLIENTS).map(|n| sh.pick(servers, clients(n))).collect()
    }

    fn count(mapping: &[Option<usize>], server: usize) -> usize {
        mapping.iter().filter(|&&m| m == Some(server)).count()
    }

    /// Asserts each server's share of `mapping` is within 5 percentage points of its
    /// weight's share.
    fn assert_shares(mapping: &[Option<usize>], servers: &[Candidate]) {
        let total: u32 = servers.iter().map(|s| s.weight).sum();
        for (index, server) in servers.iter().enumerate() {
            let expected = f64::from(server.weight) / f64::from(total);
            let share = count(mapping, index) as f64 / mapping.len() as f64;
            assert!(
                (share - expected).abs() < 0.05,
                "server {index}: share {share:.4}, expected {expected:.4}"
            );
        }
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // Continuing from a state is hashing the concatenation.
        let state = fnv1a(FNV_OFFSET_BASIS, b"foo");
        assert_eq!(fnv1a(state, b"bar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_client_keeps_its_server() {
        let servers = [up(1), up(1), up(1)];
        let first = mapping(&servers, v4);
        // A fresh selector (as in another process) agrees, pick after pick.
        assert_eq!(mapping(&servers, v4), first);
        assert_eq!(mapping(&servers, v4), first);
    }

    #[test]
    fn the_mapping_is_the_same_in_every_build() {
        // Pinned values: if the hash changes, every client of every user moves on upgrade.
        let servers = [up(1), up(2), up(1), up(3)];
        let sh = SourceHash::new();
        let picks: Vec<_> = [
            "192.0.2.1",
            "192.0.2.2",
            "198.51.100.7",
            "203.0.113.200",
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.3",
            "10.20.30.40",
            "2001:db8::1",
            "2001:db8::2",
            "2001:db8:1234::25",
            "::ffff:192.0.2.1",
        ]
        .iter()
        .map(|a| sh.pick(&servers, a.parse().expect("an address")))
        .collect();
        let pinned = [3, 3, 3, 3, 1, 3, 2, 3, 3, 3, 1, 3];
        assert_eq!(picks, pinned.map(Some));
    }

    #[test]
    fn equal_weights_share_clients_equally() {
        let servers = [up(1), up(1), up(1)];
        assert_shares(&mapping(&servers, v4), &servers);
    }

    #[test]
    fn weights_share_clients_in_proportion() {
        let servers = [up(1), up(3)];
        assert_shares(&mapping(&servers, v4), &servers);
        let servers = [up(2), up(5), up(3)];
        assert_shares(&mapping(&servers, v4), &servers);
        assert_shares(&mapping(&servers, v6), &servers);
    }

    #[test]
    fn only_the_clients_of_a_down_server_move_and_they_come_back() {
        let servers = [up(1), up(2), up(1)];
        let before = mapping(&servers, v4);
        let during = mapping(&[servers[0], down(2), servers[2]], v4);
        for (was, is) in before.iter().zip(&during) {
            if *was == Some(1) {
                assert!(matches!(is, Some(0 | 2)), "moved to {is:?}");
            } else {
                assert_eq!(was, is);
            }
        }
        // The moved clients are shared by both remaining servers, by weight.
        let moved: Vec<_> = (0..before.len())
            .filter(|&n| before[n] == Some(1))
            .map(|n| during[n])
            .collect();
        assert_shares(&moved, &[up(1), up(0), up(1)]);
        assert_eq!(mapping(&servers, v4), before);
    }

    #[test]
    fn a_weight_change_moves_only_clients_to_or_from_that_server() {
        let before = mapping(&[up(1), up(1), up(1)], v4);
        let after = mapping(&[up(1), up(3), up(1)], v4);
        for (was, is) in before.iter().zip(&after) {
            assert!(was == is || *is == Some(1), "{was:?} moved to {is:?}");
        }
    }

    #[test]
    fn ipv6_clients_are_spread() {
        let servers = [up(1), up(1)];
        assert_shares(&mapping(&servers, v6), &servers);
        // The high bits of IPv6 addresses count too.
        let high = |n: u32| IpAddr::V6(Ipv6Addr::from(u128::from(n) << 96));
        assert_shares(&mapping(&servers, high), &servers);
    }

    #[test]
    fn ipv4_mapped_ipv6_clients_hash_as_ipv4() {
        let servers = [up(1), up(1), up(1)];
        let mapped = |n: u32| match v4(n) {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            IpAddr::V6(a) => IpAddr::V6(a),
        };
        assert_eq!(mapping(&servers, mapped), mapping(&servers, v4));
    }

    #[test]
    fn ineligible_and_zero_weight_servers_are_never_chosen() {
        let servers = [down(1), up(0), up(1), down(5)];
        assert!(mapping(&servers, v4).iter().all(|&m| m == Some(2)));
    }

    #[test]
    fn nothing_eligible_gives_none() {
        let sh = SourceHash::new();
        assert_eq!(sh.pick(&[], v4(1)), None);
        assert_eq!(sh.pick(&[down(1), up(0)], v4(1)), None);
    }

    #[test]
    fn extreme_weights_and_hashes_give_finite_scores() {
        for hash in [0, 1, u64::MAX - 1, u64::MAX] {
            let unit = unit_interval(hash);
            assert!(unit > 0.0 && unit < 1.0, "{hash:#x} gives {unit}");
            for weight in [1, u32::MAX] {
                let score = f64::from(weight) / -unit.ln();
                assert!(score.is_finite() && score > 0.0, "{score}");
            }
        }
        let s = score(0, usize::MAX, u32::MAX);
        assert!(s.is_finite() && s > 0.0, "{s}");
        let servers = [up(u32::MAX), up(1)];
        assert!(mapping(&servers, v4).iter().all(Option::is_some));
    }
}
