//! One client connection, start to finish: select a server, connect, write the PROXY
//! header, hand the pair to the relay, log the outcome.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::balance::{self, Selector};
use crate::config::{Listener, Server};
use crate::pool::{Pool, ServerRuntime};
use crate::proxy_header::{self, ProxyHeader};
use crate::relay::{Relay, Termination};

/// The reply a client gets when no server can take it: SMTP senders queue and retry.
const NO_SERVER_REPLY: &[u8] = b"421 4.3.0 mxlb: no mail server available, try again later\r\n";

/// A listener's servers and policy, shared by all its sessions.
pub struct Frontend {
    pub config: Listener,
    pub pool: Arc<Pool>,
    selector: Box<dyn Selector>,
    relay: Relay,
}

impl Frontend {
    pub fn new(config: Listener, relay: Relay) -> Frontend {
        Frontend {
            selector: balance::selector_for(config.balance),
            pool: Arc::new(Pool::new(&config)),
            config,
            relay,
        }
    }

    /// Chooses a server for `client`, avoiding the servers in `tried` when another is
    /// available (a redispatched retry goes elsewhere).
    fn pick(&self, client: SocketAddr, tried: &[usize]) -> Option<usize> {
        let mut candidates = self.pool.candidates();
        let untried = candidates
            .iter()
            .enumerate()
            .any(|(index, c)| c.eligible && c.weight > 0 && !tried.contains(&index));
        if untried {
            for &index in tried {
                if let Some(candidate) = candidates.get_mut(index) {
                    candidate.eligible = false;
                }
            }
        }
        balance::pick(self.selector.as_ref(), &candidates, client.ip())
    }

    /// Serves one accepted client until its relay ends.
    pub async fn serve(self: Arc<Self>, client: TcpStream, client_addr: SocketAddr) {
        let started = Instant::now();
        let _accepted = self.pool.accept();
        let _ = client.set_nodelay(true);
        let Some((server, mut upstream, connect_time)) = self.connect(client_addr).await else {
            self.pool.count_refused();
            refuse(client, client_addr, &self.config.name).await;
            return;
        };
        let session = server.open_session();
        let server = &server.config;
        debug!(
            client = %client_addr,
            listener = %self.config.name,
            server = %server.name,
            "connected to {} in {:?}", server.addr, connect_time
        );
        let outcome = match self.send_proxy_header(&client, &mut upstream, server).await {
            Ok(()) => self.relay.relay(client, upstream, &session.live).await,
            Err(error) => Err(error),
        };
        let ended = outcome.unwrap_or_else(|error| {
            warn!(client = %client_addr, server = %server.name, %error, "relay failed");
            Termination::Internal
        });
        let transfer = session.live.transfer(&self.relay, ended);
        session.finish(&transfer);
        info!(
            client = %client_addr,
            listener = %self.config.name,
            server = %server.name,
            server_addr = %server.addr,
            relay = %self.relay.name(),
            connect_ms = connect_time.as_secs_f64() * 1e3,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            bytes_in = transfer.bytes_in,
            bytes_out = transfer.bytes_out,
            ended = %transfer.ended,
            "connection finished"
        );
    }

    /// Connects to a server, retrying `retries` times. With `redispatch` each retry goes to
    /// another server when one is available; without it the same server is retried. A
    /// failed connect counts against the server's health at once.
    async fn connect(
        &self,
        client: SocketAddr,
    ) -> Option<(Arc<ServerRuntime>, TcpStream, Duration)> {
        let mut tried = Vec::new();
        let mut index = self.pick(client, &tried)?;
        for attempt in 0..=self.config.retries {
            if attempt > 0 && self.config.redispatch {
                index = self.pick(client, &tried)?;
            }
            let server = self.pool.servers.get(index)?.clone();
            let started = Instant::now();
            match connect(server.config.addr, self.config.timeout_connect).await {
                Ok(stream) => return Some((server, stream, started.elapsed())),
                Err(error) => {
                    warn!(
                        client = %client,
                        listener = %self.config.name,
                        server = %server.config.name,
                        attempt = attempt + 1,
                        %error,
                        "connect to {} failed", server.config.addr
                    );
                    self.pool.record_connect_failure(&server, &error);
                    tried.push(index);
                }
            }
        }
        None
    }

    /// Writes the whole PROXY header before anything else. Postfix reads it with a single
    /// peek and rejects a header split over two segments; a header is far smaller than a
    /// fresh socket's send buffer, so `write_all` completes it in one `write`.
    async fn send_proxy_header(
        &self,
        client: &TcpStream,
        upstream: &mut TcpStream,
        server: &Server,
    ) -> io::Result<()> {
        let Some(version) = server.send_proxy.version() else {
            return Ok(());
        };
        let header = proxy_header::encode(
            version,
            &ProxyHeader::Proxy {
                source: client.peer_addr()?,
                destination: client.local_addr()?,
            },
        );
        upstream.write_all(&header).await
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )),
    }
}

/// Tells a client no server is available, in SMTP, and closes cleanly.
async fn refuse(mut client: TcpStream, client_addr: SocketAddr, listener: &str) {
    warn!(client = %client_addr, listener, "no server available: replied 421");
    let _ = client.write_all(NO_SERVER_REPLY).await;
    let _ = client.shutdown().await;
}
