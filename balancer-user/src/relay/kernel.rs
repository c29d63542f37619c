//! One connection on the kernel relay: pair, pause, resume, tear down.
//!
//! **Pairing** registers each socket as the other's peer in `mxlb_peers`, then attaches the
//! verdict to both by inserting them into `mxlb_socks` (server first), then runs the verdict
//! once over whatever each socket already queued (see [`sockopt::run_receive_path`]). From
//! then on the verdict moves every byte and the daemon sleeps; it watches both sockets
//! (through [`Watcher`], which does not wake it per redirected chunk) for:
//!
//! - **The bound** (`global.max_inflight`). Redirected bytes wait on the peer's psock queue,
//!   which nothing bounds. The verdict reports each step of bytes a socket redirects; when
//!   a peer has fallen more than the bound behind (relayed − taken into its socket), the
//!   daemon *holds* that direction: it sets `hold` in the socket's `mxlb_control` entry, and
//!   the verdict keeps the socket's new bytes in the socket itself (`SK_PASS`, charged to
//!   its receive buffer, so TCP closes the window and the sender waits). Once the peer has
//!   taken every redirected byte, the daemon reads the held bytes and writes them to the
//!   peer itself, with ordinary backpressure; when it has caught up it releases the hold,
//!   and the verdict redirects again as soon as every held byte has been relayed — the
//!   `released` count it compares with its own `held`, so no redirected byte overtakes a
//!   held one. The sockets never leave the maps while bytes can arrive: removing a socket
//!   from `mxlb_socks` races with a verdict run on another CPU, which then drops what it
//!   read (docs/architecture.md, "Hand-overs").
//! - **Half-close.** The kernel does not forward FIN. On EOF from one side the daemon waits
//!   until the peer socket has taken every byte of that direction (acked + send queue
//!   reaches what was relayed), then shuts the peer's write side. Shutting it at once
//!   loses the bytes still queued in the relay.
//! - **Teardown.** When both directions are done, or either side fails (reset), the daemon
//!   deletes the map entries (reading the final byte counts first), balances the ledger
//!   and closes both sockets.
//!
//! The kernel only takes established sockets. A pair it refuses (a server that closed right
//! after its banner) is relayed in user space; nothing was attached, so nothing moved.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use balancer_common::{Control, Traffic, UNTRIMMABLE};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::ledger::{self, Ledger, Moment};
use super::sockmap::KernelRelay;
use super::watch::Wants;
use super::{LiveTraffic, Termination};
use crate::sockopt;

/// How often a direction that waits on its peer (to forward a FIN, or to drain before the
/// connection leaves the kernel) looks again: starting fast, backing off.
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
    /// Bytes the verdict redirected from this socket, as last read from `mxlb_traffic`.
    redirected: u64,
    /// In `mxlb_socks`: the verdict relays what this socket receives.
    attached: bool,
    /// `hold` is set in this socket's `mxlb_control` entry.
    holding: bool,
    /// Held bytes the daemon read from this socket and wrote to the peer, in full.
    written: u64,
    /// Held bytes read from this socket and not yet written to the peer.
    pending: Vec<u8>,
    state: Direction,
    /// Set while this direction waits on the peer.
    poll: Option<Poll>,
    /// What the watcher currently wakes us for on this socket.
    wants: Wants,
    events: Arc<Notify>,
}

impl Side {
    fn wait_on_peer(&mut self) {
        self.poll = Some(self.poll.map_or_else(Poll::first, Poll::next));
    }
}

/// The relay loop stops early with this termination.
struct Abort(Termination);

/// How the kernel part of a connection ended.
pub(super) enum Outcome {
    /// The connection is over (and its ledger balanced); both sockets are closed.
    Ended(Termination),
    /// The kernel refused the pair before anything moved: relay the whole rest in user
    /// space (trying again would only be refused again).
    Refused(tokio::net::TcpStream, tokio::net::TcpStream),
}

