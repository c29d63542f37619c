//! Upgrades that refuse nobody: a new daemon takes the listening sockets over from the
//! running one, as HAProxy's `-x` and Envoy's hot restart do, so that no SYN meets a closed
//! port while the binary or the configuration is replaced.
//!
//! The running daemon listens on a unix socket, `[global] upgrade_socket`, that only root
//! can reach (mode 0600, root's, and the peer's uid checked). `mxlb upgrade` — a new daemon
//! started by root — connects to it and says hello; the running daemon answers with every
//! listening socket it has (its client listeners and its stats port), passed as
//! descriptors (SCM_RIGHTS) with the address each is bound to ([`wire`]). The new daemon
//! serves on those very sockets: one accept queue, two processes taking from it. Once the
//! new daemon is ready (relay loaded and pinned, listeners accepting, its own upgrade socket
//! in place), it tells the old one, which stops accepting, lets its sessions finish within
//! `global.grace` (the kernel relay's included: its maps live as long as it does), and
//! exits.
//!
//! - [`handing`]: the running daemon's side ([`UpgradeSocket`], [`hand_over`]).
//! - [`taking`]: the new daemon's side ([`take_over`], [`Inherited`]).
//! - [`wire`]: what goes over the socket.
//!
//! The new daemon binds its own upgrade socket under a temporary name and renames it over
//! the old one's, while it is still root: the path is never missing (a second upgrade
//! reaches one daemon or the other), and the old daemon, no longer root, need not remove
//! anything. A daemon started with `mxlb run` while another serves at the path stops with
//! an error instead of stealing it.

mod handing;
mod taking;
pub mod wire;

pub use handing::{Successor, UpgradeSocket, hand_over};
pub use taking::{Inherited, refuse_if_served, take_over};

use std::time::Duration;

/// How long either side waits for the other at each step. The new daemon's start (the
/// eBPF load, binding, pinning) takes well under a second; a peer that says nothing for
/// this long is gone.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
