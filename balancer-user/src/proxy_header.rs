//! PROXY protocol headers (v1 text and v2 binary): encoding for the backend side and
//! parsing for listeners with `accept_proxy`.
//!
//! Reference: HAProxy's `doc/proxy-protocol.txt`. The receivers we care about most are
//! Postfix (`smtpd_upstream_proxy_protocol = haproxy`) and HAProxy itself. Postfix reads
//! the header with a single `recv(MSG_PEEK)` into a 536-byte buffer, so [`encode`] returns
//! the whole header in one buffer that the caller must send in one `write()`, before any
//! other byte.
//!
//! What the parser accepts, and why:
//! - v1 `TCP4`, `TCP6` and `UNKNOWN`; `UNKNOWN` becomes [`ProxyHeader::Local`] because the
//!   specification says its addresses must be ignored, exactly like a v2 LOCAL.
//! - v2 `PROXY` over TCP/IPv4 and TCP/IPv6; `PROXY` with family `UNSPEC` and any `LOCAL`
//!   become [`ProxyHeader::Local`] (the receiver uses the real connection endpoints).
//! - v2 UDP and UNIX-socket families are errors: an SMTP connection cannot come from a
//!   datagram socket, and a UNIX peer has no address we could log, balance on or forward.
//! - v2 TLVs are skipped without being looked at, as Postfix does.
//! - Sizes are capped like Postfix: v1 at [`MAX_V1_LEN`] bytes, v2 at [`MAX_V2_LEN`].

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Longest v1 header the specification allows, `\r\n` included.
pub const MAX_V1_LEN: usize = 107;

/// Longest v2 header we accept (fixed part, addresses and TLVs): Postfix's peek buffer.
pub const MAX_V2_LEN: usize = 536;

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Signature, version/command, family/protocol and the 2-byte length.
const V2_FIXED_LEN: usize = 16;

/// Version 2 in the high nibble; the command in the low nibble.
const V2_LOCAL: u8 = 0x20;
const V2_PROXY: u8 = 0x21;

/// Address family in the high nibble, transport protocol in the low nibble.
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// Address block sizes: two addresses and two ports.
const V2_TCP4_BLOCK: u16 = 4 + 4 + 2 + 2;
const V2_TCP6_BLOCK: u16 = 16 + 16 + 2 + 2;

const V1_PREFIX: &[u8] = b"PROXY ";

/// Which PROXY protocol version to speak to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A relayed connection: `source` is the original client, `destination` the address it
    /// connected to.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// A connection made by the proxy itself (health checks): the receiver must use the
    /// real endpoints of the connection.
    Local,
}

/// Why bytes are not an acceptable PROXY header. None of these can be fixed by reading
/// more bytes: the connection should be closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header (no v1 or v2 signature)")]
    NotProxy,
    #[error("PROXY v1 header has no CRLF within {MAX_V1_LEN} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1Syntax(&'static str),
    #[error("unsupported PROXY v1 protocol {0:?} (expected TCP4, TCP6 or UNKNOWN)")]
    V1Protocol(String),
    #[error("invalid address {0:?} in PROXY v1 header")]
    V1Address(String),
    #[error("invalid port {0:?} in PROXY v1 header")]
    V1Port(String),
    #[error("unsupported PROXY v2 version {0} (only version 2 exists)")]
    V2Version(u8),
    #[error("unsupported PROXY v2 command {0:#x} (expected LOCAL or PROXY)")]
    V2Command(u8),
    #[error("unsupported PROXY v2 address family/protocol {0:#04x} (only TCP over IPv4 or IPv6)")]
    V2Family(u8),
    #[error("PROXY v2 header of {0} bytes exceeds the limit of {MAX_V2_LEN}")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {0} bytes is too short for its address family")]
    V2ShortAddresses(usize),
}

