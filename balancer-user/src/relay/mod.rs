//! Relaying an established client/server pair: in the kernel (sockmap) or in user space.
//!
//! The kernel relay is the point of mxlb: after the PROXY header, every byte moves between
//! the two sockets inside the kernel. The user-space relay exists for machines where eBPF
//! cannot load; `relay = "auto"` picks the kernel when it loads and says why when it cannot.

mod dialogue;
mod kernel;
pub mod ledger;
mod sockmap;
mod tcp_sock;
mod userspace;
mod watch;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

pub use sockmap::{EBPF_LOG_TARGET, KernelRelay};

use crate::config::RelayMode;
use crate::sockopt;
use dialogue::Dialogue;
use ledger::{AfterReset, Ledger, Moment, Resets};

/// How a relayed connection ended, in the spirit of HAProxy's termination states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// Both sides closed in order; every byte was delivered.
    Closed,
    /// The client reset the connection (or its socket failed).
    ClientReset,
    /// The server reset the connection (or its socket failed).
    ServerReset,
    /// No byte moved in either direction for `timeout_idle`; mxlb closed both sides.
    IdleTimeout,
    /// The relay itself failed (a map operation), and closed both sides.
    Internal,
    /// The byte conservation check failed: both sides were reset, so the server cannot
    /// take an altered message for a whole one.
    IntegrityError,
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Termination::Closed => "closed",
            Termination::ClientReset => "client-reset",
            Termination::ServerReset => "server-reset",
            Termination::IdleTimeout => "idle-timeout",
            Termination::Internal => "internal-error",
            Termination::IntegrityError => "integrity-error",
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
    /// The part of both directions the kernel moved (counted by the eBPF program).
    pub kernel: u64,
    pub ended: Termination,
}

/// Which way a connection's bytes went, by its byte counters: the `relay=` field of the
/// `connection finished` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayPath {
    /// The kernel carried no byte: the daemon relayed every one (or none moved).
    User,
    /// The kernel carried every byte after the PROXY header (none went through the daemon).
    Kernel,
    /// Some of each: bytes relayed before the pairing, held bytes the daemon passed on
    /// for a slow peer, or a client socket the kernel refused.
    UserAndKernel,
}

impl fmt::Display for RelayPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelayPath::User => "user",
            RelayPath::Kernel => "kernel",
            RelayPath::UserAndKernel => "user+kernel",
        })
    }
}

impl Transfer {
    /// Which way the bytes went: `kernel` counts the bytes the verdict redirected, both
    /// directions; `bytes_in + bytes_out` counts every byte relayed, by either path.
    pub fn path(&self) -> RelayPath {
        if self.kernel == 0 {
            RelayPath::User
        } else if self.kernel >= self.bytes_in + self.bytes_out {
            RelayPath::Kernel
        } else {
            RelayPath::UserAndKernel
        }
    }

    /// A connection that ended before anything was relayed.
    pub fn nothing(ended: Termination) -> Transfer {
        Transfer {
            bytes_in: 0,
            bytes_out: 0,
            kernel: 0,
            ended,
        }
    }
}

/// The bytes of one connection so far, readable by the stats while it is relayed.
///
/// Bytes the daemon moves itself are counted here as they go; bytes the kernel moves are
/// counted by the verdict in `mxlb_traffic`, read through the cookies while the sockets are
/// paired, and copied here when they are unpaired (before the map entries go), so a
/// reader never sees a connection's kernel bytes vanish.
#[derive(Debug, Default)]
pub struct LiveTraffic {
    daemon_in: AtomicU64,
    daemon_out: AtomicU64,
    kernel_in: AtomicU64,
    kernel_out: AtomicU64,
    /// Cookies of the client and server sockets while paired in the kernel; 0 otherwise.
    client_cookie: AtomicU64,
    server_cookie: AtomicU64,
    /// What the bytes the daemon relayed say of the SMTP dialogue (for the idle timeout's
    /// `421`).
    dialogue: Mutex<Dialogue>,
}

