//! Relaying an established client/server pair: in the kernel (sockmap) or in user space.
//!
//! The kernel relay is the point of mxlb: after the PROXY header, every byte moves between
//! the two sockets inside the kernel. The user-space relay exists for machines where eBPF
//! cannot load; `relay = "auto"` picks the kernel when it loads and says why when it cannot.

mod kernel;
mod sockmap;
mod userspace;
mod watch;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{info, warn};

pub use sockmap::{EBPF_LOG_TARGET, KernelRelay};

use crate::config::RelayMode;

/// How a relayed connection ended, in the spirit of HAProxy's termination states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// Both sides closed in order; every byte was delivered.
    Closed,
    /// The client reset the connection (or its socket failed).
    ClientReset,
    /// The server reset the connection (or its socket failed).
    ServerReset,
    /// The relay itself failed (a map operation), and closed both sides.
    Internal,
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Termination::Closed => "closed",
            Termination::ClientReset => "client-reset",
            Termination::ServerReset => "server-reset",
            Termination::Internal => "internal-error",
        })
    }
}

/// What a relay moved, for logs and stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Client-to-server bytes after the PROXY header.
    pub bytes_in: u64,
    /// Server-to-client bytes.
    pub bytes_out: u64,
    pub ended: Termination,
}

/// The relay chosen at start-up.
#[derive(Clone)]
pub enum Relay {
    Kernel(Arc<KernelRelay>),
    UserSpace,
}

impl Relay {
    /// Chooses the relay for `mode`: `sockmap` must load, `auto` falls back with a warning.
    pub fn start(mode: RelayMode, pin_dir: &Path, max_connections: u32) -> anyhow::Result<Relay> {
        match mode {
            RelayMode::Userspace => {
                info!("relay: user space (relay = \"userspace\")");
                Ok(Relay::UserSpace)
            }
            RelayMode::Sockmap => {
                let relay = KernelRelay::load(pin_dir, max_connections)?;
                info!("relay: kernel (sockmap)");
                Ok(Relay::Kernel(Arc::new(relay)))
            }
            RelayMode::Auto => match KernelRelay::load(pin_dir, max_connections) {
                Ok(relay) => {
                    info!("relay: kernel (sockmap), chosen by relay = \"auto\"");
                    Ok(Relay::Kernel(Arc::new(relay)))
                }
                Err(error) => {
                    warn!("relay: user space, because the kernel relay could not load: {error:#}");
                    Ok(Relay::UserSpace)
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Relay::Kernel(_) => "kernel",
            Relay::UserSpace => "userspace",
        }
    }

    /// Relays until both directions are done or one side fails; closes both sockets.
    pub async fn relay(&self, client: TcpStream, server: TcpStream) -> std::io::Result<Transfer> {
        match self {
            Relay::Kernel(kernel) => kernel.relay(client, server).await,
            Relay::UserSpace => Ok(userspace::relay(client, server).await),
        }
    }
}
