//! Scripted TCP backends and clients for relay tests that need exact control over bytes,
//! half-closes and resets (things Postfix does not let a test choose).
//!
//! A backend reads the PROXY header with the independent `ppp` parser, then runs its script
//! and reports what it saw over a channel.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// What the PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyInfo {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A backend listening on a free loopback port, running `script` for each connection.
pub struct Backend<R> {
    pub addr: SocketAddr,
    reports: mpsc::Receiver<anyhow::Result<R>>,
}

impl<R: Send + 'static> Backend<R> {
    pub fn spawn(
        script: impl Fn(TcpStream, ProxyInfo) -> anyhow::Result<R> + Send + Sync + 'static,
    ) -> anyhow::Result<Backend<R>> {
        Self::spawn_on("127.0.0.1:0".parse()?, script)
    }

    /// [`Backend::spawn`] on a given address (for example `[::1]:0`).
    pub fn spawn_on(
        bind: SocketAddr,
        script: impl Fn(TcpStream, ProxyInfo) -> anyhow::Result<R> + Send + Sync + 'static,
    ) -> anyhow::Result<Backend<R>> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let (sender, reports) = mpsc::channel();
        let script = std::sync::Arc::new(script);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let sender = sender.clone();
                let script = script.clone();
                thread::spawn(move || {
                    let report =
                        read_proxy_header(&mut stream).and_then(|info| script(stream, info));
                    let _ = sender.send(report);
                });
            }
        });
        Ok(Backend { addr, reports })
    }

    /// The report of the next finished connection.
    pub fn next_report(&self, timeout: Duration) -> anyhow::Result<R> {
        self.reports
            .recv_timeout(timeout)
            .context("backend did not finish a connection in time")?
    }
}

/// Reads a v1 or v2 PROXY header byte by byte (so nothing after it is consumed) and parses
/// it with `ppp`.
pub fn read_proxy_header(stream: &mut TcpStream) -> anyhow::Result<ProxyInfo> {
    let mut header = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream
            .read_exact(&mut byte)
            .context("reading the PROXY header")?;
        header.push(byte[0]);
        if header.len() > 536 {
            bail!("PROXY header longer than 536 bytes");
        }
        if header.starts_with(b"PROXY ") {
            if header.ends_with(b"\r\n") {
                return parse_v1(&header);
            }
        } else if header.len() >= 16 {
            let length = u16::from_be_bytes([header[14], header[15]]) as usize;
            if header.len() == 16 + length {
                return parse_v2(&header);
            }
        }
    }
}

