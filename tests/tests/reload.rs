//! SIGHUP reloads the configuration in place: servers, listeners, addresses and limits
//! change for new clients, while connections already relayed (in the kernel or not) carry
//! on untouched, and each server keeps its health, admin state and counters. A file that
//! does not parse, or an address that cannot be bound, changes nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, Pattern, digest_until_eof, read_line, send_pattern, send_pattern_and_finish,
};
use mxlb_tests::mxlb::http::{get_json, post_json, server};
use mxlb_tests::mxlb::{
    Finished, Mxlb, RelayKind, ServerEntry, config, config_with_listener_keys, pin_path,
    with_global_keys, with_stats,
};
use mxlb_tests::{free_addr, sha256_hex, wait_until};

const MIB: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);
const TOKEN: &str = "reload-admin-token";

/// A backend that greets with its name and reports the digest of what it received.
fn named(name: &str) -> Result<Backend<Digest256>> {
    let banner = format!("220 {name}\r\n");
    Backend::spawn(move |mut stream, _| {
        stream.write_all(banner.as_bytes())?;
        Ok(digest_until_eof(&mut stream)?)
    })
}

/// A one-listener configuration with the stats server on `stats`.
fn config_with_stats(
    relay: RelayKind,
    pins: &Path,
    listen: SocketAddr,
    servers: &[ServerEntry<'_>],
    stats: SocketAddr,
) -> String {
    with_stats(&config(relay, pins, listen, servers), stats, None)
}

fn entry(name: &str, addr: SocketAddr) -> ServerEntry<'_> {
    ServerEntry {
        name,
        addr,
        send_proxy: "v1",
    }
}

/// A connection through the balancer; returns its banner line.
fn banner_of(listen: SocketAddr) -> Result<String> {
    Ok(banner_and_client(listen)?.0)
}

/// [`banner_of`], with the client's address (what the daemon logs the connection under).
fn banner_and_client(listen: SocketAddr) -> Result<(String, SocketAddr)> {
    let mut client =
        TcpStream::connect(listen).with_context(|| format!("connecting to {listen}"))?;
    client.set_read_timeout(Some(TIMEOUT))?;
    let banner = read_line(&mut client)?;
    client.shutdown(Shutdown::Write)?;
    Ok((banner, client.local_addr()?))
}

/// Who carried a finished connection's bytes, by the daemon's count. With
/// `RelayKind::Kernel` (`kernel_relay_after = 0`) every connection here is paired at once
/// and moves far less than `max_inflight` (4 MiB), so no direction is ever held: the kernel
/// carried every byte. The user-space relay carries them all itself.
fn check_carried(relay: RelayKind, finished: &Finished) -> Result<()> {
    ensure!(finished.total() > 0, "nothing moved: {}", finished.line);
    match relay {
        RelayKind::Kernel => ensure!(
            finished.kernel_bytes == finished.total() && finished.relay == "kernel",
            "the kernel carried every byte: {}",
            finished.line
        ),
        RelayKind::Adaptive | RelayKind::UserSpace => ensure!(
            finished.kernel_bytes == 0 && finished.relay == "user",
            "relayed in user space: {}",
            finished.line
        ),
    }
    Ok(())
}

fn stats(base: SocketAddr) -> Result<serde_json::Value> {
    get_json(&format!("http://{base}/api/stats"))
}

