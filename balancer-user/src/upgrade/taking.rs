//! The new daemon's side: taking the sockets over from the daemon that runs.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use tracing::{info, warn};

use super::STEP_TIMEOUT;
use super::wire::{self, Role};

/// The sockets taken from the running daemon, until the new daemon has put them to use.
pub struct Inherited {
    listeners: HashMap<SocketAddr, TcpListener>,
    stats: Option<(SocketAddr, TcpListener)>,
    upgrade: Option<std::os::unix::net::UnixListener>,
    /// The running daemon, told on it when the new one serves.
    predecessor: UnixStream,
    predecessor_pid: Option<i32>,
}

/// Connects to the daemon serving at `path` and takes its listening sockets.
pub fn take_over(path: &Path) -> anyhow::Result<Inherited> {
    let stream = UnixStream::connect(path).with_context(|| {
        format!(
            "no running mxlb to take over from at {} (global.upgrade_socket)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    let peer = peer_credentials(&stream)?;
    ensure!(
        peer.uid() == 0,
        "{} is served by uid {} (pid {}), not by root: not taking sockets from it",
        path.display(),
        peer.uid(),
        peer.pid()
    );
    let predecessor_pid = Some(peer.pid());
    wire::say(&stream, wire::HELLO).context("greeting the running daemon")?;
    let mut listeners = HashMap::new();
    let mut stats = None;
    let mut upgrade = None;
    for (role, fd) in wire::receive_sockets(&stream)? {
        match role {
            Role::Listener(addr) => {
                listeners.insert(addr, listening_socket(fd, addr)?);
            }
            Role::Stats(addr) => stats = Some((addr, listening_socket(fd, addr)?)),
            Role::Upgrade => upgrade = Some(listening_unix_socket(fd)?),
        }
    }
    info!(
        pid = ?predecessor_pid,
        listeners = listeners.len(),
        stats = stats.is_some(),
        "upgrade: took the listening sockets over from the running daemon"
    );
    Ok(Inherited {
        listeners,
        stats,
        upgrade,
        predecessor: stream,
        predecessor_pid,
    })
}

/// Stops a `mxlb run` that would take the upgrade socket from a daemon serving there.
pub fn refuse_if_served(path: &Path) -> anyhow::Result<()> {
    // Whoever serves there: a socket of another user's at the path is as much in the way.
    if UnixStream::connect(path).is_ok() {
        bail!(
            "an mxlb daemon already serves upgrades at {} (global.upgrade_socket): \
             `mxlb upgrade` takes over from it, `mxlb run` would not",
            path.display()
        );
    }
    Ok(())
}

impl Inherited {
    /// The client listener bound to `addr`, if the running daemon had one.
    pub fn take_listener(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.listeners.remove(&addr)
    }

    /// The stats port, if the running daemon had it on `addr`.
    pub fn take_stats(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        match self.stats.take() {
            Some((bound, socket)) if bound == addr => Some(socket),
            other => {
                self.stats = other;
                None
            }
        }
    }

    /// The upgrade socket, if the running daemon passed it (it listens at `path`).
    pub fn take_upgrade_socket(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.upgrade.take()
    }

    /// Tells the running daemon that this one can serve, and waits for its answer: once
    /// it has it, the old daemon stops accepting and this one must start. An error means
    /// the old daemon did not hand over (it may serve on): this one must not start.
    /// Sockets the new configuration does not use are closed here (the old daemon closes
    /// its own copies as it stops).
    pub fn finish(self) -> anyhow::Result<()> {
        for addr in self.listeners.keys() {
            info!(%addr, "upgrade: the configuration no longer binds this address; closing it");
        }
        let answered = wire::say(&self.predecessor, wire::READY)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                wire::expect(&self.predecessor, wire::OVER, "the old daemon to hand over")
            });
        if let Err(error) = answered {
            warn!(pid = ?self.predecessor_pid, "upgrade: the old daemon did not hand over");
            return Err(error.context("the old daemon did not hand over; not starting"));
        }
        info!(pid = ?self.predecessor_pid, "upgrade: the old daemon stops accepting and drains");
        Ok(())
    }
}

/// A passed descriptor as a listening TCP socket, checked to be one and bound where the
/// running daemon said.
fn listening_socket(fd: OwnedFd, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::from(fd);
    ensure!(
        socket.r#type()? == socket2::Type::STREAM && socket.is_listener()?,
        "the socket passed for {addr} is not a listening TCP socket"
    );
    let bound = socket
        .local_addr()?
        .as_socket()
        .context("the socket passed is not an IP socket")?;
    ensure!(
        bound == addr,
        "the socket passed for {addr} is bound to {bound}"
    );
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A passed descriptor as a listening unix stream socket (the upgrade socket).
fn listening_unix_socket(fd: OwnedFd) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let socket = socket2::Socket::from(fd);
    ensure!(
        socket.domain()? == socket2::Domain::UNIX
            && socket.r#type()? == socket2::Type::STREAM
            && socket.is_listener()?,
        "the socket passed as the upgrade socket is not a listening unix socket"
    );
    Ok(std::os::fd::OwnedFd::from(socket).into())
}

fn peer_credentials(stream: &UnixStream) -> anyhow::Result<nix::sys::socket::UnixCredentials> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("reading the running daemon's credentials")
}