/// What [`KernelRelay::peer_behind`] says when the peer's counters could not be read
/// steadily: behind, so nothing that waits for a drained peer goes ahead.
const UNKNOWN: u64 = u64::MAX;

/// The least [`KernelRelay::check_stuck`] tolerates: a busy psock backlog worker is
/// normally behind by a few MiB, which is not the unbounded case it guards against.
const STUCK_LIMIT: u64 = 64 << 20;

/// How many held bytes the daemon reads at a time.
const HELD_CHUNK: usize = 64 * 1024;

impl KernelRelay {
    /// The current `kernel_relay_after`.
    pub(super) fn relay_after(&self) -> u64 {
        self.relay_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Relays one connection in the kernel until both directions are done, one side fails,
    /// or a peer falls `max_inflight` behind (then both sockets come back for user space).
    pub(super) async fn relay(
        &self,
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        live: &LiveTraffic,
        timeout_idle: Duration,
        ledger: &Ledger,
    ) -> io::Result<Outcome> {
        let (client_cookie, server_cookie) = (sockopt::cookie(&client)?, sockopt::cookie(&server)?);
        // Measured before pairing: from the insert on, the kernel may send into them.
        let client_sent = sockopt::bytes_taken_for_sending(&client)?;
        let server_sent = sockopt::bytes_taken_for_sending(&server)?;
        let registered = self
            .start_counting(&[client_cookie, server_cookie])
            .and_then(|()| self.register_peers(&client, client_cookie, &server, server_cookie));
        if let Err(error) = registered {
            // Nothing is attached yet, so nothing moved: a server that closed right after
            // its banner (CLOSE_WAIT already) is refused. Such a connection is short by
            // definition; relay it in user space.
            self.forget(
                &[client_cookie, server_cookie],
                &[client.as_fd(), server.as_fd()],
            );
            debug!("kernel relay refused the pair ({error:#}); relaying in user space");
            return Ok(Outcome::Refused(client, server));
        }
        if let Some(delay) = self.fault_pairing_delay {
            tokio::time::sleep(delay).await;
        }
        let sides = self
            .side(client, Role::Client, client_cookie, client_sent)
            .and_then(
                |client| match self.side(server, Role::Server, server_cookie, server_sent) {
                    Ok(server) => Ok((client, server)),
                    Err(error) => {
                        self.watcher.unwatch(&client.stream, client.cookie);
                        Err(error)
                    }
                },
            );
        let (mut client, mut server) = match sides {
            Ok(sides) => sides,
            Err(error) => {
                // The sockets are gone with the error; their entries must not stay behind.
                self.forget(&[client_cookie, server_cookie], &[]);
                return Err(error);
            }
        };
        live.set_paired(client_cookie, server_cookie);
        // The server first: if the kernel refuses it (it closed right after its banner),
        // nothing is attached yet and the pair can go to user space whole. A client the
        // kernel refuses after that has closed before the banner reached it.
        if let Err(error) = self.attach(&mut server) {
            debug!("kernel relay refused the server socket ({error:#}); relaying in user space");
            self.release(&client, &server, live);
            let client = tokio::net::TcpStream::from_std(client.stream)?;
            let server = tokio::net::TcpStream::from_std(server.stream)?;
            return Ok(Outcome::Refused(client, server));
        }
        if let Err(error) = self.attach(&mut client) {
            // The client closed (or half-closed) before its socket got the verdict: what it
            // sent waits whole in its receive queue, and the daemon relays it, as it does a
            // held direction. The server's bytes still go by the kernel.
            debug!("kernel relay refused the client socket ({error:#}); relaying its bytes");
        }
        let ended = self
            .run(&mut client, &mut server, live, timeout_idle, ledger)
            .await;
        if matches!(
            ended,
            Termination::ClientReset | Termination::ServerReset | Termination::Internal
        ) {
            // Bytes may be left in the relay's queues: the peers must not take the close for
            // an orderly end of the stream.
            let _ = sockopt::reset_on_close(&client.stream);
            let _ = sockopt::reset_on_close(&server.stream);
        }
        // Out of every map (psocks gone, SIOCINQ counts the TCP queue again), then balanced.
        self.release(&client, &server, live);
        let relayed = live.relayed(None);
        let checked = match ended {
            Termination::Closed => {
                ledger.balance(&client.stream, &server.stream, relayed, Moment::End)
            }
            // Reported already, once.
            Termination::IntegrityError => Ok(()),
            _ => ledger.bounds(&client.stream, &server.stream, || relayed),
        };
        if let Err(violation) = checked {
            ledger::report(&violation, &client.stream, &server.stream);
            return Ok(Outcome::Ended(Termination::IntegrityError));
        }
        Ok(Outcome::Ended(ended))
    }

    /// Zeroed `mxlb_traffic` entries, so the verdict counts from the very first byte.
    fn start_counting(&self, cookies: &[u64]) -> anyhow::Result<()> {
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            traffic.insert(cookie, Traffic::default(), 0)?;
        }
        Ok(())
    }