fn field(value: &serde_json::Value, name: &str) -> u64 {
    value[name].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn kernel_relay_reload_adds_a_server_and_established_relays_carry_on() -> Result<()> {
    adds_a_server_and_established_relays_carry_on(RelayKind::Kernel)
}

#[test]
fn user_space_reload_adds_a_server_and_established_relays_carry_on() -> Result<()> {
    adds_a_server_and_established_relays_carry_on(RelayKind::UserSpace)
}

/// A connection relayed before the reload moves its second MiB after it, through the
/// same server, intact; new clients alternate over both servers; counters carry over and
/// `global.maxconn` changes.
fn adds_a_server_and_established_relays_carry_on(relay: RelayKind) -> Result<()> {
    let (a, b) = (named("a")?, named("b")?);
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path(&format!("reload-add-{relay:?}"));
    let before = config_with_stats(relay, &pins, listen, &[entry("a", a.addr)], base);
    let mxlb = Mxlb::start(&before, listen, &pins)?;

    let mut early = TcpStream::connect(listen)?;
    early.set_read_timeout(Some(TIMEOUT))?;
    ensure!(read_line(&mut early)? == "220 a\r\n");
    send_pattern(&mut early, 3, MIB as u64)?;
    if relay.is_kernel() {
        // Before the reload, the kernel relays the early connection: its own counters
        // reach the banner and the first MiB.
        let carried = (MIB + "220 a\r\n".len()) as u64;
        wait_until(
            "the kernel relayed the first MiB",
            TIMEOUT,
            Duration::from_millis(20),
            || Ok((mxlb.redirected_now()? == carried).then_some(())),
        )
        .with_context(|| format!("mxlb_traffic: {:?}", mxlb.map_entries("mxlb_traffic")))?;
    }

    let after = with_global_keys(
        &config_with_stats(
            relay,
            &pins,
            listen,
            &[entry("a", a.addr), entry("b", b.addr)],
            base,
        ),
        "maxconn = 500\n",
    );
    let verdict = mxlb.reload(&after)?;
    ensure!(
        verdict.contains("configuration reloaded") && verdict.contains("servers added: smtp/b"),
        "{verdict}"
    );

    // The early connection goes on through the old configuration's relay.
    send_pattern(&mut early, 4, MIB as u64)?;
    early.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    early.read_to_end(&mut rest)?;
    let mut expected = vec![0u8; 2 * MIB];
    Pattern::new(3).fill(&mut expected[..MIB]);
    Pattern::new(4).fill(&mut expected[MIB..]);
    let received = a.next_report(TIMEOUT)?;
    ensure!(
        received.bytes == 2 * MIB as u64 && received.sha256 == sha256_hex(&expected),
        "the connection relayed across the reload lost or changed bytes: {received:?}"
    );
    let carried = mxlb.finished_for(early.local_addr()?, TIMEOUT)?;
    ensure!(
        carried.bytes_in == 2 * MIB as u64 && carried.bytes_out == "220 a\r\n".len() as u64,
        "{}",
        carried.line
    );
    check_carried(relay, &carried)?;

    let banners: Vec<String> = (0..4).map(|_| banner_of(listen)).collect::<Result<_>>()?;
    let from_a = banners.iter().filter(|b| *b == "220 a\r\n").count();
    let from_b = banners.iter().filter(|b| *b == "220 b\r\n").count();
    ensure!(
        from_a == 2 && from_b == 2,
        "round robin over both: {banners:?}"
    );
    for finished in mxlb.wait_finished(5, TIMEOUT)? {
        check_carried(relay, &finished)?;
    }

    let snapshot = wait_until(
        "the four sessions are counted",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            let snapshot = stats(base)?;
            let total = |name| server(&snapshot, "smtp", name).map(|s| field(s, "sessions_total"));
            Ok((total("a")? == 3 && total("b")? == 2).then_some(snapshot))
        },
    )?;
    ensure!(field(&snapshot, "reloads") == 1, "{snapshot}");
    ensure!(field(&snapshot, "maxconn") == 500, "{snapshot}");
    let bytes_in = field(server(&snapshot, "smtp", "a")?, "bytes_in");
    ensure!(
        bytes_in == 2 * MIB as u64,
        "server a counted {bytes_in} bytes in, both halves of the early connection expected"
    );
    Ok(())
}

