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
const HELD_CHUNK: usize = 256 * 1024;
/// How often a direction that waits on its peer (to forward a FIN, or to write held bytes
/// behind redirected ones) looks again: starting fast, backing off.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(100);

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
    Draining,
    Done,
}

/// A wait on the peer, re-checked at `at`, backing off.
#[derive(Clone, Copy, Debug)]
struct Poll {
    at: Instant,
    interval: Duration,
}

impl Poll {
    fn first() -> Poll {
        Poll {
            at: Instant::now() + POLL_FIRST,
            interval: POLL_FIRST,
        }
    }

    fn next(self) -> Poll {
        let interval = (self.interval * 2).min(POLL_MAX);
        Poll {
            at: Instant::now() + interval,
            interval,
        }
    }
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
    /// Whether the verdict was told to hold this direction (peer too far behind).
    paused: bool,
    /// Held bytes read but not yet written to the peer (its send buffer was full).
    pending: Vec<u8>,
    state: Direction,
    /// Set while this direction waits on the peer.
    poll: Option<Poll>,
    /// What the watcher currently wakes us for on this socket.
    wants: Wants,
    events: Arc<Notify>,
}

impl Side {
    /// Every byte that left this socket towards the peer, by either path (pending bytes
    /// excluded: they have not left yet).
    fn relayed(&self) -> u64 {
        self.redirected + self.forwarded
    }

