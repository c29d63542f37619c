//! Property tests of the PROXY header codec: whatever mxlb encodes, for any addresses and
//! ports of every family, its own reader (the one `accept_proxy` listeners use) parses back
//! to the same connection, consumes exactly the header and never a byte of what follows,
//! and asks for more on every shorter prefix. The `ppp` crate, an independent
//! implementation, reads the same bytes to the same addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use super::*;

fn ipv4() -> impl Strategy<Value = IpAddr> {
    any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
}

fn ipv6() -> impl Strategy<Value = IpAddr> {
    any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
}

fn socket(ip: impl Strategy<Value = IpAddr>) -> impl Strategy<Value = SocketAddr> {
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// A relayed connection of each address family: both IPv4, both IPv6, or mixed.
fn proxied() -> impl Strategy<Value = ProxyHeader> {
    let pair = |s, d| (socket(s), socket(d));
    prop_oneof![
        pair(ipv4().boxed(), ipv4().boxed()),
        pair(ipv6().boxed(), ipv6().boxed()),
        pair(ipv4().boxed(), ipv6().boxed()),
        pair(ipv6().boxed(), ipv4().boxed()),
    ]
    .prop_map(|(source, destination)| ProxyHeader::Proxy {
        source,
        destination,
    })
}

fn version() -> impl Strategy<Value = ProxyVersion> {
    prop_oneof![Just(ProxyVersion::V1), Just(ProxyVersion::V2)]
}

/// What a reader gets back: mixed families travel as IPv6 with the IPv4 side mapped.
fn as_received(header: ProxyHeader) -> ProxyHeader {
    match header {
        ProxyHeader::Proxy {
            source,
            destination,
        } if source.is_ipv4() != destination.is_ipv4() => ProxyHeader::Proxy {
            source: SocketAddr::V6(to_v6(source)),
            destination: SocketAddr::V6(to_v6(destination)),
        },
        other => other,
    }
}

/// What `ppp` read, as (source, destination) with IPv4 as IPv4.
fn ppp_endpoints(bytes: &[u8], version: ProxyVersion) -> Option<(SocketAddr, SocketAddr)> {
    match version {
        ProxyVersion::V1 => match ppp::v1::Header::try_from(bytes).ok()?.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v1::Addresses::Tcp6(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v1::Addresses::Unknown => None,
        },
        ProxyVersion::V2 => match ppp::v2::Header::try_from(bytes).ok()?.addresses {
            ppp::v2::Addresses::IPv4(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v2::Addresses::IPv6(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            _ => None,
        },
    }
}

proptest! {
    /// encode → parse gives the same connection, consumes exactly the header and leaves
    /// the payload that follows it (the client's first SMTP bytes) untouched.
    #[test]
    fn encode_then_parse_round_trips(
        version in version(),
        header in prop_oneof![proxied(), Just(ProxyHeader::Local)],
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let bytes = encode(version, &header);
        let mut stream = bytes.clone();
        stream.extend_from_slice(&payload);
        let (parsed, len) = parse(&stream)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?
            .ok_or_else(|| TestCaseError::fail("complete header read as incomplete"))?;
        prop_assert_eq!(parsed, as_received(header));
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(&stream[len..], payload.as_slice());
    }

    /// A header cut anywhere is incomplete, never an error: a slow sender is waited for.
    #[test]
    fn every_prefix_asks_for_more(version in version(), header in proxied()) {
        let bytes = encode(version, &header);
        for len in 0..bytes.len() {
            prop_assert_eq!(parse(&bytes[..len]), Ok(None), "prefix of {} bytes", len);
        }
    }

    /// An independent reader (the `ppp` crate) agrees on the addresses mxlb sends.
    #[test]
    fn ppp_reads_the_same_addresses(version in version(), header in proxied()) {
        let bytes = encode(version, &header);
        let ProxyHeader::Proxy { source, destination } = as_received(header) else {
            unreachable!("proxied() makes only Proxy headers");
        };
        prop_assert_eq!(ppp_endpoints(&bytes, version), Some((source, destination)));
    }
}
