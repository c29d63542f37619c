//! Connection limits: whether a new client may be served, decided right after accept and
//! before any server is contacted, so a client over a limit costs one socket and one short
//! reply, never a server connection.
//!
//! The gates, in the order a client meets them ([`Admission::admit`]):
//!
//! 1. `global.maxconn`: connections open over all listeners ([`Gauge`]).
//! 2. the listener's `maxconn` ([`Gauge`], shared with the listener's session count).
//! 3. per source: new connections per `rate_window` and connections open at once, sources
//!    grouped by prefix ([`SourceTable`]).
//!
//! A fourth limit, the server's `maxconn`, is applied by selection: a full server is not
//! eligible, and when every server that is up is full the client is refused with
//! [`Limit::Server`].
//!
//! - [`gauge`]: a count with a ceiling, held through RAII slots.
//! - [`rate`]: the sliding-window rate estimate the source table keeps per source.
//! - [`source`]: per-source state in a table whose size is bounded under address scans.
//! - [`refusal`]: the `421 4.7.0` replies, the clean close, counters and throttled logs.
//! - [`throttle`]: at most one log line per interval, counting what it held back.

mod gauge;
mod rate;
mod refusal;
mod source;
mod throttle;

pub use gauge::{Gauge, Slot};
pub use refusal::{Limit, Refusals, close_with_reply, is_resource_shortage};
pub use source::{SourceGuard, SourceKey, SourceTable};
pub use throttle::{Throttle, suppressed_note};

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::SourceLimits;

/// The connection gates of one listener.
pub struct Admission {
    global: Arc<Gauge>,
    listener: Arc<Gauge>,
    limits: SourceLimits,
    /// `None` when no per-source limit is set: then no per-source state is kept.
    sources: Option<Arc<SourceTable>>,
}

/// What an admitted client holds until its connection ends: one place in every count.
pub struct Admitted {
    _global: Slot,
    _listener: Slot,
    _source: Option<SourceGuard>,
}

/// A client over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    /// The source group, for per-source limits (logged, so an operator sees the block).
    pub source: Option<SourceKey>,
}

impl Admission {
    pub fn new(global: Arc<Gauge>, listener: Arc<Gauge>, limits: SourceLimits) -> Admission {
        Admission {
            global,
            listener,
            limits,
            sources: limits.any().then(|| Arc::new(SourceTable::new(limits))),
        }
    }

    /// The gates under a reloaded configuration (`listener`: the listener's gauge, whose
    /// limit the reload has set). The per-source table carries over while the per-source
    /// limits are unchanged; new limits start a new table, which counts only the clients
    /// that arrive after the reload.
    pub fn reconfigured(&self, listener: Arc<Gauge>, limits: SourceLimits) -> Admission {
        Admission {
            global: self.global.clone(),
            listener,
            limits,
            sources: if limits == self.limits {
                self.sources.clone()
            } else {
                limits.any().then(|| Arc::new(SourceTable::new(limits)))
            },
        }
    }

    /// Takes a place in every count, or says which limit refuses the client. Cheap gates
    /// come first; a client refused by one is not counted by the later ones (a client
    /// refused for its source rate still counts towards that rate: see [`SourceTable`]).
    pub fn admit(&self, client: IpAddr) -> Result<Admitted, Refused> {
        let refused = |limit| Refused {
            limit,
            source: None,
        };
        let global = self.global.try_acquire().ok_or(refused(Limit::Global))?;
        let listener = self
            .listener
            .try_acquire()
            .ok_or(refused(Limit::Listener))?;
        let source = match &self.sources {
            Some(table) => Some(table.admit(client, Instant::now())?),
            None => None,
        };
        Ok(Admitted {
            _global: global,
            _listener: listener,
            _source: source,
        })
    }

    /// Source groups currently tracked (0 without per-source limits).
    pub fn sources_tracked(&self) -> usize {
        self.sources.as_ref().map_or(0, |table| table.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn limits(max_conn: u32) -> SourceLimits {
        SourceLimits {
            max_conn,
            ..SourceLimits::default()
        }
    }

    #[test]
    fn gates_in_order_and_places_given_back() {
        let global = Arc::new(Gauge::new(3));
        let one = Admission::new(global.clone(), Arc::new(Gauge::new(2)), limits(1));
        let two = Admission::new(global.clone(), Arc::new(Gauge::new(5)), limits(0));

        let a = one.admit(ip(1)).expect("first");
        assert_eq!(
            one.admit(ip(1)).err().map(|r| r.limit),
            Some(Limit::SourceConn)
        );
        let b = one.admit(ip(2)).expect("another source");
        assert_eq!(
            one.admit(ip(3)).err().map(|r| r.limit),
            Some(Limit::Listener)
        );
        let c = two.admit(ip(1)).expect("other listener, no source limit");
        assert_eq!(two.admit(ip(4)).err().map(|r| r.limit), Some(Limit::Global));
        assert_eq!(global.open(), 3);
        assert_eq!(one.sources_tracked(), 2);
        assert_eq!(two.sources_tracked(), 0);

        drop((a, b, c));
        assert_eq!(global.open(), 0);
        assert_eq!(
            one.sources_tracked(),
            0,
            "idle entries go with their last guard"
        );
        let _again = one.admit(ip(1)).expect("room again");
    }

    #[test]
    fn a_refused_client_holds_nothing() {
        let global = Arc::new(Gauge::new(10));
        let listener = Arc::new(Gauge::new(10));
        let admission = Admission::new(
            global.clone(),
            listener.clone(),
            SourceLimits {
                max_rate: 1,
                rate_window: Duration::from_secs(60),
                ..SourceLimits::default()
            },
        );
        drop(admission.admit(ip(9)).expect("first"));
        let refused = admission
            .admit(ip(9))
            .err()
            .expect("second within the window");
        assert_eq!(refused.limit, Limit::SourceRate);
        assert_eq!(
            refused.source.map(|s| s.to_string()),
            Some("192.0.2.9".into())
        );
        assert_eq!((global.open(), listener.open()), (0, 0));
    }
}