    /// Makes each socket the other's redirect target. Undone in full if either is refused.
    fn register_peers(
        &self,
        client: &impl AsRawFd,
        client_cookie: u64,
        server: &impl AsRawFd,
        server_cookie: u64,
    ) -> anyhow::Result<()> {
        let mut peers = self.lock_peers();
        peers.insert(server_cookie, client.as_raw_fd(), 0)?;
        if let Err(error) = peers.insert(client_cookie, server.as_raw_fd(), 0) {
            let _ = peers.remove(&server_cookie);
            return Err(error.into());
        }
        Ok(())
    }

    /// Puts the verdict on `side`'s receive path and runs it over what is already queued.
    fn attach(&self, side: &mut Side) -> anyhow::Result<()> {
        self.lock_socks()
            .insert(side.cookie, side.stream.as_raw_fd(), 0)?;
        side.attached = true;
        // What the first run moves is what had queued up (SIOCINQ cannot tell: on a socket
        // in a sockmap it counts only the psock's own queue). Two map reads, so debug only.
        let before = tracing::enabled!(tracing::Level::DEBUG).then(|| self.redirected(side.cookie));
        sockopt::run_receive_path(&side.stream)?;
        if let Some(before) = before {
            let queued = self.redirected(side.cookie) - before;
            if queued > 0 {
                debug!(side = ?side.role, queued, "verdict run over bytes queued before it was attached");
            }
        }
        Ok(())
    }