/// A server's health and the operator's admin state survive a reload that changes other
/// settings: a DOWN server stays DOWN (a new server would start UP), a server in
/// maintenance stays there, and clients go to the one left.
#[test]
fn reload_keeps_health_and_admin_state() -> Result<()> {
    let (a, b) = (named("a")?, named("b")?);
    let dead = free_addr();
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-state");
    let checks = "\n[listen.check]\ntype = \"tcp\"\ninter = \"200ms\"\nfastinter = \"200ms\"\n\
                  downinter = \"200ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n";
    let servers = [entry("a", a.addr), entry("b", b.addr), entry("dead", dead)];
    let text = |weight_of_a: u32| {
        let text = config_with_listener_keys(RelayKind::Kernel, &pins, listen, &servers, checks);
        let text = text.replacen(
            "name = \"a\"\n",
            &format!("name = \"a\"\nweight = {weight_of_a}\n"),
            1,
        );
        with_stats(&text, base, Some(TOKEN))
    };
    let mxlb = Mxlb::start(&text(1), listen, &pins)?;
    wait_until("dead is DOWN", TIMEOUT, Duration::from_millis(50), || {
        let snapshot = stats(base)?;
        Ok((server(&snapshot, "smtp", "dead")?["status"] == "DOWN").then_some(()))
    })?;
    let (status, body) = post_json(
        &format!("http://{base}/api/servers/smtp/b/state"),
        Some(TOKEN),
        &serde_json::json!({"state": "maint"}),
    )?;
    ensure!(status == 200, "{status} {body}");

    let verdict = mxlb.reload(&text(3))?;
    // The summary names the server that changed, and how.
    ensure!(
        verdict
            .contains("configuration reloaded: servers changed: smtp/a: weight 1\u{2192}3 path="),
        "{verdict}"
    );
    let snapshot = stats(base)?;
    let of = |name| server(&snapshot, "smtp", name);
    ensure!(of("dead")?["status"] == "DOWN", "{snapshot}");
    ensure!(of("dead")?["check_status"].is_string(), "{snapshot}");
    ensure!(of("b")?["status"] == "MAINT", "{snapshot}");
    ensure!(
        of("a")?["status"] == "UP" && field(of("a")?, "weight") == 3,
        "{snapshot}"
    );
    for _ in 0..4 {
        let banner = banner_of(listen)?;
        ensure!(banner == "220 a\r\n", "only a takes clients: {banner:?}");
    }
    for finished in mxlb.wait_finished(4, TIMEOUT)? {
        check_carried(RelayKind::Kernel, &finished)?;
    }
    Ok(())
}

/// A reload moves the listener to another address and adds a second listener: the old
/// address refuses connections, the new ones serve. Changing a restart-only key warns and
/// keeps the running value.
#[test]
fn reload_moves_addresses_and_adds_a_listener() -> Result<()> {
    let (a, b) = (named("a")?, named("b")?);
    let (old_addr, new_addr, submission, base) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let pins = pin_path("reload-move");
    let before = config_with_stats(
        RelayKind::Kernel,
        &pins,
        old_addr,
        &[entry("a", a.addr)],
        base,
    );
    let mxlb = Mxlb::start(&before, old_addr, &pins)?;
    let (banner, before_reload) = banner_and_client(old_addr)?;
    ensure!(banner == "220 a\r\n");
    check_carried(
        RelayKind::Kernel,
        &mxlb.finished_for(before_reload, TIMEOUT)?,
    )?;

    let after = config_with_stats(
        RelayKind::UserSpace,
        &pins,
        new_addr,
        &[entry("a", a.addr)],
        base,
    ) + &format!(
        "\n[[listen]]\nname = \"submission\"\nbind = [\"{submission}\"]\n\n\
             [[listen.server]]\nname = \"b\"\naddr = \"{}\"\nsend_proxy = \"v1\"\n",
        b.addr
    );
    let verdict = mxlb.reload(&after)?;
    let mut bound = [new_addr, submission];
    bound.sort();
    ensure!(
        verdict.contains("listeners added: submission")
            && verdict.contains(&format!("bound: {}, {}", bound[0], bound[1]))
            && verdict.contains(&format!("closed: {old_addr}")),
        "{verdict}"
    );
    ensure!(
        !mxlb
            .log_lines("global.relay changed: takes effect at the next restart")
            .is_empty(),
        "no warning about the relay mode:\n{}",
        mxlb.log()
    );
    wait_until(
        "the old address is closed",
        TIMEOUT,
        Duration::from_millis(20),
        || {
            Ok(match TcpStream::connect(old_addr) {
                Err(error) if error.kind() == ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            })
        },
    )?;
    let (banner, on_new) = banner_and_client(new_addr)?;
    ensure!(banner == "220 a\r\n");
    let (banner, on_submission) = banner_and_client(submission)?;
    ensure!(banner == "220 b\r\n");
    // Still the kernel relay (a restart-only key), but the new configuration has the
    // default `kernel_relay_after` (32 KiB, a reloadable key): a banner stays in user space.
    for client in [on_new, on_submission] {
        let finished = mxlb.finished_for(client, TIMEOUT)?;
        ensure!(
            finished.relay == "user" && finished.total() > 0 && finished.kernel_bytes == 0,
            "{}",
            finished.line
        );
    }
    let snapshot = stats(base)?;
    ensure!(
        snapshot["relay"] == "kernel",
        "the relay mode needs a restart: {snapshot}"
    );
    let names: Vec<&str> = snapshot["listeners"]
        .as_array()
        .context("listeners")?
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    ensure!(names == ["smtp", "submission"], "{names:?}");
    Ok(())
}