impl LiveTraffic {
    pub(crate) fn add_daemon_in(&self, bytes: u64) {
        self.daemon_in.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_daemon_out(&self, bytes: u64) {
        self.daemon_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes the user-space relay wrote to the server: counted, and read for the dialogue.
    fn client_said(&self, bytes: &[u8]) {
        self.add_daemon_in(bytes.len() as u64);
        self.lock_dialogue().client_said(bytes);
    }

    /// Bytes the user-space relay wrote to the client: counted, and read for the dialogue.
    fn server_said(&self, bytes: &[u8]) {
        self.add_daemon_out(bytes.len() as u64);
        self.lock_dialogue().server_said(bytes);
    }

    fn lock_dialogue(&self) -> std::sync::MutexGuard<'_, Dialogue> {
        self.dialogue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paired(&self) -> Option<(u64, u64)> {
        let client = self.client_cookie.load(Ordering::Acquire);
        let server = self.server_cookie.load(Ordering::Acquire);
        (client != 0 && server != 0).then_some((client, server))
    }

    pub(crate) fn set_paired(&self, client: u64, server: u64) {
        self.client_cookie.store(client, Ordering::Release);
        self.server_cookie.store(server, Ordering::Release);
    }

    /// Adds a kernel phase's final counts, then forgets the cookies.
    pub(crate) fn set_unpaired(&self, kernel_in: u64, kernel_out: u64) {
        self.kernel_in.fetch_add(kernel_in, Ordering::Relaxed);
        self.kernel_out.fetch_add(kernel_out, Ordering::Relaxed);
        self.client_cookie.store(0, Ordering::Release);
        self.server_cookie.store(0, Ordering::Release);
    }

    /// The transfer so far (or in total, once the relay returned).
    pub fn transfer(&self, relay: &Relay, ended: Termination) -> Transfer {
        let kernel = match relay {
            Relay::Kernel(kernel) => Some(kernel.as_ref()),
            Relay::UserSpace => None,
        };
        let relayed = self.relayed(kernel);
        let kernel_bytes = self.kernel_in.load(Ordering::Relaxed)
            + self.kernel_out.load(Ordering::Relaxed)
            + self.paired_kernel(kernel).map_or(0, |(i, o)| i + o);
        Transfer {
            bytes_in: relayed.upstream,
            bytes_out: relayed.downstream,
            kernel: kernel_bytes,
            ended,
        }
    }

    /// What was passed on each way: by the daemon, by finished kernel phases, and (through
    /// `kernel`, while paired) by the kernel phase in progress.
    pub(crate) fn relayed(&self, kernel: Option<&KernelRelay>) -> ledger::Relayed {
        let (now_in, now_out) = self.paired_kernel(kernel).unwrap_or((0, 0));
        ledger::Relayed {
            upstream: self.daemon_in.load(Ordering::Relaxed)
                + self.kernel_in.load(Ordering::Relaxed)
                + now_in,
            downstream: self.daemon_out.load(Ordering::Relaxed)
                + self.kernel_out.load(Ordering::Relaxed)
                + now_out,
        }
    }

    /// The current kernel phase's counts, while the sockets are paired.
    fn paired_kernel(&self, kernel: Option<&KernelRelay>) -> Option<(u64, u64)> {
        let (client, server) = self.paired()?;
        let kernel = kernel?;
        Some((kernel.redirected(client), kernel.redirected(server)))
    }
}

impl Transfer {
    /// What was passed on each way, for the byte conservation check.
    pub fn relayed(&self) -> ledger::Relayed {
        ledger::Relayed {
            upstream: self.bytes_in,
            downstream: self.bytes_out,
        }
    }
}

/// When a connection counts as idle, and the name it is told at that point.
#[derive(Clone, Copy, Debug)]
pub struct IdleTimeout<'a> {
    /// `timeout_idle`: no byte moved either way for this long.
    pub after: std::time::Duration,
    /// The name in the `421` a client at a command boundary is told ([`tell_idle_client`]).
    pub hostname: &'a str,
}

/// The relay chosen at start-up.
#[derive(Clone)]
pub enum Relay {
    Kernel(Arc<KernelRelay>),
    UserSpace,
}

impl Relay {
    /// Chooses the relay for `mode`: `sockmap` must load, `auto` falls back with a warning.
    pub fn start(
        mode: RelayMode,
        pin_dir: &Path,
        max_connections: u32,
        max_inflight: u64,
        relay_after: u64,
    ) -> anyhow::Result<Relay> {
        match mode {
            RelayMode::Userspace => {
                info!("relay: user space (relay = \"userspace\")");
                Ok(Relay::UserSpace)
            }
            RelayMode::Sockmap => {
                let relay = KernelRelay::load(pin_dir, max_connections, max_inflight, relay_after)?;
                info!("relay: kernel (sockmap)");
                Ok(Relay::Kernel(Arc::new(relay)))
            }
            RelayMode::Auto => {
                match KernelRelay::load(pin_dir, max_connections, max_inflight, relay_after) {
                    Ok(relay) => {
                        info!("relay: kernel (sockmap), chosen by relay = \"auto\"");
                        Ok(Relay::Kernel(Arc::new(relay)))
                    }
                    Err(error) => {
                        warn!(
                            "relay: user space, because the kernel relay could not load: {error:#}"
                        );
                        Ok(Relay::UserSpace)
                    }
                }
            }
        }
    }

