//! The user-space relay: a copy loop per direction, for machines without the kernel relay,
//! for the first bytes of an adaptive connection, and for connections that left the kernel.
//!
//! Half-close is forwarded (EOF on one side shuts the other side's write half once every
//! byte is written), as the kernel relay does; a reset on either side closes both at once;
//! no byte moving in either direction for `timeout_idle` closes both.
//!
//! An idle connection holds no buffer: a chunk is read into the thread's one scratch buffer
//! and written on at once, without waiting in between. Only what the peer's socket cannot
//! take right away is copied out to wait (ordinary backpressure, rare for SMTP).

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{LiveTraffic, Termination};

const BUFFER: usize = 16 * 1024;

thread_local! {
    /// One read buffer per runtime thread, borrowed only between two awaits.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; BUFFER]);
}

/// What one [`forward`] did.
enum Forwarded {
    /// Nothing to read after all (readiness was stale).
    Nothing,
    Eof,
    /// Bytes read; `rest` is the part the peer did not take yet.
    Chunk {
        read: usize,
        rest: Vec<u8>,
    },
}

/// Reads what `from` has queued, without waiting, and writes it to `to` as far as `to`
/// takes it without waiting, reporting what it wrote to `relayed`.
fn forward(
    from: &TcpStream,
    to: &TcpStream,
    relayed: &impl Fn(&[u8]),
) -> Result<Forwarded, Failed> {
    SCRATCH.with_borrow_mut(|buffer| forward_through(buffer, from, to, relayed))
}

/// [`forward`] through a buffer of the caller's.
fn forward_through(
    buffer: &mut [u8],
    from: &TcpStream,
    to: &TcpStream,
    relayed: &impl Fn(&[u8]),
) -> Result<Forwarded, Failed> {
    {
        let read = match from.try_read(buffer) {
            Ok(0) => return Ok(Forwarded::Eof),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Forwarded::Nothing);
            }
            Err(_) => return Err(Failed::Reader),
        };
        let mut written = 0;
        while written < read {
            match to.try_write(&buffer[written..read]) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // What went out before the error went out: the ledger counts it, or
                    // a reset would look like the peer took more than was relayed.
                    relayed(&buffer[..written]);
                    return Err(Failed::Writer);
                }
            }
        }
        // Reported as written: a write that fails or times out half-way (or the future
        // dropped at the idle timeout) still leaves the ledger exact.
        relayed(&buffer[..written]);
        Ok(Forwarded::Chunk {
            read,
            rest: buffer[written..read].to_vec(),
        })
    }
}

/// Once a hand-over is due: reads everything `from` has queued in one go, through a buffer
/// larger than the queue, so the read comes back short unless bytes keep arriving while it
/// copies. Returns the chunk and whether the read left the receive queue whole.
fn forward_all(
    from: &TcpStream,
    to: &TcpStream,
    relayed: &impl Fn(&[u8]),
) -> Result<(Forwarded, bool), Failed> {
    const MARGIN: usize = 64 * 1024;
    let queued = crate::sockopt::unread(from).map_err(|_| Failed::Reader)?;
    let size = usize::try_from(queued)
        .unwrap_or(usize::MAX)
        .saturating_add(MARGIN);
    let mut buffer = vec![0; size.min(MAX_DRAIN_READ)];
    let forwarded = forward_through(&mut buffer, from, to, relayed)?;
    let whole = match &forwarded {
        Forwarded::Chunk { read, .. } => {
            *read < buffer.len() && !crate::sockopt::at_urgent_mark(from).unwrap_or(true)
        }
        Forwarded::Nothing | Forwarded::Eof => false,
    };
    Ok((forwarded, whole))
}

/// The largest read [`forward_all`] makes (a receive queue can be larger; then it takes
/// more than one).
const MAX_DRAIN_READ: usize = 64 * 1024 * 1024;

/// Forwards a half-close: shuts `to`'s write side (errors mean it is closed already).
fn shutdown_write(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
}

/// Which socket failed during a copy, or that the peer took nothing for `timeout_idle`.
enum Failed {
    Reader,
    Writer,
    Idle,
}