    fn wait_on_peer(&mut self) {
        self.poll = Some(self.poll.map_or_else(Poll::first, Poll::next));
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
        timeout_idle: Duration,
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
            return Ok(super::userspace::relay(client, server, live, timeout_idle).await);
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
        let ended = self.run(&mut client, &mut server, live, timeout_idle).await;
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
            paused: false,
            pending: Vec::new(),
            state: Direction::Open,
            poll: None,
            wants,
            events,
        })
    }

    async fn run(
        &self,
        client: &mut Side,
        server: &mut Side,
        live: &LiveTraffic,
        timeout_idle: Duration,
    ) -> Termination {
        let mut idle = IdleWatch::new(timeout_idle);
        loop {
            // Make all the progress possible without waiting, then sleep until an event.
            if let Err(Abort(termination)) = self.step(client, server, live) {
                return termination;
            }
            if let Err(Abort(termination)) = self.step(server, client, live) {
                return termination;
            }
            if client.state == Direction::Done && server.state == Direction::Done {
                return Termination::Closed;
            }
            let moved = self.traffic(client.cookie).redirected
                + self.traffic(server.cookie).redirected
                + client.forwarded
                + server.forwarded;
            if idle.expired(moved) {
                return Termination::IdleTimeout;
            }
            let wake_at = [client.poll, server.poll]
                .into_iter()
                .flatten()
                .map(|poll| poll.at)
                .chain([idle.deadline()])
                .min()
                .unwrap_or_else(|| idle.deadline());
            tokio::select! {
                () = client.events.notified() => {}
                () = server.events.notified() => {}
                () = sleep_until(wake_at) => {}
            }
        }
    }

    /// Advances the direction from `from` to `to` as far as it goes without waiting.
    fn step(&self, from: &mut Side, to: &mut Side, live: &LiveTraffic) -> Result<(), Abort> {
        let due = from.poll.is_none_or(|poll| poll.at <= Instant::now());
        match from.state {
            Direction::Open if due => self.forward(from, to, live)?,
            Direction::Draining if due => self.check_drained(from, to),
            _ => {}
        }
        failed(from)
    }

    /// The daemon's part of one direction: keep the peer from falling too far behind,
    /// move held bytes, notice EOF.
    fn forward(&self, from: &mut Side, to: &mut Side, live: &LiveTraffic) -> Result<(), Abort> {
        let traffic = self.traffic(from.cookie);
        from.redirected = traffic.redirected;
        let held_outstanding = traffic.held > from.forwarded;
        let bounded = self.pause_at != u64::MAX;
        // Where the peer stands costs two syscalls: only ask when it can matter.
        if bounded || from.paused || held_outstanding {
            let behind = self.peer_behind(from, to);
            if bounded && !from.paused && behind > self.pause_at {
                // The redirect path has no backpressure: stop it before the peer's queue
                // grows past max_inflight. From here the verdict holds, the sender's window
                // closes.
                self.publish(from, true)?;
                debug!(side = ?from.role, behind, "peer behind: holding this direction");
            }
            if behind > 0 && (from.paused || held_outstanding) {
                // Held bytes may only follow once every redirected byte is in the peer's
                // socket, or they would overtake them.
                from.wait_on_peer();
                return Ok(());
            }
        }
        self.flush_pending(from, to)?;
        if !from.pending.is_empty() {
            return Ok(());
        }
        self.read_held(from, to, live)
    }

    /// How many bytes of this direction the relay has handed on that `to` has not taken
    /// into its own socket yet (they wait in the kernel relay's queue).
    fn peer_behind(&self, from: &Side, to: &Side) -> u64 {
        let taken = sockopt::bytes_taken_for_sending(&to.stream)
            .unwrap_or(u64::MAX)
            .saturating_sub(to.sent_before_pairing);
        from.relayed().saturating_sub(taken)
    }

    /// Reads held bytes from `from` and writes them to `to` until nothing is held, the peer
    /// is full, or EOF.
    fn read_held(&self, from: &mut Side, to: &mut Side, live: &LiveTraffic) -> Result<(), Abort> {
        let mut buffer = vec![0; HELD_CHUNK];
        loop {
            let read = from.stream.read(&mut buffer);
            tracing::trace!(side = ?from.role, ?read, "read");
            match read {
                Ok(0)
                    if self.traffic(from.cookie).held
                        > from.forwarded + from.pending.len() as u64 =>
                {
                    // The kernel reports EOF as soon as its message queue is momentarily
                    // empty, even with held bytes still on their way into it: not yet.
                    from.wait_on_peer();
                    return Ok(());
                }
                Ok(0) => {
                    self.set_wants(from, Wants::default());
                    from.state = Direction::Draining;
                    self.check_drained(from, to);
                    return Ok(());
                }
                Ok(n) => {
                    match from.role {
                        Role::Client => live.add_daemon_in(n as u64),
                        Role::Server => live.add_daemon_out(n as u64),
                    }
                    from.pending.extend_from_slice(&buffer[..n]);
                    self.flush_pending(from, to)?;
                    if !from.pending.is_empty() {
                        return Ok(());
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing queued. While the verdict holds for us (paused, or bytes
                    // counted but maybe not queued yet) keep listening for input; once
                    // caught up, resume the kernel path and stop listening.
                    let caught_up = self.traffic(from.cookie).held == from.forwarded;
                    // A paused direction stays with the daemon for the rest of the
                    // connection: resuming the kernel path lets the verdict redirect and
                    // hold in quick alternation, and on 6.18 that alternation can leave
                    // held bytes stuck in the socket's psock backlog (seen in the memory
                    // tests: a full receive buffer nobody can read). See
                    // docs/architecture.md, "Bounded memory".
                    let input = !caught_up || from.paused;
                    self.set_wants(
                        from,
                        Wants {
                            input,
                            ..from.wants
                        },
                    );
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    debug!(side = ?from.role, %error, "read failed");
                    return Err(Abort(from.role.reset()));
                }
            }
        }
    }

    /// Writes pending held bytes to the peer as far as its send buffer takes them, and
    /// publishes what was forwarded. A full peer is waited for through `EPOLLOUT`, never
    /// by blocking the other direction.
    fn flush_pending(&self, from: &mut Side, to: &mut Side) -> Result<(), Abort> {
        let mut written = 0;
        while written < from.pending.len() {
            match to.stream.write(&from.pending[written..]) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    debug!(side = ?to.role, %error, "write failed");
                    return Err(Abort(to.role.reset()));
                }
            }
        }
        if written > 0 {
            // Progress: waits on the peer start over from the shortest interval.
            from.poll = None;
            from.pending.drain(..written);
            from.forwarded += written as u64;
            self.publish(from, from.paused)?;
        }
        let output = !from.pending.is_empty();
        self.set_wants(to, Wants { output, ..to.wants });
        Ok(())
    }

    /// Tells the verdict how many held bytes of `side` are forwarded, and whether to hold.
    fn publish(&self, side: &mut Side, paused: bool) -> Result<(), Abort> {
        let published = Handover {
            forwarded: side.forwarded,
            paused: u64::from(paused),
        };
        let mut handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = handover.insert(side.cookie, published, 0) {
            debug!(%error, "publishing the hand-over failed");
            return Err(Abort(Termination::Internal));
        }
        side.paused = paused;
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
        from.redirected = self.traffic(from.cookie).redirected;
        if from.pending.is_empty() && self.peer_behind(from, to) == 0 {
            let _ = to.stream.shutdown(Shutdown::Write);
            from.state = Direction::Done;
            from.poll = None;
            debug!(
                from = ?from.role,
                bytes = from.relayed(),
                "direction drained, FIN forwarded"
            );
        } else {
            from.wait_on_peer();
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

/// The idle timeout of a kernel-relayed connection. The daemon does not see the bytes, so it
/// compares the kernel's counters when the deadline comes: moved since last time means
/// active, and the deadline moves on.
struct IdleWatch {
    timeout: Duration,
    deadline: Instant,
    moved: u64,
}

impl IdleWatch {
    fn new(timeout: Duration) -> IdleWatch {
        IdleWatch {
            timeout,
            deadline: Instant::now() + timeout,
            moved: 0,
        }
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `moved`: every byte relayed so far, both directions, both paths.
    fn expired(&mut self, moved: u64) -> bool {
        if moved != self.moved {
            self.moved = moved;
            self.deadline = Instant::now() + self.timeout;
            return false;
        }
        Instant::now() >= self.deadline
    }
}
