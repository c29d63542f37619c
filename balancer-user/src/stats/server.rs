//! Serving the stats port: the accept loop and each connection's limits.
//!
//! The port is served with hyper's HTTP/1 connection builder rather than `axum::serve`,
//! which has no connection cap and no timeouts: any client could hold a descriptor (the
//! daemon's, shared with the sessions) for as long as it liked, and as many of them as it
//! liked. Here:
//!
//! - **At most `maxconn` connections** ([`Limits::maxconn`], `[stats] maxconn`, default
//!   [`DEFAULT_MAXCONN`]). Past it, a connection is accepted, answered a canned `503` in a
//!   single non-blocking write, and closed at once: it never costs more than one descriptor
//!   for a moment, and it is counted ([`PortStats::refused`]). The port thus holds at most
//!   `maxconn` + 2 descriptors (the listener and one being refused), well inside the
//!   daemon's reserve beside its sessions.
//! - **One `timeout` for everything slow** ([`Limits::timeout`], `[stats] timeout`,
//!   default [`DEFAULT_TIMEOUT`]): each connection has a deadline, `timeout` after it was
//!   accepted and moved to `timeout` after the arrival of each request (its headers
//!   complete). A slowloris (headers a byte at a time), a slow body, a client that does not
//!   read its answer, and an idle keep-alive connection are all closed there and counted
//!   ([`PortStats::timed_out`]). hyper's own header read timeout is set to the same value,
//!   a second line should the deadline ever not be polled.
//! - **Bounded requests**: at most [`MAX_HEADERS`] header fields and [`MAX_HEADER_SIZE`]
//!   bytes of request line and headers (hyper answers `431`), a read buffer of
//!   [`MAX_BUF_SIZE`], and a body of at most 4 KiB (`413`, in [`super::http`]).
//!
//! A flood of requests under the cap is served from the shared snapshot
//! ([`super::cache`]), so it costs HTTP parsing and a write, never the session locks.
//!
//! And the port runs on **a thread of its own** ([`Port::spawn`]): a one-thread runtime at a
//! lower CPU priority (nice [`NICE`]). On the daemon's runtime, a flood's connections were
//! tasks queued beside the sessions': with the adaptive relay, mail under a request flood
//! fell to a few percent of its rate (one task serving many kernel-relayed sessions got one
//! turn in a hundred). On its own thread, the flood competes for CPU through the kernel's
//! scheduler, which favours the relay's thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{Service as _, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `[stats] maxconn` when not set: a few browsers, a scraper and scripts fit many times
/// over, and 64 descriptors are a small share of the daemon's reserve.
pub const DEFAULT_MAXCONN: u32 = 64;

/// `[stats] timeout` when not set: ample for a request on any network that reaches an
/// admin port, short enough that a slowloris holds a place only briefly.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Header fields a request may carry; a browser sends about 15.
pub const MAX_HEADERS: usize = 32;

/// Bytes of request line and headers together.
pub const MAX_HEADER_SIZE: usize = 8 * 1024;

/// hyper's read buffer per connection (its minimum is 8 KiB); bounds memory to
/// `maxconn` × 16 KiB whatever clients send.
pub const MAX_BUF_SIZE: usize = 16 * 1024;

/// The stats thread's nice value: under CPU contention the relay's threads (nice 0) get
/// about ten times its share; with a CPU to spare it runs at full speed.
pub const NICE: i32 = 10;

/// How long [`serve`] waits, once stopped, for open requests to finish. Past it the
/// daemon's shutdown is not held hostage by a stalled HTTP client.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The pause after a failed `accept` (out of descriptors, mostly), so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a connection over the cap is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    Content-Type: application/json\r\n\
    Content-Length: 48\r\n\
    Retry-After: 1\r\n\
    Connection: close\r\n\
    \r\n\
    {\"error\":\"too many connections to the stats port\"}";

/// The stats port's limits (`[stats] maxconn` and `timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub maxconn: u32,
    /// The deadline of a request, from the connection's start or the previous request.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            maxconn: DEFAULT_MAXCONN,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The stats port's own counters, shared by the accept loop and `/metrics`.
#[derive(Debug)]
pub struct PortCounters {
    limit: u32,
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

/// [`PortCounters`] at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Connections being served now.
    pub connections_cur: u64,
    /// [`Limits::maxconn`].
    pub connections_limit: u64,
    /// Connections served (accepted under the cap) since the start.
    pub connections_total: u64,
    /// Connections refused because `maxconn` were open.
    pub refused: u64,
    /// Connections closed at their deadline.
    pub timed_out: u64,
    /// Snapshots built ([`super::cache`]): a flood shows as requests, not as builds.
    pub snapshots_built: u64,
}

impl PortCounters {
    pub fn new(limits: Limits) -> PortCounters {
        PortCounters {
            limit: limits.maxconn,
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> PortStats {
        PortStats {
            connections_cur: self.open.load(Ordering::Relaxed),
            connections_limit: u64::from(self.limit),
            connections_total: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            snapshots_built: 0,
        }
    }
}

/// The stats port, bound and routed, before its thread starts.
pub struct Port {
    pub listener: TcpListener,
    pub router: Router,
    pub limits: Limits,
    pub counters: Arc<PortCounters>,
}

impl Port {
    /// Runs [`serve`] on a thread of its own (`mxlb-stats`), with a one-thread runtime at
    /// nice [`NICE`]. The thread ends when `serve` returns after `stop`. Started after the
    /// daemon dropped root, the thread that parses untrusted HTTP inherits the reduced
    /// credentials, bounding set and `no_new_privs`.
    pub fn spawn(self, stop: CancellationToken) -> io::Result<std::thread::JoinHandle<()>> {
        let Port {
            listener,
            router,
            limits,
            counters,
        } = self;
        // Taken off the daemon's reactor here, registered with the stats runtime's there.
        let listener = listener.into_std()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("mxlb-stats".to_owned())
            .spawn(move || {
                lower_priority();
                let served = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, router, limits, counters, stop).await
                });
                if let Err(error) = served {
                    tracing::error!(%error, "stats server failed");
                }
            })
    }
}

