//! Connection limits on the real daemon: per-source concurrency and rate, the listener's
//! and the global `maxconn`, and the server's `maxconn` with spill-over. Each refuses with
//! `421 4.7.0` and a clean close (the client's QUIT after the reply meets no reset),
//! without contacting a server, and shows in `/api/stats`, `/metrics` and the log.
//!
//! Then a burst of 5,000 connections that never send anything, each from its own address
//! of 127.0.0.0/8: during it the stats answer and real mail flows through Postfix, and
//! afterwards the daemon is back to its idle descriptors and empty kernel maps.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::backend::{HoldingBackend, read_line};
use mxlb_tests::mxlb::http::{get_json, metric, server};
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path, with_global_keys, with_stats,
};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, wait_for_listen, wait_until};

/// For every single network step of these tests; generous, never reached when all is well.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A backend that greets with `220 <name>` and holds each session until the client closes.
fn holding(name: &str) -> Result<HoldingBackend> {
    HoldingBackend::start(format!("220 {name}\r\n"), b"")
}

/// A connection from `source`, any address of 127.0.0.0/8.
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> Result<TcpStream> {
    let stream = mxlb_tests::connect_from(source.into(), to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// A client served by a server: its banner line, and the open connection.
fn admitted(source: Ipv4Addr, to: SocketAddr) -> Result<(TcpStream, String)> {
    let mut client = connect_from(source, to)?;
    let banner = read_line(&mut client)?;
    ensure!(
        banner.starts_with("220 "),
        "{source}: expected a server's banner, got {banner:?}"
    );
    Ok((client, banner))
}

/// A client refused over a limit: a `421 4.7.0` line, then EOF. The client says QUIT as
/// a polite SMTP client does; the daemon takes it and closes without a reset.
fn refused(source: Ipv4Addr, to: SocketAddr) -> Result<String> {
    let mut client = connect_from(source, to)?;
    let reply = read_line(&mut client)?;
    ensure!(
        reply.starts_with("421 4.7.0 mxlb: ") && reply.ends_with("\r\n"),
        "{source}: expected a 421 4.7.0 reply, got {reply:?}"
    );
    client.write_all(b"QUIT\r\n")?;
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .context("the refusal must end in a clean close, not a reset")?;
    ensure!(rest.is_empty(), "nothing after the 421: {rest:?}");
    // A reset after the EOF (the QUIT meeting a closed socket) shows as the socket's error.
    ensure!(
        client.take_error()?.is_none(),
        "the daemon reset the connection"
    );
    Ok(reply)
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

fn u64_of(value: &serde_json::Value, field: &str) -> u64 {
    value[field].as_u64().unwrap_or(u64::MAX)
}

/// A listener's entry in `/api/stats`.
fn listener(base: &str, name: &str) -> Result<serde_json::Value> {
    let stats = get_json(&format!("{base}/api/stats"))?;
    stats["listeners"]
        .as_array()
        .context("no listeners")?
        .iter()
        .find(|l| l["name"] == name)
        .cloned()
        .with_context(|| format!("no listener {name} in {stats}"))
}

/// Checks a listener's `refused_limits`: `expected` reasons with their counts, 0 for the
/// others.
fn ensure_refused(listener: &serde_json::Value, expected: &[(&str, u64)]) -> Result<()> {
    for reason in [
        "global",
        "listener",
        "server",
        "source_conn",
        "source_rate",
        "resources",
    ] {
        let want = expected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n);
        let got = listener["refused_limits"][reason].as_u64();
        ensure!(
            got == Some(want),
            "refused_limits.{reason}: {got:?}, expected {want}: {listener}"
        );
    }
    Ok(())
}

/// Waits until a listener's (or server's, with `server`) `field` reads `value`.
fn wait_for_stat(
    base: &str,
    listener_name: &str,
    server_name: Option<&str>,
    field: &str,
    value: u64,
) -> Result<()> {
    wait_until(
        &format!("{listener_name}/{server_name:?} {field} = {value}"),
        TIMEOUT,
        Duration::from_millis(20),
        || {
            let stats = get_json(&format!("{base}/api/stats"))?;
            let node = match server_name {
                Some(name) => server(&stats, listener_name, name)?.clone(),
                None => listener(base, listener_name)?,
            };
            Ok((u64_of(&node, field) == value).then_some(()))
        },
    )
}

/// A server of [`start`]: name, backend, extra TOML keys.
type ServerSpec<'a> = (&'a str, SocketAddr, &'a str);

/// Starts mxlb with listener `smtp` (`listener_keys` added), `global_keys`, a stats
/// endpoint, and `servers` (PROXY v1). Returns the daemon and the stats base URL.
fn start(
    relay: RelayKind,
    test: &str,
    global_keys: &str,
    listener_keys: &str,
    servers: &[ServerSpec<'_>],
    extra: &str,
) -> Result<(Mxlb, String)> {
    let listen = free_addr();
    let stats = free_addr();
    let pins = pin_path(&format!("limits-{test}"));
    let entries: Vec<ServerEntry<'_>> = servers
        .iter()
        .map(|&(name, addr, _)| ServerEntry {
            name,
            addr,
            send_proxy: "v1",
        })
        .collect();
    let mut text = config_with_listener_keys(relay, &pins, listen, &entries, listener_keys);
    for (name, _, keys) in servers {
        let line = format!("name = \"{name}\"\n");
        text = text.replacen(&line, &format!("{line}{keys}"), 1);
    }
    let text = with_stats(&with_global_keys(&text, global_keys), stats, None) + extra;
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    Ok((mxlb, format!("http://{stats}")))
}

#[test]
fn per_source_connection_limit() -> Result<()> {
    let backend = holding("one")?;
    let keys = "max_conn_per_source = 3\n";
    let (mxlb, base) = start(
        RelayKind::Kernel,
        "conn",
        "",
        keys,
        &[("one", backend.addr, "")],
        "",
    )?;
    let (busy, other) = (ip(127, 0, 0, 77), ip(127, 0, 0, 78));

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(admitted(busy, mxlb.listen)?.0);
    }
    let reply = refused(busy, mxlb.listen)?;
    ensure!(
        reply == "421 4.7.0 mxlb: too many connections from your address, try again later\r\n",
        "{reply:?}"
    );
    let _other = admitted(other, mxlb.listen)?;
    ensure!(
        backend.accepted() == 4,
        "the refused client never reached a server: {} connections",
        backend.accepted()
    );

    let smtp = listener(&base, "smtp")?;
    ensure_refused(&smtp, &[("source_conn", 1)])?;
    ensure!(u64_of(&smtp, "sessions_cur") == 4, "{smtp}");
    ensure!(
        u64_of(&smtp, "sessions_total") == 4,
        "refusals are not sessions: {smtp}"
    );
    ensure!(u64_of(&smtp, "sources_tracked") == 2, "{smtp}");
    let labels = [("listener", "smtp"), ("reason", "source_conn")];
    ensure!(metric(&base, "mxlb_listener_refused_total", &labels)? == 1.0);
    mxlb.wait_for_log_count(
        "client refused: too many connections from 127.0.0.77 (max_conn_per_source)",
        1,
        TIMEOUT,
    )?;

    // A connection that ends gives its place back.
    drop(held.pop());
    wait_for_stat(&base, "smtp", None, "sessions_cur", 3)?;
    held.push(admitted(busy, mxlb.listen)?.0);
    Ok(())
}

#[test]
fn per_source_rate_limit() -> Result<()> {
    let backend = holding("one")?;
    let keys = "max_rate_per_source = 3\nrate_window = \"1h\"\n";
    let (mxlb, base) = start(
        RelayKind::UserSpace,
        "rate",
        "",
        keys,
        &[("one", backend.addr, "")],
        "",
    )?;
    let (eager, other) = (ip(127, 0, 0, 79), ip(127, 0, 0, 80));

    // Three sessions, one after the other: never more than one open at once.
    for _ in 0..3 {
        let (client, _) = admitted(eager, mxlb.listen)?;
        drop(client);
    }
    let reply = refused(eager, mxlb.listen)?;
    ensure!(
        reply.contains("too many new connections from your address"),
        "{reply:?}"
    );
    let _other = admitted(other, mxlb.listen)?;
    ensure!(
        backend.accepted() == 4,
        "{} connections",
        backend.accepted()
    );

    let smtp = listener(&base, "smtp")?;
    ensure_refused(&smtp, &[("source_rate", 1)])?;
    ensure!(u64_of(&smtp, "sessions_total") == 4, "{smtp}");
    // The eager source is remembered for its rate, though it has no connection open.
    ensure!(u64_of(&smtp, "sources_tracked") == 2, "{smtp}");
    let labels = [("listener", "smtp"), ("reason", "source_rate")];
    ensure!(metric(&base, "mxlb_listener_refused_total", &labels)? == 1.0);
    mxlb.wait_for_log_count(
        "too many new connections from 127.0.0.79 within rate_window (max_rate_per_source)",
        1,
        TIMEOUT,
    )?;
    Ok(())
}

/// Listener `smtp` may hold 2, the whole daemon 3: the third client of `smtp` meets the
/// listener's limit, the second client of `other` (the daemon's fourth) the global one.
#[test]
fn listener_and_global_maxconn() -> Result<()> {
    let backend = holding("one")?;
    let other_listen = free_addr();
    let other = format!(
        "\n[[listen]]\nname = \"other\"\nbind = \"{other_listen}\"\n\n\
         [[listen.server]]\nname = \"one\"\naddr = \"{}\"\nsend_proxy = \"v1\"\n",
        backend.addr
    );
    let (mxlb, base) = start(
        RelayKind::Kernel,
        "maxconn",
        "maxconn = 3\n",
        "maxconn = 2\n",
        &[("one", backend.addr, "")],
        &other,
    )?;
    wait_for_listen(&[other_listen], TIMEOUT)?;
    let client = ip(127, 0, 0, 81);

    let mut smtp_clients = vec![
        admitted(client, mxlb.listen)?.0,
        admitted(client, mxlb.listen)?.0,
    ];
    let reply = refused(client, mxlb.listen)?;
    ensure!(
        reply == "421 4.7.0 mxlb: too many connections, try again later\r\n",
        "{reply:?}"
    );
    let _other_client = admitted(client, other_listen)?;
    refused(client, other_listen)?;
    ensure!(
        backend.accepted() == 3,
        "{} connections",
        backend.accepted()
    );

    let stats = get_json(&format!("{base}/api/stats"))?;
    ensure!(
        u64_of(&stats, "conns_cur") == 3 && u64_of(&stats, "maxconn") == 3,
        "{stats}"
    );
    let smtp = listener(&base, "smtp")?;
    ensure_refused(&smtp, &[("listener", 1)])?;
    ensure!(
        u64_of(&smtp, "sessions_limit") == 2 && u64_of(&smtp, "sessions_total") == 2,
        "{smtp}"
    );
    let other = listener(&base, "other")?;
    ensure_refused(&other, &[("global", 1)])?;
    ensure!(
        u64_of(&other, "sessions_limit") == 3,
        "the listener inherits global.maxconn: {other}"
    );
    ensure!(metric(&base, "mxlb_connections_current", &[])? == 3.0);
    ensure!(metric(&base, "mxlb_connections_limit", &[])? == 3.0);
    let listener_refused = [("listener", "smtp"), ("reason", "listener")];
    ensure!(metric(&base, "mxlb_listener_refused_total", &listener_refused)? == 1.0);
    let global_refused = [("listener", "other"), ("reason", "global")];
    ensure!(metric(&base, "mxlb_listener_refused_total", &global_refused)? == 1.0);
    mxlb.wait_for_log_count("client refused: listener maxconn reached", 1, TIMEOUT)?;
    mxlb.wait_for_log_count("client refused: global maxconn reached", 1, TIMEOUT)?;

    // A place freed on smtp is a place for the whole daemon.
    drop(smtp_clients.pop());
    wait_for_stat(&base, "smtp", None, "sessions_cur", 1)?;
    let _again = admitted(client, other_listen)?;
    Ok(())
}

/// `first` with `one` (maxconn 2) before `two` (maxconn 1): clients fill `one`, spill over
/// to `two`, then are refused; a place freed on `one` takes the next client there again.
#[test]
fn server_maxconn_spills_over_then_refuses() -> Result<()> {
    let one = holding("one")?;
    let two = holding("two")?;
    let (mxlb, base) = start(
        RelayKind::Kernel,
        "server",
        "",
        "balance = \"first\"\n",
        &[
            ("one", one.addr, "maxconn = 2\n"),
            ("two", two.addr, "maxconn = 1\n"),
        ],
        "",
    )?;
    let client = ip(127, 0, 0, 82);

    let mut on_one = Vec::new();
    for _ in 0..2 {
        let (stream, banner) = admitted(client, mxlb.listen)?;
        ensure!(banner == "220 one\r\n", "{banner:?}");
        on_one.push(stream);
    }
    let (_on_two, banner) = admitted(client, mxlb.listen)?;
    ensure!(
        banner == "220 two\r\n",
        "spill-over to the next server: {banner:?}"
    );
    let reply = refused(client, mxlb.listen)?;
    ensure!(
        reply == "421 4.7.0 mxlb: all mail servers are busy, try again later\r\n",
        "{reply:?}"
    );
    ensure!(
        (one.accepted(), two.accepted()) == (2, 1),
        "no server was contacted for the refused client"
    );

    let stats = get_json(&format!("{base}/api/stats"))?;
    for (name, cur, limit) in [("one", 2, 2), ("two", 1, 1)] {
        let s = server(&stats, "smtp", name)?;
        ensure!(
            u64_of(s, "sessions_cur") == cur && u64_of(s, "sessions_limit") == limit,
            "{s}"
        );
    }
    let smtp = listener(&base, "smtp")?;
    ensure_refused(&smtp, &[("server", 1)])?;
    ensure!(u64_of(&smtp, "refused_no_server") == 0, "{smtp}");
    let labels = [("listener", "smtp"), ("reason", "server")];
    ensure!(metric(&base, "mxlb_listener_refused_total", &labels)? == 1.0);
    let labels = [("listener", "smtp"), ("server", "one")];
    ensure!(metric(&base, "mxlb_server_sessions_limit", &labels)? == 2.0);
    mxlb.wait_for_log_count(
        "client refused: every server that is up is at its maxconn",
        1,
        TIMEOUT,
    )?;

    drop(on_one.pop());
    wait_for_stat(&base, "smtp", Some("one"), "sessions_cur", 1)?;
    let (_back, banner) = admitted(client, mxlb.listen)?;
    ensure!(banner == "220 one\r\n", "{banner:?}");
    Ok(())
}

/// Sets the open-files limit (soft and hard) of another process.
fn set_fd_limit(pid: u32, limit: u64) -> Result<()> {
    let value = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: prlimit reads the struct we own and writes nothing (old limit: null).
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &value, std::ptr::null_mut()) };
    ensure!(result == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The daemon runs out of descriptors (its limit lowered to a few more than it uses idle,
/// then more clients than fit): accepts fail with EMFILE, the daemon backs off, keeps its
/// listener, and once the clients are gone it serves again and has given everything back.
#[test]
fn out_of_descriptors_then_recovers() -> Result<()> {
    /// Clients that connect at once, far more than the descriptors allow.
    const QUEUED: usize = 40;
    let backend = holding("one")?;
    let (mxlb, base) = start(
        RelayKind::Kernel,
        "emfile",
        "",
        "",
        &[("one", backend.addr, "")],
        "",
    )?;
    let idle_fds = mxlb.fd_count()?;
    // Room for a handful of clients (two descriptors each), not for all of them.
    set_fd_limit(mxlb.pid(), (idle_fds + 12) as u64)?;
    let client = ip(127, 0, 0, 83);
    let clients = (0..QUEUED)
        .map(|_| connect_from(client, mxlb.listen))
        .collect::<Result<Vec<_>>>()?;
    mxlb.wait_for_log_count("accept failed; retrying in", 1, TIMEOUT)?;
    let error_line = mxlb.log_lines("accept failed; retrying in").remove(0);
    ensure!(error_line.contains("Too many open files"), "{error_line}");

    // Load drops: the daemon catches up with the queued clients (they have closed by then)
    // and is back to normal. Free descriptors do not show that it has caught up: between
    // two rounds of accepts it backs off with every descriptor free and closed clients
    // still queued, and a client that connected then would be accepted in one round with
    // up to a dozen of them, whose server connections can take the descriptor its own
    // needs (421 4.3.2). Caught up means every queued client has been accepted; each
    // counts as a session, those refused for want of descriptors too.
    drop(clients);
    mxlb.wait_for_log_count("accepting again after", 1, TIMEOUT)?;
    wait_for_stat(&base, "smtp", None, "sessions_total", QUEUED as u64)?;
    wait_for_stat(&base, "smtp", None, "sessions_cur", 0)?;
    mxlb.wait_until_clean(idle_fds, true)?;
    let smtp = listener(&base, "smtp")?;
    ensure!(u64_of(&smtp, "accept_errors") >= 1, "{smtp}");
    let labels = [("listener", "smtp")];
    ensure!(metric(&base, "mxlb_listener_accept_errors_total", &labels)? >= 1.0);
    let (_served, banner) = admitted(client, mxlb.listen)?;
    ensure!(banner == "220 one\r\n", "{banner:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The burst.

/// Connections in the burst, each from its own address.
const BURST: usize = 5_000;
/// Threads that open them.
const BURST_THREADS: usize = 8;

/// The `i`-th burst address: 127.10.1.7 onwards, spread over the second and third octet.
fn burst_source(i: usize) -> Ipv4Addr {
    let (high, low) = (i / 250, i % 250);
    ip(127, 10 + u8::try_from(high).unwrap_or(0), 1 + low as u8, 7)
}

/// A backend for the burst: one thread accepts, greets and keeps every connection until
/// told to let go, so thousands of sessions cost no threads.
struct Hold {
    addr: SocketAddr,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Hold {
    fn start() -> Result<Hold> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        // The daemon connects thousands of times in a burst; std's backlog of 128 would drop
        // SYNs and make those connects wait for a retransmission.
        socket.listen(4096)?;
        let listener = TcpListener::from(socket);
        let addr = listener.local_addr()?;
        let streams = Arc::new(Mutex::new(Vec::new()));
        let kept = streams.clone();
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let _ = stream.write_all(b"220 hold\r\n");
                kept.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
            }
        });
        Ok(Hold { addr, streams })
    }

    fn held(&self) -> usize {
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn release_all(&self) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Raises this process's open-files limit to at least `needed`; the daemon it starts
/// inherits it (and raises its own soft limit to the hard one anyway). The hard limit is
/// raised only when it is short, which needs CAP_SYS_RESOURCE.
fn raise_fd_limit(needed: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0);
    let wanted = libc::rlimit {
        rlim_cur: limit.rlim_cur.max(needed),
        rlim_max: limit.rlim_max.max(needed),
    };
    // SAFETY: setrlimit reads the struct we own. Raising the hard limit needs root, which
    // these tests have.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        bail!(
            "cannot raise RLIMIT_NOFILE to {needed}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Opens the burst: `BURST` connections, none of which ever sends a byte.
fn open_burst(listen: SocketAddr) -> Result<Vec<TcpStream>> {
    let per_thread = BURST.div_ceil(BURST_THREADS);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..BURST_THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (t * per_thread..((t + 1) * per_thread).min(BURST))
                        .map(|i| connect_from(burst_source(i), listen))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut clients = Vec::with_capacity(BURST);
        for worker in workers {
            match worker.join() {
                Ok(opened) => clients.extend(opened?),
                Err(_) => bail!("a burst thread panicked"),
            }
        }
        Ok(clients)
    })
}

fn send_mail(listen: SocketAddr, n: usize) -> Result<()> {
    let outcome = Swaks::send(
        listen,
        IpAddr::V4(ip(127, 0, 0, 90)),
        "user@example.test",
        &format!("through the burst {n}"),
        None,
    )?;
    outcome.ensure_success()?;
    Ok(())
}

#[test]
fn burst_of_silent_connections() -> Result<()> {
    let started = Instant::now();
    // Both ends of the burst: the clients and the backend's side of each session.
    raise_fd_limit(2 * BURST as u64 + 1024)?;
    let postfix = PostfixInstance::start(&[
        SmtpdService::with_proxy("mail1", free_addr()),
        SmtpdService::with_proxy("mail2", free_addr()),
    ])?;
    let hold = Hold::start()?;
    let (listen, mail_listen, stats) = (free_addr(), free_addr(), free_addr());
    let pins = pin_path("limits-burst");
    // One connection per address is all the burst needs: the per-source table sees 5,000
    // sources and refuses none of them.
    let text = format!(
        "[global]\npin_path = \"{pins}\"\nrelay = \"sockmap\"\nkernel_relay_after = 0\nmaxconn = 20000\ngrace = \"2s\"\n\n\
         [stats]\nbind = \"{stats}\"\n\n\
         [[listen]]\nname = \"burst\"\nbind = \"{listen}\"\nmax_conn_per_source = 1\n\n\
         [[listen.server]]\nname = \"hold\"\naddr = \"{hold}\"\n\n\
         [[listen]]\nname = \"mail\"\nbind = \"{mail_listen}\"\n\n\
         [[listen.server]]\nname = \"mail1\"\naddr = \"{mail1}\"\nsend_proxy = \"v1\"\n\n\
         [[listen.server]]\nname = \"mail2\"\naddr = \"{mail2}\"\nsend_proxy = \"v2\"\n",
        pins = pins.display(),
        hold = hold.addr,
        mail1 = postfix.services()[0].addr,
        mail2 = postfix.services()[1].addr,
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    wait_for_listen(&[mail_listen], TIMEOUT)?;
    let base = format!("http://{stats}");
    let idle_fds = mxlb.fd_count()?;
    let burst_started = Instant::now();

    // While the burst opens: the stats keep answering (polled without pause from another
    // thread) and a message goes through the other listener.
    let polling = AtomicBool::new(true);
    let (answers, burst) = thread::scope(|scope| -> Result<_> {
        let poller = scope.spawn(|| -> Result<usize> {
            let mut answers = 0;
            while polling.load(Ordering::SeqCst) {
                get_json(&format!("{base}/api/stats")).context("stats during the burst")?;
                answers += 1;
            }
            Ok(answers)
        });
        let burst = scope.spawn(|| open_burst(listen));
        let mail = send_mail(mail_listen, 1);
        let burst = burst
            .join()
            .map_err(|_| anyhow::anyhow!("burst panicked"))?;
        polling.store(false, Ordering::SeqCst);
        let answers = poller
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))?;
        mail?;
        Ok((answers?, burst?))
    })?;
    ensure!(answers > 0, "the stats answered during the burst");

    // Every connection is admitted and held by the backend, through the kernel relay.
    wait_until(
        "the whole burst held",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let l = listener(&base, "burst")?;
            Ok((u64_of(&l, "sessions_cur") == BURST as u64 && hold.held() == BURST).then_some(l))
        },
    )
    .with_context(|| format!("held {} of {BURST}", hold.held()))?;
    let all_held = burst_started.elapsed();
    let asked = Instant::now();
    let during = listener(&base, "burst")?;
    let stats_time = asked.elapsed();
    ensure_refused(&during, &[])?;
    ensure!(
        u64_of(&during, "sources_tracked") == BURST as u64,
        "{during}"
    );
    ensure!(
        u64_of(&during, "accept_errors") == 0,
        "no accept failed: {during}"
    );
    let paired = mxlb.map_key_count("mxlb_socks")?;
    ensure!(paired >= 2 * BURST, "{paired} sockets in the kernel relay");
    // With all of it held, the daemon still relays real mail, and says so in its stats.
    send_mail(mail_listen, 2)?;
    let delivered = postfix.wait_for_messages(2, Duration::from_secs(20))?;
    ensure!(
        delivered.len() == 2,
        "{} messages delivered",
        delivered.len()
    );
    let stats_now = get_json(&format!("{base}/api/stats"))?;
    ensure!(
        u64_of(&stats_now, "conns_cur") >= BURST as u64,
        "{stats_now}"
    );

    // The burst goes away: every descriptor and kernel map entry is given back.
    let closing = Instant::now();
    drop(burst);
    hold.release_all();
    wait_until(
        "the burst torn down",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || Ok((u64_of(&listener(&base, "burst")?, "sessions_cur") == 0).then_some(())),
    )?;
    mxlb.wait_until_clean(idle_fds, true)?;
    let clean = closing.elapsed();
    let after = get_json(&format!("{base}/api/stats"))?;
    ensure!(u64_of(&after, "conns_cur") == 0, "{after}");
    let burst_after = listener(&base, "burst")?;
    ensure!(
        u64_of(&burst_after, "sources_tracked") == 0,
        "{burst_after}"
    );

    // And it works as before.
    let (_client, banner) = admitted(ip(127, 0, 0, 91), listen)?;
    ensure!(banner == "220 hold\r\n", "{banner:?}");
    send_mail(mail_listen, 3)?;
    postfix.wait_for_messages(3, Duration::from_secs(20))?;
    eprintln!(
        "burst of {BURST}: all held after {all_held:?}, {answers} stats answers while it \
         opened, /api/stats in {stats_time:?} with all held; idle again {clean:?} after closing; \
         whole test {:?}",
        started.elapsed()
    );
    Ok(())
}