/// Relays until both directions reach EOF, one side fails, or nothing moved for
/// `timeout_idle`, counting into `live`. The sockets stay open (the caller balances the
/// ledger and closes them).
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    live: &LiveTraffic,
    timeout_idle: Duration,
) -> Termination {
    // Milliseconds since `started` of the last byte moved (atomic: the future must be Send).
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let idle_since = || started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
    let upstream = copy_then_shutdown(client, server, timeout_idle, |bytes| {
        live.client_said(bytes);
        touch();
    });
    let downstream = copy_then_shutdown(server, client, timeout_idle, |bytes| {
        live.server_said(bytes);
        touch();
    });
    tokio::pin!(upstream, downstream);
    let (mut upstream_done, mut downstream_done) = (false, false);
    loop {
        if upstream_done && downstream_done {
            return Termination::Closed;
        }
        let idle_at = idle_since() + timeout_idle;
        tokio::select! {
            result = &mut upstream, if !upstream_done => match result {
                Ok(()) => upstream_done = true,
                Err(Failed::Reader) => return Termination::ClientReset,
                Err(Failed::Writer) => return Termination::ServerReset,
                Err(Failed::Idle) => return Termination::IdleTimeout,
            },
            result = &mut downstream, if !downstream_done => match result {
                Ok(()) => downstream_done = true,
                Err(Failed::Reader) => return Termination::ServerReset,
                Err(Failed::Writer) => return Termination::ClientReset,
                Err(Failed::Idle) => return Termination::IdleTimeout,
            },
            () = tokio::time::sleep_until(idle_at.into()) => {
                if idle_since() + timeout_idle <= Instant::now() {
                    return Termination::IdleTimeout;
                }
            }
        }
    }
}

/// Copies until EOF, then shuts down the writer, reporting the bytes written to `relayed`.
async fn copy_then_shutdown(
    from: &TcpStream,
    to: &TcpStream,
    timeout_idle: Duration,
    relayed: impl Fn(&[u8]),
) -> Result<(), Failed> {
    loop {
        from.readable().await.map_err(|_| Failed::Reader)?;
        match forward(from, to, &relayed)? {
            Forwarded::Nothing => {}
            Forwarded::Eof => {
                shutdown_write(to);
                return Ok(());
            }
            Forwarded::Chunk { rest, .. } => {
                write_all(to, &rest, timeout_idle, &relayed).await?;
            }
        }
    }
}

/// Whether each socket's receive queue holds only whole segments: nothing the daemon read
/// stopped in the middle of one. The kernel relay may only take such a socket: its read
/// path (`tcp_read_skb`) hands whole segments to the verdict and ignores how much of the
/// first one was already read, so a partly read segment would be relayed twice in part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Whole {
    pub client: bool,
    pub server: bool,
}

impl Whole {
    pub fn both(self) -> bool {
        self.client && self.server
    }
}

/// How the user-space phase of an adaptive relay ended.
pub enum Phase {
    /// The connection ended before it could go to the kernel.
    Finished(Termination),
    /// `threshold` bytes relayed, both directions open, nothing buffered in the daemon and
    /// both receive queues whole: the sockets can go to the kernel relay.
    HandOff,
}