/// Encodes `header` as one buffer, to be sent in a single `write()` before any payload.
///
/// Source and destination of different families are sent as IPv6, with the IPv4 one
/// mapped (`::ffff:a.b.c.d`), because neither version can carry mixed families.
///
/// v1 has no LOCAL command, so [`ProxyHeader::Local`] becomes `PROXY UNKNOWN\r\n`.
/// Postfix rejects `UNKNOWN`: for a v1 backend, health checks must send a real `Proxy`
/// header built from the check socket's own addresses (as HAProxy does).
pub fn encode(version: ProxyVersion, header: &ProxyHeader) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => encode_v1(header),
        ProxyVersion::V2 => encode_v2(header),
    }
}

/// Parses a PROXY header (either version) at the start of `buf`.
///
/// Returns `Ok(None)` while `buf` is a prefix of a header that could still be valid,
/// `Ok(Some((header, len)))` once complete (the payload starts at `buf[len..]`), and an
/// error as soon as the bytes cannot become a valid header. Never panics.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(0x0D) => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// A source/destination pair of one family, as both versions need.
enum Endpoints {
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
}

/// Brings both addresses to the same family, mapping IPv4 into IPv6 when they differ.
fn same_family(source: SocketAddr, destination: SocketAddr) -> Endpoints {
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Endpoints::V4(s, d),
        (s, d) => Endpoints::V6(to_v6(s), to_v6(d)),
    }
}

fn to_v6(addr: SocketAddr) -> SocketAddrV6 {
    match addr {
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        SocketAddr::V6(a) => a,
    }
}

fn encode_v1(header: &ProxyHeader) -> Vec<u8> {
    let line = match *header {
        ProxyHeader::Local => "PROXY UNKNOWN\r\n".to_owned(),
        ProxyHeader::Proxy {
            source,
            destination,
        } => match same_family(source, destination) {
            Endpoints::V4(s, d) => v1_line("TCP4", s.ip(), d.ip(), s.port(), d.port()),
            Endpoints::V6(s, d) => v1_line("TCP6", s.ip(), d.ip(), s.port(), d.port()),
        },
    };
    debug_assert!(line.len() <= MAX_V1_LEN);
    line.into_bytes()
}

fn v1_line(protocol: &str, src: impl Display, dst: impl Display, sport: u16, dport: u16) -> String {
    format!("PROXY {protocol} {src} {dst} {sport} {dport}\r\n")
}

fn encode_v2(header: &ProxyHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + usize::from(V2_TCP6_BLOCK));
    out.extend_from_slice(&V2_SIGNATURE);
    match *header {
        ProxyHeader::Local => {
            out.extend_from_slice(&[V2_LOCAL, V2_UNSPEC]);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        ProxyHeader::Proxy {
            source,
            destination,
        } => {
            out.push(V2_PROXY);
            match same_family(source, destination) {
                Endpoints::V4(s, d) => {
                    v2_prelude(&mut out, V2_TCP4, V2_TCP4_BLOCK);
                    v2_addresses(
                        &mut out,
                        &s.ip().octets(),
                        &d.ip().octets(),
                        s.port(),
                        d.port(),
                    );
                }
                Endpoints::V6(s, d) => {
                    v2_prelude(&mut out, V2_TCP6, V2_TCP6_BLOCK);
                    v2_addresses(
                        &mut out,
                        &s.ip().octets(),
                        &d.ip().octets(),
                        s.port(),
                        d.port(),
                    );
                }
            }
        }
    }
    out
}

/// Appends the family/protocol byte and the length of the address block.
fn v2_prelude(out: &mut Vec<u8>, family: u8, block_len: u16) {
    out.push(family);
    out.extend_from_slice(&block_len.to_be_bytes());
}

/// Appends the address block: source and destination addresses, then their ports.
fn v2_addresses(out: &mut Vec<u8>, src: &[u8], dst: &[u8], sport: u16, dport: u16) {
    out.extend_from_slice(src);
    out.extend_from_slice(dst);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// v1 parsing

/// The protocol word of a v1 header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Protocol {
    Tcp4,
    Tcp6,
    Unknown,
}

