//! One client connection, start to finish: admit it (or refuse it over a limit), select a
//! server, connect, write the PROXY header, hand the pair to the relay, log the outcome.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::accept_proxy;
use crate::balance::{self, Selector};
use crate::config::{Listener, Server};
use crate::limits::{self, Admission, Gauge, Limit, Refused};
use crate::logging::millis;
use crate::pool::{Pool, Reservation, ServerRuntime};
use crate::proxy_header::{self, ProxyHeader};
use crate::relay::{IdleTimeout, Relay, Termination};
use crate::session_register::{self, OpenSession, SessionId};
use crate::stats::ListenerStats;

/// The reply a client gets when no server can take it: SMTP senders queue and retry.
const NO_SERVER_REPLY: &[u8] = b"421 4.3.0 mxlb: no mail server available, try again later\r\n";

/// Why no server could take a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoServer {
    /// Servers are up, but every one that could take the client is at its `maxconn`.
    Full,
    /// This host is out of descriptors or memory for the server connection.
    Shortage,
    /// No server is up (or every connect attempt failed).
    Unavailable,
}

impl NoServer {
    /// The limit the client is refused by; `None` for the plain "no server" refusal.
    fn limit(self) -> Option<Limit> {
        match self {
            NoServer::Full => Some(Limit::Server),
            NoServer::Shortage => Some(Limit::Resources),
            NoServer::Unavailable => None,
        }
    }
}

/// A listener's servers, limits and policy, shared by all its sessions.
pub struct Frontend {
    pub config: Listener,
    pub pool: Arc<Pool>,
    admission: Admission,
    selector: Box<dyn Selector>,
    relay: Relay,
}

impl Frontend {
    /// `global` counts the connections of every listener, against `global.maxconn`.
    pub fn new(config: Listener, relay: Relay, global: Arc<Gauge>) -> Frontend {
        let pool = Arc::new(Pool::new(&config));
        Frontend {
            admission: Admission::new(global, pool.sessions.clone(), config.source_limits),
            selector: balance::selector_for(config.balance),
            pool,
            config,
            relay,
        }
    }

    /// This listener under a reloaded configuration: state shared with `self` (see
    /// [`Pool::reconfigured`]); the sessions `self` serves keep their settings.
    pub fn reconfigured(&self, config: Listener) -> Frontend {
        let pool = Arc::new(self.pool.reconfigured(&config));
        Frontend {
            admission: self
                .admission
                .reconfigured(pool.sessions.clone(), config.source_limits),
            selector: balance::selector_for(config.balance),
            pool,
            config,
            relay: self.relay.clone(),
        }
    }

    /// The listener's numbers for the stats.
    pub fn stats(&self, relay: &Relay) -> ListenerStats {
        ListenerStats {
            sources_tracked: self.admission.sources_tracked() as u64,
            ..self.pool.stats(relay)
        }
    }

    /// Chooses a server for `client` and takes a place among its sessions, avoiding the
    /// servers in `tried` when another is available (a redispatched retry goes elsewhere).
    fn pick(&self, client: SocketAddr, tried: &[usize]) -> Result<(usize, Reservation), NoServer> {
        // A server chosen as having room may fill up before the place is taken (another
        // client got there first); then choose again, among the rest.
        for _ in 0..=self.pool.servers.len() {
            let mut candidates = self.pool.candidates();
            let untried = candidates
                .iter()
                .enumerate()
                .any(|(index, c)| c.eligible && c.weight > 0 && !c.full && !tried.contains(&index));
            if untried {
                for &index in tried {
                    if let Some(candidate) = candidates.get_mut(index) {
                        candidate.eligible = false;
                    }
                }
            }
            let Some(index) = balance::pick(self.selector.as_ref(), &candidates, client.ip())
            else {
                let full = candidates
                    .iter()
                    .any(|c| c.eligible && c.weight > 0 && c.full);
                return Err(if full {
                    NoServer::Full
                } else {
                    NoServer::Unavailable
                });
            };
            if let Some(reservation) = self.pool.servers.get(index).and_then(|s| s.reserve()) {
                return Ok((index, reservation));
            }
        }
        Err(NoServer::Full)
    }