fn parse_v1(header: &[u8]) -> anyhow::Result<ProxyInfo> {
    let text = std::str::from_utf8(header)?;
    match ppp::v1::Header::try_from(text)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .addresses
    {
        ppp::v1::Addresses::Tcp4(a) => Ok(ProxyInfo {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Tcp6(a) => Ok(ProxyInfo {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        other => bail!("unexpected v1 addresses {other:?}"),
    }
}

fn parse_v2(header: &[u8]) -> anyhow::Result<ProxyInfo> {
    let parsed = ppp::v2::Header::try_from(header).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => Ok(ProxyInfo {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v2::Addresses::IPv6(a) => Ok(ProxyInfo {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        other => bail!("unexpected v2 addresses {other:?}"),
    }
}

/// A deterministic byte stream (xorshift), so both ends can agree on content without
/// keeping it in memory. Different seeds give different streams.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // xorshift needs a non-zero state. `seed | 1` gave seeds 2k and 2k+1 the same
        // stream; splitmix64's finalizer is a bijection, so distinct seeds get distinct
        // states (and xorshift, a bijection too, distinct first words). The one seed it
        // maps to 0 shares its stream with whichever seed maps to the stand-in.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Pattern {
            state: if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z },
        }
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Compares a stream with [`Pattern`] as it arrives, so a test can say where a stream first
/// went wrong (lost, duplicated or foreign bytes), not only that its digest differs.
pub struct PatternCheck {
    expected: Pattern,
    /// A window of expected bytes; the pattern comes in 8-byte words, so it is refilled
    /// whole.
    want: Vec<u8>,
    want_at: usize,
    /// Bytes seen so far.
    pub received: u64,
    /// Offset of the first byte that differs from the pattern, if any.
    pub first_diff: Option<u64>,
}

impl PatternCheck {
    pub fn new(seed: u64) -> PatternCheck {
        PatternCheck {
            expected: Pattern::new(seed),
            want: vec![0u8; 256 * 1024],
            want_at: 256 * 1024,
            received: 0,
            first_diff: None,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.want_at == self.want.len() {
                self.expected.fill(&mut self.want);
                self.want_at = 0;
            }
            let n = data.len().min(self.want.len() - self.want_at);
            let want = &self.want[self.want_at..self.want_at + n];
            if self.first_diff.is_none() && data[..n] != *want {
                let at = data.iter().zip(want).position(|(a, b)| a != b);
                self.first_diff = at.map(|at| self.received + at as u64);
            }
            self.want_at += n;
            self.received += n as u64;
            data = &data[n..];
        }
    }

    /// Bytes received, and where they first differed: what a backend reports.
    pub fn report(&self) -> (u64, Option<u64>) {
        (self.received, self.first_diff)
    }
}

/// Size and SHA-256 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest256 {
    pub bytes: u64,
    pub sha256: String,
}

/// Writes `total` pattern bytes, returning their digest.
pub fn send_pattern(stream: &mut impl Write, seed: u64, total: u64) -> io::Result<Digest256> {
    let mut pattern = Pattern::new(seed);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buffer.len() as u64) as usize;
        pattern.fill(&mut buffer[..n]);
        hasher.update(&buffer[..n]);
        stream.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(Digest256 {
        bytes: total,
        sha256: hex(&hasher.finalize()),
    })
}

/// A client's last turn: `total` pattern bytes, a half-close, then whatever the other
/// side still sends until it closes. Returns the digest of what was sent, and that reply.
pub fn send_pattern_and_finish(
    stream: &mut TcpStream,
    seed: u64,
    total: u64,
) -> io::Result<(Digest256, Vec<u8>)> {
    let sent = send_pattern(stream, seed, total)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok((sent, reply))
}

/// Reads until EOF, returning the digest of everything read.
pub fn digest_until_eof(stream: &mut impl Read) -> io::Result<Digest256> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok(Digest256 {
                bytes,
                sha256: hex(&hasher.finalize()),
            });
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
}

/// The digest `send_pattern(seed, total)` produces, computed without a socket.
pub fn pattern_digest(seed: u64, total: u64) -> Digest256 {
    send_pattern(&mut io::sink(), seed, total).expect("writing to a sink cannot fail")
}

/// Reads one CRLF-terminated line byte by byte (nothing after it is consumed).
pub fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Closes a socket with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A backend that reads the PROXY header, greets with `banner`, holds the session until the
/// client closes its side, then answers `farewell` (possibly empty). Counts the connections
/// it accepted (health-check connections included).
pub struct HoldingBackend {
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HoldingBackend {
    pub fn start(banner: String, farewell: &'static [u8]) -> anyhow::Result<HoldingBackend> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let banner = banner.clone();
                thread::spawn(move || {
                    if read_proxy_header(&mut stream).is_ok() {
                        let _ = stream.write_all(banner.as_bytes());
                        let _ = io::copy(&mut stream, &mut io::sink());
                        let _ = stream.write_all(farewell);
                    }
                });
            }
        });
        Ok(HoldingBackend { addr, accepted })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_gives_its_own_stream() {
        let starts: Vec<[u8; 64]> = (0..64)
            .map(|seed| {
                let mut start = [0u8; 64];
                Pattern::new(seed).fill(&mut start);
                start
            })
            .collect();
        for (a, first) in starts.iter().enumerate() {
            for (b, second) in starts.iter().enumerate().skip(a + 1) {
                assert_ne!(first, second, "seeds {a} and {b}");
            }
        }
    }

    #[test]
    fn the_digest_is_that_of_the_stream_and_depends_on_the_seed() {
        let mut stream = vec![0u8; 1000];
        Pattern::new(7).fill(&mut stream);
        let digest = pattern_digest(7, 1000);
        assert_eq!(digest.bytes, 1000);
        assert_eq!(digest.sha256, hex(&Sha256::digest(&stream)));
        assert_ne!(digest, pattern_digest(6, 1000));
    }
}
