//! Health checks and failover against real Postfix backends and scripted bad servers:
//! what HAProxy's `option smtpchk` does, and no mail lost when a server goes away.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mxlb_tests::free_addr;
use mxlb_tests::mxlb::http::get_json;
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path, two_proxy_backends,
    with_stats,
};
use mxlb_tests::swaks::Swaks;

/// Fast checks so the tests run in seconds: every interval is 200 ms, two checks either way.
const INTER: Duration = Duration::from_millis(200);
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
const RISE: u32 = 2;
const FALL: u32 = 2;

fn check_keys(inter: Duration, timeout: Duration) -> String {
    format!(
        "retries = 3\nredispatch = true\n\n[listen.check]\ntype = \"smtp\"\nverb = \"EHLO\"\n\
         domain = \"lb.example.test\"\ninter = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {RISE}\n\
         fall = {FALL}\n",
        inter.as_millis(),
        timeout.as_millis()
    )
}

fn start_mxlb(test: &str, servers: &[ServerEntry<'_>], keys: &str) -> Result<Mxlb> {
    let listen = free_addr();
    let pins = pin_path(test);
    let text = config_with_listener_keys(RelayKind::Kernel, &pins, listen, servers, keys);
    Mxlb::start(&text, listen, &pins)
}

/// One message of the continuous stream.
struct Sent {
    ok: bool,
    banner: String,
    at: Instant,
    transcript: String,
}

/// Sends mail through `server` in a loop until `stop`, one message at a time, from
/// rotating 127.0.0.x addresses.
fn mail_stream(server: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<Sent>> {
    thread::spawn(move || {
        let mut sent = Vec::new();
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let client = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % 200) as u8));
            let outcome = Swaks::send(
                server,
                client,
                "user@example.test",
                &format!("failover {i}"),
                Some(format!("message {i}\n").as_bytes()),
            );
            let (ok, banner, transcript) = match outcome {
                Ok(outcome) => (
                    outcome.success(),
                    outcome.banner.clone().unwrap_or_default(),
                    outcome.transcript.clone(),
                ),
                Err(error) => (false, String::new(), format!("{error:#}")),
            };
            sent.push(Sent {
                ok,
                banner,
                at: Instant::now(),
                transcript,
            });
            i += 1;
        }
        sent
    })
}

/// A continuous stream of mail while one backend is taken off the network and brought
/// back: nothing refused, nothing lost, the outage detected within fall × inter + timeout,
/// the return within rise checks, and mail flows to the server again.
#[test]
fn failover_loses_no_mail_and_the_server_comes_back() -> Result<()> {
    let (mut postfix, servers) = two_proxy_backends()?;
    let mxlb = start_mxlb("failover", &servers, &check_keys(INTER, CHECK_TIMEOUT))?;

    let stop = Arc::new(AtomicBool::new(false));
    let stream = mail_stream(mxlb.listen, stop.clone());
    thread::sleep(Duration::from_millis(1500));

    let went_down = Instant::now();
    postfix.disable_service("mail2")?;
    mxlb.wait_for_log_count("server smtp/mail2 is DOWN", 1, Duration::from_secs(10))?;
    let detected = went_down.elapsed();
    thread::sleep(Duration::from_millis(1500));

    let came_back = Instant::now();
    postfix.enable_service("mail2")?;
    mxlb.wait_for_log_count("server smtp/mail2 is UP", 1, Duration::from_secs(10))?;
    let recovered = came_back.elapsed();
    let up_again = Instant::now();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let sent = stream.join().expect("mail stream thread");

    // Nothing refused while another server was up.
    let failed: Vec<&Sent> = sent.iter().filter(|s| !s.ok).collect();
    ensure!(
        failed.is_empty(),
        "{} of {} messages refused, first:\n{}",
        failed.len(),
        sent.len(),
        failed[0].transcript
    );
    // Nothing lost: every accepted message is delivered.
    let delivered = postfix.wait_for_messages(sent.len(), Duration::from_secs(30))?;
    ensure!(
        delivered.len() == sent.len(),
        "{} sent, {} delivered",
        sent.len(),
        delivered.len()
    );
    // Mail flows to mail2 again once it is back up.
    let to_mail2_after = sent
        .iter()
        .filter(|s| s.at > up_again && s.banner.starts_with("220 mail2.test"))
        .count();
    ensure!(
        to_mail2_after > 0,
        "no mail reached mail2 after it came back"
    );

    // HAProxy's bound: fall checks at most `inter` apart, each bounded by `timeout` (a
    // refused connect fails at once, so detection is usually faster). The slack covers
    // scheduling and the reload that takes the service away.
    let bound = INTER * FALL + CHECK_TIMEOUT + Duration::from_millis(500);
    ensure!(
        detected <= bound,
        "DOWN detected after {detected:?}, bound {bound:?}"
    );
    let bound = INTER * RISE + CHECK_TIMEOUT + Duration::from_millis(500);
    ensure!(
        recovered <= bound,
        "UP again after {recovered:?}, bound {bound:?}"
    );
    eprintln!(
        "{} messages, none refused or lost; DOWN detected in {detected:?}, UP in {recovered:?}",
        sent.len()
    );

    let warnings = postfix.warnings();
    ensure!(
        warnings.is_empty(),
        "Postfix logged:\n{}",
        warnings.join("\n")
    );
    Ok(())
}