/// A configuration with an unknown key, then one whose new address is taken: each reload
/// fails with the reason (file:line:col for the first), and the daemon serves on with the
/// configuration it had.
#[test]
fn a_failed_reload_changes_nothing() -> Result<()> {
    let (a, b) = (named("a")?, named("b")?);
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-bad");
    let good = config_with_stats(
        RelayKind::Kernel,
        &pins,
        listen,
        &[entry("a", a.addr)],
        base,
    );
    let mxlb = Mxlb::start(&good, listen, &pins)?;

    let typo = good.replacen("[global]\n", "[global]\nmaxconns = 10\n", 1);
    let verdict = mxlb.reload(&typo)?;
    ensure!(
        verdict.contains("reload failed") && verdict.contains("mxlb.toml:2:1"),
        "{verdict}"
    );

    let taken = TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?;
    let both = config_with_stats(
        RelayKind::Kernel,
        &pins,
        listen,
        &[entry("b", b.addr)],
        base,
    )
    .replace(
        &format!("bind = [\"{listen}\"]"),
        &format!("bind = [\"{listen}\", \"{taken_addr}\"]"),
    );
    let verdict = mxlb.reload(&both)?;
    ensure!(
        verdict.contains("reload failed") && verdict.contains(&format!("binding {taken_addr}")),
        "{verdict}"
    );

    let (banner, client) = banner_and_client(listen)?;
    ensure!(banner == "220 a\r\n", "the old configuration serves");
    // Still with the old configuration's `kernel_relay_after = 0`.
    check_carried(RelayKind::Kernel, &mxlb.finished_for(client, TIMEOUT)?)?;
    let snapshot = stats(base)?;
    ensure!(field(&snapshot, "reloads") == 0, "{snapshot}");
    ensure!(field(&snapshot, "reload_failures") == 2, "{snapshot}");
    ensure!(
        server(&snapshot, "smtp", "b").is_err(),
        "b must not be there: {snapshot}"
    );
    let metrics = mxlb_tests::mxlb::http::get(&format!("http://{base}/metrics"))?.1;
    ensure!(
        metrics.contains("mxlb_config_reloads_total{result=\"failed\"} 2"),
        "{metrics}"
    );
    Ok(())
}

/// Started by systemd (`Type=notify` / `notify-reload`): the daemon says READY=1 once it
/// serves, RELOADING=1 then READY=1 around a reload, STOPPING=1 at SIGTERM.
#[test]
fn systemd_is_told_ready_reloading_and_stopping() -> Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

    let a = named("a")?;
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-notify");
    let text = config_with_stats(
        RelayKind::Kernel,
        &pins,
        listen,
        &[entry("a", a.addr)],
        base,
    );
    let name = format!("mxlb-test-notify-{}", std::process::id());
    let systemd = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    systemd.set_read_timeout(Some(TIMEOUT))?;
    let mut buffer = [0u8; 512];
    let mut next = || -> Result<String> {
        let n = systemd.recv(&mut buffer).context("no sd_notify message")?;
        Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
    };
    let socket = format!("@{name}");
    let mxlb = Mxlb::start_with_env(&text, listen, &pins, &[("NOTIFY_SOCKET", &socket)])?;
    let ready = next()?;
    ensure!(
        ready.starts_with("READY=1\nSTATUS=serving\n")
            && ready.contains(&format!("MAINPID={}", mxlb.pid())),
        "{ready:?}"
    );
    ensure!(mxlb.reload(&text)?.contains("configuration reloaded"));
    let reloading = next()?;
    ensure!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let reloaded = next()?;
    ensure!(
        reloaded.starts_with("READY=1\nSTATUS=serving (configuration reloaded)"),
        "{reloaded:?}"
    );
    let status = mxlb.stop()?;
    ensure!(status.success(), "{status}");
    ensure!(next()? == "STOPPING=1");
    Ok(())
}

