//! The user-space relay: a copy loop per direction, for machines without the kernel relay.
//!
//! Half-close is forwarded (EOF on one side shuts the other side's write half once every
//! byte is written), as the kernel relay does; a reset on either side closes both at once;
//! no byte moving in either direction for `timeout_idle` closes both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{LiveTraffic, Termination};

const BUFFER: usize = 16 * 1024;

/// Which socket failed during a copy.
enum Failed {
    Reader,
    Writer,
}

/// Relays until both directions reach EOF, one side fails, or nothing moved for
/// `timeout_idle`, counting into `live`.
pub async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    live: &LiveTraffic,
    timeout_idle: Duration,
) -> Termination {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    // Milliseconds since `started` of the last byte moved (atomic: the future must be Send).
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let idle_since = || started + Duration::from_millis(last_activity.load(Ordering::Relaxed));
    let upstream = copy_then_shutdown(client_read, server_write, |n| {
        live.add_daemon_in(n);
        touch();
    });
    let downstream = copy_then_shutdown(server_read, client_write, |n| {
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
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    count: impl Fn(u64),
) -> Result<(), Failed> {
    let mut buffer = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buffer).await.map_err(|_| Failed::Reader)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buffer[..n])
            .await
            .map_err(|_| Failed::Writer)?;
        count(n as u64);
    }
}