/// Over a run of well over 100 checks, Postfix (requiring PROXY v1 on one service, v2 on
/// the other) logs clean EHLO … QUIT sessions from the balancer and no warning at all.
#[test]
fn checks_leave_postfix_logs_clean() -> Result<()> {
    let (postfix, servers) = two_proxy_backends()?;
    let _mxlb = start_mxlb(
        "cleanlog",
        &servers,
        &check_keys(Duration::from_millis(20), CHECK_TIMEOUT),
    )?;
    let sessions = mxlb_tests::wait_until(
        "120 finished check sessions",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let done = postfix.disconnects();
            Ok((done.len() >= 120).then_some(done))
        },
    )?;
    ensure!(sessions.iter().any(|(service, _)| service == "mail1"));
    ensure!(sessions.iter().any(|(service, _)| service == "mail2"));
    // v1 carries the check socket's own addresses, v2 is LOCAL: either way Postfix sees
    // the balancer's loopback address.
    ensure!(
        sessions
            .iter()
            .all(|(_, ip)| *ip == IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "{sessions:?}"
    );
    let log = postfix.maillog();
    let disconnects: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnect from"))
        .collect();
    for line in &disconnects {
        ensure!(
            line.contains("ehlo=1 quit=1 commands=2"),
            "not a clean EHLO … QUIT session: {line}"
        );
    }
    let warnings = postfix.warnings();
    ensure!(
        warnings.is_empty(),
        "Postfix logged:\n{}",
        warnings.join("\n")
    );
    Ok(())
}

/// A scripted bad server: accepts connections and runs `script` on each.
fn bad_server(script: impl Fn(TcpStream) + Send + Sync + 'static) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let script = Arc::new(script);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let script = script.clone();
            thread::spawn(move || script(stream));
        }
    });
    Ok(addr)
}

/// Each way a server can fail a check is classified like HAProxy does; with every server
/// down, clients get `421 4.3.0` from mxlb itself.
#[test]
fn failed_checks_are_classified_and_clients_get_421() -> Result<()> {
    let busy = bad_server(|mut stream| {
        let _ = stream.write_all(b"421 4.3.2 Service shutting down\r\n");
    })?;
    let silent = bad_server(|stream| {
        thread::sleep(Duration::from_secs(5));
        drop(stream);
    })?;
    let refused = free_addr();
    let hangs_up = bad_server(|mut stream| {
        let _ = stream.write_all(b"220 ready\r\n");
        let mut buffer = [0u8; 64];
        let _ = stream.read(&mut buffer); // the EHLO, then close without a reply
    })?;
    let servers = [
        ServerEntry {
            name: "busy",
            addr: busy,
            send_proxy: "none",
        },
        ServerEntry {
            name: "silent",
            addr: silent,
            send_proxy: "none",
        },
        ServerEntry {
            name: "refused",
            addr: refused,
            send_proxy: "none",
        },
        ServerEntry {
            name: "hangsup",
            addr: hangs_up,
            send_proxy: "none",
        },
    ];
    let listen = free_addr();
    let stats_addr = free_addr();
    let pins = pin_path("classify");
    let text = config_with_listener_keys(
        RelayKind::Kernel,
        &pins,
        listen,
        &servers,
        &check_keys(INTER, Duration::from_millis(300)),
    );
    let mxlb = Mxlb::start(&with_stats(&text, stats_addr, None), listen, &pins)?;
    for (server, status) in [
        ("busy", "L7STS/421"),
        ("silent", "L7TOUT"),
        ("refused", "L4CON"),
        ("hangsup", "L7RSP"),
    ] {
        let lines = mxlb.wait_for_log_count(
            &format!("server smtp/{server} is DOWN"),
            1,
            Duration::from_secs(10),
        )?;
        ensure!(
            lines[0].contains(status),
            "{server}: expected {status} in {:?}",
            lines[0]
        );
        // The stats say the same, in the same words.
        let stats = get_json(&format!("http://{stats_addr}/api/stats"))?;
        let shown = mxlb_tests::mxlb::http::server(&stats, "smtp", server)?;
        ensure!(shown["status"] == "DOWN", "{shown}");
        let check = shown["check_status"].as_str().unwrap_or_default();
        ensure!(
            check.starts_with(status),
            "{server}: stats show {check:?}, expected {status}"
        );
    }

    let mut client = TcpStream::connect(mxlb.listen)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reply = String::new();
    client
        .read_to_string(&mut reply)
        .context("reading mxlb's reply")?;
    ensure!(reply.starts_with("421 4.3.0 "), "{reply:?}");
    Ok(())
}

