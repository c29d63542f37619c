//! `accept_proxy`: mxlb behind another balancer. The client named by the upstream's PROXY
//! header is the one mxlb passes on to its servers, limits per source and logs; the bytes
//! after the header arrive intact (kernel relay included); a connection without a usable
//! header is closed and counted. The last test chains Debian's HAProxy (`send-proxy-v2`)
//! in front of mxlb in front of Postfix, and Postfix logs the true client addresses.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, ProxyInfo, digest_until_eof, pattern_digest, read_line,
    send_pattern_and_finish,
};
use mxlb_tests::delivery::send_round_robin;
use mxlb_tests::haproxy::{Haproxy, HaproxyConfig, SendProxy};
use mxlb_tests::mxlb::http::get_json;
use mxlb_tests::mxlb::{
    Finished, Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path, with_stats,
};
use mxlb_tests::{free_addr, wait_until};

const TIMEOUT: Duration = Duration::from_secs(20);
const BANNER: &str = "220 behind\r\n";

/// A backend that greets, digests what it receives, and reports it with the PROXY header
/// mxlb sent.
fn reporting() -> Result<Backend<(ProxyInfo, Digest256)>> {
    Backend::spawn(|mut stream, info| {
        stream.write_all(BANNER.as_bytes())?;
        Ok((info, digest_until_eof(&mut stream)?))
    })
}

/// mxlb with `accept_proxy` on its listener, one server that gets `send_proxy`.
fn start(
    test: &str,
    relay: RelayKind,
    server: SocketAddr,
    send_proxy: &str,
    keys: &str,
) -> Result<(Mxlb, SocketAddr)> {
    let (listen, stats) = (free_addr(), free_addr());
    let pins = pin_path(test);
    let entry = ServerEntry {
        name: "one",
        addr: server,
        send_proxy,
    };
    let keys = format!("accept_proxy = true\ntimeout_connect = \"1s\"\n{keys}");
    let text = config_with_listener_keys(relay, &pins, listen, &[entry], &keys);
    let text = text.replacen("timeout_connect = \"2s\"\n", "", 1);
    Ok((
        Mxlb::start(&with_stats(&text, stats, None), listen, &pins)?,
        stats,
    ))
}

