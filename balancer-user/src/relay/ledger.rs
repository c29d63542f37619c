//! Byte conservation: every relayed connection is checked against the kernel's own TCP
//! counters, per direction, at each change of relay phase and at its end. Always on.
//!
//! For a direction from socket A to socket B, with `consumed(A)` = what A's TCP received in
//! order minus what still waits unread (both from the kernel, FIN left out) and `taken(B)`
//! = what B's TCP took for sending (acknowledged + queued, our FIN left out):
//!
//! - **source**: `consumed(A) = consumed₀(A) + relayed` — every byte read from A (by the
//!   daemon or by the verdict) was passed on, once;
//! - **sink**: `taken(B) = taken₀(B) + relayed` — B was given exactly what was passed on;
//!
//! where `relayed` is what the daemon wrote plus what the verdict redirected, and the
//! subscript 0 marks the reading taken before the relay moved a byte (the PROXY header the
//! daemon wrote, an `accept_proxy` header it read). A chunk relayed twice makes `relayed`
//! larger than `consumed(A)`; a chunk lost on the way makes `taken(B)` smaller than
//! `relayed`; a duplicate and a loss of the same length still break one equation each at
//! the next balance, because the duplicate is counted when it is read and the loss when
//! the sink falls short.
//!
//! The equalities hold only when nothing is in flight inside the relay, so they are taken
//! where that is so: at a hand-over to the kernel (user space has written all it read), on
//! leaving the kernel (both peers have taken everything, both sockets out of the maps, so
//! `SIOCINQ` counts the TCP queue again), and at a clean end. While the kernel relays,
//! only the bounds can be checked: `relayed ≤ received(A) − consumed₀(A)` and
//! `taken(B) ≤ taken₀(B) + relayed`.
//!
//! What it cannot see: a byte altered in place (the counts match), and bytes reordered
//! within one direction. Neither is something the relay does: both paths move whole
//! buffers or whole skbs in queue order; only duplication or loss at a hand-over has been
//! seen, and that is what this catches.

use std::fmt;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::error;

use crate::sockopt::{self, Counts};

static INTEGRITY_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Connections whose byte conservation check failed since the daemon started.
pub fn integrity_errors() -> u64 {
    INTEGRITY_ERRORS.load(Ordering::Relaxed)
}

/// Where in a connection's life the balance is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// User space hands the sockets to the kernel.
    ToKernel,
    /// The kernel hands them back (both out of the maps).
    FromKernel,
    /// While the kernel relays: bounds only.
    InKernel,
    /// Both directions closed in order.
    End,
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Moment::ToKernel => "hand-over to the kernel",
            Moment::FromKernel => "hand-back from the kernel",
            Moment::InKernel => "kernel relay",
            Moment::End => "end of connection",
        })
    }
}

/// What the relay passed on so far, per direction (daemon + kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Client to server.
    pub upstream: u64,
    /// Server to client.
    pub downstream: u64,
}

/// A broken conservation equation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub moment: Moment,
    /// `client->server` or `server->client`.
    pub direction: &'static str,
    /// `source` (read ≠ relayed) or `sink` (relayed ≠ given to the peer).
    pub side: &'static str,
    /// What the relay passed on.
    pub relayed: u64,
    /// What the kernel says the source consumed, or the sink took, since the baseline.
    pub kernel_says: u64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} at {}: relayed {} bytes, the socket's TCP counters say {} ({:+})",
            self.direction,
            self.side,
            self.moment,
            self.relayed,
            self.kernel_says,
            self.relayed as i128 - self.kernel_says as i128,
        )
    }
}

/// Per socket: what was consumed from it and taken by it before the relay began.
#[derive(Clone, Copy, Debug)]
struct Base {
    consumed: u64,
    taken: u64,
}

/// The baselines of one connection.
#[derive(Debug)]
pub struct Ledger {
    client: Base,
    server: Base,
    /// The daemon read part of the client's stream itself (an `accept_proxy` header) and
    /// bytes were still queued behind it: the first read may have split a segment.
    client_split: bool,
}

impl Ledger {
    /// Reads the baselines; call before the relay moves a byte.
    pub fn start(client: &impl AsFd, server: &impl AsFd) -> std::io::Result<Ledger> {
        let (c, s) = (Counts::read(client)?, Counts::read(server)?);
        Ok(Ledger {
            client: Base {
                consumed: consumed(&c),
                taken: sent(&c),
            },
            server: Base {
                consumed: consumed(&s),
                taken: sent(&s),
            },
            client_split: consumed(&c) > 0 && c.unread > 0,
        })
    }

    /// Whether each socket's receive queue holds only whole segments (nothing partly read),
    /// as the kernel relay requires: (client, server).
    pub fn initially_whole(&self) -> (bool, bool) {
        (!self.client_split, true)
    }

