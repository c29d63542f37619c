//! `accept_proxy`: reading the PROXY header an upstream balancer (HAProxy's `send-proxy`,
//! NGINX's `proxy_protocol on`, another mxlb) puts in front of each connection, so the
//! client it names is the one mxlb balances, limits, logs and passes on to the servers.
//!
//! The header is taken off the socket without consuming a byte of what follows, as
//! HAProxy and Postfix do: peek, parse, then read exactly the header's length. Whatever the
//! client sent after it stays in the socket's queue for the relay, kernel or user space.
//! An upstream balancer sends the header in its first segment; a header that arrives in
//! pieces is peeked again after a short pause rather than in a loop, so a client trickling
//! bytes cannot spin the daemon.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proxy_header::{self, MAX_V2_LEN, ProxyError, ProxyHeader};

/// Pause before looking again at an incomplete header.
const PEEK_AGAIN_AFTER: Duration = Duration::from_millis(5);

/// Why a connection on an `accept_proxy` listener had no usable header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0}")]
    Invalid(#[from] ProxyError),
    #[error("no complete PROXY header within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    /// The peer is not one of the listener's `accept_proxy_from`: nothing was read.
    #[error("peer {0} is not in accept_proxy_from")]
    Untrusted(std::net::IpAddr),
}

/// Reads the PROXY header at the start of `stream`, waiting at most `within` for it.
pub async fn read_header(stream: &TcpStream, within: Duration) -> Result<ProxyHeader, HeaderError> {
    tokio::time::timeout(within, take_header(stream))
        .await
        .map_err(|_| HeaderError::Timeout(within))?
}

async fn take_header(stream: &TcpStream) -> Result<ProxyHeader, HeaderError> {
    let mut buffer = [0u8; MAX_V2_LEN];
    loop {
        let queued = stream.peek(&mut buffer).await?;
        if queued == 0 {
            return Err(HeaderError::Closed);
        }
        match proxy_header::parse(&buffer[..queued])? {
            Some((header, len)) => {
                consume(stream, len).await?;
                return Ok(header);
            }
            // A prefix of a header: the rest is on its way.
            None if queued < buffer.len() => tokio::time::sleep(PEEK_AGAIN_AFTER).await,
            None => return Err(ProxyError::V2TooLong(queued).into()),
        }
    }
}

/// Reads and drops exactly `len` bytes, which a peek has shown are queued.
async fn consume(stream: &TcpStream, len: usize) -> io::Result<()> {
    let mut header = [0u8; MAX_V2_LEN];
    let mut taken = 0;
    while taken < len {
        stream.readable().await?;
        match stream.try_read(&mut header[taken..len]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => taken += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (what the test writes to, what mxlb reads from).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (client, accepted)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[tokio::test]
    async fn takes_the_header_and_leaves_what_follows() {
        let (mut client, accepted) = pair().await;
        client
            .write_all(b"PROXY TCP4 203.0.113.7 198.51.100.25 40001 25\r\nEHLO early\r\n")
            .await
            .expect("write");
        let header = read_header(&accepted, Duration::from_secs(5))
            .await
            .expect("header");
        assert_eq!(
            header,
            ProxyHeader::Proxy {
                source: addr("203.0.113.7:40001"),
                destination: addr("198.51.100.25:25"),
            }
        );
        let mut rest = [0u8; 12];
        let mut accepted = accepted;
        accepted.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"EHLO early\r\n");
    }

    #[tokio::test]
    async fn waits_for_a_header_sent_in_pieces() {
        let (mut client, accepted) = pair().await;
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::25 40001 25\r\n";
        let writer = tokio::spawn(async move {
            for piece in header.chunks(9) {
                client.write_all(piece).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let parsed = read_header(&accepted, Duration::from_secs(5))
            .await
            .expect("header");
        assert_eq!(
            parsed,
            ProxyHeader::Proxy {
                source: addr("[2001:db8::7]:40001"),
                destination: addr("[2001:db8::25]:25"),
            }
        );
        drop(writer.await);
    }

    #[tokio::test]
    async fn refuses_smtp_instead_of_a_header() {
        let (mut client, accepted) = pair().await;
        client.write_all(b"EHLO client\r\n").await.expect("write");
        let error = read_header(&accepted, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(error, HeaderError::Invalid(ProxyError::NotProxy)),
            "{error}"
        );
    }

    #[tokio::test]
    async fn gives_up_on_a_silent_client_and_a_closed_one() {
        let (client, accepted) = pair().await;
        let error = read_header(&accepted, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(error, HeaderError::Timeout(_)), "{error}");
        drop(client);
        let error = read_header(&accepted, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, HeaderError::Closed), "{error}");
    }
}
