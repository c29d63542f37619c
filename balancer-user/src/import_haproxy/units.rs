//! HAProxy's value syntaxes: times (`5s`, `100` = ms) and addresses (`:25`, `:::25`,
//! `[::1]:25`, `ipv6@:25`, `192.0.2.10:25`), turned into what mxlb's configuration takes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// A HAProxy time: a number with an optional unit, milliseconds when there is none.
pub(super) fn parse_time(text: &str) -> Result<Duration, String> {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a time (such as 5s or 500ms)"))?;
    let duration = match unit {
        "us" => Duration::from_micros(number),
        "" | "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        "d" => Duration::from_secs(number.saturating_mul(86_400)),
        _ => return Err(format!("{text:?} has an unknown time unit {unit:?}")),
    };
    Ok(duration)
}

/// A duration as mxlb's configuration writes it: in the largest unit that states it
/// exactly (`90s`, `10m`, `1500ms`), a form humantime reads back.
pub(super) fn format_duration(duration: Duration) -> String {
    let micros = duration.as_micros();
    const UNITS: [(u128, &str); 5] = [
        (86_400_000_000, "d"),
        (3_600_000_000, "h"),
        (60_000_000, "m"),
        (1_000_000, "s"),
        (1_000, "ms"),
    ];
    UNITS
        .iter()
        .find(|(size, _)| micros != 0 && micros.is_multiple_of(*size))
        .map_or_else(
            || format!("{micros}us"),
            |(size, unit)| format!("{}{unit}", micros / size),
        )
}

/// The host part of an address: a literal IP, or "any" of a family (`:25`, `*:25`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Host {
    Ip(IpAddr),
    AnyV4,
    AnyV6,
}

/// An address as HAProxy writes it on `bind` and `server` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub host: Host,
    pub port: Option<u16>,
}

/// Which address family a prefix (`ipv4@`, `ipv6@`, ...) forces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Any,
    V4,
    V6,
}

/// Parses `[prefix@]host[:port]`; IPv6 without brackets takes the text after the last
/// colon as the port (`:::25`, `::1:25`), as HAProxy does.
pub(super) fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let (family, rest) = match text.split_once('@') {
        Some(("ipv4" | "tcp4", rest)) => (Family::V4, rest),
        Some(("ipv6" | "tcp6", rest)) => (Family::V6, rest),
        Some(("tcp", rest)) => (Family::Any, rest),
        Some((prefix, _)) => {
            return Err(format!(
                "{prefix}@ is not a TCP address: mxlb takes IP addresses only"
            ));
        }
        None if text.starts_with('/') => {
            return Err("a UNIX socket: mxlb takes IP addresses only".to_owned());
        }
        None => (Family::Any, text),
    };
    let (host, port) = split_host_port(rest)?;
    let port = match port {
        None | Some("") => None,
        Some(port) => Some(parse_port(port)?),
    };
    let host = match (host, family) {
        ("" | "*", Family::V6) => Host::AnyV6,
        ("" | "*", _) => Host::AnyV4,
        (literal, _) => match literal.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(_)) if family == Family::V6 => {
                return Err(format!("{ip} is not an IPv6 address"));
            }
            Ok(ip @ IpAddr::V6(_)) if family == Family::V4 => {
                return Err(format!("{ip} is not an IPv4 address"));
            }
            Ok(ip) => Host::Ip(ip),
            Err(_) => {
                return Err(format!(
                    "{literal:?} is a host name: mxlb takes IP literals only"
                ));
            }
        },
    };
    Ok(Endpoint { host, port })
}

fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: no closing ']'"))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("{text:?}: expected ':' after ']'")),
            },
        };
    }
    Ok(match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.contains('-') || text.starts_with('+') {
        return Err(format!(
            "port {text:?}: ranges and offsets have no mxlb equivalent; write one port"
        ));
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

impl Endpoint {
    /// The socket addresses to listen on. An IPv6 "any" address is dual stack in HAProxy
    /// unless `v6only`, while mxlb binds IPv6 sockets v6only: it takes both families.
    pub fn listen_addrs(self, v6only: bool) -> Result<Vec<SocketAddr>, String> {
        let port = self
            .port
            .ok_or("no port: mxlb's binds need one".to_owned())?;
        let v4_any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let v6_any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        Ok(match self.host {
            Host::AnyV4 => vec![v4_any],
            Host::AnyV6 if v6only => vec![v6_any],
            Host::AnyV6 => vec![v4_any, v6_any],
            Host::Ip(ip) if ip.is_unspecified() && ip.is_ipv6() && !v6only => {
                vec![v4_any, v6_any]
            }
            Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
        })
    }

    /// The address to connect to: a literal, specified IP and a port.
    pub fn server_addr(self) -> Result<SocketAddr, String> {
        let port = self.port.ok_or(
            "no port: HAProxy would use the port each client connected to; write it".to_owned(),
        )?;
        match self.host {
            Host::Ip(ip) if !ip.is_unspecified() => Ok(SocketAddr::new(ip, port)),
            _ => Err("not a server address: a specific IP is needed".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(text: &str, v6only: bool) -> Vec<String> {
        parse_endpoint(text)
            .and_then(|endpoint| endpoint.listen_addrs(v6only))
            .expect("parses")
            .iter()
            .map(SocketAddr::to_string)
            .collect()
    }

    #[test]
    fn times_default_to_milliseconds() {
        assert_eq!(parse_time("100"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_time("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_time("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_time("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_time("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_time("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_time("5 s").is_err());
        assert!(parse_time("s").is_err());
        assert!(parse_time("5x").unwrap_err().contains("unknown time unit"));
        assert!(parse_time("1.5s").is_err());
    }

    #[test]
    fn durations_in_the_largest_exact_unit() {
        let cases = [
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_micros(250), "250us"),
            (Duration::ZERO, "0us"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            if !duration.is_zero() {
                assert_eq!(humantime::parse_duration(text), Ok(duration), "{text}");
            }
        }
    }

    #[test]
    fn bind_forms() {
        assert_eq!(addrs(":25", false), ["0.0.0.0:25"]);
        assert_eq!(addrs("*:25", false), ["0.0.0.0:25"]);
        assert_eq!(addrs("0.0.0.0:25", false), ["0.0.0.0:25"]);
        assert_eq!(addrs("192.0.2.1:2525", false), ["192.0.2.1:2525"]);
        assert_eq!(addrs(":::25", false), ["0.0.0.0:25", "[::]:25"]);
        assert_eq!(addrs(":::25", true), ["[::]:25"]);
        assert_eq!(addrs("[::]:25", true), ["[::]:25"]);
        assert_eq!(addrs("ipv6@:25", false), ["0.0.0.0:25", "[::]:25"]);
        assert_eq!(addrs("ipv6@:25", true), ["[::]:25"]);
        assert_eq!(addrs("ipv4@:25", false), ["0.0.0.0:25"]);
        assert_eq!(addrs("[2001:db8::1]:25", false), ["[2001:db8::1]:25"]);
        assert_eq!(addrs("::1:25", false), ["[::1]:25"]);
        assert_eq!(addrs("ipv6@::1:25", false), ["[::1]:25"]);
    }

    #[test]
    fn unmappable_addresses() {
        let error = |text: &str| {
            parse_endpoint(text)
                .and_then(|endpoint| endpoint.listen_addrs(false))
                .expect_err(text)
        };
        assert!(error("unix@/run/smtp.sock").contains("not a TCP address"));
        assert!(error("/run/smtp.sock").contains("UNIX socket"));
        assert!(error("fd@3").contains("not a TCP address"));
        assert!(error("mail.example.com:25").contains("host name"));
        assert!(error(":25-30").contains("ranges"));
        assert!(error("192.0.2.1").contains("no port"));
        assert!(error(":0").contains("not a port"));
        assert!(error("ipv6@192.0.2.1:25").contains("not an IPv6"));
        assert!(error("ipv4@[::1]:25").contains("not an IPv4"));
    }

    #[test]
    fn server_addresses() {
        let server = |text: &str| parse_endpoint(text).and_then(Endpoint::server_addr);
        assert_eq!(
            server("192.0.2.10:25"),
            Ok("192.0.2.10:25".parse().unwrap())
        );
        assert_eq!(
            server("[2001:db8::10]:25"),
            Ok("[2001:db8::10]:25".parse().unwrap())
        );
        assert_eq!(
            server("ipv6@2001:db8::10:25"),
            Ok("[2001:db8::10]:25".parse().unwrap())
        );
        assert!(server("192.0.2.10").unwrap_err().contains("no port"));
        assert!(server(":25").unwrap_err().contains("specific IP"));
        assert!(server("+1").is_err());
    }
}