/// A v2 PROXY header for TCP over IPv6.
fn v2_tcp6(source: std::net::SocketAddrV6, destination: std::net::SocketAddrV6) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x21, 0, 36]);
    header.extend_from_slice(&source.ip().octets());
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// Who carried a connection's bytes, by the daemon's count: `RelayKind::Kernel` pairs at
/// once (`kernel_relay_after = 0`, right after the header was read, when nothing followed
/// it), and 1 MiB cannot put a reader `max_inflight` (4 MiB) behind, so the kernel carried
/// every byte after the header; the user-space relay none.
fn check_carried(relay: RelayKind, finished: &Finished) -> Result<()> {
    ensure!(
        finished.bytes_in == 1 << 20 && finished.bytes_out == BANNER.len() as u64,
        "the header is not relayed, the rest is: {}",
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
    Ok(())
}

/// Sends `header`, then 1 MiB after the banner; returns what the backend saw.
fn through(
    listen: SocketAddr,
    header: &[u8],
    backend: &Backend<(ProxyInfo, Digest256)>,
) -> Result<(ProxyInfo, Digest256)> {
    through_on(TcpStream::connect(listen)?, header, backend)
}

/// [`through`] on a connection already open.
fn through_on(
    mut client: TcpStream,
    header: &[u8],
    backend: &Backend<(ProxyInfo, Digest256)>,
) -> Result<(ProxyInfo, Digest256)> {
    client.set_read_timeout(Some(TIMEOUT))?;
    client.write_all(header)?;
    ensure!(read_line(&mut client)? == BANNER);
    send_pattern_and_finish(&mut client, 21, 1 << 20)?;
    let (info, digest) = backend.next_report(TIMEOUT)?;
    ensure!(
        digest == pattern_digest(21, 1 << 20),
        "bytes after the header: {digest:?}"
    );
    Ok((info, digest))
}

#[test]
fn kernel_relay_passes_the_claimed_client_on() -> Result<()> {
    passes_the_claimed_client_on(RelayKind::Kernel)
}

#[test]
fn user_space_relay_passes_the_claimed_client_on() -> Result<()> {
    passes_the_claimed_client_on(RelayKind::UserSpace)
}

/// v1 in, v1 out; v2 (IPv6) in, v1 out: the server gets the upstream's client and
/// destination, not mxlb's peer, and every byte after the header.
fn passes_the_claimed_client_on(relay: RelayKind) -> Result<()> {
    let backend = reporting()?;
    let (mxlb, _) = start(
        &format!("accept-proxy-{relay:?}"),
        relay,
        backend.addr,
        "v1",
        "",
    )?;

    let (info, _) = through(
        mxlb.listen,
        b"PROXY TCP4 203.0.113.7 198.51.100.25 40001 25\r\n",
        &backend,
    )?;
    ensure!(info.source == "203.0.113.7:40001".parse()?, "{info:?}");
    ensure!(info.destination == "198.51.100.25:25".parse()?, "{info:?}");

    let source = "[2001:db8::7]:40002".parse()?;
    let destination = "[2001:db8::25]:25".parse()?;
    let (info, _) = through(mxlb.listen, &v2_tcp6(source, destination), &backend)?;
    ensure!(
        info.source == SocketAddr::V6(source) && info.destination == SocketAddr::V6(destination),
        "{info:?}"
    );
    let logged = mxlb.wait_for_log_count("connection finished", 2, TIMEOUT)?;
    ensure!(
        logged
            .iter()
            .any(|l| l.contains("client=203.0.113.7:40001"))
            && logged
                .iter()
                .any(|l| l.contains("client=[2001:db8::7]:40002")),
        "the log names the claimed clients: {logged:?}"
    );
    for claimed in ["203.0.113.7:40001", "[2001:db8::7]:40002"] {
        check_carried(relay, &mxlb.finished_for(claimed.parse()?, TIMEOUT)?)?;
    }
    Ok(())
}

/// SMTP where the header should be, silence, and an early close: each connection is
/// closed without reaching a server, counted, and the daemon serves the next client.
#[test]
fn connections_without_a_usable_header_are_closed_and_counted() -> Result<()> {
    let backend = reporting()?;
    let (mxlb, stats) = start(
        "accept-proxy-bad",
        RelayKind::Kernel,
        backend.addr,
        "v1",
        "",
    )?;

    // mxlb only peeked at the EHLO, so it closes with those bytes unread, and a close with
    // unread data is a reset (RFC 2525 2.17): no answer, no EOF, and no hanging either.
    let mut smtp = TcpStream::connect(mxlb.listen)?;
    smtp.set_read_timeout(Some(TIMEOUT))?;
    smtp.write_all(b"EHLO client.example\r\n")?;
    let mut answer = Vec::new();
    let ended = smtp.read_to_end(&mut answer);
    ensure!(
        answer.is_empty()
            && matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "no server may answer, mxlb resets: {ended:?} {answer:?}"
    );

    // Nothing unread here: a plain close (EOF) once timeout_connect (1s) has passed.
    let connected = Instant::now();
    let mut silent = TcpStream::connect(mxlb.listen)?;
    silent.set_read_timeout(Some(TIMEOUT))?;
    let mut answer = Vec::new();
    let ended = silent.read_to_end(&mut answer);
    let waited = connected.elapsed();
    ensure!(
        matches!(ended, Ok(0)) && waited >= Duration::from_secs(1),
        "closed at timeout_connect without a word: {ended:?} {answer:?} after {waited:?}"
    );

    drop(TcpStream::connect(mxlb.listen)?);

    let listener = wait_until(
        "three bad headers counted",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
            let listener = snapshot["listeners"][0].clone();
            Ok((listener["bad_proxy_headers"] == 3).then_some(listener))
        },
    )?;
    ensure!(listener["sessions_total"] == 0, "{listener}");
    ensure!(
        !mxlb
            .log_lines("closed a connection without a usable PROXY header")
            .is_empty(),
        "{}",
        mxlb.log()
    );
    let (info, _) = through(
        mxlb.listen,
        b"PROXY TCP4 192.0.2.9 198.51.100.25 40003 25\r\n",
        &backend,
    )?;
    ensure!(info.source.ip() == Ipv4Addr::new(192, 0, 2, 9), "{info:?}");
    check_carried(
        RelayKind::Kernel,
        &mxlb.finished_for("192.0.2.9:40003".parse()?, TIMEOUT)?,
    )?;
    Ok(())
}

