//! Refusing a client over a limit: the SMTP reply that makes a sending MTA queue and retry
//! later, a close that never resets the connection, the counters the stats show, and log
//! lines that stay few under a flood.

use std::io;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::warn;

use super::Refused;
use super::throttle::{Throttle, suppressed_note};
use crate::stats::RefusedLimits;

/// Which limit refused a client. The names are the stats' and the metrics' `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `global.maxconn`: connections over all listeners.
    Global,
    /// The listener's `maxconn`.
    Listener,
    /// Every server that is up is at its `maxconn`.
    Server,
    /// `max_conn_per_source`: connections open from the client's source.
    SourceConn,
    /// `max_rate_per_source`: new connections from the client's source within `rate_window`.
    SourceRate,
    /// The daemon itself is out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
    /// and cannot open the server connection: the operating system's limit, not a server's
    /// fault, so it neither counts against the server's health nor is retried.
    Resources,
}

impl Limit {
    pub const ALL: [Limit; 6] = [
        Limit::Global,
        Limit::Listener,
        Limit::Server,
        Limit::SourceConn,
        Limit::SourceRate,
        Limit::Resources,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Global => "global",
            Limit::Listener => "listener",
            Limit::Server => "server",
            Limit::SourceConn => "source_conn",
            Limit::SourceRate => "source_rate",
            Limit::Resources => "resources",
        }
    }

    /// The SMTP reply. 421 makes the sender close and retry later (RFC 5321 4.2.3);
    /// 4.7.0 is the enhanced code Postfix uses for its own connection limits, 4.3.2
    /// (system not accepting network messages, RFC 3463) says the host is overloaded. The
    /// text names the limit for whoever reads the sender's log.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Limit::Global | Limit::Listener => {
                b"421 4.7.0 mxlb: too many connections, try again later\r\n"
            }
            Limit::Server => b"421 4.7.0 mxlb: all mail servers are busy, try again later\r\n",
            Limit::SourceConn => {
                b"421 4.7.0 mxlb: too many connections from your address, try again later\r\n"
            }
            Limit::SourceRate => {
                b"421 4.7.0 mxlb: too many new connections from your address, try again later\r\n"
            }
            Limit::Resources => b"421 4.3.2 mxlb: system busy, try again later\r\n",
        }
    }

    /// `421 4.7.0`: the reply's code and enhanced code, for the log.
    fn code(self) -> &'static str {
        match self {
            Limit::Resources => "421 4.3.2",
            _ => "421 4.7.0",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The daemon is out of descriptors or memory: an error of this host, not of the peer.
pub fn is_resource_shortage(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// What the log says for a refusal, naming the configuration key to look at.
fn describe(refused: &Refused) -> String {
    let source = refused
        .source
        .map_or_else(|| "its source".to_owned(), |key| key.to_string());
    match refused.limit {
        Limit::Global => "global maxconn reached".to_owned(),
        Limit::Listener => "listener maxconn reached".to_owned(),
        Limit::Server => "every server that is up is at its maxconn".to_owned(),
        Limit::SourceConn => format!("too many connections from {source} (max_conn_per_source)"),
        Limit::SourceRate => format!(
            "too many new connections from {source} within rate_window (max_rate_per_source)"
        ),
        Limit::Resources => "out of descriptors or memory for the server connection \
                             (raise the open files limit, or lower maxconn)"
            .to_owned(),
    }
}

/// One listener's refusals by limit: counted for the stats, logged at most once a second
/// per limit.
#[derive(Debug)]
pub struct Refusals {
    counts: [AtomicU64; Limit::ALL.len()],
    logs: [Throttle; Limit::ALL.len()],
}

const LOG_INTERVAL: Duration = Duration::from_secs(1);

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            counts: Default::default(),
            logs: [const { Throttle::new(LOG_INTERVAL) }; Limit::ALL.len()],
        }
    }
}