/// Relays in user space until `threshold` bytes came in full reads and the sockets can be
/// handed over whole, or until the connection ends.
///
/// Only reads that fill the whole buffer count toward `threshold`: they mean a stream (the
/// DATA of a large message) rather than a conversation. An SMTP dialogue or a run of small
/// messages over one session never fills a read, and on the kernel path every such chunk
/// would wait for a kworker to send it (measured: no CPU saved on loopback, and slower, see
/// docs/benchmarks.md, workload 4), so those stay here.
///
/// The hand-over waits for a boundary where neither receive queue holds a partly read
/// segment (see [`Whole`]): each socket's last read came back short, which TCP does only
/// when the queue ran dry, and not at an urgent mark, the one place a read stops short in
/// the middle of a segment. Until then the relay goes on here; a stream that the daemon
/// reads slower than it arrives hands over when the sender pauses.
///
/// One task, one direction at a time: a chunk is read and written whole before the next
/// read, so there is never a partial chunk to carry over.
pub async fn relay_until(
    client: &TcpStream,
    server: &TcpStream,
    live: &LiveTraffic,
    timeout_idle: Duration,
    threshold: u64,
    whole: &mut Whole,
) -> Phase {
    let mut moved = 0u64;
    let (mut client_open, mut server_open) = (true, true);
    // One timer for the whole phase, re-armed only when it fires: moving it on every chunk
    // would cost a timer-wheel update per chunk.
    let mut last_activity = Instant::now();
    let idle = tokio::time::sleep(timeout_idle);
    tokio::pin!(idle);
    loop {
        if !client_open && !server_open {
            return Phase::Finished(Termination::Closed);
        }
        if client_open && server_open && moved >= threshold {
            // A socket with nothing unread holds no partly read segment either.
            for (socket, is_whole) in [(client, &mut whole.client), (server, &mut whole.server)] {
                if !*is_whole && crate::sockopt::unread(socket).is_ok_and(|n| n == 0) {
                    *is_whole = true;
                }
            }
            if whole.both() {
                return Phase::HandOff;
            }
        }
        let from_client = tokio::select! {
            ready = client.readable(), if client_open => match ready {
                Ok(()) => true,
                Err(_) => return Phase::Finished(Termination::ClientReset),
            },
            ready = server.readable(), if server_open => match ready {
                Ok(()) => false,
                Err(_) => return Phase::Finished(Termination::ServerReset),
            },
            () = &mut idle => {
                let deadline = last_activity + timeout_idle;
                if deadline <= Instant::now() {
                    return Phase::Finished(Termination::IdleTimeout);
                }
                idle.as_mut().reset(deadline.into());
                continue;
            }
        };
        let (from, to, failed_from, failed_to) = if from_client {
            (
                client,
                server,
                Termination::ClientReset,
                Termination::ServerReset,
            )
        } else {
            (
                server,
                client,
                Termination::ServerReset,
                Termination::ClientReset,
            )
        };
        let relayed = |bytes: &[u8]| {
            if from_client {
                live.client_said(bytes);
            } else {
                live.server_said(bytes);
            }
        };
        // Once a hand-over is due, each read takes the whole queue, so it can end whole.
        let due = moved >= threshold;
        let (forwarded, drained) = if due {
            match forward_all(from, to, &relayed) {
                Ok((forwarded, drained)) => (Ok(forwarded), drained),
                Err(failed) => (Err(failed), false),
            }
        } else {
            (forward(from, to, &relayed), false)
        };
        let n = match forwarded {
            Ok(Forwarded::Nothing) => continue,
            Ok(Forwarded::Eof) => {
                // Half-close: forward it and stay in user space for the rest (short anyway).
                shutdown_write(to);
                if from_client {
                    client_open = false;
                } else {
                    server_open = false;
                }
                continue;
            }
            Ok(Forwarded::Chunk { read, rest }) => {
                match write_all(to, &rest, timeout_idle, &relayed).await {
                    Ok(()) => {}
                    Err(Failed::Idle) => return Phase::Finished(Termination::IdleTimeout),
                    Err(_) => return Phase::Finished(failed_to),
                }
                read
            }
            Err(Failed::Reader) => return Phase::Finished(failed_from),
            Err(_) => return Phase::Finished(failed_to),
        };
        if n >= BUFFER {
            moved += n as u64;
        }
        if from_client {
            whole.client = drained;
        } else {
            whole.server = drained;
        }
        last_activity = Instant::now();
    }
}

/// Writes all of `bytes`, waiting for room as needed; gives up when `to` takes nothing for
/// `timeout_idle` (a peer with a zero window must not hold the session for ever).
async fn write_all(
    to: &TcpStream,
    mut bytes: &[u8],
    timeout_idle: Duration,
    relayed: &impl Fn(&[u8]),
) -> Result<(), Failed> {
    while !bytes.is_empty() {
        match tokio::time::timeout(timeout_idle, to.writable()).await {
            Err(_) => return Err(Failed::Idle),
            Ok(Err(_)) => return Err(Failed::Writer),
            Ok(Ok(())) => {}
        }
        match to.try_write(bytes) {
            Ok(n) => {
                relayed(&bytes[..n]);
                bytes = &bytes[n..];
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Failed::Writer),
        }
    }
    Ok(())
}