    /// The equalities, for a moment when nothing is in flight inside the relay and both
    /// sockets are in no sockmap.
    pub fn balance(
        &self,
        client: &impl AsFd,
        server: &impl AsFd,
        relayed: Relayed,
        moment: Moment,
    ) -> Result<(), Violation> {
        if moment == Moment::End && (reset(client) || reset(server)) {
            // Reset after the relay's last look (the client hung up before the banner
            // reached it, say): bytes may rightly be lost there, and a reset socket's FINs
            // cannot be told from its state. Only the bounds hold.
            return self.bounds(client, server, || relayed);
        }
        let (Ok(c), Ok(s)) = (Counts::read(client), Counts::read(server)) else {
            // A socket that failed (reset) or kept moving: the next balance covers it.
            return Ok(());
        };
        let up = Direction::new("client->server", self.client, self.server, relayed.upstream);
        let down = Direction::new(
            "server->client",
            self.server,
            self.client,
            relayed.downstream,
        );
        up.balance(&c, &s, moment)?;
        down.balance(&s, &c, moment)
    }

    /// The equalities at the hand-over to the kernel once a peer's reset was found pending
    /// on a socket (the first [`Ledger::balance`] failed).
    ///
    /// A reset leaves the socket in TCP state `CLOSE`, whose counters read as if both FINs
    /// had passed. Measured on Linux 6.18, the reset changes nothing else: received, unread
    /// (`SIOCINQ`), acknowledged and queued (`SIOCOUTQ`) stay as they were. What is known
    /// instead of the state: the daemon sent no FIN on either socket (`relay_until` hands
    /// over only while both directions are open), and the reset peer may or may not have
    /// sent one before its reset. So every equation must hold exactly, except the reset
    /// socket's source equation, which may read one more (that FIN). Anything else is a
    /// violation, reported as any other.
    pub fn balance_after_reset(
        &self,
        client: &impl AsFd,
        server: &impl AsFd,
        relayed: Relayed,
        resets: Resets,
    ) -> Result<AfterReset, Violation> {
        let (Ok(mut c), Ok(mut s)) = (Counts::read(client), Counts::read(server)) else {
            return Ok(AfterReset::Exact);
        };
        for (counts, reset) in [(&mut c, resets.client), (&mut s, resets.server)] {
            if reset {
                counts.fin_sent = false;
                counts.fin_received = false;
            }
        }
        let up = Direction::new("client->server", self.client, self.server, relayed.upstream);
        let down = Direction::new(
            "server->client",
            self.server,
            self.client,
            relayed.downstream,
        );
        let up_fin = up.balance_within(&c, &s, u64::from(resets.client))?;
        let down_fin = down.balance_within(&s, &c, u64::from(resets.server))?;
        Ok(if up_fin || down_fin {
            AfterReset::WithinAFin
        } else {
            AfterReset::Exact
        })
    }

    /// The bounds, valid at any time (sockets paired in the kernel or not). `relayed` is
    /// asked twice, around the socket readings, because the kernel may be relaying
    /// meanwhile: the source is compared with what was relayed before its counters were
    /// read, the sink with what was relayed after.
    pub fn bounds(
        &self,
        client: &impl AsFd,
        server: &impl AsFd,
        relayed: impl Fn() -> Relayed,
    ) -> Result<(), Violation> {
        let before = relayed();
        let (Ok(c), Ok(s)) = (Counts::read(client), Counts::read(server)) else {
            return Ok(());
        };
        let after = relayed();
        let up = |relayed| Direction::new("client->server", self.client, self.server, relayed);
        let down = |relayed| Direction::new("server->client", self.server, self.client, relayed);
        up(before.upstream).source_bound(&c)?;
        down(before.downstream).source_bound(&s)?;
        up(after.upstream).sink_bound(&s)?;
        down(after.downstream).sink_bound(&c)
    }
}

/// Which sockets had a pending error (a peer's reset) when it was taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resets {
    pub client: bool,
    pub server: bool,
}

impl Resets {
    /// Takes (and so clears) each socket's pending error.
    pub fn take(client: &impl AsFd, server: &impl AsFd) -> Resets {
        Resets {
            client: reset(client),
            server: reset(server),
        }
    }

    pub fn any(self) -> bool {
        self.client || self.server
    }
}

/// How a balance after a reset held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterReset {
    /// Every equation exactly: no FIN came before the reset.
    Exact,
    /// A reset socket's stream read one more than was relayed: its peer's FIN before the
    /// reset, or a lost byte, which the counters cannot tell apart.
    WithinAFin,
}