const V1_PROTOCOLS: [(&str, V1Protocol); 3] = [
    ("TCP4", V1Protocol::Tcp4),
    ("TCP6", V1Protocol::Tcp6),
    ("UNKNOWN", V1Protocol::Unknown),
];

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = buf.get(..MAX_V1_LEN).unwrap_or(buf);
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => {
            let line = window.get(..end).unwrap_or_default();
            parse_v1_line(line).map(|header| Some((header, end + 2)))
        }
        None if window.len() >= MAX_V1_LEN => Err(ProxyError::V1TooLong),
        None => check_v1_prefix(window).map(|()| None),
    }
}

/// Parses a complete v1 line, without its CRLF.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let text = v1_text(line)?;
    let rest = text.strip_prefix("PROXY ").ok_or(ProxyError::NotProxy)?;
    let mut fields = rest.split(' ');
    let protocol = v1_protocol(fields.next().unwrap_or_default())?;
    if protocol == V1Protocol::Unknown {
        // The specification says everything after UNKNOWN must be ignored.
        return Ok(ProxyHeader::Local);
    }
    let fields: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = fields.as_slice() else {
        return Err(ProxyError::V1Syntax(
            "expected source, destination, source port and destination port",
        ));
    };
    Ok(ProxyHeader::Proxy {
        source: SocketAddr::new(v1_ip(protocol, src)?, v1_port(sport)?),
        destination: SocketAddr::new(v1_ip(protocol, dst)?, v1_port(dport)?),
    })
}

/// Checks that an incomplete v1 header (no CRLF yet) can still become a valid one, so
/// that garbage is refused at once rather than after a timeout.
fn check_v1_prefix(partial: &[u8]) -> Result<(), ProxyError> {
    if let Some((b'\r', line)) = partial.split_last() {
        // Only the LF is missing: the line itself must be complete and valid.
        return parse_v1_line(line).map(|_| ());
    }
    let text = v1_text(partial)?;
    let Some(rest) = text.strip_prefix("PROXY ") else {
        return if V1_PREFIX.starts_with(partial) {
            Ok(())
        } else {
            Err(ProxyError::NotProxy)
        };
    };
    let mut fields: Vec<&str> = rest.split(' ').collect();
    // The last field may still grow; the ones before it are complete.
    let last = fields.pop().unwrap_or_default();
    let Some((first, complete)) = fields.split_first() else {
        return if V1_PROTOCOLS.iter().any(|(word, _)| word.starts_with(last)) {
            Ok(())
        } else {
            Err(ProxyError::V1Protocol(last.to_owned()))
        };
    };
    let protocol = v1_protocol(first)?;
    if protocol == V1Protocol::Unknown {
        return Ok(());
    }
    check_v1_fields(protocol, complete, last)
}

/// Validates the complete address fields of a partial TCP4/TCP6 line and the characters
/// of the one still being received.
fn check_v1_fields(protocol: V1Protocol, complete: &[&str], last: &str) -> Result<(), ProxyError> {
    if complete.len() >= 4 {
        return Err(ProxyError::V1Syntax("too many fields"));
    }
    for (index, field) in complete.iter().enumerate() {
        match index {
            0 | 1 => v1_ip(protocol, field).map(|_| ())?,
            _ => v1_port(field).map(|_| ())?,
        }
    }
    let allowed = |c: char| match (complete.len(), protocol) {
        (0 | 1, V1Protocol::Tcp4) => c.is_ascii_digit() || c == '.',
        (0 | 1, _) => c.is_ascii_hexdigit() || c == ':' || c == '.',
        _ => c.is_ascii_digit(),
    };
    if last.chars().all(allowed) {
        Ok(())
    } else {
        Err(ProxyError::V1Syntax("unexpected character"))
    }
}

/// v1 headers are printable US-ASCII; anything else (including a bare LF) is refused.
fn v1_text(bytes: &[u8]) -> Result<&str, ProxyError> {
    if !bytes.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err(ProxyError::V1Syntax("non-printable byte"));
    }
    std::str::from_utf8(bytes).map_err(|_| ProxyError::V1Syntax("non-printable byte"))
}