/// Reloads while clients keep arriving: ten reloads that alternate the server set and the
/// listener's `maxconn`, and not one connection in the meantime is refused, reset or left
/// without a banner (they wait in the accept queue while the generations change over).
#[test]
fn reloads_under_a_stream_of_clients_drop_no_connection() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (a, b) = (named("a")?, named("b")?);
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-stream");
    let with = |servers: &[ServerEntry<'_>], maxconn: u32| {
        config_with_stats(RelayKind::Kernel, &pins, listen, servers, base).replacen(
            "timeout_connect = \"2s\"\n",
            &format!("timeout_connect = \"2s\"\nmaxconn = {maxconn}\n"),
            1,
        )
    };
    let one = with(&[entry("a", a.addr)], 1000);
    let two = with(&[entry("a", a.addr), entry("b", b.addr)], 2000);
    let mxlb = Mxlb::start(&one, listen, &pins)?;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<usize> {
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                let banner = banner_of(listen).with_context(|| format!("client {served}"))?;
                ensure!(
                    banner == "220 a\r\n" || banner == "220 b\r\n",
                    "client {served}: {banner:?}"
                );
                served += 1;
            }
            Ok(served)
        })
    };
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(30));
        let verdict = mxlb.reload(if round % 2 == 0 { &two } else { &one })?;
        ensure!(
            verdict.contains("configuration reloaded"),
            "round {round}: {verdict}"
        );
    }
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, Ordering::Relaxed);
    let served = clients.join().expect("client thread")?;
    eprintln!("{served} clients served across 10 reloads");
    ensure!(served >= 10, "only {served} clients got through");
    // Every generation pairs at once (`kernel_relay_after = 0`): each banner went by the
    // kernel.
    for finished in mxlb.wait_finished(served, TIMEOUT)? {
        check_carried(RelayKind::Kernel, &finished)?;
    }
    let snapshot = stats(base)?;
    ensure!(field(&snapshot, "reloads") == 10, "{snapshot}");
    Ok(())
}

/// The kernel maps are sized for `2 × global.maxconn` sockets at start. Raised by a reload,
/// `maxconn` lets more clients in; those beyond the maps' room are relayed in user space,
/// intact, instead of being refused.
#[test]
fn a_raised_global_maxconn_beyond_the_kernel_maps_relays_the_rest_in_user_space() -> Result<()> {
    let a = named("a")?;
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-maps");
    let text = |maxconn: u32| {
        let text = config_with_stats(
            RelayKind::Kernel,
            &pins,
            listen,
            &[entry("a", a.addr)],
            base,
        );
        with_global_keys(&text, &format!("maxconn = {maxconn}\n"))
    };
    let mxlb = Mxlb::start(&text(2), listen, &pins)?;
    ensure!(mxlb.reload(&text(6))?.contains("configuration reloaded"));

    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = TcpStream::connect(listen)?;
        client.set_read_timeout(Some(TIMEOUT))?;
        ensure!(
            read_line(&mut client)? == "220 a\r\n",
            "all four are let in"
        );
        clients.push(client);
    }
    for (seed, client) in clients.iter_mut().enumerate() {
        send_pattern(client, 40 + seed as u64, MIB as u64)?;
        client.shutdown(Shutdown::Write)?;
    }
    let mut received: Vec<Digest256> = (0..4)
        .map(|_| a.next_report(TIMEOUT))
        .collect::<Result<_>>()?;
    let mut sent: Vec<Digest256> = (0..4)
        .map(|seed| mxlb_tests::backend::pattern_digest(40 + seed, MIB as u64))
        .collect();
    received.sort_by(|x, y| x.sha256.cmp(&y.sha256));
    sent.sort_by(|x, y| x.sha256.cmp(&y.sha256));
    ensure!(received == sent, "every stream intact");
    drop(clients);
    let finished = mxlb.wait_finished(4, TIMEOUT)?;
    let whole = (MIB + "220 a\r\n".len()) as u64;
    ensure!(finished.iter().all(|f| f.total() == whole), "{finished:#?}");
    let in_kernel = finished
        .iter()
        .filter(|f| f.kernel_bytes == f.total())
        .count();
    let in_user_space = finished.iter().filter(|f| f.kernel_bytes == 0).count();
    ensure!(
        in_kernel == 2 && in_user_space == 2,
        "two pairs fit the maps sized for maxconn 2 (the kernel carried every byte), the \
         other two ran in user space: {finished:#?}"
    );
    Ok(())
}