    /// Serves one accepted client until its relay ends. Everything logged about it, down
    /// to the relay's errors, is in its `session` span, so every line carries its id.
    pub async fn serve(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let id = SessionId::next();
        let span = info_span!("session", session = %id);
        self.serve_session(client, peer, id).instrument(span).await;
    }

    async fn serve_session(self: Arc<Self>, client: TcpStream, peer: SocketAddr, id: SessionId) {
        let started = Instant::now();
        debug!(client = %peer, listener = %self.config.name, "accepted");
        // Behind an upstream balancer, the client is who its PROXY header names: that is
        // the address balanced on, limited, logged and passed on to the server. `Local`
        // (no upstream, or the upstream's own health check) means the socket's own
        // endpoints, as in the PROXY protocol itself.
        let claimed = if self.config.accept_proxy {
            if let Some(trusted) = &self.config.accept_proxy_from
                && !trusted.allows(peer.ip())
            {
                // Not even peeked at: an untrusted peer's claim is never read.
                let untrusted = accept_proxy::HeaderError::Untrusted(peer.ip());
                return self.pool.record_bad_proxy_header(peer, &untrusted);
            }
            let within = self.config.timeout_connect;
            match Box::pin(accept_proxy::read_header(&client, within)).await {
                Ok(header) => header,
                Err(error) => return self.pool.record_bad_proxy_header(peer, &error),
            }
        } else {
            ProxyHeader::Local
        };
        let client_addr = match claimed {
            ProxyHeader::Proxy { source, .. } => source,
            ProxyHeader::Local => peer,
        };
        let admitted = match self.admission.admit(client_addr.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                return Box::pin(self.refuse_over_limit(client, client_addr, &refused)).await;
            }
        };
        self.pool.count_session();
        let _ = client.set_nodelay(true);
        // The phases are boxed: a task's future is as large as its largest phase, and an
        // idle session (most of them, at any time) should only hold the relay's state.
        let (server, reservation, mut upstream, connect_time) =
            match Box::pin(self.connect(client_addr)).await {
                Ok(connected) => connected,
                Err(no_server) => {
                    // A refused client holds no place while its reply goes out.
                    drop(admitted);
                    let Some(limit) = no_server.limit() else {
                        self.pool.count_refused();
                        return Box::pin(refuse(client, client_addr, &self.config.name)).await;
                    };
                    let refused = Refused {
                        limit,
                        source: None,
                    };
                    return Box::pin(self.refuse_over_limit(client, client_addr, &refused)).await;
                }
            };
        let session = server.open_session(reservation);
        let server = &server.config;
        let _registered = session_register::register(
            id,
            OpenSession {
                client: client_addr,
                listener: self.config.name.clone(),
                server: server.name.clone(),
                server_addr: server.addr,
                span: tracing::Span::current(),
            },
        );
        debug!(
            client = %client_addr,
            listener = %self.config.name,
            server = %server.name,
            "connected to {} in {:?}", server.addr, connect_time
        );
        let outcome = match self
            .send_proxy_header(&client, claimed, &mut upstream, server)
            .await
        {
            Ok(()) => {
                Box::pin(self.relay.relay(
                    client,
                    upstream,
                    &session.live,
                    IdleTimeout {
                        after: self.config.timeout_idle,
                        hostname: &self.config.hostname,
                    },
                ))
                .await
            }
            // The client reset before its header was written (a socket that was reset
            // has no peer address left to put in it): a client reset, not a failure of
            // ours. Nothing was relayed; the server gets an orderly close.
            Err(HeaderError::ClientGone) => Ok(Termination::ClientReset),
            Err(HeaderError::Io(error)) => Err(error),
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
            relay = %transfer.path(),
            connect_ms = millis(connect_time),
            duration_ms = millis(started.elapsed()),
            bytes_in = transfer.bytes_in,
            bytes_out = transfer.bytes_out,
            kernel_bytes = transfer.kernel,
            ended = %transfer.ended,
            "connection finished"
        );
    }

    /// Connects to a server, retrying `retries` times. With `redispatch` each retry goes to
    /// another server when one is available; without it the same server is retried. A
    /// failed connect counts against the server's health at once. The server's place is
    /// taken before connecting and given back when the connect fails.
    async fn connect(
        &self,
        client: SocketAddr,
    ) -> Result<(Arc<ServerRuntime>, Reservation, TcpStream, Duration), NoServer> {
        let mut tried = Vec::new();
        let mut previous: Option<usize> = None;
        for attempt in 0..=self.config.retries {
            let (index, reservation) = match previous {
                Some(index) if !self.config.redispatch => {
                    let server = self.pool.servers.get(index).ok_or(NoServer::Unavailable)?;
                    (index, server.reserve().ok_or(NoServer::Full)?)
                }
                _ => self.pick(client, &tried)?,
            };
            previous = Some(index);
            let server = self
                .pool
                .servers
                .get(index)
                .ok_or(NoServer::Unavailable)?
                .clone();
            let started = Instant::now();
            match connect(server.config.addr, self.config.timeout_connect).await {
                Ok(stream) => return Ok((server, reservation, stream, started.elapsed())),
                // Our shortage, not the server's fault: no retry (it would fail the same
                // way), nothing against its health, no log line per attempt.
                Err(error) if limits::is_resource_shortage(&error) => {
                    return Err(NoServer::Shortage);
                }
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
        Err(NoServer::Unavailable)
    }

    /// Refuses a client over a limit: counted, logged (throttled), `421 4.7.0`, clean
    /// close. No server is contacted.
    async fn refuse_over_limit(
        &self,
        client: TcpStream,
        client_addr: SocketAddr,
        refused: &Refused,
    ) {
        self.pool
            .refusals()
            .record(&self.config.name, client_addr, refused);
        limits::close_with_reply(client, refused.limit.reply()).await;
    }

    /// Writes the whole PROXY header before anything else. Postfix reads it with a single
    /// peek and rejects a header split over two segments; a header is far smaller than a
    /// fresh socket's send buffer, so `write_all` completes it in one `write`.
    ///
    /// The endpoints are the upstream balancer's claim when there is one, else the client
    /// socket's own.
    async fn send_proxy_header(
        &self,
        client: &TcpStream,
        claimed: ProxyHeader,
        upstream: &mut TcpStream,
        server: &Server,
    ) -> Result<(), HeaderError> {
        let Some(version) = server.send_proxy.version() else {
            return Ok(());
        };
        let endpoints = match claimed {
            ProxyHeader::Proxy { .. } => claimed,
            ProxyHeader::Local => ProxyHeader::Proxy {
                source: client.peer_addr().map_err(HeaderError::from_client)?,
                destination: client.local_addr().map_err(HeaderError::from_client)?,
            },
        };
        let header = proxy_header::encode(version, &endpoints);
        upstream.write_all(&header).await.map_err(HeaderError::Io)
    }
}

/// Why the PROXY header was not written.
enum HeaderError {
    /// The client's socket has no peer any more: it was reset (found by the chaos tests,
    /// where an RST storm logged every such client as a relay failure).
    ClientGone,
    Io(io::Error),
}

impl HeaderError {
    fn from_client(error: io::Error) -> HeaderError {
        if error.raw_os_error() == Some(libc::ENOTCONN) {
            HeaderError::ClientGone
        } else {
            HeaderError::Io(error)
        }
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
async fn refuse(client: TcpStream, client_addr: SocketAddr, listener: &str) {
    warn!(client = %client_addr, listener, "no server available: replied 421");
    limits::close_with_reply(client, NO_SERVER_REPLY).await;
}
