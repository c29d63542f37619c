//! The daemon's life: start the relay, bind the listeners, accept until told to stop, then
//! let established relays finish within `global.grace`.
//!
//! The accept loops only accept and spawn: everything a client can stall (reading, the
//! server connect, a refusal's reply) happens in the client's own task, so a burst of
//! clients that connect and never send cannot hold up anyone else. An accept that fails
//! for want of descriptors or memory backs off and tries again; the listener stays.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::limits::{Gauge, Throttle, suppressed_note};
use crate::relay::Relay;
use crate::session::Frontend;
use crate::stats::{AdminError, AdminState, StatsSnapshot, StatsSource};

/// The accept queue holds the listener's `maxconn` (as HAProxy's default backlog), at
/// least this many, at most [`LISTEN_BACKLOG_MAX`]; the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG_MIN: u32 = 1024;
const LISTEN_BACKLOG_MAX: u32 = 65_535;
/// Backoff after an accept failed for want of descriptors or memory: doubling from the
/// first pause to the last, reset by the next accept that works.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Descriptors the daemon needs beside its connections (listeners, maps, epoll, stats).
const FD_RESERVE: u64 = 256;

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    refuse_or_warn_unimplemented(&config)?;
    raise_fd_limit(config.global.maxconn);
    let relay = Relay::start(
        config.global.relay,
        &config.global.pin_path,
        config.global.maxconn,
        config.global.max_inflight,
        config.global.kernel_relay_after,
    )?;
    let stop = CancellationToken::new();
    let sessions = TaskTracker::new();
    let connections = Arc::new(Gauge::new(config.global.maxconn));

    let mut acceptors = Vec::new();
    let mut frontends = Vec::new();
    for listener in &config.listeners {
        let frontend = Arc::new(Frontend::new(
            listener.clone(),
            relay.clone(),
            connections.clone(),
        ));
        frontend.pool.start_monitors(listener, &stop);
        frontends.push(frontend.clone());
        for &addr in &listener.bind {
            let socket = bind(addr, listen_backlog(listener.maxconn))
                .with_context(|| format!("listener {}: binding {addr}", listener.name))?;
            info!(listener = %listener.name, %addr, servers = listener.servers.len(), "listening");
            acceptors.push(tokio::spawn(accept_loop(
                socket,
                addr,
                frontend.clone(),
                sessions.clone(),
                stop.clone(),
            )));
        }
    }

    if let Some(stats) = &config.stats {
        let source = Arc::new(DaemonStats {
            started: Instant::now(),
            relay: relay.clone(),
            connections,
            frontends,
        });
        let socket = tokio::net::TcpListener::bind(stats.bind)
            .await
            .with_context(|| format!("stats: binding {}", stats.bind))?;
        info!(addr = %stats.bind, admin = stats.admin_token.is_some(), "stats listening");
        let router = crate::stats::http::router(source, stats.admin_token.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(error) = crate::stats::http::serve(socket, router, stop).await {
                error!(%error, "stats server failed");
            }
        });
    }

    let signals = StopSignals::install()?;
    // Everything is bound and every descriptor the idle daemon keeps is open: tests and
    // supervisors wait for this line.
    info!(pid = std::process::id(), "ready");
    signals.wait().await;
    info!(
        sessions = sessions.len(),
        grace = %humantime::format_duration(config.global.grace),
        "stopping: no new connections; letting relays finish"
    );
    stop.cancel();
    for acceptor in acceptors {
        let _ = acceptor.await;
    }
    sessions.close();
    if tokio::time::timeout(config.global.grace, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = sessions.len(),
            "grace period over: closing remaining connections"
        );
    }
    drop(relay);
    info!("stopped");
    Ok(())
}

/// Keys the parser accepts (they are part of the contract) but the daemon does not act on
/// yet: a warning each, or a refusal where ignoring the key would corrupt sessions.
fn refuse_or_warn_unimplemented(config: &Config) -> anyhow::Result<()> {
    for listener in &config.listeners {
        let name = &listener.name;
        anyhow::ensure!(
            !listener.accept_proxy,
            "listener {name}: accept_proxy is not supported yet; an upstream PROXY header \
             would reach the servers as SMTP input"
        );
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: each client costs two
/// descriptors (client and server socket), and the usual soft limit of 1024 would stop
/// the daemon at a few hundred clients. Warns when even the hard limit is short of
/// `maxconn`: accepts then fail with EMFILE before `maxconn` is reached.
fn raise_fd_limit(maxconn: u32) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot read the open files limit");
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                "open files limit raised from {} to {} (the hard limit)",
                limit.rlim_cur, limit.rlim_max
            );
            limit = raised;
        } else {
            warn!(error = %io::Error::last_os_error(), "cannot raise the open files limit");
        }
    }
    let needed = 2 * u64::from(maxconn) + FD_RESERVE;
    if limit.rlim_cur < needed {
        warn!(
            "open files limit {} is below the {needed} descriptors global.maxconn {maxconn} \
             needs (two per connection); raise LimitNOFILE= (systemd) or ulimit -n, or lower \
             maxconn: accepts fail with EMFILE before maxconn is reached",
            limit.rlim_cur
        );
    }
}

fn listen_backlog(maxconn: u32) -> u32 {
    maxconn.clamp(LISTEN_BACKLOG_MIN, LISTEN_BACKLOG_MAX)
}

fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
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
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Accepts on one socket until `stop`, one task per client. The limits are checked in
/// that task, right away, so clients beyond `maxconn` get their `421` instead of waiting in
/// the accept queue.
async fn accept_loop(
    socket: TcpListener,
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

/// The signals that stop the daemon, installed before it reports itself ready so that a
/// SIGTERM sent right after "ready" is never met by the default action.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            // SIGHUP's default action would kill the daemon and every relay with it.
            hangup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }

    async fn wait(mut self) {
        let name = loop {
            tokio::select! {
                _ = self.terminate.recv() => break "SIGTERM",
                _ = self.interrupt.recv() => break "SIGINT",
                _ = self.hangup.recv() => {
                    warn!("SIGHUP received: configuration reload is not supported yet; ignored");
                }
            }
        };
        info!("{name} received");
    }
}

/// The daemon's answer to the stats server: a fresh snapshot per request.
struct DaemonStats {
    started: Instant,
    relay: Relay,
    /// Client connections over all listeners, against `global.maxconn`.
    connections: Arc<Gauge>,
    frontends: Vec<Arc<Frontend>>,
}

impl StatsSource for DaemonStats {
    fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            relay: self.relay.name().to_owned(),
            conns_cur: u64::from(self.connections.open()),
            maxconn: u64::from(self.connections.limit()),
            listeners: self
                .frontends
                .iter()
                .map(|frontend| frontend.stats(&self.relay))
                .collect(),
        }
    }

    fn set_state(&self, listener: &str, server: &str, state: AdminState) -> Result<(), AdminError> {
        self.frontends
            .iter()
            .find(|frontend| frontend.config.name == listener)
            .ok_or_else(|| AdminError::UnknownListener(listener.to_owned()))?
            .pool
            .set_admin_state(server, state)
    }
}
