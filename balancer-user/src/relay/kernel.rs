//! One connection on the kernel relay: pair, hand over, tear down.
//!
//! Pairing inserts each socket into `mxlb_socks` under its cookie, with the *peer* as the
//! value; from then on the stream verdict moves the bytes and the daemon sleeps. It still
//! watches both sockets (through [`Watcher`], which does not wake it per redirected chunk)
//! for three things:
//!
//! - **Held bytes.** The verdict holds bytes it cannot redirect (before the pair is complete,
//!   or behind earlier held bytes) in the socket's own receive queue. The daemon reads them,
//!   writes them to the peer, and publishes the total in `mxlb_handover`; the verdict
//!   redirects again once that total catches up with what it held, so no byte overtakes
//!   another. The first read after pairing also runs the verdict over bytes that arrived
//!   before the insert (pitfall 1 in the sockmap notes: they would otherwise stall).
//! - **Half-close.** The kernel does not forward FIN. On EOF from one side the daemon waits
//!   until the peer socket has taken every byte of that direction (acked + send queue
//!   reaches what was redirected and forwarded), then shuts the peer's write side. Shutting
//!   it at once loses the bytes still queued in the relay.
//! - **Teardown.** When both directions are done, or either side fails (reset), both
//!   sockets close; closing removes them from the sockhash, and the daemon deletes their
//!   `mxlb_traffic` / `mxlb_handover` entries, reading the final byte counts first.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use balancer_common::{Handover, Traffic};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::sockmap::KernelRelay;
use super::watch::Wants;
use super::{LiveTraffic, Termination};
use crate::sockopt;

/// Most bytes read from a socket's held queue in one go.
const HELD_CHUNK: usize = 64 * 1024;
/// How often a half-closed direction re-checks whether its bytes have left the relay.
const DRAIN_POLL_FIRST: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(100);

/// Which end of the connection a socket faces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Client,
    Server,
}

impl Role {
    fn reset(self) -> Termination {
        match self {
            Role::Client => Termination::ClientReset,
            Role::Server => Termination::ServerReset,
        }
    }
}

/// The direction that *starts* at a side: from its socket to the peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Open,
    /// EOF seen; waiting until the peer has taken every byte before forwarding the FIN.
    Draining {
        next_check: Instant,
        interval: Duration,
    },
    Done,
}

/// One side of a relayed connection, with what the daemon knows about it.
struct Side {
    stream: TcpStream,
    role: Role,
    cookie: u64,
    /// Bytes this socket had taken for sending before pairing (the PROXY header, say).
    sent_before_pairing: u64,
    /// Held bytes read from this socket and written to the peer.
    forwarded: u64,
    /// Bytes the verdict redirected from this socket, as last read from `mxlb_traffic`.
    redirected: u64,
    state: Direction,
    /// What the watcher currently wakes us for on this socket.
    wants: Wants,
    events: Arc<Notify>,
}

impl Side {
    /// Every byte that left this socket towards the peer, by either path.
    fn relayed(&self) -> u64 {
        self.redirected + self.forwarded
    }
}

/// The relay loop stops early with this termination.
struct Abort(Termination);

impl KernelRelay {
    /// Relays one connection in the kernel until both directions are done or one side fails.
    pub async fn relay(
        &self,
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        live: &LiveTraffic,
    ) -> io::Result<Termination> {
        let (client_cookie, server_cookie) = (sockopt::cookie(&client)?, sockopt::cookie(&server)?);
        // Measured before pairing: from the insert on, the kernel may send into them.
        let client_sent = sockopt::bytes_taken_for_sending(&client)?;
        let server_sent = sockopt::bytes_taken_for_sending(&server)?;
        let paired = self
            .pair(&client, client_cookie, &server, server_cookie)
            .await;
        if let Err(error) = paired {
            // The kernel only takes established sockets: a server that closed right after
            // its banner (CLOSE_WAIT already) is refused. Such a connection is short by
            // definition; relay it in user space.
            self.forget(&[client_cookie, server_cookie]);
            debug!("kernel relay refused the pair ({error:#}); relaying in user space");
            return Ok(super::userspace::relay(client, server, live).await);
        }
        let mut client = self.side(client, Role::Client, client_cookie, client_sent)?;
        let mut server = match self.side(server, Role::Server, server_cookie, server_sent) {
            Ok(server) => server,
            Err(error) => {
                self.watcher.unwatch(&client.stream, client.cookie);
                self.forget(&[client_cookie, server_cookie]);
                return Err(error);
            }
        };
        live.set_paired(client_cookie, server_cookie);
        let ended = self.run(&mut client, &mut server, live).await;
        self.unpair(client, server, live);
        Ok(ended)
    }