/// Counts and logs a violation, and makes both sockets reset when they close: the server
/// must not take an altered message for a whole one.
pub fn report(violation: &Violation, client: &impl AsFd, server: &impl AsFd) {
    INTEGRITY_ERRORS.fetch_add(1, Ordering::Relaxed);
    error!(
        client = %peer(client),
        server = %peer(server),
        "integrity: byte conservation failed, resetting both sides: {violation}"
    );
    let _ = sockopt::reset_on_close(client);
    let _ = sockopt::reset_on_close(server);
}

/// Counts and logs a chunk the verdict dropped because it began with bytes the socket had
/// delivered before and it could not cut them off (`balancer_common::UNTRIMMABLE`), and
/// makes both sockets reset when they close, as [`report`] does.
pub fn report_untrimmable(direction: &str, client: &impl AsFd, server: &impl AsFd) {
    INTEGRITY_ERRORS.fetch_add(1, Ordering::Relaxed);
    error!(
        client = %peer(client),
        server = %peer(server),
        "integrity: byte conservation failed, resetting both sides: {direction} source at \
         kernel relay: a chunk began with bytes delivered before that could not be cut off, \
         and was dropped"
    );
    let _ = sockopt::reset_on_close(client);
    let _ = sockopt::reset_on_close(server);
}

/// The socket's peer address, for the log.
fn peer(socket: &dyn AsFd) -> String {
    socket2::SockRef::from(&socket.as_fd())
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or_else(|| "?".to_owned(), |a| a.to_string())
}

/// Whether the socket has a pending error (a reset the relay has not seen).
fn reset(socket: &impl AsFd) -> bool {
    !matches!(socket2::SockRef::from(socket).take_error(), Ok(None))
}

/// Bytes read from a socket so far (by anyone), FIN left out.
fn consumed(counts: &Counts) -> u64 {
    counts
        .received
        .saturating_sub(counts.unread)
        .saturating_sub(u64::from(counts.fin_received))
}

/// Bytes given to a socket for sending so far, our FIN left out.
fn sent(counts: &Counts) -> u64 {
    counts.taken.saturating_sub(u64::from(counts.fin_sent))
}

struct Direction {
    name: &'static str,
    from: Base,
    to: Base,
    relayed: u64,
}

impl Direction {
    fn new(name: &'static str, from: Base, to: Base, relayed: u64) -> Direction {
        Direction {
            name,
            from,
            to,
            relayed,
        }
    }

    fn violation(&self, moment: Moment, side: &'static str, kernel_says: u64) -> Violation {
        Violation {
            moment,
            direction: self.name,
            side,
            relayed: self.relayed,
            kernel_says,
        }
    }

    fn balance(&self, from: &Counts, to: &Counts, moment: Moment) -> Result<(), Violation> {
        let read = consumed(from).wrapping_sub(self.from.consumed);
        if read != self.relayed {
            return Err(self.violation(moment, "source", read));
        }
        // Both directions ended at their FIN, so nothing can wait unread. Bytes that do were
        // skipped, not relayed (a verdict that cut off more than it should), and would
        // otherwise balance: `consumed` leaves them out on both sides of the equation.
        if moment == Moment::End && from.unread > 0 {
            return Err(self.violation(moment, "source", read + from.unread));
        }
        let given = sent(to).wrapping_sub(self.to.taken);
        if given != self.relayed {
            return Err(self.violation(moment, "sink", given));
        }
        Ok(())
    }

    /// [`Direction::balance`] letting the source read up to `slack` more than was
    /// relayed (a FIN the counters cannot place); whether it did.
    fn balance_within(&self, from: &Counts, to: &Counts, slack: u64) -> Result<bool, Violation> {
        let moment = Moment::ToKernel;
        let read = consumed(from).wrapping_sub(self.from.consumed);
        let extra = read.wrapping_sub(self.relayed);
        if extra > slack {
            return Err(self.violation(moment, "source", read));
        }
        let given = sent(to).wrapping_sub(self.to.taken);
        if given != self.relayed {
            return Err(self.violation(moment, "sink", given));
        }
        Ok(extra > 0)
    }

    fn source_bound(&self, from: &Counts) -> Result<(), Violation> {
        // Unread bytes are not subtracted (SIOCINQ is the psock's while paired): the bound
        // is looser by what waits, never wrong.
        let received = from.received.saturating_sub(self.from.consumed);
        if self.relayed > received {
            return Err(self.violation(Moment::InKernel, "source", received));
        }
        Ok(())
    }

    fn sink_bound(&self, to: &Counts) -> Result<(), Violation> {
        // A FIN we queued counts one in `taken`; allow for it rather than trust the state.
        let given = to.taken.saturating_sub(self.to.taken);
        if given > self.relayed + 1 {
            return Err(self.violation(Moment::InKernel, "sink", given));
        }
        Ok(())
    }