    fn lock_socks(
        &self,
    ) -> std::sync::MutexGuard<'_, aya::maps::SockHash<aya::maps::MapData, u64>> {
        self.socks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_peers(
        &self,
    ) -> std::sync::MutexGuard<'_, aya::maps::SockHash<aya::maps::MapData, u64>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the map entries of these sockets (the sockets stay open).
    fn forget(&self, cookies: &[u64], sockets: &[BorrowedFd<'_>]) {
        // Verdicts off first. Removing a socket from `mxlb_socks` does not wait for a verdict
        // run in progress on another CPU, so each socket's lock is taken once (which waits
        // it out) before the entries that run may still use go: the redirect targets, the
        // counters, the daemon's word.
        {
            let mut socks = self.lock_socks();
            for cookie in cookies {
                let _ = socks.remove(cookie);
            }
        }
        for socket in sockets {
            let _ = sockopt::run_receive_path(socket);
        }
        let mut peers = self.lock_peers();
        for cookie in cookies {
            let _ = peers.remove(cookie);
        }
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            let _ = traffic.remove(cookie);
        }
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            // Gone with the connection: the map has room for the sockets open now only.
            let _ = control.remove(cookie);
        }
    }

    /// Moves a socket from tokio's reactor to the relay's watcher.
    fn side(
        &self,
        stream: tokio::net::TcpStream,
        role: Role,
        cookie: u64,
        sent_before_pairing: u64,
    ) -> io::Result<Side> {
        // Leaving tokio's reactor stops the per-chunk wake-ups; the socket stays nonblocking.
        let stream = stream.into_std()?;
        let wants = Wants::default();
        let events = self.watcher.watch(&stream, cookie, wants)?;
        Ok(Side {
            sent_before_pairing,
            stream,
            role,
            cookie,
            redirected: 0,
            attached: false,
            holding: false,
            written: 0,
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
        ledger: &Ledger,
    ) -> Termination {
        let mut idle = IdleWatch::new(timeout_idle);
        loop {
            // Make all the progress possible without waiting, then sleep until an event.
            let progress = self
                .hold_if_behind(client, server)
                .and_then(|()| self.hold_if_behind(server, client))
                .and_then(|()| self.step(client, server, live))
                .and_then(|()| self.step(server, client, live))
                .and_then(|()| failed(client))
                .and_then(|()| failed(server));
            if let Err(Abort(termination)) = progress {
                return termination;
            }
            // A chunk that began with bytes delivered before, which the verdict could not
            // cut off: it dropped the chunk, so the stream has a hole. Checked before a
            // clean end can be declared.
            for (side, direction) in [(&*client, "client->server"), (&*server, "server->client")] {
                if self.traffic(side.cookie).flags & UNTRIMMABLE != 0 {
                    ledger::report_untrimmable(direction, &client.stream, &server.stream);
                    return Termination::IntegrityError;
                }
            }
            if client.state == Direction::Done && server.state == Direction::Done {
                return Termination::Closed;
            }
            // The bounds, on every wake: a duplicate caught here resets both sides before
            // the server can answer for an altered message.
            if let Err(violation) =
                ledger.bounds(&client.stream, &server.stream, || live.relayed(Some(self)))
            {
                ledger::report(&violation, &client.stream, &server.stream);
                return Termination::IntegrityError;
            }
            // Progress is what moved either way and what the peers took: a slow receiver
            // draining the relay's queue is not idle.
            let moved = self.redirected(client.cookie)
                + self.redirected(server.cookie)
                + client.written
                + server.written
                + sockopt::bytes_taken_for_sending(&client.stream).unwrap_or(0)
                + sockopt::bytes_taken_for_sending(&server.stream).unwrap_or(0);
            if idle.expired(moved) {
                return Termination::IdleTimeout;
            }
            self.update_wants(client, server);
            self.update_wants(server, client);
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
        if self.relays_held(from) {
            return self.relay_held(from, to, live);
        }
        let due = from.poll.is_none_or(|poll| poll.at <= Instant::now());
        match from.state {
            Direction::Open => self.check_eof(from, to),
            Direction::Draining if due => self.check_drained(from, to),
            _ => Ok(()),
        }
    }

    /// Whether the daemon relays `side`'s bytes itself: the direction is held, the verdict
    /// held bytes the daemon has not relayed yet, or the kernel refused the socket.
    fn relays_held(&self, side: &Side) -> bool {
        !side.attached
            || side.holding
            || !side.pending.is_empty()
            || self.traffic(side.cookie).held != side.written
    }

    /// Holds the direction from `from` once `to` has fallen more than `max_inflight` behind.
    fn hold_if_behind(&self, from: &mut Side, to: &Side) -> Result<(), Abort> {
        if self.pause_at == u64::MAX || from.state != Direction::Open || from.holding {
            return Ok(());
        }
        from.redirected = self.redirected(from.cookie);
        let behind = self.peer_behind(from, to)?;
        if behind > self.pause_at && behind != UNKNOWN {
            debug!(side = ?from.role, behind, "peer behind: holding the direction");
            if self.set_control(from, true).is_err() {
                // No room in mxlb_control: the bound is not kept for this connection, but
                // no byte is at stake.
                return Ok(());
            }
            // Waits out a verdict run in progress: from here on, new bytes are held.
            let _ = sockopt::run_receive_path(&from.stream);
        }
        Ok(())
    }

    /// Writes `from`'s hold and relayed count to its `mxlb_control` entry.
    fn set_control(&self, from: &mut Side, hold: bool) -> Result<(), Abort> {
        let control = Control {
            hold: u64::from(hold),
            released: from.written,
        };
        let mut map = self.control.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = map.insert(from.cookie, control, 0) {
            debug!(side = ?from.role, %error, "cannot write mxlb_control");
            return Err(Abort(Termination::Internal));
        }
        from.holding = hold;
        Ok(())
    }

    /// Relays what the verdict held in `from`: once `to` has taken every redirected byte
    /// (writing earlier would overtake them), reads the held bytes and writes them to `to`
    /// as far as it takes them; caught up, releases the hold.
    fn relay_held(&self, from: &mut Side, to: &mut Side, live: &LiveTraffic) -> Result<(), Abort> {
        from.redirected = self.redirected(from.cookie);
        if self.peer_behind(from, to)? > 0 {
            from.wait_on_peer();
            return Ok(());
        }
        from.poll = None;
        loop {
            while !from.pending.is_empty() {
                match (&to.stream).write(&from.pending) {
                    Ok(n) => {
                        from.pending.drain(..n);
                        from.written += n as u64;
                        match from.role {
                            Role::Client => live.add_daemon_in(n as u64),
                            Role::Server => live.add_daemon_out(n as u64),
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(Abort(to.role.reset())),
                }
            }
            if from.state != Direction::Open {
                break;
            }
            let mut chunk = vec![0; HELD_CHUNK];
            match (&from.stream).read(&mut chunk) {
                Ok(0) if from.attached && self.traffic(from.cookie).held != from.written => {
                    // Not the end: a held chunk can wait on the socket's psock backlog
                    // (behind bytes redirected *to* this socket) while the FIN that came
                    // after it already makes reads return 0. It comes when the backlog
                    // gets to it.
                    from.wait_on_peer();
                    break;
                }
                Ok(0) => {
                    // EOF after the held bytes: forward it once `to` has taken them all.
                    from.state = Direction::Draining;
                    break;
                }
                Ok(n) => {
                    chunk.truncate(n);
                    from.pending = chunk;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.check_stuck(from)?;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Abort(from.role.reset())),
            }
        }
        // Caught up: every byte read is written. The verdict redirects again once its held
        // count equals what was written (anything held meanwhile is read on the next wake).
        if from.state == Direction::Open && from.attached {
            self.set_control(from, false)?;
            return Ok(());
        }
        if from.state == Direction::Draining {
            return self.check_drained(from, to);
        }
        Ok(())
    }

    /// Held bytes the daemon cannot read yet wait on the socket's psock backlog behind bytes
    /// redirected *to* it, and there the kernel charges them to nothing (the window stays
    /// open). They come out when this socket's peer reads what is ahead of them; a peer
    /// that sends without reading could otherwise pile up memory without bound, so past
    /// the bound the connection ends.
    fn check_stuck(&self, from: &Side) -> Result<(), Abort> {
        let held = self.traffic(from.cookie).held;
        // SIOCINQ on a paired socket counts the psock's readable queue only.
        let readable = sockopt::unread(&from.stream).unwrap_or(0);
        let stuck = held.saturating_sub(from.written + from.pending.len() as u64 + readable);
        if self.pause_at != u64::MAX && stuck > STUCK_LIMIT.max(16 * self.pause_at) {
            debug!(side = ?from.role, stuck, "held bytes stuck behind the other direction");
            return Err(Abort(Termination::Internal));
        }
        Ok(())
    }

    /// Asks the watcher for what `side` waits on: its held bytes to read, and room to
    /// write while the other direction waits for it to drain or holds bytes for it.
    fn update_wants(&self, side: &mut Side, other: &Side) {
        let wants = Wants {
            input: side.state == Direction::Open && self.relays_held(side),
            output: other.state == Direction::Draining
                || (other.state == Direction::Open && (other.holding || !other.pending.is_empty())),
        };
        self.set_wants(side, wants);
    }

    /// Looks for EOF on an attached socket. The verdict leaves nothing to read there, so a
    /// peek only ever reports EOF, or bytes the verdict could not redirect because the peer
    /// is gone. A peek, not a read: a read that took a byte of a segment the verdict has
    /// not seen yet would make the verdict relay that byte twice.
    fn check_eof(&self, from: &mut Side, to: &mut Side) -> Result<(), Abort> {
        if !from.attached {
            return Ok(());
        }
        let mut byte = [0u8; 1];
        match from.stream.peek(&mut byte) {
            Ok(0) => {
                from.state = Direction::Draining;
                self.check_drained(from, to)
            }
            Ok(_) if self.traffic(from.cookie).passed == 0 => {
                // Queued, not yet seen by the verdict (it failed to take it, or is about
                // to): run it again rather than take it for an orphan.
                let _ = sockopt::run_receive_path(&from.stream);
                from.wait_on_peer();
                Ok(())
            }
            Ok(_) => {
                debug!(side = ?from.role, "bytes without a peer: the peer is gone");
                Err(Abort(to.role.reset()))
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(error) => {
                debug!(side = ?from.role, %error, "read failed");
                Err(Abort(from.role.reset()))
            }
        }
    }

    /// How many bytes of this direction the relay passed on (redirected by the kernel,
    /// written by the daemon) that `to` has not taken into its own socket yet (they wait in
    /// the kernel relay's queue). A socket whose
    /// counters cannot be read is not taken for drained: that would let a FIN or a
    /// withdrawal overtake queued bytes. The connection ends instead.
    fn peer_behind(&self, from: &Side, to: &Side) -> Result<u64, Abort> {
        let taken = match sockopt::bytes_taken_for_sending(&to.stream) {
            Ok(taken) => taken.saturating_sub(to.sent_before_pairing),
            // Counters moving too fast to read: not drained as far as anyone can tell.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(UNKNOWN),
            Err(error) => {
                debug!(side = ?to.role, %error, "cannot read the socket's counters");
                return Err(Abort(Termination::Internal));
            }
        };
        Ok((from.redirected + from.written).saturating_sub(taken))
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
    fn check_drained(&self, from: &mut Side, to: &Side) -> Result<(), Abort> {
        from.redirected = self.redirected(from.cookie);
        if self.peer_behind(from, to)? == 0 {
            let _ = to.stream.shutdown(Shutdown::Write);
            from.state = Direction::Done;
            from.poll = None;
            debug!(
                from = ?from.role,
                bytes = from.redirected,
                "direction drained, FIN forwarded"
            );
        } else {
            from.wait_on_peer();
        }
        Ok(())
    }

    fn traffic(&self, cookie: u64) -> Traffic {
        let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        traffic.get(&cookie, 0).unwrap_or_default()
    }

    /// The bytes the verdict redirected from the socket with this cookie.
    pub(super) fn redirected(&self, cookie: u64) -> u64 {
        self.traffic(cookie).redirected
    }

    /// Saves the kernel's final counts in `live`, stops watching both sockets and deletes
    /// their map entries; the sockets stay open.
    fn release(&self, client: &Side, server: &Side, live: &LiveTraffic) {
        let (client_traffic, server_traffic) =
            (self.traffic(client.cookie), self.traffic(server.cookie));
        let (from_client, from_server) = (client_traffic.passed, server_traffic.passed);
        if from_client + from_server > 0 {
            debug!(
                from_client,
                from_server, "bytes arrived after their peer was gone"
            );
        }
        let (trimmed_client, trimmed_server) = (client_traffic.trimmed, server_traffic.trimmed);
        if trimmed_client + trimmed_server > 0 {
            debug!(
                trimmed_client,
                trimmed_server, "retransmitted bytes handed to the verdict again were cut off"
            );
        }
        live.set_unpaired(
            self.redirected(client.cookie),
            self.redirected(server.cookie),
        );
        for side in [client, server] {
            self.watcher.unwatch(&side.stream, side.cookie);
        }
        self.forget(
            &[client.cookie, server.cookie],
            &[client.stream.as_fd(), server.stream.as_fd()],
        );
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
