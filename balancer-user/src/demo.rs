//! `mxlb demo`: the balancer in front of two built-in SMTP backends that speak the PROXY
//! protocol, so a newcomer sees mail alternate between them and the client address they
//! were told, without installing an MTA.
//!
//! The backends are just enough SMTP for swaks: banner, EHLO/HELO, MAIL, RCPT, DATA, RSET,
//! NOOP, QUIT. Each names itself and the client address from the PROXY header in its banner
//! and in its reply to DATA.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::config::Config;
use crate::proxy_header::{self, ProxyHeader};

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");
/// Longest SMTP line the demo backends accept (RFC 5321 allows 1000 with CRLF).
const MAX_LINE: usize = 4096;
/// Longest PROXY header (v2 with TLVs), as Postfix bounds it.
const MAX_PROXY_HEADER: usize = 536;

/// Where `mxlb demo` listens, when not where the embedded configuration says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// The listener's port on 127.0.0.1 (`--port`). The backends then take ports the
    /// kernel picks and the kernel relay pins under `/sys/fs/bpf/mxlb-demo-<port>`, so the
    /// demo runs beside a real instance, or beside another demo.
    pub port: Option<u16>,
    /// The stats page's address (`--stats`).
    pub stats: Option<SocketAddr>,
}

/// The demo's configuration: the embedded text, moved as `options` say.
pub fn config(options: Options) -> anyhow::Result<Config> {
    let mut config = Config::parse(DEMO_CONFIG, "<embedded demo.toml>")?;
    if let (Some(bind), Some(stats)) = (options.stats, config.stats.as_mut()) {
        stats.bind = bind;
    }
    if let Some(port) = options.port {
        config.global.pin_path = format!("{}-demo-{port}", config.global.pin_path.display()).into();
        for listener in &mut config.listeners {
            listener
                .bind
                .iter_mut()
                .for_each(|addr| addr.set_port(port));
            // Port 0: bound by `bind_backends`, which writes the port the kernel chose.
            listener
                .servers
                .iter_mut()
                .for_each(|server| server.addr.set_port(0));
        }
    }
    Ok(config)
}

/// The demo's backends, bound and not yet serving.
pub struct Backends(Vec<(String, std::net::TcpListener)>);

/// Binds one backend per server of the demo configuration; a server at port 0 gets the
/// port the kernel picks, written back into `config`.
pub fn bind_backends(config: &mut Config) -> anyhow::Result<Backends> {
    let mut backends = Vec::new();
    for server in config.listeners.iter_mut().flat_map(|l| &mut l.servers) {
        let socket = std::net::TcpListener::bind(server.addr)
            .with_context(|| format!("demo backend {}: binding {}", server.name, server.addr))?;
        socket.set_nonblocking(true)?;
        server.addr = socket.local_addr()?;
        backends.push((server.name.clone(), socket));
    }
    Ok(Backends(backends))
}

impl Backends {
    /// Serves each backend on its own task (inside the runtime).
    pub fn serve(self) -> anyhow::Result<()> {
        for (name, socket) in self.0 {
            let socket = TcpListener::from_std(socket)?;
            info!(backend = %name, addr = %socket.local_addr()?, "demo backend listening");
            tokio::spawn(serve_backend(name, socket));
        }
        Ok(())
    }
}

async fn serve_backend(name: String, socket: TcpListener) {
    loop {
        match socket.accept().await {
            Ok((stream, _)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(error) = smtp_session(&name, stream).await {
                        warn!(backend = %name, "demo session ended: {error:#}");
                    }
                });
            }
            Err(error) => warn!(backend = %name, %error, "demo backend accept failed"),
        }
    }
}

/// Reads the PROXY header: returns who the balancer says the client is, and any bytes read
/// past the header.
async fn read_proxy_header(stream: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(MAX_PROXY_HEADER);
    loop {
        match proxy_header::parse(&buffer)? {
            Some((header, used)) => {
                let client = match header {
                    ProxyHeader::Proxy { source, .. } => source.to_string(),
                    ProxyHeader::Local => "a local health check".to_owned(),
                };
                return Ok((client, buffer.split_off(used)));
            }
            None if buffer.len() >= MAX_PROXY_HEADER => anyhow::bail!("PROXY header too long"),
            None => {
                let mut chunk = [0u8; 128];
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "connection closed before the PROXY header");
                buffer.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

async fn smtp_session(name: &str, mut stream: TcpStream) -> anyhow::Result<()> {
    let (client, early_bytes) = read_proxy_header(&mut stream).await?;
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::new(early_bytes.as_slice().chain(reader));
    let hostname = format!("{name}.demo.mxlb");
    writer
        .write_all(
            format!("220 {hostname} ESMTP mxlb demo backend {name}: you are {client}\r\n")
                .as_bytes(),
        )
        .await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(&mut reader, &mut line).await? == 0 {
            return Ok(());
        }
        let command = String::from_utf8_lossy(&line).trim_end().to_owned();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" => format!("250-{hostname} hello, you are {client}\r\n250 8BITMIME\r\n"),
            "HELO" => format!("250 {hostname} hello, you are {client}\r\n"),
            "MAIL" | "RSET" | "NOOP" => "250 2.0.0 Ok\r\n".to_owned(),
            "RCPT" => "250 2.1.5 Ok\r\n".to_owned(),
            "DATA" => {
                writer
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let size = read_message(&mut reader).await?;
                info!(backend = name, client = %client, bytes = size, "demo backend received a message");
                format!("250 2.0.0 Ok: {size} bytes queued on {name} for {client}\r\n")
            }
            "QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
        };
        writer.write_all(reply.as_bytes()).await?;
    }
}

/// Reads one line (up to `MAX_LINE`); 0 means the client closed.
async fn read_line(
    reader: &mut (impl AsyncBufReadExt + Unpin),
    line: &mut Vec<u8>,
) -> anyhow::Result<usize> {
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)
        .await?;
    anyhow::ensure!(n < MAX_LINE || line.ends_with(b"\n"), "line too long");
    Ok(n)
}

/// Reads a DATA payload up to the lone dot, returning its size in bytes.
async fn read_message(reader: &mut (impl AsyncBufReadExt + Unpin)) -> anyhow::Result<usize> {
    let mut size = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        anyhow::ensure!(
            read_line(reader, &mut line).await? > 0,
            "connection closed during DATA"
        );
        if line == b".\r\n" || line == b".\n" {
            return Ok(size);
        }
        size += line.len();
    }
}

/// The address the demo's listener accepts mail on.
pub fn listen_addr(config: &Config) -> Option<SocketAddr> {
    config.listeners.first()?.bind.first().copied()
}