/// `accept_proxy_from`: only the listed upstreams' headers are believed. A peer outside
/// the list is closed before anything it sent is read (a well-formed header included),
/// reaches no server, and is counted with the bad headers and logged; a listed peer is
/// served as before.
#[test]
fn only_trusted_upstreams_may_claim_a_client() -> Result<()> {
    let backend = reporting()?;
    let (mxlb, stats) = start(
        "accept-proxy-trust",
        RelayKind::Kernel,
        backend.addr,
        "v1",
        "accept_proxy_from = [\"127.0.0.2\", \"10.0.0.0/8\"]\n",
    )?;

    // From 127.0.0.1, not listed: the header may be sent or refused, never answered.
    let mut stranger = TcpStream::connect(mxlb.listen)?;
    stranger.set_read_timeout(Some(TIMEOUT))?;
    let _ = stranger.write_all(b"PROXY TCP4 192.0.2.66 198.51.100.25 40066 25\r\n");
    let mut answer = Vec::new();
    let ended = stranger.read_to_end(&mut answer);
    ensure!(
        answer.is_empty(),
        "an untrusted peer gets no banner: {ended:?} {answer:?}"
    );
    let listener = wait_until(
        "the untrusted peer counted",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
            let listener = snapshot["listeners"][0].clone();
            Ok((listener["bad_proxy_headers"] == 1).then_some(listener))
        },
    )?;
    ensure!(listener["sessions_total"] == 0, "{listener}");
    let logged = mxlb.log_lines("is not in accept_proxy_from");
    ensure!(
        logged.len() == 1 && logged[0].contains("127.0.0.1"),
        "one warning naming the peer: {}",
        mxlb.log()
    );

    // From 127.0.0.2, listed: the claimed client is served.
    let trusted = mxlb_tests::connect_from([127, 0, 0, 2].into(), mxlb.listen, TIMEOUT)?;
    let header = b"PROXY TCP4 192.0.2.9 198.51.100.25 40009 25\r\n";
    let (info, _) = through_on(trusted, header, &backend)?;
    ensure!(info.source.ip() == Ipv4Addr::new(192, 0, 2, 9), "{info:?}");
    check_carried(
        RelayKind::Kernel,
        &mxlb.finished_for("192.0.2.9:40009".parse()?, TIMEOUT)?,
    )?;
    let snapshot = get_json(&format!("http://{stats}/api/stats"))?;
    ensure!(
        snapshot["listeners"][0]["sessions_total"] == 1
            && snapshot["listeners"][0]["bad_proxy_headers"] == 1,
        "{snapshot}"
    );
    Ok(())
}

/// `max_conn_per_source` counts the claimed client, not the upstream balancer (which is
/// one address for everybody).
#[test]
fn per_source_limits_count_the_claimed_client() -> Result<()> {
    let backend = reporting()?;
    let (mxlb, _) = start(
        "accept-proxy-limit",
        RelayKind::Kernel,
        backend.addr,
        "v1",
        "max_conn_per_source = 1\n",
    )?;
    let open = |source: &str| -> Result<(TcpStream, String)> {
        let mut client = TcpStream::connect(mxlb.listen)?;
        client.set_read_timeout(Some(TIMEOUT))?;
        client.write_all(format!("PROXY TCP4 {source} 198.51.100.25 40000 25\r\n").as_bytes())?;
        let first = read_line(&mut client)?;
        Ok((client, first))
    };
    let (_held, first) = open("203.0.113.1")?;
    ensure!(first == BANNER, "{first:?}");
    let (_refused, second) = open("203.0.113.1")?;
    ensure!(
        second.starts_with("421 4.7.0"),
        "the same claimed source: {second:?}"
    );
    let (_other, third) = open("203.0.113.2")?;
    ensure!(third == BANNER, "another claimed source: {third:?}");
    // The two served connections are open and paired (`kernel_relay_after = 0`): the
    // kernel's own counters show it relayed both banners (a client reads its banner only
    // after the verdict redirected it, and counted it), and nothing else.
    let redirected = mxlb.redirected_now()?;
    ensure!(
        redirected == 2 * BANNER.len() as u64,
        "mxlb_traffic: {redirected} bytes redirected, two banners expected: {:?}",
        mxlb.map_entries("mxlb_traffic")?
    );
    Ok(())
}

/// The real chain: swaks from 127.0.0.11..=16 → HAProxy (`send-proxy-v2`) → mxlb
/// (`accept_proxy`, round robin) → two Postfix smtpd that require the PROXY protocol
/// (v1 and v2). Each message arrives intact, alternating, and Postfix logs the address
/// swaks sent from, two balancers away.
#[test]
fn behind_haproxy_postfix_sees_the_true_clients() -> Result<()> {
    let (postfix, servers) = mxlb_tests::mxlb::two_proxy_backends()?;
    let listen = free_addr();
    let pins = pin_path("accept-proxy-haproxy");
    let text = config_with_listener_keys(
        RelayKind::Kernel,
        &pins,
        listen,
        &servers,
        "accept_proxy = true\n",
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let haproxy =
        Haproxy::start(HaproxyConfig::new(free_addr()).server("mxlb", listen, SendProxy::V2))?;
    let deliveries = send_round_robin(
        haproxy.addr(),
        &postfix,
        11..=16,
        Ipv4Addr::LOCALHOST.into(),
        false,
    )
    .with_context(|| mxlb.log())?;
    ensure!(deliveries.len() == 6, "{deliveries:?}");
    thread::sleep(Duration::from_millis(50));
    ensure!(
        mxlb.log_lines("without a usable PROXY header").is_empty(),
        "{}",
        mxlb.log()
    );
    // Six SMTP sessions, each paired at once (`kernel_relay_after = 0`) and far too short
    // to put a reader `max_inflight` behind: the kernel carried every byte of each.
    let finished = mxlb.wait_finished(6, TIMEOUT)?;
    for session in &finished {
        ensure!(
            session.total() > 0 && session.kernel_bytes == session.total(),
            "the kernel carried every byte: {}",
            session.line
        );
    }
    Ok(())
}