fn v1_protocol(word: &str) -> Result<V1Protocol, ProxyError> {
    V1_PROTOCOLS
        .iter()
        .find(|(name, _)| *name == word)
        .map(|(_, protocol)| *protocol)
        .ok_or_else(|| ProxyError::V1Protocol(word.to_owned()))
}

fn v1_ip(protocol: V1Protocol, text: &str) -> Result<IpAddr, ProxyError> {
    let parsed = match protocol {
        V1Protocol::Tcp4 => text.parse::<Ipv4Addr>().map(IpAddr::V4),
        _ => text.parse::<Ipv6Addr>().map(IpAddr::V6),
    };
    parsed.map_err(|_| ProxyError::V1Address(text.to_owned()))
}

/// A decimal port: digits only (no sign, which `u16::from_str` would take), 0..=65535.
fn v1_port(text: &str) -> Result<u16, ProxyError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| text.parse().ok())
        .flatten()
        .ok_or_else(|| ProxyError::V1Port(text.to_owned()))
}

// ---------------------------------------------------------------------------------------
// v2 parsing

/// What the address block of a v2 header holds, as far as we care.
#[derive(Clone, Copy)]
enum V2Addresses {
    /// LOCAL, or PROXY with UNSPEC: use the real connection endpoints.
    Ignored,
    Tcp4,
    Tcp6,
}

impl V2Addresses {
    fn block_len(self) -> usize {
        match self {
            Self::Ignored => 0,
            Self::Tcp4 => usize::from(V2_TCP4_BLOCK),
            Self::Tcp6 => usize::from(V2_TCP6_BLOCK),
        }
    }
}

/// Parses a v2 header field by field, so a prefix is refused at the first bad byte.
fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let signature = buf.get(..V2_SIGNATURE.len()).unwrap_or(buf);
    if !V2_SIGNATURE.starts_with(signature) {
        return Err(ProxyError::NotProxy);
    }
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    let local = v2_is_local(version_command)?;
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    let addresses = if local {
        V2Addresses::Ignored
    } else {
        v2_family(family)?
    };
    let (Some(&high), Some(&low)) = (buf.get(14), buf.get(15)) else {
        return Ok(None);
    };
    let block_len = usize::from(u16::from_be_bytes([high, low]));
    let total = V2_FIXED_LEN + block_len;
    if total > MAX_V2_LEN {
        return Err(ProxyError::V2TooLong(total));
    }
    if block_len < addresses.block_len() {
        return Err(ProxyError::V2ShortAddresses(block_len));
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(None);
    };
    v2_header(addresses, block).map(|header| Some((header, total)))
}

/// Checks the version nibble and tells LOCAL (`true`) from PROXY (`false`).
fn v2_is_local(version_command: u8) -> Result<bool, ProxyError> {
    match (version_command >> 4, version_command & 0x0F) {
        (2, 0) => Ok(true),
        (2, 1) => Ok(false),
        (2, command) => Err(ProxyError::V2Command(command)),
        (version, _) => Err(ProxyError::V2Version(version)),
    }
}

fn v2_family(family: u8) -> Result<V2Addresses, ProxyError> {
    match family {
        V2_UNSPEC => Ok(V2Addresses::Ignored),
        V2_TCP4 => Ok(V2Addresses::Tcp4),
        V2_TCP6 => Ok(V2Addresses::Tcp6),
        other => Err(ProxyError::V2Family(other)),
    }
}

