//! Session ids, and the register of the sessions relayed right now.
//!
//! Every log line of one client connection carries its id (`session=…`, from the tracing
//! span [`crate::session`] opens), so an operator can pull one connection's story out of a
//! busy log. The id is `<pid>-<n>` in hex: `n` counts the connections this process
//! accepted, and the process id keeps the ids of two daemons apart while they run side by
//! side during an `mxlb upgrade` (the old one drains while the new one serves).
//!
//! The register is what the daemon names when the `grace` period ends with connections
//! still open: one line per connection cut, with its client and server.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One connection's id, unique within the daemon's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionId {
    process: u32,
    n: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(1);

impl SessionId {
    /// The id of the next connection this process accepts.
    pub fn next() -> SessionId {
        SessionId {
            process: std::process::id(),
            n: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{:x}", self.process, self.n)
    }
}

/// What the log says of a connection cut at the end of the grace period.
#[derive(Clone, Debug)]
pub struct OpenSession {
    pub client: SocketAddr,
    pub listener: String,
    pub server: String,
    pub server_addr: SocketAddr,
    /// The connection's span: the cut is logged in it, with its id like every other line.
    pub span: tracing::Span,
}

/// Logs one line per connection still relayed, each in its own span: the `grace` period
/// is over and they are about to be cut.
pub fn log_cut_connections() {
    for (_, open) in relayed_now() {
        open.span.in_scope(|| {
            tracing::warn!(
                client = %open.client,
                listener = %open.listener,
                server = %open.server,
                server_addr = %open.server_addr,
                "grace period over: connection cut"
            );
        });
    }
}

static OPEN: Mutex<BTreeMap<SessionId, OpenSession>> = Mutex::new(BTreeMap::new());

fn open() -> std::sync::MutexGuard<'static, BTreeMap<SessionId, OpenSession>> {
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place in the register, from the connect to its server until the guard
/// is dropped (the relay ended, or the task was dropped at exit).
#[must_use]
pub struct Registered(SessionId);

impl Drop for Registered {
    fn drop(&mut self) {
        open().remove(&self.0);
    }
}

/// Enters a connection in the register.
pub fn register(id: SessionId, session: OpenSession) -> Registered {
    open().insert(id, session);
    Registered(id)
}

/// The connections being relayed now, oldest first.
pub fn relayed_now() -> Vec<(SessionId, OpenSession)> {
    open().iter().map(|(id, s)| (*id, s.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_process_and_a_count_in_hex() {
        let (a, b) = (SessionId::next(), SessionId::next());
        assert_ne!(a, b);
        let pid = format!("{:x}-", std::process::id());
        assert!(a.to_string().starts_with(&pid), "{a}");
        let n = |id: SessionId| u64::from_str_radix(&id.to_string()[pid.len()..], 16).unwrap();
        assert!(n(b) > n(a));
    }

    #[test]
    fn a_session_leaves_the_register_with_its_guard() {
        let id = SessionId::next();
        let session = OpenSession {
            client: "192.0.2.7:52265".parse().unwrap(),
            listener: "smtp".into(),
            server: "mail1".into(),
            server_addr: "10.0.0.11:25".parse().unwrap(),
            span: tracing::Span::none(),
        };
        let guard = register(id, session);
        assert!(
            relayed_now()
                .iter()
                .any(|(other, open)| *other == id && open.server == "mail1")
        );
        drop(guard);
        assert!(relayed_now().iter().all(|(other, _)| *other != id));
    }
}
