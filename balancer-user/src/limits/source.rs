//! Per-source limits: connections open at once and new connections per window, for each
//! source group (an IPv4 address or IPv6 block, by the listener's prefix lengths).
//!
//! Memory is bounded, whatever the clients do:
//!
//! - An entry lives while its source has a connection open or a connection within the last
//!   rate window; without a rate limit it goes with its source's last connection.
//! - Expired entries are swept once per window.
//! - The table holds at most `capacity` entries without open connections (100 000 by
//!   default, some 10 MB). When a new source arrives at a full table, the oldest such
//!   entries are evicted, an eighth of the table at a time so a scan over fresh addresses
//!   costs O(1) per connection on average. Entries with open connections are never evicted
//!   (their count would be lost); there are at most `maxconn` of them.
//!
//! An evicted source starts again with a clean rate; that is the price of a bounded table
//! under a scan, and it only favours sources that have been quiet the longest.
//!
//! Every connection attempt counts towards the rate, refused ones included, so a client
//! that keeps hammering stays refused until it slows down; a sender that retries after the
//! `421` minutes later finds its window empty.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Refused;
use super::rate::WindowRate;
use super::refusal::Limit;
use crate::config::SourceLimits;

/// Entries without open connections kept at most, per listener.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A source group: an address with the bits beyond the prefix cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4 { network: u32, prefix: u8 },
    V6 { network: u128, prefix: u8 },
}

impl SourceKey {
    /// The group of `ip`. An IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, what a
    /// dual-stack socket reports for IPv4 clients) is grouped as the IPv4 address.
    pub fn new(ip: IpAddr, prefix_v4: u8, prefix_v6: u8) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4 {
                network: u32::from(v4) & mask_u32(prefix_v4),
                prefix: prefix_v4.min(32),
            },
            IpAddr::V6(v6) => SourceKey::V6 {
                network: u128::from(v6) & mask_u128(prefix_v6),
                prefix: prefix_v6.min(128),
            },
        }
    }
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

/// `192.0.2.7` for a whole address, `2001:db8::/64` for a block.
impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SourceKey::V4 {
                network,
                prefix: 32,
            } => write!(f, "{}", Ipv4Addr::from(network)),
            SourceKey::V4 { network, prefix } => write!(f, "{}/{prefix}", Ipv4Addr::from(network)),
            SourceKey::V6 {
                network,
                prefix: 128,
            } => write!(f, "{}", Ipv6Addr::from(network)),
            SourceKey::V6 { network, prefix } => write!(f, "{}/{prefix}", Ipv6Addr::from(network)),
        }
    }
}

struct Entry {
    open: u32,
    rate: WindowRate,
    last_seen: Instant,
}

struct Table {
    entries: HashMap<SourceKey, Entry>,
    /// Entries with a connection open, kept up to date so that checking for a full table
    /// does not scan it.
    busy: usize,
    last_sweep: Instant,
}

/// The per-source state of one listener.
pub struct SourceTable {
    limits: SourceLimits,
    capacity: usize,
    table: Mutex<Table>,
}

/// A connection counted against its source until dropped.
pub struct SourceGuard {
    table: Arc<SourceTable>,
    key: SourceKey,
}

impl SourceTable {
    pub fn new(limits: SourceLimits) -> SourceTable {
        SourceTable::with_capacity(limits, DEFAULT_CAPACITY)
    }

