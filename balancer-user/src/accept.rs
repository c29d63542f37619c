//! Accepting clients on one bound socket: one task per client, and a back-off when the
//! daemon runs out of descriptors or memory (the listener stays).
//!
//! The accept loops only accept and spawn: everything a client can stall (reading, the
//! server connect, a refusal's reply) happens in the client's own task, so a burst of
//! clients that connect and never send cannot hold up anyone else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use crate::limits::{Throttle, suppressed_note};
use crate::session::Frontend;

/// The accept queue holds the listener's `maxconn` (as HAProxy's default backlog), at
/// least this many, at most [`LISTEN_BACKLOG_MAX`]; the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG_MIN: u32 = 1024;
const LISTEN_BACKLOG_MAX: u32 = 65_535;
/// Backoff after an accept failed for want of descriptors or memory: doubling from the
/// first pause to the last, reset by the next accept that works.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept queue for a listener with `maxconn`.
pub fn listen_backlog(maxconn: u32) -> u32 {
    maxconn.clamp(LISTEN_BACKLOG_MIN, LISTEN_BACKLOG_MAX)
}

/// A listening socket on `addr`.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "[::]:25" next to "0.0.0.0:25" must not collide.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog_arg(backlog))?;
    TcpListener::from_std(socket.into())
}

/// Sets the accept queue of a socket already listening (Linux takes a second `listen`
/// for that); connections already queued stay queued.
pub fn set_backlog(socket: &TcpListener, backlog: u32) -> std::io::Result<()> {
    socket2::SockRef::from(socket).listen(backlog_arg(backlog))
}

fn backlog_arg(backlog: u32) -> i32 {
    i32::try_from(backlog).unwrap_or(i32::MAX)
}

/// Accepts on one socket until `stop`, one task per client. The limits are checked in
/// that task, right away, so clients beyond `maxconn` get their `421` instead of waiting in
/// the accept queue. The socket is shared: a reload starts a new loop on it (with the new
/// frontend) and stops this one, and connections wait in its queue meanwhile.
pub async fn accept_loop(
    socket: Arc<TcpListener>,
    addr: SocketAddr,
    frontend: Arc<Frontend>,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    let listener = frontend.config.name.as_str();
    let failure_log = Throttle::new(Duration::from_secs(1));
    let recovery_log = Throttle::new(Duration::from_secs(1));
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut failures: u64 = 0;
    loop {
        let accepted: io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            () = stop.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        let error = match accepted {
            Ok((client, client_addr)) => {
                if failures > 0 {
                    if let Some(suppressed) = recovery_log.allow(Instant::now()) {
                        info!(
                            listener, %addr,
                            "accepting again after {failures} failed accepts{}",
                            suppressed_note(suppressed)
                        );
                    }
                    failures = 0;
                    backoff = ACCEPT_BACKOFF_FIRST;
                }
                sessions.spawn(frontend.clone().serve(client, client_addr));
                continue;
            }
            Err(error) => error,
        };
        frontend.pool.count_accept_error();
        if is_client_error(&error) {
            // That one connection failed before we got it; the next is fine.
            debug!(listener, %addr, %error, "accept: connection failed before it was accepted");
            continue;
        }
        failures += 1;
        if let Some(suppressed) = failure_log.allow(Instant::now()) {
            error!(
                listener, %addr, %error,
                "accept failed; retrying in {}{}",
                humantime::format_duration(backoff),
                suppressed_note(suppressed)
            );
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// Errors of the one connection being accepted, which Linux reports through `accept`
/// (accept(2), "Error handling"): retry at once. Anything else (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM, or an error we do not know) backs off, so a shortage cannot spin a core.
fn is_client_error(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ECONNRESET
                | libc::ETIMEDOUT
        )
    )
}