/// Decodes the address block; whatever follows the addresses (TLVs) is skipped.
fn v2_header(addresses: V2Addresses, block: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let short = || ProxyError::V2ShortAddresses(block.len());
    let (source, destination) = match addresses {
        V2Addresses::Ignored => return Ok(ProxyHeader::Local),
        V2Addresses::Tcp4 => {
            let src: [u8; 4] = take(block, 0).ok_or_else(short)?;
            let dst: [u8; 4] = take(block, 4).ok_or_else(short)?;
            let ports: [u8; 4] = take(block, 8).ok_or_else(short)?;
            v2_endpoints(IpAddr::from(src), IpAddr::from(dst), ports)
        }
        V2Addresses::Tcp6 => {
            let src: [u8; 16] = take(block, 0).ok_or_else(short)?;
            let dst: [u8; 16] = take(block, 16).ok_or_else(short)?;
            let ports: [u8; 4] = take(block, 32).ok_or_else(short)?;
            v2_endpoints(IpAddr::from(src), IpAddr::from(dst), ports)
        }
    };
    Ok(ProxyHeader::Proxy {
        source,
        destination,
    })
}

fn v2_endpoints(src: IpAddr, dst: IpAddr, ports: [u8; 4]) -> (SocketAddr, SocketAddr) {
    let [sh, sl, dh, dl] = ports;
    (
        SocketAddr::new(src, u16::from_be_bytes([sh, sl])),
        SocketAddr::new(dst, u16::from_be_bytes([dh, dl])),
    )
}

