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

use tokio::io::Interest;
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
/// takes it without waiting.
fn forward(from: &TcpStream, to: &TcpStream) -> Result<Forwarded, Failed> {
    SCRATCH.with_borrow_mut(|buffer| {
        let read = match from.try_read(buffer) {
            Ok(0) => return Ok(Forwarded::Eof),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Forwarded::Nothing);
            }
            Err(_) => return Err(Failed::Reader),
        };
        if read < buffer.len() {
            forget_readiness(from);
        }
        let mut written = 0;
        while written < read {
            match to.try_write(&buffer[written..read]) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Failed::Writer),
            }
        }
        Ok(Forwarded::Chunk {
            read,
            rest: buffer[written..read].to_vec(),
        })
    })
}

/// After a short read: the socket's receive queue was empty at that moment (TCP copies
/// until the queue runs dry or the buffer is full), so its readiness is dropped here rather
/// than by one more `read` that could only say EAGAIN; that read was a third of the
/// syscalls of every relayed chunk. Safe with tokio's edge-triggered epoll: data or a FIN
/// arriving later raises a new event, readiness set by an event seen since the read is
/// kept (tokio compares ticks), and closed states are never cleared.
fn forget_readiness(socket: &TcpStream) {
    let _ = socket.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Forwards a half-close: shuts `to`'s write side (errors mean it is closed already).
fn shutdown_write(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
}

/// Which socket failed during a copy.
enum Failed {
    Reader,
    Writer,
}

/// Relays until both directions reach EOF, one side fails, or nothing moved for
/// `timeout_idle`, counting into `live`.
pub async fn relay(
    client: TcpStream,
    server: TcpStream,
    live: &LiveTraffic,
    timeout_idle: Duration,
) -> Termination {
    // Milliseconds since `started` of the last byte moved (atomic: the future must be Send).
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let idle_since = || started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
    let upstream = copy_then_shutdown(&client, &server, |n| {
        live.add_daemon_in(n);
        touch();
    });
    let downstream = copy_then_shutdown(&server, &client, |n| {
        live.add_daemon_out(n);
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
            },
            result = &mut downstream, if !downstream_done => match result {
                Ok(()) => downstream_done = true,
                Err(Failed::Reader) => return Termination::ServerReset,
                Err(Failed::Writer) => return Termination::ClientReset,
            },
            () = tokio::time::sleep_until(idle_at.into()) => {
                if idle_since() + timeout_idle <= Instant::now() {
                    return Termination::IdleTimeout;
                }
            }
        }
    }
}

/// Copies until EOF, then shuts down the writer, reporting bytes written to `count`.
async fn copy_then_shutdown(
    from: &TcpStream,
    to: &TcpStream,
    count: impl Fn(u64),
) -> Result<(), Failed> {
    loop {
        from.readable().await.map_err(|_| Failed::Reader)?;
        match forward(from, to)? {
            Forwarded::Nothing => {}
            Forwarded::Eof => {
                shutdown_write(to);
                return Ok(());
            }
            Forwarded::Chunk { read, rest } => {
                write_all(to, &rest).await.map_err(|_| Failed::Writer)?;
                count(read as u64);
            }
        }
    }
}

/// How the user-space phase of an adaptive relay ended.
pub enum Phase {
    /// The connection ended before it grew long enough for the kernel.
    Finished(Termination),
    /// `threshold` bytes relayed, both directions open, nothing buffered in the daemon: the
    /// sockets go to the kernel relay.
    HandOff(TcpStream, TcpStream),
}

/// Relays in user space until `threshold` bytes came in full reads (then hands the sockets
/// back at a clean boundary: every byte read has been written), or until the connection
/// ends.
///
/// Only reads that fill the whole buffer count: they mean a stream (the DATA of a large
/// message) rather than a conversation. An SMTP dialogue or a run of small messages over
/// one session never fills a read, and on the kernel path every such chunk would wait for a
/// kworker to send it (measured: no CPU saved on loopback, and slower, see
/// docs/benchmarks.md, workload 4), so those stay here.
///
/// One task, one direction at a time: a chunk is read and written whole before the next
/// read, so there is never a partial chunk to carry over.
pub async fn relay_until(
    client: TcpStream,
    server: TcpStream,
    live: &LiveTraffic,
    timeout_idle: Duration,
    threshold: u64,
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
            return Phase::HandOff(client, server);
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
                &client,
                &server,
                Termination::ClientReset,
                Termination::ServerReset,
            )
        } else {
            (
                &server,
                &client,
                Termination::ServerReset,
                Termination::ClientReset,
            )
        };
        let n = match forward(from, to) {
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
                if write_all(to, &rest).await.is_err() {
                    return Phase::Finished(failed_to);
                }
                read
            }
            Err(Failed::Reader) => return Phase::Finished(failed_from),
            Err(Failed::Writer) => return Phase::Finished(failed_to),
        };
        if from_client {
            live.add_daemon_in(n as u64);
        } else {
            live.add_daemon_out(n as u64);
        }
        if n == BUFFER {
            moved += n as u64;
        }
        last_activity = Instant::now();
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
