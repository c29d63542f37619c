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
    let predecessor_pid = peer_pid(&stream);
    wire::say(&stream, wire::HELLO).context("greeting the running daemon")?;
    let mut listeners = HashMap::new();
    let mut stats = None;
    for (role, fd) in wire::receive_sockets(&stream)? {
        match role {
            Role::Listener(addr) => {
                listeners.insert(addr, listening_socket(fd, addr)?);
            }
            Role::Stats(addr) => stats = Some((addr, listening_socket(fd, addr)?)),
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
        predecessor: stream,
        predecessor_pid,
    })
}

/// Stops a `mxlb run` that would take the upgrade socket from a daemon serving there.
pub fn refuse_if_served(path: &Path) -> anyhow::Result<()> {
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

    /// Tells the running daemon that this one serves: it stops accepting and drains.
    /// Sockets the new configuration does not use are closed here (the old daemon closes
    /// its own copies as it stops).
    pub fn finish(self) {
        for addr in self.listeners.keys() {
            info!(%addr, "upgrade: the configuration no longer binds this address; closing it");
        }
        match wire::say(&self.predecessor, wire::READY) {
            Ok(()) => {
                info!(pid = ?self.predecessor_pid, "upgrade: the old daemon stops accepting and drains")
            }
            Err(error) => warn!(
                pid = ?self.predecessor_pid,
                %error,
                "upgrade: could not tell the old daemon to stop; both serve until it is stopped"
            ),
        }
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

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|cred| cred.pid())
}