/// Sets this thread's nice value to [`NICE`] (on Linux a thread has its own).
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS as _, tid as libc::id_t, NICE)
    };
    if result != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "stats: cannot lower the thread's priority");
    }
}

/// Serves `router` on `listener` within `limits` until `stop` is cancelled, then stops
/// accepting, lets requests in flight finish (idle keep-alive connections are closed) and
/// returns; after [`SHUTDOWN_GRACE`] it returns anyway. A failed `accept` is logged and
/// retried: the port outlives a moment without descriptors.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    counters: Arc<PortCounters>,
    stop: CancellationToken,
) -> io::Result<()> {
    let places = Arc::new(Semaphore::new(limits.maxconn as usize));
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_SIZE)
        .max_buf_size(MAX_BUF_SIZE);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "stats: accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            refuse(&stream, peer, &counters);
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        let open = Open {
            counters: counters.clone(),
            _place: place,
        };
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            &http,
            limits.timeout,
            &stop,
            open,
        ));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "stats: requests still open at shutdown, leaving them");
    }
    Ok(())
}

/// A connection's place under the cap, given back (and counted) when it ends.
struct Open {
    counters: Arc<PortCounters>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Turns away a connection over the cap: the canned 503 if the socket takes it at once
/// (a new socket's send buffer always does), then the close.
fn refuse(stream: &TcpStream, peer: SocketAddr, counters: &PortCounters) {
    let refused = counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
    let _ = stream.try_write(REFUSAL);
    // One line per power of two: a flood shows in the log without flooding it.
    if refused.is_power_of_two() {
        tracing::warn!(%peer, refused, "stats: connection limit reached, refusing connections");
    }
}

/// A connection's deadline, shared by its request handler (which moves it) and the task
/// that enforces it.
struct Deadline {
    base: Instant,
    /// Nanoseconds after `base`.
    at: AtomicU64,
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        let deadline = Deadline {
            base: Instant::now(),
            at: AtomicU64::new(0),
            timeout,
        };
        deadline.extend();
        deadline
    }

    /// `timeout` from now.
    fn extend(&self) {
        let at = self.base.elapsed() + self.timeout;
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.at.store(nanos, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.base + Duration::from_nanos(self.at.load(Ordering::Relaxed))
    }
}

/// Serves one connection until the client closes it, its deadline passes, or the stop
/// (then in-flight requests finish and the connection closes). A connection that has not
/// sent its first request when the stop comes gets it answered first (within its
/// deadline): on an upgrade the new daemon serves the port already, and a client whose
/// connection the old one had just accepted must not see it closed unanswered.
fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    http: &http1::Builder,
    timeout: Duration,
    stop: &CancellationToken,
    open: Open,
) -> impl Future<Output = ()> + Send + 'static {
    let deadline = Arc::new(Deadline::new(timeout));
    let first_request = Arc::new(Notify::new());
    let service = {
        let deadline = deadline.clone();
        let first_request = first_request.clone();
        let router = TowerToHyperService::new(router);
        service_fn(move |mut request: hyper::Request<Incoming>| {
            // The headers are in: the body and the answer have `timeout` from here.
            deadline.extend();
            first_request.notify_one();
            request.extensions_mut().insert(ConnectInfo(peer));
            router.call(request)
        })
    };
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let stop = stop.clone();
    async move {
        tokio::pin!(conn);
        let mut requested = false;
        let mut stopping = false;
        loop {
            let due = deadline.get();
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(error) = result {
                        if error.is_timeout() {
                            open.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(%peer, %error, "stats: connection ended");
                    }
                    return;
                }
                () = first_request.notified(), if !requested => {
                    requested = true;
                    if stopping {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    if requested {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = tokio::time::sleep_until(due) => {
                    // A request that arrived meanwhile moved the deadline: wait for that.
                    if deadline.get() <= Instant::now() {
                        open.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, ?timeout, "stats: connection past its timeout, closed");
                        return;
                    }
                }
            }
        }
    }
}
