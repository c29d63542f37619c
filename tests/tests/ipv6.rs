//! IPv6, as an MX faces it: a dual-stack listener (`127.0.0.1:P` and `[::1]:P`, the second
//! bound v6-only), IPv6 servers, PROXY headers that carry IPv6 clients (v1 `TCP6`, v2), the
//! kernel relay over IPv6 sockets, and per-source limits that group IPv6 clients by
//! prefix. The last test runs in a network namespace of its own where any address of
//! 2001:db8::/48 can be bound, so clients come from distinct IPv6 addresses.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, ProxyInfo, digest_until_eof, pattern_digest, read_line,
    send_pattern_and_finish,
};
use mxlb_tests::free_port;
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path};
use mxlb_tests::netns::Netns;

const TIMEOUT: Duration = Duration::from_secs(20);
const BANNER: &str = "220 six\r\n";
const MIB: u64 = 1 << 20;

fn reporting_on(bind: SocketAddr) -> Result<Backend<(ProxyInfo, Digest256)>> {
    Backend::spawn_on(bind, |mut stream, info| {
        stream.write_all(BANNER.as_bytes())?;
        Ok((info, digest_until_eof(&mut stream)?))
    })
}

/// A configuration whose listener binds every address in `bind`.
fn dual_stack_config(
    relay: RelayKind,
    test: &str,
    bind: &[SocketAddr],
    servers: &[ServerEntry<'_>],
    keys: &str,
) -> (String, std::path::PathBuf) {
    let pins = pin_path(test);
    let text = config_with_listener_keys(relay, &pins, bind[0], servers, keys);
    let list: Vec<String> = bind.iter().map(|a| format!("\"{a}\"")).collect();
    let text = text.replacen(
        &format!("bind = [\"{}\"]", bind[0]),
        &format!("bind = [{}]", list.join(", ")),
        1,
    );
    (text, pins)
}

/// One session from `from` (or any local address) to `to`: 1 MiB after the banner, the
/// reply read to EOF. Returns the client's own address.
fn session(from: Option<IpAddr>, to: SocketAddr) -> Result<SocketAddr> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(from) = from {
        socket.bind(&SocketAddr::new(from, 0).into())?;
    }
    socket.connect_timeout(&to.into(), TIMEOUT)?;
    let mut client = TcpStream::from(socket);
    client.set_read_timeout(Some(TIMEOUT))?;
    ensure!(read_line(&mut client)? == BANNER);
    send_pattern_and_finish(&mut client, 6, MIB)?;
    Ok(client.local_addr()?)
}

#[test]
fn kernel_relay_over_ipv6_with_v1_and_v2_headers() -> Result<()> {
    dual_stack(RelayKind::Kernel)
}

#[test]
fn user_space_relay_over_ipv6_with_v1_and_v2_headers() -> Result<()> {
    dual_stack(RelayKind::UserSpace)
}