/// `global.kernel_relay_after` changes at once: pairing every connection at first, then,
/// after a reload to 1 GiB, a 1 MiB connection stays in user space.
#[test]
fn kernel_relay_after_changes_with_a_reload() -> Result<()> {
    let a = named("a")?;
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-after");
    let at_once = config_with_stats(
        RelayKind::Kernel,
        &pins,
        listen,
        &[entry("a", a.addr)],
        base,
    );
    ensure!(at_once.contains("kernel_relay_after = 0\n"), "{at_once}");
    let mxlb = Mxlb::start(&at_once, listen, &pins)?;
    let one_mib = |seed| -> Result<()> {
        let mut client = TcpStream::connect(listen)?;
        client.set_read_timeout(Some(TIMEOUT))?;
        ensure!(read_line(&mut client)? == "220 a\r\n");
        send_pattern_and_finish(&mut client, seed, MIB as u64)?;
        ensure!(a.next_report(TIMEOUT)? == mxlb_tests::backend::pattern_digest(seed, MIB as u64));
        Ok(())
    };
    one_mib(50)?;
    let later = at_once.replace(
        "kernel_relay_after = 0\n",
        "kernel_relay_after = \"1GiB\"\n",
    );
    let verdict = mxlb.reload(&later)?;
    ensure!(verdict.contains("configuration reloaded"), "{verdict}");
    ensure!(
        mxlb.log_lines("kernel_relay_after changed").is_empty(),
        "it is not a restart-only key: {}",
        mxlb.log()
    );
    one_mib(51)?;
    let finished = mxlb.wait_finished(2, TIMEOUT)?;
    let whole = (MIB + "220 a\r\n".len()) as u64;
    ensure!(
        finished[0].total() == whole
            && finished[0].kernel_bytes == whole
            && finished[1].total() == whole
            && finished[1].kernel_bytes == 0,
        "paired at once (the kernel carried every byte), then kept in user space: {finished:#?}"
    );
    Ok(())
}

/// `mxlb show-config` as an operator runs it against the daemon at `stats`.
fn show_config(stats: SocketAddr, token: Option<&str>) -> Result<mxlb_tests::CommandOutput> {
    let mut command = std::process::Command::new(mxlb_tests::mxlb::binary());
    command
        .args(["show-config", "--stats", &stats.to_string()])
        .env_remove("MXLB_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("MXLB_ADMIN_TOKEN", token);
    }
    mxlb_tests::run_command(&mut command, Duration::from_secs(10))
}

/// The value of `key` in the `[[listen.server]]` block of server `name` of a `show-config`.
fn server_key<'a>(config: &'a str, name: &str, key: &str) -> Option<&'a str> {
    config
        .split("[[listen.server]]")
        .find(|block| block.contains(&format!("\nname = \"{name}\"\n")))?
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key} = ")))
}