impl Refusals {
    /// Counts a refused client and logs it, unless a line for the same limit was written
    /// less than a second ago.
    pub fn record(&self, listener: &str, client: SocketAddr, refused: &Refused) {
        let limit = refused.limit;
        self.counts[limit.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.logs[limit.index()].allow(Instant::now()) {
            warn!(
                client = %client,
                listener,
                limit = limit.as_str(),
                "client refused: {}; replied {}{}",
                describe(refused),
                limit.code(),
                suppressed_note(suppressed)
            );
        }
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.counts[limit.index()].load(Ordering::Relaxed)
    }

    /// The counts as the stats show them.
    pub fn stats(&self) -> RefusedLimits {
        RefusedLimits {
            global: self.count(Limit::Global),
            listener: self.count(Limit::Listener),
            server: self.count(Limit::Server),
            source_conn: self.count(Limit::SourceConn),
            source_rate: self.count(Limit::SourceRate),
            resources: self.count(Limit::Resources),
        }
    }
}

/// Time allowed for the reply to reach the socket's send buffer (it always fits in a fresh
/// one; this only guards against a peer that never opens its window).
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a refused client may go on sending before the socket is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes read and thrown away while draining.
const DRAIN_BYTES: usize = 64 * 1024;
/// Refused clients drained at once. Beyond that (a flood), the socket is closed right after
/// the reply: each drain holds a descriptor, and descriptors are what a flood exhausts.
const MAX_DRAINING: usize = 1024;
static DRAINING: Semaphore = Semaphore::const_new(MAX_DRAINING);

/// Writes `reply`, then closes without a reset: shut down the write side (the client sees
/// the reply and then EOF), read and discard what the client still sends (a `QUIT`, a
/// pipelined command) until it closes or [`DRAIN_TIMEOUT`], then close. Closing a socket
/// with unread bytes would make the kernel send a RST, and a RST can make the client lose
/// the reply it has not read yet.
pub async fn close_with_reply(mut client: TcpStream, reply: &[u8]) {
    let sent = tokio::time::timeout(REPLY_TIMEOUT, client.write_all(reply)).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    if client.shutdown().await.is_err() {
        return;
    }
    let Ok(_permit) = DRAINING.try_acquire() else {
        return;
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard_until_eof(&mut client)).await;
}

async fn discard_until_eof(client: &mut TcpStream) {
    let mut buffer = [0u8; 4096];
    let mut total = 0;
    while total < DRAIN_BYTES {
        match client.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => total += read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn replies_are_421_lines() {
        for limit in Limit::ALL {
            let reply = limit.reply();
            assert!(reply.starts_with(limit.code().as_bytes()), "{limit:?}");
            assert!(reply[9..].starts_with(b" mxlb: "), "{limit:?}");
            assert!(reply.ends_with(b", try again later\r\n"), "{limit:?}");
            assert_eq!(
                reply.iter().filter(|&&b| b == b'\n').count(),
                1,
                "{limit:?}"
            );
            assert!(reply.len() <= 512, "RFC 5321 reply line length");
        }
    }

    #[test]
    fn names_and_counts() {
        let names: Vec<_> = Limit::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(
            names,
            [
                "global",
                "listener",
                "server",
                "source_conn",
                "source_rate",
                "resources"
            ]
        );
        let stats_names: Vec<_> = RefusedLimits::default()
            .by_reason()
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(names, stats_names, "the stats use the same names");
        let refusals = Refusals::default();
        let client: SocketAddr = "192.0.2.1:4000".parse().expect("addr");
        for limit in [Limit::Server, Limit::SourceRate, Limit::SourceRate] {
            refusals.record(
                "smtp",
                client,
                &Refused {
                    limit,
                    source: None,
                },
            );
        }
        assert_eq!(
            refusals.stats(),
            RefusedLimits {
                global: 0,
                listener: 0,
                server: 1,
                source_conn: 0,
                source_rate: 2,
                resources: 0,
            }
        );
    }

    /// The client reads the whole reply, then EOF; its QUIT afterwards is taken without a
    /// reset.
    #[tokio::test]
    async fn closes_cleanly_after_the_reply() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            close_with_reply(socket, Limit::SourceConn.reply()).await;
        });
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut reply = Vec::new();
        let mut buffer = [0u8; 256];
        loop {
            let read = client.read(&mut buffer).await.expect("no reset");
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
        }
        assert_eq!(reply, Limit::SourceConn.reply());
        client.write_all(b"QUIT\r\n").await.expect("write QUIT");
        client.shutdown().await.expect("shutdown");
        server.await.expect("server task");
        // Closed without a reset: a read on our side sees EOF again, not an error.
        assert_eq!(client.read(&mut buffer).await.expect("no reset"), 0);
    }
}