/// Clients over IPv6 and IPv4 to one dual-stack listener; servers on `[::1]` getting a v1
/// and a v2 header: each server sees the true client and listener address, and every
/// byte.
fn dual_stack(relay: RelayKind) -> Result<()> {
    let v1 = reporting_on("[::1]:0".parse()?)?;
    let v2 = reporting_on("[::1]:0".parse()?)?;
    let port = free_port();
    let v6: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
    let v4: SocketAddr = ([127, 0, 0, 1], port).into();
    let servers = [
        ServerEntry {
            name: "v1",
            addr: v1.addr,
            send_proxy: "v1",
        },
        ServerEntry {
            name: "v2",
            addr: v2.addr,
            send_proxy: "v2",
        },
    ];
    let (text, pins) =
        dual_stack_config(relay, &format!("ipv6-{relay:?}"), &[v4, v6], &servers, "");
    let mxlb = Mxlb::start(&text, v6, &pins)?;

    // Round robin: v1, v2, v1, v2.
    for (listener, backend) in [(v6, &v1), (v6, &v2), (v4, &v1), (v4, &v2)] {
        let client = session(None, listener)?;
        let (info, digest) = backend.next_report(TIMEOUT)?;
        ensure!(digest == pattern_digest(6, MIB), "{listener}: {digest:?}");
        ensure!(
            info.source == client && info.destination == listener,
            "{listener}: the server was told {info:?}, the client was {client}"
        );
        // Who carried the bytes, by the daemon's count. `RelayKind::Kernel` pairs at once
        // (`kernel_relay_after = 0`), and 1 MiB cannot put a reader `max_inflight` (4 MiB)
        // behind, so the kernel carried every byte, over IPv6 sockets too.
        let finished = mxlb.finished_for(client, TIMEOUT)?;
        ensure!(
            finished.bytes_in == MIB && finished.bytes_out == BANNER.len() as u64,
            "{}",
            finished.line
        );
        match relay {
            RelayKind::Kernel => ensure!(
                finished.kernel_bytes == finished.total(),
                "the kernel carried every byte: {}",
                finished.line
            ),
            RelayKind::Adaptive | RelayKind::UserSpace => ensure!(
                finished.kernel_bytes == 0,
                "relayed in user space: {}",
                finished.line
            ),
        }
    }
    Ok(())
}

/// `max_conn_per_source = 1` with the default IPv6 grouping (/64): a second client from
/// another address of the same /64 is refused with 421 4.7.0, a client from the next /64
/// is served. A host cannot dodge a per-source limit by hopping through its /64.
#[test]
fn ipv6_sources_are_grouped_by_prefix() -> Result<()> {
    // Every address of 2001:db8::/48 local and bindable: a `local` route and
    // `ip_nonlocal_bind`.
    let netns = Netns::create("v6")?;
    netns.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        "local",
        "2001:db8::/48",
        "dev",
        "lo",
    ])?;
    netns.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv6/ip_nonlocal_bind"])?;
    netns.run(|| {
        let backend = reporting_on("[2001:db8::25]:0".parse()?)?;
        let listen: SocketAddr = "[2001:db8::2525]:2525".parse()?;
        let servers = [ServerEntry {
            name: "six",
            addr: backend.addr,
            send_proxy: "v2",
        }];
        let (text, pins) = dual_stack_config(
            RelayKind::Kernel,
            "ipv6-prefix",
            &[listen],
            &servers,
            "max_conn_per_source = 1\n",
        );
        let mxlb = Mxlb::start(&text, listen, &pins)?;
        let open = |from: &str| -> Result<(TcpStream, String)> {
            let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            let from: IpAddr = from.parse()?;
            socket.bind(&SocketAddr::new(from, 0).into())?;
            socket.connect_timeout(&listen.into(), TIMEOUT)?;
            let mut client = TcpStream::from(socket);
            client.set_read_timeout(Some(TIMEOUT))?;
            let first = read_line(&mut client)?;
            Ok((client, first))
        };
        let (_held, first) = open("2001:db8::a")?;
        ensure!(first == BANNER, "{first:?}");
        let (_same_64, second) = open("2001:db8::b")?;
        ensure!(second.starts_with("421 4.7.0"), "same /64: {second:?}");
        let (_next_64, third) = open("2001:db8:0:1::a")?;
        ensure!(third == BANNER, "the next /64: {third:?}");
        // The two served connections are open and paired (`kernel_relay_after = 0`): the
        // kernel's own counters show it relayed both banners (a client reads its banner
        // only after the verdict redirected it, and counted it), and nothing else.
        let redirected = mxlb.redirected_now()?;
        ensure!(
            redirected == 2 * BANNER.len() as u64,
            "mxlb_traffic: {redirected} bytes redirected, two banners expected: {:?}",
            mxlb.map_entries("mxlb_traffic")?
        );
        Ok(())
    })
}