    #[cfg(test)]
    fn bounds(&self, from: &Counts, to: &Counts) -> Result<(), Violation> {
        self.source_bound(from).and_then(|()| self.sink_bound(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(received: u64, unread: u64, taken: u64, fin: bool) -> Counts {
        Counts {
            received,
            unread,
            taken,
            fin_received: fin,
            fin_sent: fin,
        }
    }

    fn direction(relayed: u64) -> Direction {
        Direction::new(
            "client->server",
            Base {
                consumed: 10,
                taken: 0,
            },
            Base {
                consumed: 0,
                taken: 50,
            },
            relayed,
        )
    }

    #[test]
    fn balanced_direction_passes_with_fins_and_unread_bytes() {
        // 10 bytes read before the relay, 1000 relayed, 5 still queued, FIN arrived.
        let from = counts(10 + 1000 + 5 + 1, 5, 0, true);
        let to = counts(0, 0, 50 + 1000 + 1, true);
        assert_eq!(
            direction(1000).balance(&from, &to, Moment::FromKernel),
            Ok(())
        );
        assert_eq!(direction(1000).bounds(&from, &to), Ok(()));
    }

    #[test]
    fn bytes_left_unread_at_a_clean_end_were_skipped() {
        // Both directions ended at their FINs, yet 5 bytes wait: the relay went past them
        // (a stale-head cut that took new bytes), though read and given still agree.
        let from = counts(10 + 1000 + 5 + 1, 5, 0, true);
        let to = counts(0, 0, 50 + 1000 + 1, true);
        let violation = direction(1000)
            .balance(&from, &to, Moment::End)
            .unwrap_err();
        assert_eq!((violation.side, violation.kernel_says), ("source", 1005));
        let drained = counts(10 + 1000 + 1, 0, 0, true);
        assert_eq!(direction(1000).balance(&drained, &to, Moment::End), Ok(()));
    }

    #[test]
    fn a_duplicated_chunk_breaks_the_source_equation() {
        // The verdict sent 100 bytes twice: relayed says 1100, TCP delivered 1000.
        let from = counts(10 + 1000, 0, 0, false);
        let to = counts(0, 0, 50 + 1100, false);
        let violation = direction(1100)
            .balance(&from, &to, Moment::FromKernel)
            .unwrap_err();
        assert_eq!((violation.side, violation.kernel_says), ("source", 1000));
        assert!(direction(1100).bounds(&from, &to).is_err());
    }

    #[test]
    fn a_lost_chunk_breaks_the_sink_equation() {
        let from = counts(10 + 1000, 0, 0, false);
        let to = counts(0, 0, 50 + 900, false);
        let violation = direction(1000)
            .balance(&from, &to, Moment::End)
            .unwrap_err();
        assert_eq!((violation.side, violation.kernel_says), ("sink", 900));
    }

    #[test]
    fn a_duplicate_and_a_loss_of_equal_length_are_still_caught() {
        // 100 bytes relayed twice and 100 others lost: the peer got 1000 bytes, as many as
        // were sent, but the relay read 1000 and relayed 1100.
        let from = counts(10 + 1000, 0, 0, false);
        let to = counts(0, 0, 50 + 1000, false);
        assert!(direction(1100).balance(&from, &to, Moment::End).is_err());
    }

    #[test]
    fn after_a_reset_only_the_source_may_read_one_more() {
        // The reset socket's counters with the state's FINs taken out: 1000 relayed, none
        // lost. With the peer's FIN before its reset, `received` has one more.
        let to = counts(0, 0, 50 + 1000, false);
        let without_fin = counts(10 + 1000, 0, 0, false);
        let with_fin = counts(10 + 1000 + 1, 0, 0, false);
        assert_eq!(
            direction(1000).balance_within(&without_fin, &to, 1),
            Ok(false)
        );
        assert_eq!(direction(1000).balance_within(&with_fin, &to, 1), Ok(true));
        // No slack where the socket was not reset.
        assert!(direction(1000).balance_within(&with_fin, &to, 0).is_err());
        // A source that read two more, or one less, than was relayed: lost or duplicated.
        let two_more = counts(10 + 1002, 0, 0, false);
        let one_less = counts(10 + 999, 0, 0, false);
        assert!(direction(1000).balance_within(&two_more, &to, 1).is_err());
        assert!(direction(1000).balance_within(&one_less, &to, 1).is_err());
        // The sink stays exact: a peer that took less than was relayed is a loss.
        let short = counts(0, 0, 50 + 999, false);
        let violation = direction(1000)
            .balance_within(&without_fin, &short, 1)
            .unwrap_err();
        assert_eq!((violation.side, violation.kernel_says), ("sink", 999));
    }

    #[test]
    fn a_sink_that_took_more_than_was_relayed_is_out_of_bounds() {
        let from = counts(10 + 1000, 0, 0, false);
        let to = counts(0, 0, 50 + 1200, false);
        let violation = direction(1000).bounds(&from, &to).unwrap_err();
        assert_eq!(violation.side, "sink");
    }
}
