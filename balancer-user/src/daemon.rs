//! The daemon's life: start the relay, bind the listeners, accept until told to stop, then
//! let established relays finish within `global.grace`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::relay::Relay;
use crate::session::Frontend;
use crate::stats::{AdminError, AdminState, StatsSnapshot, StatsSource};

/// Pause after an accept error (EMFILE and friends) so a full fd table does not spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
const LISTEN_BACKLOG: u32 = 1024;

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    refuse_or_warn_unimplemented(&config)?;
    let relay = Relay::start(
        config.global.relay,
        &config.global.pin_path,
        config.global.maxconn,
    )?;
    let stop = CancellationToken::new();
    let sessions = TaskTracker::new();

    let mut acceptors = Vec::new();
    let mut frontends = Vec::new();
    for listener in &config.listeners {
        let frontend = Arc::new(Frontend::new(listener.clone(), relay.clone()));
        frontend.pool.start_monitors(listener, &stop);
        frontends.push(frontend.clone());
        for &addr in &listener.bind {
            let socket = bind(addr)
                .with_context(|| format!("listener {}: binding {addr}", listener.name))?;
            info!(listener = %listener.name, %addr, servers = listener.servers.len(), "listening");
            acceptors.push(tokio::spawn(accept_loop(
                socket,
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

    wait_for_stop_signal().await?;
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

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
    socket.listen(LISTEN_BACKLOG as i32)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    socket: TcpListener,
    frontend: Arc<Frontend>,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted: std::io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            () = stop.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((client, client_addr)) => {
                sessions.spawn(frontend.clone().serve(client, client_addr));
            }
            Err(error) => {
                error!(listener = %frontend.config.name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // SIGHUP's default action would kill the daemon and every relay with it.
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let name = loop {
        tokio::select! {
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = hangup.recv() => {
                warn!("SIGHUP received: configuration reload is not supported yet; ignored");
            }
        }
    };
    info!("{name} received");
    Ok(())
}

/// The daemon's answer to the stats server: a fresh snapshot per request.
struct DaemonStats {
    started: Instant,
    relay: Relay,
    frontends: Vec<Arc<Frontend>>,
}

impl StatsSource for DaemonStats {
    fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            relay: self.relay.name().to_owned(),
            listeners: self
                .frontends
                .iter()
                .map(|frontend| frontend.pool.stats(&self.relay))
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