    /// A table that keeps at most `capacity` (at least 1) entries without open connections.
    pub fn with_capacity(limits: SourceLimits, capacity: usize) -> SourceTable {
        SourceTable {
            limits,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                entries: HashMap::new(),
                busy: 0,
                last_sweep: Instant::now(),
            }),
        }
    }

    /// Source groups tracked now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a connection attempt from `client` at `now`, and admits it unless its source
    /// is over a limit.
    pub fn admit(self: &Arc<Self>, client: IpAddr, now: Instant) -> Result<SourceGuard, Refused> {
        let key = SourceKey::new(client, self.limits.prefix_v4, self.limits.prefix_v6);
        let window = self.limits.rate_window;
        let mut table = self.lock();
        if now.saturating_duration_since(table.last_sweep) >= window {
            table.sweep(now, window);
        }
        if !table.entries.contains_key(&key) && table.idle() >= self.capacity {
            table.evict_oldest(self.capacity.div_ceil(8));
        }
        let Table { entries, busy, .. } = &mut *table;
        let entry = entries.entry(key).or_insert_with(|| Entry {
            open: 0,
            rate: WindowRate::new(now),
            last_seen: now,
        });
        entry.last_seen = now;
        let refused = |limit| Refused {
            limit,
            source: Some(key),
        };
        if self.limits.max_rate > 0 {
            let recent = entry.rate.count(now, window);
            entry.rate.record(now, window);
            if recent >= self.limits.max_rate {
                return Err(refused(Limit::SourceRate));
            }
        }
        if self.limits.max_conn > 0 && entry.open >= self.limits.max_conn {
            return Err(refused(Limit::SourceConn));
        }
        if entry.open == 0 {
            *busy += 1;
        }
        entry.open += 1;
        Ok(SourceGuard {
            table: self.clone(),
            key,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, key: &SourceKey, now: Instant) {
        let window = self.limits.rate_window;
        let rate_limited = self.limits.max_rate > 0;
        let mut table = self.lock();
        let Table { entries, busy, .. } = &mut *table;
        let Some(entry) = entries.get_mut(key) else {
            return;
        };
        entry.open = entry.open.saturating_sub(1);
        if entry.open > 0 {
            return;
        }
        *busy = busy.saturating_sub(1);
        if !rate_limited || entry.rate.is_idle(now, window) {
            entries.remove(key);
        }
    }
}

impl Table {
    /// Entries that could be forgotten: no connection open.
    fn idle(&self) -> usize {
        self.entries.len().saturating_sub(self.busy)
    }

    /// Drops the entries with no open connection and no event within the window.
    fn sweep(&mut self, now: Instant, window: Duration) {
        self.entries
            .retain(|_, entry| entry.open > 0 || !entry.rate.is_idle(now, window));
        self.last_sweep = now;
    }

    /// Evicts up to `count` entries without open connections, least recently seen first.
    fn evict_oldest(&mut self, count: usize) {
        let mut idle: Vec<(Instant, SourceKey)> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.open == 0)
            .map(|(key, entry)| (entry.last_seen, *key))
            .collect();
        if idle.len() > count {
            idle.select_nth_unstable_by_key(count, |(seen, _)| *seen);
            idle.truncate(count);
        }
        for (_, key) in idle {
            self.entries.remove(&key);
        }
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.table.release(&self.key, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> IpAddr {
        IpAddr::V4(text.parse().expect("IPv4"))
    }

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(text.parse().expect("IPv6"))
    }

    fn table(limits: SourceLimits, capacity: usize) -> Arc<SourceTable> {
        Arc::new(SourceTable::with_capacity(limits, capacity))
    }

    fn conn_limit(max_conn: u32) -> SourceLimits {
        SourceLimits {
            max_conn,
            ..SourceLimits::default()
        }
    }

    fn rate_limit(max_rate: u32, window: Duration) -> SourceLimits {
        SourceLimits {
            max_rate,
            rate_window: window,
            ..SourceLimits::default()
        }
    }

    fn limit_of(result: Result<SourceGuard, Refused>) -> Option<Limit> {
        result.err().map(|refused| refused.limit)
    }

    #[test]
    fn grouping_by_prefix() {
        let key = |ip, p4, p6| SourceKey::new(ip, p4, p6).to_string();
        assert_eq!(key(v4("192.0.2.77"), 32, 64), "192.0.2.77");
        assert_eq!(key(v4("192.0.2.77"), 24, 64), "192.0.2.0/24");
        assert_eq!(key(v4("192.0.2.77"), 1, 64), "128.0.0.0/1");
        assert_eq!(key(v6("2001:db8:1:2:3:4:5:6"), 32, 64), "2001:db8:1:2::/64");
        assert_eq!(key(v6("2001:db8:1:2:3:4:5:6"), 32, 48), "2001:db8:1::/48");
        assert_eq!(key(v6("2001:db8::1"), 32, 128), "2001:db8::1");
        // IPv4-mapped IPv6 is IPv4, with the IPv4 prefix.
        assert_eq!(key(v6("::ffff:192.0.2.77"), 24, 64), "192.0.2.0/24");
        assert_eq!(
            SourceKey::new(v6("::ffff:192.0.2.77"), 32, 64),
            SourceKey::new(v4("192.0.2.77"), 32, 64)
        );
        // Two hosts of one /64 are one source; the next /64 is another.
        assert_eq!(
            SourceKey::new(v6("2001:db8::1"), 32, 64),
            SourceKey::new(v6("2001:db8::ffff:1"), 32, 64)
        );
        assert_ne!(
            SourceKey::new(v6("2001:db8::1"), 32, 64),
            SourceKey::new(v6("2001:db8:0:1::1"), 32, 64)
        );
        assert_eq!((mask_u32(0), mask_u32(32)), (0, u32::MAX));
        assert_eq!((mask_u128(0), mask_u128(128)), (0, u128::MAX));
    }

    #[test]
    fn concurrent_connections_per_source() {
        let sources = table(conn_limit(3), 100);
        let now = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|_| {
                sources
                    .admit(v4("127.0.0.77"), now)
                    .expect("under the limit")
            })
            .collect();
        assert_eq!(
            limit_of(sources.admit(v4("127.0.0.77"), now)),
            Some(Limit::SourceConn)
        );
        let other = sources
            .admit(v4("127.0.0.78"), now)
            .expect("another source");
        assert_eq!(sources.len(), 2);
        drop(other);
        assert_eq!(sources.len(), 1, "an idle entry goes with its last guard");
        let mut held = held;
        held.pop();
        let again = sources
            .admit(v4("127.0.0.77"), now)
            .expect("a place was freed");
        drop((held, again));
        assert!(sources.is_empty());
    }

    #[test]
    fn one_ipv6_block_is_one_source() {
        let sources = table(conn_limit(2), 100);
        let now = Instant::now();
        let _a = sources.admit(v6("2001:db8::1"), now).expect("first");
        let _b = sources.admit(v6("2001:db8::2"), now).expect("second");
        let refused = sources.admit(v6("2001:db8::3"), now).err().expect("third");
        assert_eq!(refused.limit, Limit::SourceConn);
        assert_eq!(
            refused.source.map(|s| s.to_string()),
            Some("2001:db8::/64".into())
        );
        let _c = sources.admit(v6("2001:db8:1::1"), now).expect("next block");
    }

    #[test]
    fn rate_per_window_counts_refused_attempts_too() {
        let window = Duration::from_secs(10);
        let sources = table(rate_limit(3, window), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(sources.admit(v4("192.0.2.1"), t0).expect("under the rate"));
        }
        assert_eq!(
            limit_of(sources.admit(v4("192.0.2.1"), t0)),
            Some(Limit::SourceRate)
        );
        let _other = sources.admit(v4("192.0.2.2"), t0).expect("another source");
        // The rate entry outlives the connections, until the window has passed.
        assert_eq!(sources.len(), 2);
        // 4 attempts in the first period; halfway through the next one 2 still count.
        let half = t0 + window + window / 2;
        let _ok = sources.admit(v4("192.0.2.1"), half).expect("2 < 3");
        assert_eq!(
            limit_of(sources.admit(v4("192.0.2.1"), half)),
            Some(Limit::SourceRate),
            "2 weighted + 1 recorded just now"
        );
        let later = t0 + window * 4;
        let _fine = sources.admit(v4("192.0.2.1"), later).expect("forgotten");
    }

    #[test]
    fn both_limits_together() {
        let limits = SourceLimits {
            max_conn: 1,
            max_rate: 2,
            rate_window: Duration::from_secs(60),
            ..SourceLimits::default()
        };
        let sources = table(limits, 100);
        let now = Instant::now();
        let held = sources.admit(v4("192.0.2.1"), now).expect("first");
        assert_eq!(
            limit_of(sources.admit(v4("192.0.2.1"), now)),
            Some(Limit::SourceConn)
        );
        drop(held);
        // Two attempts (one refused) used up the rate.
        assert_eq!(
            limit_of(sources.admit(v4("192.0.2.1"), now)),
            Some(Limit::SourceRate)
        );
    }

    #[test]
    fn expired_entries_are_swept() {
        let window = Duration::from_secs(1);
        let sources = table(rate_limit(5, window), 1000);
        let t0 = Instant::now();
        for i in 0..100u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            drop(sources.admit(ip, t0).expect("admitted"));
        }
        assert_eq!(sources.len(), 100);
        let _one = sources
            .admit(v4("192.0.2.1"), t0 + window * 3)
            .expect("admitted");
        assert_eq!(sources.len(), 1, "the sweep dropped every expired entry");
    }

    #[test]
    fn a_scan_cannot_grow_the_table_without_bound() {
        let sources = table(rate_limit(5, Duration::from_secs(3600)), 1000);
        let t0 = Instant::now();
        let held = sources.admit(v6("2001:db8:ffff::1"), t0).expect("held");
        for i in 0..50_000u128 {
            let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64) | 1));
            let now = t0 + Duration::from_micros(i as u64);
            drop(sources.admit(ip, now).expect("admitted"));
            assert!(sources.len() <= 1001, "{} entries", sources.len());
        }
        // The held source was never evicted: its count is intact.
        let key = SourceKey::new(v6("2001:db8:ffff::1"), 32, 64);
        assert_eq!(sources.lock().entries.get(&key).map(|e| e.open), Some(1));
        // The most recent sources are the ones kept.
        let newest = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (49_999 << 64) | 1));
        let newest = SourceKey::new(newest, 32, 64);
        assert!(sources.lock().entries.contains_key(&newest));
        drop(held);
    }

    #[test]
    fn guards_are_safe_after_their_entry_is_gone() {
        let sources = table(conn_limit(5), 100);
        let guard = sources
            .admit(v4("192.0.2.1"), Instant::now())
            .expect("admitted");
        sources.lock().entries.clear();
        drop(guard);
        assert!(sources.is_empty());
    }
}
