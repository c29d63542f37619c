//! One connection on the kernel relay: pair, hand over, tear down.
//!
//! Pairing inserts each socket into `mxlb_socks` under its cookie, with the *peer* as the
//! value; from then on the stream verdict moves the bytes. The daemon still watches both
//! sockets, for three reasons:
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

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::Duration;

use balancer_common::{Handover, Traffic};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::sockmap::KernelRelay;
use super::{Termination, Transfer};
use crate::sockopt;

/// Most bytes read from a socket's held queue in one go.
const HELD_CHUNK: usize = 64 * 1024;
/// How often a half-closed direction re-checks whether its bytes have left the relay.
const DRAIN_POLL_FIRST: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(100);

/// One side of a relayed connection, with what the daemon knows about it.
struct Side {
    stream: TcpStream,
    role: Role,
    cookie: u64,
    /// Bytes this socket had taken for sending before pairing (SYN, PROXY header).
    sent_before_pairing: u64,
    /// Held bytes read from this socket and written to the peer.
    forwarded: u64,
    /// Bytes the verdict redirected from this socket, as last read from `mxlb_traffic`.
    redirected: u64,
    state: Direction,
}

/// The direction that *starts* at a side: from its socket to the peer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Open,
    /// EOF seen; waiting until the peer has taken every byte before forwarding the FIN.
    Draining { next_check: Instant, interval: Duration },
    Done,
}

impl Side {
    fn new(stream: TcpStream, role: Role) -> io::Result<Side> {
        Ok(Side {
            role,
            cookie: sockopt::cookie(&stream)?,
            sent_before_pairing: sockopt::bytes_taken_for_sending(&stream)?,
            stream,
            forwarded: 0,
            redirected: 0,
            state: Direction::Open,
        })
    }

    /// Every byte that left this socket towards the peer, by either path.
    fn relayed(&self) -> u64 {
        self.redirected + self.forwarded
    }
}

/// The relay loop stops early with this termination.
struct Abort(Termination);

/// Which end of the connection a socket faces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Role {
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

impl KernelRelay {
    /// Relays one connection in the kernel until both directions are done or one side fails.
    pub async fn relay(&self, client: TcpStream, server: TcpStream) -> io::Result<Transfer> {
        let mut client = Side::new(client, Role::Client)?;
        let mut server = Side::new(server, Role::Server)?;
        if let Err(error) = self.pair(&client, &server) {
            // The kernel only takes established sockets: a server that closed right after
            // its banner (CLOSE_WAIT already) is refused. Such a connection is short by
            // definition; relay it in user space.
            self.forget(&client, &server);
            debug!("kernel relay refused the pair ({error:#}); relaying in user space");
            return Ok(super::userspace::relay(client.stream, server.stream).await);
        }
        let ended = self.run(&mut client, &mut server).await;
        Ok(self.unpair(client, server, ended))
    }

    /// Undoes a partial pairing: map entries go, the sockets stay open.
    fn forget(&self, client: &Side, server: &Side) {
        let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        for side in [client, server] {
            let _ = socks.remove(&side.cookie);
            let _ = traffic.remove(&side.cookie);
        }
    }

    fn pair(&self, client: &Side, server: &Side) -> anyhow::Result<()> {
        {
            let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
            for side in [client, server] {
                traffic.insert(side.cookie, Traffic::default(), 0)?;
            }
        }
        let mut socks = self.socks.lock().unwrap_or_else(|e| e.into_inner());
        // Entry keyed by the server first: it attaches the verdict to the client socket,
        // which speaks second in SMTP. Either order is safe (bytes without a peer are held),
        // this one just makes holding rare.
        socks.insert(server.cookie, client.stream.as_raw_fd(), 0)?;
        socks.insert(client.cookie, server.stream.as_raw_fd(), 0)?;
        Ok(())
    }

    async fn run(&self, client: &mut Side, server: &mut Side) -> Termination {
        loop {
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
            let result = tokio::select! {
                ready = client.stream.readable(), if client.state == Direction::Open => {
                    match ready {
                        Ok(()) => self.read_held(client, server).await,
                        Err(_) => Err(Abort(Termination::ClientReset)),
                    }
                }
                ready = server.stream.readable(), if server.state == Direction::Open => {
                    match ready {
                        Ok(()) => self.read_held(server, client).await,
                        Err(_) => Err(Abort(Termination::ServerReset)),
                    }
                }
                () = sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                    self.check_drained(client, server);
                    self.check_drained(server, client);
                    Ok(())
                }
            };
            if let Err(Abort(termination)) = result {
                return termination;
            }
        }
    }

    /// Reads what the verdict held on `from`, writes it to `to`, and notices EOF.
    async fn read_held(&self, from: &mut Side, to: &mut Side) -> Result<(), Abort> {
        use tokio::io::AsyncWriteExt;
        let mut buffer = vec![0; HELD_CHUNK];
        loop {
            match from.stream.try_read(&mut buffer) {
                Ok(0) => {
                    from.state = Direction::Draining {
                        next_check: Instant::now(),
                        interval: DRAIN_POLL_FIRST,
                    };
                    self.check_drained(from, to);
                    return Ok(());
                }
                Ok(n) => {
                    if to.stream.write_all(&buffer[..n]).await.is_err() {
                        return Err(Abort(to.role.reset()));
                    }
                    from.forwarded += n as u64;
                    let published = Handover {
                        forwarded: from.forwarded,
                    };
                    let mut handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(error) = handover.insert(from.cookie, published, 0) {
                        debug!(%error, "publishing the hand-over failed");
                        return Err(Abort(Termination::Internal));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Abort(from.role.reset())),
            }
        }
    }

    /// For a draining direction: forward the FIN once `to` has taken every byte.
    fn check_drained(&self, from: &mut Side, to: &Side) {
        let Direction::Draining { interval, .. } = from.state else {
            return;
        };
        from.redirected = self.redirected(from.cookie);
        let target = to.sent_before_pairing + from.relayed();
        let taken = sockopt::bytes_taken_for_sending(&to.stream).unwrap_or(u64::MAX);
        debug!(
            from = ?from.role,
            redirected = from.redirected,
            forwarded = from.forwarded,
            target,
            taken,
            "checking whether a half-closed direction has drained"
        );
        if taken >= target {
            let _ = socket2::SockRef::from(&to.stream).shutdown(Shutdown::Write);
            from.state = Direction::Done;
            debug!(cookie = from.cookie, bytes = from.relayed(), "direction drained, FIN forwarded");
        } else {
            let interval = (interval * 2).min(DRAIN_POLL_MAX);
            from.state = Direction::Draining {
                next_check: Instant::now() + interval,
                interval,
            };
        }
    }

    fn redirected(&self, cookie: u64) -> u64 {
        let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        traffic.get(&cookie, 0).map_or(0, |t| t.redirected)
    }

    fn unpair(&self, mut client: Side, mut server: Side, ended: Termination) -> Transfer {
        client.redirected = self.redirected(client.cookie);
        server.redirected = self.redirected(server.cookie);
        let transfer = Transfer {
            bytes_in: client.relayed(),
            bytes_out: server.relayed(),
            ended,
        };
        let cookies = [client.cookie, server.cookie];
        // Closing removes both sockets from the sockhash.
        drop(client);
        drop(server);
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        let mut handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in cookies {
            let _ = traffic.remove(&cookie);
            let _ = handover.remove(&cookie);
        }
        transfer
    }
}