/// `GET /api/config` and `mxlb show-config` print the configuration in force: after a
/// reload the new file, after a refused reload still the old one, never the admin token.
/// A weight set at run time survives a reload that leaves the server's weight in the file
/// alone, and gives way to one that changes it.
#[test]
fn show_config_follows_reloads_and_a_runtime_weight_lasts_until_the_file_changes_it() -> Result<()>
{
    let (a, b) = (named("a")?, named("b")?);
    let (listen, base) = (free_addr(), free_addr());
    let pins = pin_path("reload-config");
    let servers = [entry("a", a.addr), entry("b", b.addr)];
    let text = |weight_of_a: u32, retries: u32| {
        let keys = format!("retries = {retries}\n");
        let text = config_with_listener_keys(RelayKind::UserSpace, &pins, listen, &servers, &keys);
        let text = text.replacen(
            "name = \"a\"\n",
            &format!("name = \"a\"\nweight = {weight_of_a}\n"),
            1,
        );
        with_stats(&text, base, Some(TOKEN))
    };
    let mxlb = Mxlb::start(&text(1, 3), listen, &pins)?;

    // Behind the token: 401 over HTTP, a failure from the command.
    let url = format!("http://{base}/api/config");
    let (status, body) = mxlb_tests::mxlb::http::get_with_token(&url, None)?;
    ensure!(status == 401, "{status} {body}");
    let (status, _) = mxlb_tests::mxlb::http::get_with_token(&url, Some("wrong"))?;
    ensure!(status == 401);
    let refused = show_config(base, Some("wrong"))?;
    ensure!(
        refused.status.code() == Some(1) && refused.output.contains("401"),
        "{refused:?}"
    );
    let missing = show_config(base, None)?;
    ensure!(missing.status.code() == Some(2), "{missing:?}");

    let shown = show_config(base, Some(TOKEN))?;
    ensure!(shown.status.success(), "{}", shown.output);
    ensure!(shown.output.contains("\nretries = 3\n"), "{}", shown.output);
    ensure!(
        server_key(&shown.output, "a", "weight") == Some("1"),
        "{}",
        shown.output
    );
    ensure!(
        !shown.output.contains(TOKEN) && shown.output.contains("# admin_token is set (not shown)"),
        "{}",
        shown.output
    );
    let (status, body) = mxlb_tests::mxlb::http::get_with_token(&url, Some(TOKEN))?;
    ensure!(status == 200 && body == shown.output, "{status} {body}");

    let weight_url = format!("http://{base}/api/servers/smtp/a/weight");
    let (status, body) = post_json(&weight_url, Some(TOKEN), &serde_json::json!({"weight": 3}))?;
    ensure!(status == 200, "{status} {body}");

    // The file changes elsewhere: shown after the reload; a's runtime weight stays.
    let verdict = mxlb.reload(&text(1, 5))?;
    ensure!(verdict.contains("configuration reloaded"), "{verdict}");
    let shown = show_config(base, Some(TOKEN))?;
    ensure!(shown.output.contains("\nretries = 5\n"), "{}", shown.output);
    let snapshot = stats(base)?;
    let of_a = server(&snapshot, "smtp", "a")?;
    ensure!(
        field(of_a, "weight") == 3 && field(of_a, "config_weight") == 1,
        "{of_a}"
    );

    // A refused reload: what runs is still shown, not the file on disk.
    let verdict = mxlb.reload(&text(1, 5).replace("retries = 5", "retries = 1000"))?;
    ensure!(verdict.contains("reload failed"), "{verdict}");
    let shown = show_config(base, Some(TOKEN))?;
    ensure!(shown.output.contains("\nretries = 5\n"), "{}", shown.output);

    // The file gives a another weight: the file's word is the newer one.
    let verdict = mxlb.reload(&text(2, 5))?;
    ensure!(verdict.contains("configuration reloaded"), "{verdict}");
    let snapshot = stats(base)?;
    let of_a = server(&snapshot, "smtp", "a")?;
    ensure!(
        field(of_a, "weight") == 2 && field(of_a, "config_weight") == 2,
        "{of_a}"
    );
    let shown = show_config(base, Some(TOKEN))?;
    ensure!(
        server_key(&shown.output, "a", "weight") == Some("2"),
        "{}",
        shown.output
    );
    Ok(())
}