    /// Pairs the two sockets in the sockhash. The `Traffic` entries go in first, so the
    /// verdict counts from the very first byte.
    async fn pair(
        &self,
        client: &tokio::net::TcpStream,
        client_cookie: u64,
        server: &tokio::net::TcpStream,
        server_cookie: u64,
    ) -> anyhow::Result<()> {
        {
            let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
            for cookie in [client_cookie, server_cookie] {
                traffic.insert(cookie, Traffic::default(), 0)?;
            }
        }
        // Entry keyed by the server first: it attaches the verdict to the client socket,
        // which speaks second in SMTP. Either order is safe (bytes without a peer are held),
        // this one just makes holding rare.
        self.lock_socks()
            .insert(server_cookie, client.as_raw_fd(), 0)?;
        if let Some(delay) = self.fault_pairing_delay {
            tokio::time::sleep(delay).await;
        }
        self.lock_socks()
            .insert(client_cookie, server.as_raw_fd(), 0)?;
        Ok(())
    }

    fn lock_socks(
        &self,
    ) -> std::sync::MutexGuard<'_, aya::maps::SockHash<aya::maps::MapData, u64>> {
        self.socks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Undoes a partial pairing: map entries go, the sockets stay open.
    fn forget(&self, cookies: &[u64]) {
        let mut socks = self.lock_socks();
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        let mut handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            let _ = socks.remove(cookie);
            let _ = traffic.remove(cookie);
            let _ = handover.remove(cookie);
        }
    }

    /// Moves a paired socket from tokio's reactor to the relay's watcher.
    fn side(
        &self,
        stream: tokio::net::TcpStream,
        role: Role,
        cookie: u64,
        sent_before_pairing: u64,
    ) -> io::Result<Side> {
        // Leaving tokio's reactor stops the per-chunk wake-ups; the socket stays nonblocking.
        let stream = stream.into_std()?;
        // Input wanted at first: pairing may have held a few bytes, and the first read runs
        // the verdict over bytes that arrived before the insert.
        let wants = Wants {
            input: true,
            output: false,
        };
        let events = self.watcher.watch(&stream, cookie, wants)?;
        Ok(Side {
            sent_before_pairing,
            stream,
            role,
            cookie,
            forwarded: 0,
            redirected: 0,
            state: Direction::Open,
            wants,
            events,
        })
    }

    async fn run(&self, client: &mut Side, server: &mut Side, live: &LiveTraffic) -> Termination {
        loop {
            // Make all the progress possible without waiting, then sleep until an event.
            if let Err(Abort(termination)) = self.step(client, server, live).await {
                return termination;
            }
            if let Err(Abort(termination)) = self.step(server, client, live).await {
                return termination;
            }
            if client.state == Direction::Done && server.state == Direction::Done {
                return Termination::Closed;
            }
            let wake_at = [client.state, server.state]
                .into_iter()
                .filter_map(|state| match state {
                    Direction::Draining { next_check, .. } => Some(next_check),
                    _ => None,
                })
                .min();
            tokio::select! {
                () = client.events.notified() => {}
                () = server.events.notified() => {}
                () = sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
            }
        }
    }

    /// Advances the direction from `from` to `to` as far as it goes without waiting.
    async fn step(&self, from: &mut Side, to: &mut Side, live: &LiveTraffic) -> Result<(), Abort> {
        match from.state {
            Direction::Open => self.forward_held(from, to, live).await?,
            Direction::Draining { next_check, .. } if next_check <= Instant::now() => {
                self.check_drained(from, to);
            }
            _ => {}
        }
        failed(from)
    }

    /// Reads what the verdict held on `from` and writes it to `to`; notices EOF.
    async fn forward_held(
        &self,
        from: &mut Side,
        to: &mut Side,
        live: &LiveTraffic,
    ) -> Result<(), Abort> {
        let mut buffer = Vec::new();
        loop {
            if buffer.is_empty() {
                buffer.resize(HELD_CHUNK, 0);
            }
            let read = from.stream.read(&mut buffer);
            tracing::trace!(side = ?from.role, ?read, "read");
            match read {
                Ok(0) => {
                    self.set_wants(from, Wants::default());
                    from.state = Direction::Draining {
                        next_check: Instant::now(),
                        interval: DRAIN_POLL_FIRST,
                    };
                    self.check_drained(from, to);
                    return Ok(());
                }
                Ok(n) => {
                    self.write_to_peer(to, &buffer[..n]).await?;
                    from.forwarded += n as u64;
                    match from.role {
                        Role::Client => live.add_daemon_in(n as u64),
                        Role::Server => live.add_daemon_out(n as u64),
                    }
                    let published = Handover {
                        forwarded: from.forwarded,
                    };
                    let mut handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(error) = handover.insert(from.cookie, published, 0) {
                        debug!(%error, "publishing the hand-over failed");
                        return Err(Abort(Termination::Internal));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing queued. While the verdict still holds bytes for us (counted
                    // but maybe not queued yet) keep listening for input; once caught up,
                    // every new byte is redirected and input events would only be noise.
                    let holding = self.traffic(from.cookie).held != from.forwarded;
                    self.set_wants(
                        from,
                        Wants {
                            input: holding,
                            ..from.wants
                        },
                    );
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    debug!(side = ?from.role, %error, "read failed");
                    return Err(Abort(from.role.reset()));
                }
            }
        }
    }

    /// Writes held bytes to the peer, waiting for room when its send buffer is full.
    async fn write_to_peer(&self, to: &mut Side, mut bytes: &[u8]) -> Result<(), Abort> {
        while !bytes.is_empty() {
            match to.stream.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.set_wants(
                        to,
                        Wants {
                            output: true,
                            ..to.wants
                        },
                    );
                    to.events.notified().await;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    debug!(side = ?to.role, %error, "write failed");
                    return Err(Abort(to.role.reset()));
                }
            }
        }
        if to.wants.output {
            self.set_wants(
                to,
                Wants {
                    output: false,
                    ..to.wants
                },
            );
        }
        Ok(())
    }

    fn set_wants(&self, side: &mut Side, wants: Wants) {
        if side.wants != wants
            && self
                .watcher
                .change(&side.stream, side.cookie, wants)
                .is_ok()
        {
            side.wants = wants;
        }
    }

    /// For a draining direction: forward the FIN once `to` has taken every byte.
    fn check_drained(&self, from: &mut Side, to: &Side) {
        let Direction::Draining { interval, .. } = from.state else {
            return;
        };
        from.redirected = self.traffic(from.cookie).redirected;
        let target = to.sent_before_pairing + from.relayed();
        let taken = sockopt::bytes_taken_for_sending(&to.stream).unwrap_or(u64::MAX);
        if taken >= target {
            let _ = to.stream.shutdown(Shutdown::Write);
            from.state = Direction::Done;
            debug!(
                from = ?from.role,
                bytes = from.relayed(),
                "direction drained, FIN forwarded"
            );
        } else {
            let interval = (interval * 2).min(DRAIN_POLL_MAX);
            from.state = Direction::Draining {
                next_check: Instant::now() + interval,
                interval,
            };
        }
    }

    fn traffic(&self, cookie: u64) -> Traffic {
        let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        traffic.get(&cookie, 0).unwrap_or_default()
    }

    /// The bytes the verdict redirected from the socket with this cookie.
    pub(super) fn redirected(&self, cookie: u64) -> u64 {
        self.traffic(cookie).redirected
    }

    /// Closes both sockets and deletes their map entries, after saving the kernel's final
    /// counts in `live`.
    fn unpair(&self, client: Side, server: Side, live: &LiveTraffic) {
        live.set_unpaired(
            self.redirected(client.cookie),
            self.redirected(server.cookie),
        );
        if client.forwarded + server.forwarded > 0 {
            debug!(
                held_in = client.forwarded,
                held_out = server.forwarded,
                "held bytes handed over by the daemon"
            );
        }
        for side in [&client, &server] {
            self.watcher.unwatch(&side.stream, side.cookie);
        }
        let cookies = [client.cookie, server.cookie];
        // Closing removes both sockets from the sockhash.
        drop(client);
        drop(server);
        self.forget(&cookies);
    }
}

/// A socket error (a reset) on a side whose direction no longer reads ends the connection:
/// the other direction could otherwise wait forever on a dead peer.
fn failed(side: &Side) -> Result<(), Abort> {
    match side.stream.take_error() {
        Ok(None) => Ok(()),
        error => {
            debug!(side = ?side.role, ?error, "socket error");
            Err(Abort(side.role.reset()))
        }
    }
}
