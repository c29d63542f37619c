//! The daemon's life: start the relay, bind the listeners, accept until told to stop, then
//! let established relays finish within `global.grace`. SIGHUP reloads the configuration
//! in place ([`crate::reload`]).
//!
//! The listeners and their accept loops are in [`crate::listeners`] and
//! [`crate::accept`]; this module wires them to the relay, the stats server and the
//! signals.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::limits::Gauge;
use crate::listeners::Listeners;
use crate::notify::Notifier;
use crate::relay::Relay;
use crate::reload::{ReloadCounters, Reloader};
use crate::session::Frontend;
use crate::stats::{AdminError, AdminState, StatsSnapshot, StatsSource};
use crate::upgrade::{self, Inherited, Successor, UpgradeSocket, wire::Role};

/// Descriptors the daemon needs beside its connections (listeners, maps, epoll, stats).
const FD_RESERVE: u64 = 256;

/// Runs the daemon until SIGTERM or SIGINT, or until a daemon started with `mxlb upgrade`
/// has taken its sockets over ([`crate::upgrade`]); SIGHUP reloads `config_path` (`None`:
/// the configuration is built in, as for `mxlb demo`). `take_over`: this daemon is that
/// new one, and serves on the sockets of the daemon at `global.upgrade_socket`.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    take_over: bool,
) -> anyhow::Result<()> {
    raise_fd_limit(config.global.maxconn);
    // First: a SIGHUP's default action would kill the daemon (and during an upgrade the
    // daemon may already hold the old one's sockets).
    let mut signals = Signals::install()?;
    // Before the relay loads: a failed take-over leaves the running daemon's pins alone.
    let mut inherited = inherit_sockets(&config, take_over)?;
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
    let mut listeners = Listeners::start(
        &config.listeners,
        relay.clone(),
        connections.clone(),
        sessions.clone(),
        stop.clone(),
        inherited.as_mut(),
    )?;
    let mut reloader = Reloader::new(config_path, config);

    let mut stats_port = None;
    let mut stats_socket = None;
    if let Some(stats) = &reloader.running().stats {
        let source = Arc::new(DaemonStats {
            started: Instant::now(),
            relay: relay.clone(),
            connections: connections.clone(),
            frontends: listeners.watch(),
            reloads: reloader.counters.clone(),
            config: reloader.watch(),
        });
        let socket = match inherited.as_mut().and_then(|i| i.take_stats(stats.bind)) {
            Some(socket) => tokio::net::TcpListener::from_std(socket)
                .context("stats: serving the socket taken over")?,
            None => tokio::net::TcpListener::bind(stats.bind)
                .await
                .with_context(|| format!("stats: binding {}", stats.bind))?,
        };
        // A copy for a successor: the stats thread owns the socket itself.
        stats_socket = Some((stats.bind, socket.as_fd().try_clone_to_owned()?));
        let limits = crate::stats::Limits {
            maxconn: stats.maxconn,
            timeout: stats.timeout,
        };
        info!(
            addr = %stats.bind,
            admin = stats.admin_token.is_some(),
            maxconn = limits.maxconn,
            timeout = %humantime::format_duration(limits.timeout),
            "stats listening"
        );
        let counters = Arc::new(crate::stats::PortCounters::new(limits));
        let router = crate::stats::router(source, stats.admin_token.clone(), counters.clone());
        stats_port = Some(crate::stats::server::Port {
            listener: socket,
            router,
            limits,
            counters,
        });
    }
    // Bound while still root: the socket is root's alone (its directory too). In an
    // upgrade the old daemon passed its own: the path never changes hands as a file.
    let mut upgrade_socket = match &reloader.running().global.upgrade_socket {
        Some(path) => Some(
            match inherited.as_mut().and_then(Inherited::take_upgrade_socket) {
                Some(socket) => UpgradeSocket::taken_over(socket, path),
                None => UpgradeSocket::bind(path),
            }
            .context("global.upgrade_socket")?,
        ),
        None => None,
    };

    // Loaded, pinned and bound: from here on the daemon needs almost nothing of root.
    if let Some(run_as) = &reloader.running().global.user {
        crate::privilege::drop_privileges(run_as, &relay)
            .context("dropping privileges to global.user")?;
    }
    if let Some(inherited) = inherited {
        // Everything that can fail has succeeded: the old daemon stops accepting once it
        // has answered, and this one starts.
        inherited.finish()?;
        if let Some(socket) = &mut upgrade_socket {
            socket.own();
        }
    }
    // The stats thread parses untrusted HTTP: it starts with the credentials just reduced.
    let stats_thread = match stats_port {
        Some(port) => Some(
            port.spawn(stop.clone())
                .context("stats: starting its thread")?,
        ),
        None => None,
    };
    listeners.serve();

    let systemd = Notifier::from_env();
    // Everything is bound and every descriptor the idle daemon keeps is open: tests and
    // supervisors wait for this line (systemd for the READY=1).
    info!(pid = std::process::id(), "ready");
    systemd.ready("serving");
    let mut handing_over: Option<JoinHandle<anyhow::Result<Successor>>> = None;
    let ended = loop {
        tokio::select! {
            wanted = signals.next() => match wanted {
                Wanted::Reload => {
                    systemd.reloading();
                    let outcome = reloader.reload(&mut listeners, &connections, &relay);
                    systemd.ready(outcome);
                }
                Wanted::Stop => match handing_over.take() {
                    // The new daemon may start any moment: see the hand-over through.
                    Some(pending) => match pending.await {
                        Ok(Ok(successor)) => break Ended::HandedOver(successor),
                        _ => break Ended::Stopped,
                    },
                    None => break Ended::Stopped,
                },
            },
            request = upgrade_request(upgrade_socket.as_ref()), if handing_over.is_none() => {
                let sockets =
                    sockets_to_hand_over(&listeners, stats_socket.as_ref(), upgrade_socket.as_ref());
                match sockets {
                    Ok(sockets) => {
                        handing_over = Some(tokio::spawn(upgrade::hand_over(request, sockets)));
                    }
                    Err(error) => warn!(%error, "upgrade refused: cannot copy the listening sockets"),
                }
            },
            handed = wait_for(&mut handing_over), if handing_over.is_some() => {
                handing_over = None;
                match handed {
                    Ok(Ok(successor)) => break Ended::HandedOver(successor),
                    Ok(Err(error)) => warn!("upgrade failed, serving on: {error:#}"),
                    Err(error) => warn!(%error, "upgrade failed, serving on"),
                }
            },
        }
    };
    // Nothing more to hand over: the stats port closes with the stats thread, and a daemon
    // started now with `mxlb run` may take the upgrade socket's path. After a hand-over
    // the socket (the same one) and its file are the successor's.
    drop(stats_socket);
    if let (Ended::HandedOver(_), Some(socket)) = (&ended, &mut upgrade_socket) {
        socket.disown();
    }
    drop(upgrade_socket);
    let grace = reloader.running().global.grace;
    match ended {
        Ended::Stopped => {
            systemd.stopping();
            info!(
                sessions = sessions.len(),
                grace = %humantime::format_duration(grace),
                "stopping: no new connections; letting relays finish"
            );
        }
        // The service goes on in the successor: systemd hears from it, not of a stop.
        Ended::HandedOver(successor) => info!(
            successor = ?successor.pid,
            sessions = sessions.len(),
            grace = %humantime::format_duration(grace),
            "upgrade: handed over; no new connections here, letting relays finish"
        ),
    }
    listeners.stop_accepting().await;
    stop.cancel();
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        warn!(
            sessions = sessions.len(),
            "grace period over: closing remaining connections"
        );
        // Each by name: which client lost its connection, to which server. (A session
        // still connecting to its server has no line of its own; it counts above.)
        crate::session_register::log_cut_connections();
    }
    // The stats thread holds the relay too (its snapshots read the maps): wait until it
    // has ended, or the process exits with the kernel relay still referenced and its pins
    // are never removed (found by the chaos tests: pins left after a clean stop).
    if let Some(thread) = stats_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    drop(relay);
    info!("stopped");
    Ok(())
}