/// `N` bytes of `block` starting at `at`, or `None` if the block is too short.
fn take<const N: usize>(block: &[u8], at: usize) -> Option<[u8; N]> {
    block.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn proxy(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxy {
            source: addr(source),
            destination: addr(destination),
        }
    }

    fn v2_bytes(rest: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(rest);
        out
    }

    /// Every prefix shorter than the full header asks for more bytes.
    fn assert_prefixes_incomplete(bytes: &[u8]) {
        for len in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..len]),
                Ok(None),
                "prefix of {len} bytes of {bytes:?}"
            );
        }
    }

    // --- encoding, checked against hand-made bytes and against the `ppp` crate ---

    #[test]
    fn v1_tcp4_encoding() {
        let header = proxy("192.0.2.1:51234", "198.51.100.7:25");
        let bytes = encode(ProxyVersion::V1, &header);
        assert_eq!(bytes, b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 25\r\n");

        let parsed = ppp::v1::Header::try_from(bytes.as_slice()).expect("ppp parses v1");
        assert_eq!(
            parsed.addresses,
            ppp::v1::Addresses::new_tcp4(
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(198, 51, 100, 7),
                51234,
                25
            )
        );
    }

    #[test]
    fn v1_tcp6_encoding() {
        let header = proxy("[2001:db8::1]:40000", "[2001:db8::25]:25");
        let bytes = encode(ProxyVersion::V1, &header);
        assert_eq!(bytes, b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 25\r\n");

        let parsed = ppp::v1::Header::try_from(bytes.as_slice()).expect("ppp parses v1");
        assert_eq!(
            parsed.addresses,
            ppp::v1::Addresses::new_tcp6(
                "2001:db8::1".parse::<Ipv6Addr>().expect("ip"),
                "2001:db8::25".parse::<Ipv6Addr>().expect("ip"),
                40000,
                25
            )
        );
    }

    #[test]
    fn v1_mixed_families_use_mapped_ipv6() {
        let header = proxy("192.0.2.1:1234", "[2001:db8::25]:25");
        let bytes = encode(ProxyVersion::V1, &header);
        assert_eq!(
            bytes,
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::25 1234 25\r\n"
        );

        let parsed = ppp::v1::Header::try_from(bytes.as_slice()).expect("ppp parses v1");
        assert_eq!(
            parsed.addresses,
            ppp::v1::Addresses::new_tcp6(
                Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(),
                "2001:db8::25".parse::<Ipv6Addr>().expect("ip"),
                1234,
                25
            )
        );
    }

    #[test]
    fn v1_local_is_unknown() {
        let bytes = encode(ProxyVersion::V1, &ProxyHeader::Local);
        assert_eq!(bytes, b"PROXY UNKNOWN\r\n");
        let parsed = ppp::v1::Header::try_from(bytes.as_slice()).expect("ppp parses v1");
        assert_eq!(parsed.addresses, ppp::v1::Addresses::Unknown);
    }

    #[test]
    fn v1_longest_header_fits() {
        let header = proxy(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        let bytes = encode(ProxyVersion::V1, &header);
        assert!(bytes.len() <= MAX_V1_LEN, "{} bytes", bytes.len());
        assert_eq!(parse(&bytes), Ok(Some((header, bytes.len()))));
    }

    #[test]
    fn v2_tcp4_encoding() {
        let header = proxy("192.0.2.1:51234", "198.51.100.7:25");
        let bytes = encode(ProxyVersion::V2, &header);
        let expected = v2_bytes(&[
            0x21, 0x11, 0x00, 0x0C, // PROXY, TCP4, 12 bytes
            192, 0, 2, 1, 198, 51, 100, 7, // addresses
            0xC8, 0x22, 0x00, 0x19, // ports 51234, 25
        ]);
        assert_eq!(bytes, expected);

        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("ppp parses v2");
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::IPv4(ppp::v2::IPv4::new(
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(198, 51, 100, 7),
                51234,
                25
            ))
        );
        assert_eq!(parsed.tlvs().count(), 0);
    }

    #[test]
    fn v2_tcp6_encoding() {
        let header = proxy("[2001:db8::1]:40000", "[2001:db8::25]:25");
        let bytes = encode(ProxyVersion::V2, &header);
        let mut expected = v2_bytes(&[0x21, 0x21, 0x00, 0x24]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25,
        ]);
        expected.extend_from_slice(&[0x9C, 0x40, 0x00, 0x19]);
        assert_eq!(bytes, expected);

        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("ppp parses v2");
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::IPv6(ppp::v2::IPv6::new(
                "2001:db8::1".parse::<Ipv6Addr>().expect("ip"),
                "2001:db8::25".parse::<Ipv6Addr>().expect("ip"),
                40000,
                25
            ))
        );
    }

    #[test]
    fn v2_mixed_families_use_mapped_ipv6() {
        let header = proxy("[2001:db8::1]:40000", "198.51.100.7:25");
        let bytes = encode(ProxyVersion::V2, &header);
        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("ppp parses v2");
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::IPv6(ppp::v2::IPv6::new(
                "2001:db8::1".parse::<Ipv6Addr>().expect("ip"),
                Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped(),
                40000,
                25
            ))
        );
    }

    #[test]
    fn v2_local_encoding() {
        let bytes = encode(ProxyVersion::V2, &ProxyHeader::Local);
        assert_eq!(bytes, v2_bytes(&[0x20, 0x00, 0x00, 0x00]));

        let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("ppp parses v2");
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }

    // --- parsing ---

    #[test]
    fn parses_hand_made_v1() {
        let tcp4 = b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(tcp4),
            Ok(Some((proxy("192.0.2.1:51234", "198.51.100.7:25"), 44)))
        );
        let tcp6 = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert_eq!(
            parse(tcp6),
            Ok(Some((proxy("[2001:db8::1]:1", "[::1]:65535"), tcp6.len())))
        );
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(
            parse(unknown),
            Ok(Some((ProxyHeader::Local, unknown.len())))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Some((ProxyHeader::Local, 15)))
        );
    }

    #[test]
    fn parses_hand_made_v2() {
        let mut tcp4 = v2_bytes(&[
            0x21, 0x11, 0x00, 0x0C, 10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0x00, 0x00, 0x19,
        ]);
        tcp4.extend_from_slice(b"220 ready\r\n");
        assert_eq!(
            parse(&tcp4),
            Ok(Some((proxy("10.0.0.1:1024", "10.0.0.2:25"), 28)))
        );

        let mut tcp6 = v2_bytes(&[0x21, 0x21, 0x00, 0x24]);
        tcp6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        tcp6.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().expect("ip").octets());
        tcp6.extend_from_slice(&[0x00, 0x50, 0x01, 0xBB]);
        assert_eq!(
            parse(&tcp6),
            Ok(Some((proxy("[::1]:80", "[2001:db8::2]:443"), 52)))
        );

        let local = v2_bytes(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 16))));
    }

    #[test]
    fn v2_local_ignores_its_address_block() {
        // LOCAL may carry any family and addresses; the receiver ignores them.
        let local = v2_bytes(&[0x20, 0x11, 0x00, 0x0C, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 28))));
        let unspec = v2_bytes(&[0x21, 0x00, 0x00, 0x02, 0xAA, 0xBB]);
        assert_eq!(parse(&unspec), Ok(Some((ProxyHeader::Local, 18))));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let addresses: ppp::v2::Addresses = (addr("192.0.2.9:3333"), addr("192.0.2.10:25")).into();
        let bytes = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .write_tlv(ppp::v2::Type::NoOp, b"padding")
        .expect("tlv")
        .write_tlv(ppp::v2::Type::Authority, b"mx.example.com")
        .expect("tlv")
        .build()
        .expect("build");
        assert_eq!(
            parse(&bytes),
            Ok(Some((
                proxy("192.0.2.9:3333", "192.0.2.10:25"),
                bytes.len()
            )))
        );
        assert_prefixes_incomplete(&bytes);
    }

    #[test]
    fn round_trips() {
        let headers = [
            proxy("192.0.2.1:1", "192.0.2.2:25"),
            proxy("0.0.0.0:0", "255.255.255.255:65535"),
            proxy("[2001:db8::1]:40000", "[fe80::1]:25"),
            proxy("[::]:0", "[::ffff:10.1.2.3]:587"),
            ProxyHeader::Local,
        ];
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            for header in headers {
                let bytes = encode(version, &header);
                assert_eq!(
                    parse(&bytes),
                    Ok(Some((header, bytes.len()))),
                    "{version:?}"
                );
                assert_prefixes_incomplete(&bytes);
            }
        }
    }

    #[test]
    fn round_trip_of_mixed_families_gives_mapped_addresses() {
        let header = proxy("192.0.2.1:1234", "[2001:db8::25]:25");
        let expected = proxy("[::ffff:192.0.2.1]:1234", "[2001:db8::25]:25");
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let bytes = encode(version, &header);
            assert_eq!(
                parse(&bytes),
                Ok(Some((expected, bytes.len()))),
                "{version:?}"
            );
        }
    }

    #[test]
    fn refuses_garbage() {
        let cases: &[(&[u8], ProxyError)] = &[
            (b"EHLO example.com\r\n", ProxyError::NotProxy),
            (b"PROXZ", ProxyError::NotProxy),
            (b"PROXY\r\n", ProxyError::NotProxy),
            (b"PROXY TCP5 ", ProxyError::V1Protocol("TCP5".into())),
            (b"PROXY X", ProxyError::V1Protocol("X".into())),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                ProxyError::V1Syntax(
                    "expected source, destination, source port and destination port",
                ),
            ),
            (b"PROXY TCP4 ::1 ", ProxyError::V1Address("::1".into())),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
                ProxyError::V1Port("+1".into()),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                ProxyError::V1Port("65536".into()),
            ),
            (
                b"PROXY TCP4 1.2.3.4  5.6.7.8",
                ProxyError::V1Address("".into()),
            ),
            (
                b"PROXY TCP4 1.2.3.4\n",
                ProxyError::V1Syntax("non-printable byte"),
            ),
            (
                b"PROXY TCP6 1.2.3.4\r",
                ProxyError::V1Syntax(
                    "expected source, destination, source port and destination port",
                ),
            ),
            (
                b"PROXY TCP4 1.2.x",
                ProxyError::V1Syntax("unexpected character"),
            ),
            (b"\r\n\r\n\0\r\nQUIX", ProxyError::NotProxy),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x11,
                ],
                ProxyError::V2Version(1),
            ),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x22,
                ],
                ProxyError::V2Command(2),
            ),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21,
                    0x12,
                ],
                ProxyError::V2Family(0x12),
            ),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21,
                    0x31,
                ],
                ProxyError::V2Family(0x31),
            ),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21,
                    0x11, 0x00, 0x08,
                ],
                ProxyError::V2ShortAddresses(8),
            ),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21,
                    0x11, 0x02, 0x09,
                ],
                ProxyError::V2TooLong(537),
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(
                parse(bytes),
                Err(error.clone()),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn v1_without_crlf_within_limit_is_refused() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LEN, b'a');
        assert_eq!(parse(&long[..MAX_V1_LEN - 1]), Ok(None));
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_largest_accepted_header() {
        let mut bytes = v2_bytes(&[0x20, 0x00, 0x02, 0x08]);
        bytes.resize(MAX_V2_LEN, 0);
        assert_eq!(parse(&bytes), Ok(Some((ProxyHeader::Local, MAX_V2_LEN))));
    }

    use crate::test_support::XorShift;

    /// The parser never panics, answers consistently (a complete header's length never
    /// exceeds the input) and agrees that the prefix of an accepted header is incomplete.
    #[test]
    fn mutations_never_panic() {
        let seeds = [
            encode(
                ProxyVersion::V1,
                &proxy("192.0.2.1:51234", "198.51.100.7:25"),
            ),
            encode(ProxyVersion::V1, &proxy("[2001:db8::1]:1", "[::1]:2")),
            encode(ProxyVersion::V1, &ProxyHeader::Local),
            encode(
                ProxyVersion::V2,
                &proxy("192.0.2.1:51234", "198.51.100.7:25"),
            ),
            encode(ProxyVersion::V2, &proxy("[2001:db8::1]:1", "[::1]:2")),
            encode(ProxyVersion::V2, &ProxyHeader::Local),
        ];
        let interesting = [
            0x00, 0x0A, 0x0D, 0x20, b'.', b':', b'0', b'9', b'P', 0x11, 0x21, 0xFF,
        ];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for seed in &seeds {
            for _ in 0..3000 {
                let mut bytes = seed.clone();
                for _ in 0..=rng.below(3) {
                    mutate(&mut bytes, &mut rng, &interesting);
                }
                check_consistent(&bytes);
            }
        }
    }

    fn mutate(bytes: &mut Vec<u8>, rng: &mut XorShift, interesting: &[u8]) {
        let at = rng.below(bytes.len() + 1);
        let byte = match rng.below(2) {
            0 => interesting[rng.below(interesting.len())],
            _ => (rng.next() & 0xFF) as u8,
        };
        match rng.below(4) {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }

    /// Feeds every prefix of `bytes`: "need more" may turn into anything, but an error
    /// stays an error and a complete header stays the same header, as more bytes arrive.
    fn check_consistent(bytes: &[u8]) {
        let mut previous = Ok(None);
        for len in 0..=bytes.len() {
            let result = parse(&bytes[..len]);
            match (&previous, &result) {
                (Ok(None), _) => {}
                (Err(_), Err(_)) => {}
                (Ok(Some(before)), Ok(Some(now))) => assert_eq!(before, now, "{bytes:?}"),
                _ => panic!("{previous:?} then {result:?} for {:?}", &bytes[..len]),
            }
            if let Ok(Some((_, consumed))) = result {
                assert!(consumed <= len, "{bytes:?}");
            }
            previous = result;
        }
    }

    #[test]
    fn every_short_input_is_handled() {
        // All inputs of up to two bytes, and every single-byte extension of each signature.
        for a in 0..=255u8 {
            let _ = parse(&[a]);
            for b in 0..=255u8 {
                let _ = parse(&[a, b]);
            }
        }
        for prefix_len in 0..V2_SIGNATURE.len() + 4 {
            let mut v2 = v2_bytes(&[0x21, 0x11, 0x00, 0x0C]);
            v2.truncate(prefix_len);
            let mut v1 = b"PROXY TCP4 1".to_vec();
            v1.truncate(prefix_len);
            for byte in 0..=255u8 {
                for base in [&v1, &v2] {
                    let mut bytes = base.clone();
                    bytes.push(byte);
                    let _ = parse(&bytes);
                }
            }
        }
    }
}