    /// `global.kernel_relay_after` from a reload: new connections use it.
    pub fn set_kernel_relay_after(&self, bytes: u64) {
        if let Relay::Kernel(kernel) = self {
            kernel
                .relay_after
                .store(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Relay::Kernel(_) => "kernel",
            Relay::UserSpace => "userspace",
        }
    }

    /// Relays until both directions are done or one side fails, counting into `live`,
    /// checking byte conservation at every phase change and at the end; closes both
    /// sockets.
    pub async fn relay(
        &self,
        client: TcpStream,
        server: TcpStream,
        live: &LiveTraffic,
        idle: IdleTimeout<'_>,
    ) -> std::io::Result<Termination> {
        let IdleTimeout {
            after: timeout_idle,
            hostname,
        } = idle;
        // Urgent bytes stay in the stream on both paths (the verdict forwards them too).
        sockopt::keep_urgent_inline(&client)?;
        sockopt::keep_urgent_inline(&server)?;
        let ledger = Ledger::start(&client, &server)?;
        let ended = match self {
            // Each phase boxed, so an idle connection holds only the state of the one it is in.
            Relay::Kernel(kernel) => {
                return Box::pin(
                    self.relay_with_kernel(kernel, client, server, live, idle, &ledger),
                )
                .await;
            }
            Relay::UserSpace => {
                Box::pin(userspace::relay(&client, &server, live, timeout_idle)).await
            }
        };
        Ok(self.finish(ended, &client, &server, live, &ledger, hostname))
    }

    /// The kernel relay's phases: user space until `kernel_relay_after` bytes streamed and
    /// the sockets can be handed over whole, then the kernel to the end (a peer that falls
    /// `max_inflight` behind is handled there, without leaving the maps).
    async fn relay_with_kernel(
        &self,
        kernel: &KernelRelay,
        client: TcpStream,
        server: TcpStream,
        live: &LiveTraffic,
        idle: IdleTimeout<'_>,
        ledger: &Ledger,
    ) -> std::io::Result<Termination> {
        let IdleTimeout {
            after: timeout_idle,
            hostname,
        } = idle;
        let (client_whole, server_whole) = ledger.initially_whole();
        let mut whole = userspace::Whole {
            client: client_whole,
            server: server_whole,
        };
        let threshold = kernel.relay_after();
        if !(threshold == 0 && whole.both()) {
            let phase = Box::pin(userspace::relay_until(
                &client,
                &server,
                live,
                timeout_idle,
                threshold,
                &mut whole,
            ))
            .await;
            if let userspace::Phase::Finished(ended) = phase {
                return Ok(self.finish(ended, &client, &server, live, ledger, hostname));
            }
        }
        let relayed = live.relayed(Some(kernel));
        if let Err(violation) = ledger.balance(&client, &server, relayed, Moment::ToKernel) {
            // A peer's reset that arrived after the user-space phase last read its socket
            // leaves that socket in TCP state CLOSE, which the counters take for both FINs
            // passed, so the balance fails by one. Such a connection is over: balance it
            // again knowing which sockets were reset (`balance_after_reset`: exact but for
            // the reset peer's possible FIN), and end it as the reset it is. Found by the
            // chaos tests: clients resetting in the middle of a transfer, before the
            // adaptive hand-over, were counted as integrity errors.
            let resets = Resets::take(&client, &server);
            if resets.any() {
                let ended = if resets.client {
                    Termination::ClientReset
                } else {
                    Termination::ServerReset
                };
                let after = ledger.balance_after_reset(&client, &server, relayed, resets);
                debug!(?resets, ?after, %violation, "peer reset at the hand-over to the kernel");
                match after {
                    Ok(AfterReset::Exact) => {}
                    // One byte more read than relayed: the peer's FIN, or a lost byte. The
                    // other side is reset too, so that it cannot take a stream short of a
                    // byte for a whole one.
                    Ok(AfterReset::WithinAFin) => {
                        let _ = sockopt::reset_on_close(&client);
                        let _ = sockopt::reset_on_close(&server);
                    }
                    Err(violation) => {
                        ledger::report(&violation, &client, &server);
                        return Ok(Termination::IntegrityError);
                    }
                }
                return Ok(self.finish(ended, &client, &server, live, ledger, hostname));
            }
            ledger::report(&violation, &client, &server);
            return Ok(Termination::IntegrityError);
        }
        match Box::pin(kernel.relay(client, server, live, timeout_idle, ledger)).await? {
            kernel::Outcome::Ended(ended) => Ok(ended),
            kernel::Outcome::Refused(client, server) => {
                let ended = Box::pin(userspace::relay(&client, &server, live, timeout_idle)).await;
                Ok(self.finish(ended, &client, &server, live, ledger, hostname))
            }
        }
    }

    /// Balances the ledger of a connection that ended in user space (its caller closes
    /// it); at the idle timeout, tells the client so if it may be told.
    fn finish(
        &self,
        ended: Termination,
        client: &TcpStream,
        server: &TcpStream,
        live: &LiveTraffic,
        ledger: &Ledger,
        hostname: &str,
    ) -> Termination {
        let transfer = live.transfer(self, ended);
        let relayed = transfer.relayed();
        // Reset or timed out: bytes may rightly be left unrelayed; only the bounds hold.
        let checked = if ended == Termination::Closed {
            ledger.balance(client, server, relayed, Moment::End)
        } else {
            ledger.bounds(client, server, || relayed)
        };
        match checked {
            Ok(()) => {
                // After the balance: the reply is the daemon's own bytes, not relayed ones.
                if ended == Termination::IdleTimeout && transfer.kernel == 0 {
                    tell_idle_client(client, server, live, hostname);
                }
                ended
            }
            Err(violation) => {
                ledger::report(&violation, client, server);
                Termination::IntegrityError
            }
        }
    }
}

/// At the idle timeout, tells the client `421 4.4.2 <hostname> Error: timeout exceeded`, as
/// Postfix does, when that reply cannot land inside anything else: the daemon relayed every
/// byte of the connection itself (the caller checks), the dialogue is at a command
/// boundary ([`dialogue`]), the client's socket has nothing left to send, so the reply
/// goes out whole in one write, and neither socket holds bytes not yet relayed. Otherwise the client just sees the connection close.
fn tell_idle_client(client: &TcpStream, server: &TcpStream, live: &LiveTraffic, hostname: &str) {
    if !live.lock_dialogue().at_command_boundary() {
        debug!("idle timeout: not at a command boundary, closing without a reply");
        return;
    }
    if !sockopt::unacknowledged(client).is_ok_and(|queued| queued == 0) {
        debug!("idle timeout: the client has not taken everything yet, closing without a reply");
        return;
    }
    // Bytes that arrived as the timer fired: a server reply the 421 would stand in for (the
    // client retrying a message the server accepted), or a client command.
    if !(sockopt::unread(client).is_ok_and(|n| n == 0)
        && sockopt::unread(server).is_ok_and(|n| n == 0))
    {
        debug!("idle timeout: bytes arrived unread, closing without a reply");
        return;
    }
    let reply = idle_reply(hostname);
    match client.try_write(reply.as_bytes()) {
        Ok(n) if n == reply.len() => debug!("idle timeout: told the client 421"),
        outcome => debug!(?outcome, "idle timeout: the 421 did not go out whole"),
    }
}

/// The reply a client at a command boundary gets at the idle timeout.
fn idle_reply(hostname: &str) -> String {
    format!("421 4.4.2 {hostname} Error: timeout exceeded\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(bytes_in: u64, bytes_out: u64, kernel: u64) -> Transfer {
        Transfer {
            bytes_in,
            bytes_out,
            kernel,
            ended: Termination::Closed,
        }
    }

    #[test]
    fn the_path_is_read_from_the_byte_counters() {
        assert_eq!(transfer(0, 0, 0).path(), RelayPath::User);
        assert_eq!(transfer(300, 283, 0).path(), RelayPath::User);
        assert_eq!(transfer(300, 283, 583).path(), RelayPath::Kernel);
        // The banner and the dialogue in user space, the message in the kernel.
        assert_eq!(
            transfer(1 << 20, 283, 1 << 20).path(),
            RelayPath::UserAndKernel
        );
        assert_eq!(transfer(300, 283, 1).path(), RelayPath::UserAndKernel);
    }

    #[test]
    fn the_idle_reply_is_postfix_s() {
        assert_eq!(
            idle_reply("mx.example.com"),
            "421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
        );
    }

    #[test]
    fn the_paths_have_the_names_the_log_uses() {
        let names: Vec<String> = [RelayPath::User, RelayPath::Kernel, RelayPath::UserAndKernel]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["user", "kernel", "user+kernel"]);
    }
}