/// How the serving loop ended.
enum Ended {
    /// SIGTERM or SIGINT.
    Stopped,
    /// A new daemon serves on this one's sockets.
    HandedOver(Successor),
}

/// The sockets of the daemon serving at `global.upgrade_socket`, when this one is to take
/// over from it; otherwise makes sure no daemon serves there (this one would take the path
/// from it).
fn inherit_sockets(config: &Config, take_over: bool) -> anyhow::Result<Option<Inherited>> {
    let path = config.global.upgrade_socket.as_deref();
    if !take_over {
        if let Some(path) = path {
            upgrade::refuse_if_served(path)?;
        }
        return Ok(None);
    }
    let path = path.context(
        "`mxlb upgrade` takes the sockets over through global.upgrade_socket, which the \
         configuration does not set",
    )?;
    upgrade::take_over(path).map(Some)
}

/// The next upgrade request, or never without an upgrade socket.
async fn upgrade_request(socket: Option<&UpgradeSocket>) -> tokio::net::UnixStream {
    match socket {
        Some(socket) => socket.next_request().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the hand-over under way (the caller polls only when there is one).
async fn wait_for<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Copies of every listening socket (the client listeners, the stats port and the upgrade
/// socket), each with what it is for.
fn sockets_to_hand_over(
    listeners: &Listeners,
    stats: Option<&(std::net::SocketAddr, OwnedFd)>,
    upgrade: Option<&UpgradeSocket>,
) -> io::Result<Vec<(Role, OwnedFd)>> {
    let mut sockets: Vec<(Role, OwnedFd)> = listeners
        .listening_sockets()?
        .into_iter()
        .map(|(addr, fd)| (Role::Listener(addr), fd))
        .collect();
    if let Some((addr, fd)) = stats {
        sockets.push((Role::Stats(*addr), fd.try_clone()?));
    }
    if let Some(socket) = upgrade {
        sockets.push((Role::Upgrade, socket.copy()?));
    }
    Ok(sockets)
}

/// Raises the soft limit on open files to the hard limit: each client costs two
/// descriptors (client and server socket), and the usual soft limit of 1024 would stop
/// the daemon at a few hundred clients. Warns when even the hard limit is short of
/// `maxconn`: accepts then fail with EMFILE before `maxconn` is reached.
pub fn raise_fd_limit(maxconn: u32) {
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

/// What a signal asks of the daemon.
enum Wanted {
    Reload,
    Stop,
}

/// The signals the daemon acts on, installed before it reports itself ready so that a
/// SIGTERM sent right after "ready" is never met by the default action (nor a SIGHUP,
/// whose default would kill the daemon and every relay with it).
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Wanted {
        let name = tokio::select! {
            _ = self.hangup.recv() => return Wanted::Reload,
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        };
        info!("{name} received");
        Wanted::Stop
    }
}

/// The daemon's answer to the stats server: a fresh snapshot each time it is asked
/// (the stats server shares it between requests, see [`crate::stats::cache`]).
struct DaemonStats {
    started: Instant,
    relay: Relay,
    /// Client connections over all listeners, against `global.maxconn`.
    connections: Arc<Gauge>,
    /// The listeners of the configuration in force.
    frontends: watch::Receiver<Vec<Arc<Frontend>>>,
    reloads: Arc<ReloadCounters>,
    /// The configuration in force.
    config: watch::Receiver<Arc<Config>>,
}

impl StatsSource for DaemonStats {
    fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            relay: self.relay.name().to_owned(),
            conns_cur: u64::from(self.connections.open()),
            maxconn: u64::from(self.connections.limit()),
            reloads: self.reloads.ok(),
            reload_failures: self.reloads.failed(),
            integrity_errors: crate::relay::ledger::integrity_errors(),
            listeners: self
                .frontends
                .borrow()
                .iter()
                .map(|frontend| frontend.stats(&self.relay))
                .collect(),
        }
    }

    fn set_state(&self, listener: &str, server: &str, state: AdminState) -> Result<(), AdminError> {
        self.pool(listener)?.set_admin_state(server, state)
    }

    fn set_weight(&self, listener: &str, server: &str, weight: u32) -> Result<(), AdminError> {
        self.pool(listener)?.set_weight(server, weight)
    }

    fn running_config(&self) -> String {
        crate::running_config::render(&self.config.borrow())
    }
}

impl DaemonStats {
    /// The servers of the listener called `name`, in the configuration in force.
    fn pool(&self, name: &str) -> Result<Arc<crate::pool::Pool>, AdminError> {
        self.frontends
            .borrow()
            .iter()
            .find(|frontend| frontend.config.name == name)
            .map(|frontend| frontend.pool.clone())
            .ok_or_else(|| AdminError::UnknownListener(name.to_owned()))
    }
}