/// An SMTP server just good enough for checks (banner, 250 to anything, 221 to QUIT)
/// that can be stopped, closing its port, and started again on the same address.
struct SwitchableSmtp {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SwitchableSmtp {
    fn start(addr: SocketAddr) -> Result<SwitchableSmtp> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread::spawn(move || Self::converse(stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(SwitchableSmtp {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    fn converse(mut stream: TcpStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"220 switchable ESMTP\r\n");
        let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
            let quit = line.trim().eq_ignore_ascii_case("QUIT");
            let reply: &[u8] = if quit { b"221 bye\r\n" } else { b"250 ok\r\n" };
            if stream.write_all(reply).is_err() || quit {
                return;
            }
            line.clear();
        }
    }

    /// Closes the port: checks get `L4CON` from here on.
    fn stop(mut self) -> SocketAddr {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.addr
    }
}

/// Reads the one field of a server that the test follows.
fn server_field(stats_addr: SocketAddr, server: &str, field: &str) -> Result<serde_json::Value> {
    let stats = get_json(&format!("http://{stats_addr}/api/stats"))?;
    Ok(mxlb_tests::mxlb::http::server(&stats, "smtp", server)?[field].clone())
}

/// Waits until the stats show a passed SMTP check of `server`.
fn wait_for_passed_check(stats_addr: SocketAddr, server: &str) -> Result<()> {
    mxlb_tests::wait_until(&format!("a passed check of {server}"), WAIT, INTER, || {
        let check = server_field(stats_addr, server, "check_status")?;
        Ok(check
            .as_str()
            .is_some_and(|c| c.starts_with("L7OK/250"))
            .then_some(()))
    })
}

/// The `mxlb` command with `args`, its exit status and output.
fn mxlb_cli(args: &[&str]) -> Result<mxlb_tests::CommandOutput> {
    mxlb_tests::run_command(
        std::process::Command::new(mxlb_tests::mxlb::binary())
            .args(args)
            .env_remove("MXLB_ADMIN_TOKEN"),
        Duration::from_secs(10),
    )
}

/// The row of `server` in `mxlb status` output, split into cells at runs of spaces.
fn status_row(table: &str, server: &str) -> Result<Vec<String>> {
    let row = table
        .lines()
        .find(|line| line.trim_start().starts_with(&format!("{server} ")))
        .with_context(|| format!("no row for {server} in:\n{table}"))?;
    Ok(row
        .split("  ")
        .map(str::trim)
        .filter(|cell| !cell.is_empty())
        .map(str::to_owned)
        .collect())
}

/// HAProxy's Chk, Dwn, LastChg and Downtime: a server whose backend stops goes DOWN and
/// comes back, and the JSON, the metrics and `mxlb status` count it the same way. In
/// maintenance its checks stop and every view says so instead of showing the last result.
#[test]
fn health_history_counts_a_down_and_back_and_maintenance_shows_checks_off() -> Result<()> {
    const TOKEN: &str = "history-token";
    let one = SwitchableSmtp::start("127.0.0.1:0".parse()?)?;
    let two = SwitchableSmtp::start("127.0.0.1:0".parse()?)?;
    let servers = [
        ServerEntry {
            name: "one",
            addr: one.addr,
            send_proxy: "none",
        },
        ServerEntry {
            name: "two",
            addr: two.addr,
            send_proxy: "none",
        },
    ];
    let listen = free_addr();
    let stats_addr = free_addr();
    let pins = pin_path("history");
    let keys = check_keys(INTER, CHECK_TIMEOUT);
    let text = config_with_listener_keys(RelayKind::UserSpace, &pins, listen, &servers, &keys);
    let mxlb = Mxlb::start(&with_stats(&text, stats_addr, Some(TOKEN)), listen, &pins)?;
    let base = format!("http://{stats_addr}");
    wait_for_passed_check(stats_addr, "one")?;
    ensure!(server_field(stats_addr, "one", "checks_failed")? == 0);
    ensure!(server_field(stats_addr, "one", "down_transitions")? == 0);

    // The backend stops: DOWN after `fall` failed checks; it stays down a while (at least
    // a second, so that `mxlb status` shows it), then comes back on the same address.
    let addr = one.stop();
    mxlb.wait_for_log_count("server smtp/one is DOWN", 1, WAIT)?;
    mxlb_tests::wait_until("a second of downtime", WAIT, INTER, || {
        let down = server_field(stats_addr, "one", "downtime_secs")?;
        Ok((down.as_f64().unwrap_or_default() >= 1.0).then_some(()))
    })?;
    let _one = SwitchableSmtp::start(addr)?;
    mxlb.wait_for_log_count("server smtp/one is UP", 1, WAIT)?;

    let stats = get_json(&format!("{base}/api/stats"))?;
    let shown = mxlb_tests::mxlb::http::server(&stats, "smtp", "one")?;
    let checks_failed = shown["checks_failed"].as_u64().context("checks_failed")?;
    ensure!(checks_failed >= u64::from(FALL), "{shown}");
    ensure!(shown["down_transitions"] == 1, "{shown}");
    ensure!(shown["status"] == "UP", "{shown}");
    let downtime = shown["downtime_secs"].as_f64().context("downtime_secs")?;
    ensure!(downtime >= 1.0, "{shown}");
    let at = shown["last_change_at"].as_str().context("last_change_at")?;
    ensure!(
        at.len() == 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z'),
        "RFC 3339: {shown}"
    );
    let other = mxlb_tests::mxlb::http::server(&stats, "smtp", "two")?;
    ensure!(
        other["checks_failed"] == 0 && other["down_transitions"] == 0,
        "{other}"
    );

    let labels = [("listener", "smtp"), ("server", "one")];
    let metric = |name| mxlb_tests::mxlb::http::metric(&base, name, &labels);
    ensure!(metric("mxlb_server_checks_failed_total")? == checks_failed as f64);
    ensure!(metric("mxlb_server_down_transitions_total")? == 1.0);
    // Read after the JSON, so no less; the two renderings of one float may differ in the
    // last digit (1.4181585079999999 against 1.418158508).
    let downtime_metric = metric("mxlb_server_downtime_seconds_total")?;
    ensure!(
        downtime_metric >= downtime - 1e-6,
        "{downtime_metric} < {downtime}"
    );
    ensure!(metric("mxlb_server_last_change_seconds")? >= 0.0);

    let table = mxlb_cli(&["status", "--stats", &stats_addr.to_string()])?;
    ensure!(table.status.success(), "{}", table.output);
    let row = status_row(&table.output, "one")?;
    // … errors, chk, dwn, last chg, downtime
    let tail: Vec<&str> = row.iter().rev().take(4).rev().map(String::as_str).collect();
    ensure!(
        tail[0] == checks_failed.to_string() && tail[1] == "1" && tail[3] != "0s",
        "{row:?} in\n{}",
        table.output
    );

    // Maintenance: no checks, and no view shows the last result as if it were current.
    let maint = mxlb_cli(&[
        "server",
        "set-state",
        "smtp/one",
        "maint",
        "--stats",
        &stats_addr.to_string(),
        "--token",
        TOKEN,
    ])?;
    ensure!(maint.status.success(), "{}", maint.output);
    let stats = get_json(&format!("{base}/api/stats"))?;
    let shown = mxlb_tests::mxlb::http::server(&stats, "smtp", "one")?;
    ensure!(
        shown["status"] == "MAINT" && shown["check_status"] == "MAINT (checks off)",
        "{shown}"
    );
    let detail = shown["check_detail"].as_str().unwrap_or_default();
    ensure!(
        detail.starts_with("the last check, before: L7OK/250"),
        "{shown}"
    );
    let other = mxlb_tests::mxlb::http::server(&stats, "smtp", "two")?;
    ensure!(
        other["check_status"]
            .as_str()
            .is_some_and(|c| c.starts_with("L7OK/250")),
        "{other}"
    );
    let table = mxlb_cli(&["status", "--stats", &base])?;
    let row = status_row(&table.output, "one")?;
    ensure!(
        row[2] == "MAINT" && row[3] == "MAINT (checks off)",
        "{row:?} in\n{}",
        table.output
    );
    let (status, page) = mxlb_tests::mxlb::http::get(&base)?;
    ensure!(status == 200);
    let page_row = page
        .split(r#"<tr id="srv-smtp-one""#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .context("the page has a row for one")?;
    ensure!(
        page_row.contains(">MAINT (checks off)</td>") && !page_row.contains(">L7OK/250"),
        "{page_row}"
    );

    // Back to ready: `pending` until a check says how the server is now, then L7OK.
    let ready = mxlb_tests::mxlb::http::post_json(
        &format!("{base}/api/servers/smtp/one/state"),
        Some(TOKEN),
        &serde_json::json!({"state": "ready"}),
    )?;
    ensure!(ready.0 == 200, "{ready:?}");
    let answer: serde_json::Value = serde_json::from_str(&ready.1)?;
    ensure!(answer["check_status"].is_null(), "{answer}");
    wait_for_passed_check(stats_addr, "one")?;
    drop(mxlb);
    Ok(())
}

/// For conditions the test waits for; never reached when all is well.
const WAIT: Duration = Duration::from_secs(20);
