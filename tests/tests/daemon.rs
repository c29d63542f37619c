//! The daemon as an operator meets it: config errors, relay selection, the pinned kernel
//! objects bpftool shows, and the demo.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, binary, config, http, pin_path};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, run_command};

fn bpftool_json(args: &[&str], pin: &Path) -> Result<serde_json::Value> {
    let output = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .arg(pin)
        .output()?;
    ensure!(
        output.status.success(),
        "bpftool {args:?} {}: {}",
        pin.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// A kernel-relay configuration with one server that never answers (`backend` only
/// listens): enough for the daemon to start and pin its objects.
fn idle_config(pins: &Path, listen: SocketAddr, backend: &TcpListener) -> Result<String> {
    let server = ServerEntry {
        name: "idle",
        addr: backend.local_addr()?,
        send_proxy: "none",
    };
    Ok(config(RelayKind::Kernel, pins, listen, &[server]))
}

#[test]
fn bpftool_shows_the_pinned_program_and_maps_while_running() -> Result<()> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let listen = free_addr();
    let pins = pin_path("bpftool");
    let mxlb = Mxlb::start(&idle_config(&pins, listen, &backend)?, listen, &pins)?;

    let program = bpftool_json(&["prog", "show", "pinned"], &pins.join("mxlb_verdict"))?;
    ensure!(program["name"] == "mxlb_verdict", "{program}");
    ensure!(program["type"] == "sk_skb", "{program}");
    for (map, kind, read_by_program) in [
        // The verdict is attached to mxlb_socks; it reads the other two.
        ("mxlb_socks", "sockhash", false),
        ("mxlb_peers", "sockhash", true),
        ("mxlb_traffic", "hash", true),
    ] {
        let shown = bpftool_json(&["map", "show", "pinned"], &pins.join(map))?;
        ensure!(shown["name"] == map && shown["type"] == kind, "{shown}");
        // Sized from global.maxconn (default 20000): two sockets per connection.
        ensure!(shown["max_entries"] == 40_000, "{shown}");
        let ids = program["map_ids"].as_array().context("map_ids")?;
        ensure!(
            ids.contains(&shown["id"]) == read_by_program,
            "{map} used by the program: {read_by_program} expected: {program}"
        );
    }

    // The system-wide listing names them too, as operators will look for them.
    let listing = Command::new("bpftool").args(["prog", "show"]).output()?;
    ensure!(String::from_utf8_lossy(&listing.stdout).contains("name mxlb_verdict"));

    let status = mxlb.stop()?;
    ensure!(status.success(), "mxlb exited with {status}");
    ensure!(!pins.exists(), "a clean exit removes the pins");
    Ok(())
}

/// A daemon started while the old one still drains (a restart by hand) takes the pins over;
/// the old one, when it exits, leaves the new one's pins in place.
#[test]
fn a_newer_daemon_keeps_its_pins_when_the_old_one_exits() -> Result<()> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let pins = pin_path("pins-handover");
    let start = |listen| Mxlb::start(&idle_config(&pins, listen, &backend)?, listen, &pins);
    let program_id = || -> Result<serde_json::Value> {
        Ok(bpftool_json(&["prog", "show", "pinned"], &pins.join("mxlb_verdict"))?["id"].clone())
    };
    let old = start(free_addr())?;
    let old_program = program_id()?;
    let new = start(free_addr())?;
    let new_program = program_id()?;
    ensure!(
        old_program != new_program,
        "the new daemon pinned its own program"
    );
    ensure!(
        !new.log_lines("removing a pin left by an earlier run")
            .is_empty(),
        "{}",
        new.log()
    );

    ensure!(old.stop()?.success());
    ensure!(
        program_id()? == new_program,
        "the old daemon's exit must leave the new daemon's pins"
    );
    for map in ["mxlb_socks", "mxlb_peers", "mxlb_traffic", "mxlb_events"] {
        ensure!(pins.join(map).exists(), "{map} pin gone");
    }
    ensure!(new.stop()?.success());
    ensure!(
        !pins.exists(),
        "the last daemon's clean exit removes the pins"
    );
    Ok(())
}

#[test]
fn config_errors_exit_2_with_file_line_and_column() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[listen]]\nname = \"smtp\"\nbind = \"127.0.0.1:2525\"\n\n\
         [[listen.server]]\nname = \"mail1\"\naddres = \"127.0.0.1:25\"\n",
    )?;
    let expected = format!("{}:7:1:", path.display());
    for args in [
        vec!["check-config".as_ref(), path.as_os_str()],
        vec!["run".as_ref(), "--config".as_ref(), path.as_os_str()],
    ] {
        let output = run_command(Command::new(binary()).args(&args), Duration::from_secs(10))?;
        ensure!(
            output.status.code() == Some(2),
            "{args:?}: expected exit 2, got {}: {}",
            output.status,
            output.output
        );
        ensure!(
            output.output.starts_with(&expected),
            "{args:?}: expected {expected:?}…, got {:?}",
            output.output
        );
    }

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[listen]]\nname = \"smtp\"\nbind = \"127.0.0.1:2525\"\n\n\
         [[listen.server]]\nname = \"mail1\"\naddr = \"127.0.0.1:25\"\n",
    )?;
    let output = run_command(
        Command::new(binary()).arg("check-config").arg(&good),
        Duration::from_secs(10),
    )?;
    ensure!(output.status.success(), "{}", output.output);
    Ok(())
}

/// A config file that holds the admin token and that any user can read: check-config (and
/// the daemon at start) warn and name the fix; 0640 passes quietly.
#[test]
fn world_readable_admin_token_is_warned_about() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mxlb.toml");
    std::fs::write(
        &path,
        "[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = \"s3cret\"\n\n\
         [[listen]]\nname = \"smtp\"\nbind = \"127.0.0.1:2525\"\n\n\
         [[listen.server]]\nname = \"mail1\"\naddr = \"127.0.0.1:25\"\n",
    )?;
    let check = |mode: u32| -> Result<String> {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        let output = run_command(
            Command::new(binary()).arg("check-config").arg(&path),
            Duration::from_secs(10),
        )?;
        ensure!(output.status.success(), "{mode:o}: {}", output.output);
        Ok(output.output)
    };
    let loose = check(0o644)?;
    ensure!(
        loose.contains("warning:") && loose.contains("admin_token") && loose.contains("0644"),
        "0644: expected a warning naming the token and the mode, got {loose:?}"
    );
    let tight = check(0o640)?;
    ensure!(
        !tight.contains("warning"),
        "0640: expected no warning, got {tight:?}"
    );
    Ok(())
}

/// A pin path outside bpffs makes the kernel relay fail to load: `sockmap` must refuse to
/// start, `auto` must fall back to user space and say why.
#[test]
fn relay_auto_falls_back_and_names_the_reason_sockmap_refuses() -> Result<()> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let not_bpffs = tempfile::tempdir()?;
    let listen = free_addr();
    let text = idle_config(not_bpffs.path(), listen, &backend)?;
    let config_path = not_bpffs.path().join("sockmap.toml");
    std::fs::write(&config_path, &text)?;
    let output = run_command(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(&config_path),
        Duration::from_secs(10),
    )?;
    ensure!(output.status.code() == Some(1), "{}", output.output);
    ensure!(
        output.output.contains("not on a bpf filesystem"),
        "the error names the reason: {}",
        output.output
    );

    let listen = free_addr();
    let text = idle_config(not_bpffs.path(), listen, &backend)?
        .replace("relay = \"sockmap\"", "relay = \"auto\"");
    let mxlb = Mxlb::start(&text, listen, not_bpffs.path())?;
    let log = mxlb.log();
    ensure!(
        log.contains("relay: user space, because the kernel relay could not load")
            && log.contains("not on a bpf filesystem"),
        "{log}"
    );
    Ok(())
}

/// What `cargo xtask run` starts: mail alternates between the two built-in backends, and
/// each names the client address it was told in the PROXY header.
#[test]
fn demo_alternates_backends_and_shows_client_addresses() -> Result<()> {
    run_demo(&[], "127.0.0.1:2525".parse()?, "127.0.0.1:8404".parse()?).map(|_| ())
}

/// `--port` and `--stats` move the demo beside another instance: it serves there, its
/// backends take other ports than the default demo's, and mail still alternates.
#[test]
fn demo_runs_on_the_ports_it_is_given() -> Result<()> {
    let listen = free_addr();
    let stats = free_addr();
    let port = listen.port().to_string();
    let stats_arg = stats.to_string();
    let backends = run_demo(&["--port", &port, "--stats", &stats_arg], listen, stats)?;
    for addr in backends {
        ensure!(
            !["127.0.0.1:10025", "127.0.0.1:10026"].contains(&addr.as_str()),
            "a backend on the default demo's port: {addr}"
        );
    }
    Ok(())
}

/// Runs `mxlb demo ARGS`, expecting it on `listen` and its stats on `stats`; sends four
/// messages from four addresses; returns the backends' addresses from `/api/stats`.
fn run_demo(args: &[&str], listen: SocketAddr, stats: SocketAddr) -> Result<Vec<String>> {
    let log = tempfile::NamedTempFile::new()?;
    let mut demo = Command::new(binary())
        .arg("demo")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen()?)
        .spawn()?;
    let result = (|| -> Result<Vec<String>> {
        mxlb_tests::wait_for_listen(&[listen, stats], Duration::from_secs(20))?;
        let mut backends = Vec::new();
        for octet in [41u8, 42, 43, 44] {
            let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet));
            let outcome = Swaks::send(listen, client, "you@example.test", "demo", None)?;
            outcome.ensure_success()?;
            let banner = outcome.banner.clone().unwrap_or_default();
            ensure!(
                banner.contains(&format!("you are {client}:")),
                "banner does not show the client address {client}: {banner}"
            );
            let backend = if banner.contains("demo1") {
                "demo1"
            } else {
                "demo2"
            };
            backends.push(backend);
        }
        ensure!(
            backends == ["demo1", "demo2", "demo1", "demo2"],
            "{backends:?}"
        );
        let snapshot = http::get_json(&format!("http://{stats}/api/stats"))?;
        ["demo1", "demo2"]
            .into_iter()
            .map(|name| {
                let server = http::server(&snapshot, "smtp", name)?;
                let addr = server["addr"].as_str().context("no addr")?;
                Ok(addr.to_owned())
            })
            .collect()
    })();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(demo.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = demo.wait()?;
    let result = result.with_context(|| std::fs::read_to_string(log.path()).unwrap_or_default())?;
    ensure!(status.success(), "demo exited with {status}");
    Ok(result)
}

/// A backend that reads each connection's PROXY header, sends `banner` and closes.
fn greeting_backend(banner: &'static [u8]) -> Result<SocketAddr> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let addr = backend.local_addr()?;
    std::thread::spawn(move || {
        for stream in backend.incoming().flatten() {
            let mut stream = stream;
            let _ = mxlb_tests::backend::read_proxy_header(&mut stream);
            let _ = std::io::Write::write_all(&mut stream, banner);
        }
    });
    Ok(addr)
}

/// `log_format = "json"`: one JSON object per line, the connection line with every field
/// an operator filters on.
#[test]
fn json_logs_carry_the_connection_fields() -> Result<()> {
    let backend_addr = greeting_backend(b"220 json\r\n")?;
    let listen = free_addr();
    let pins = pin_path("json");
    let text = config(
        RelayKind::Kernel,
        &pins,
        listen,
        &[ServerEntry {
            name: "mail1",
            addr: backend_addr,
            send_proxy: "v1",
        }],
    )
    .replace("[global]\n", "[global]\nlog_format = \"json\"\n");
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let mut client = std::net::TcpStream::connect(listen)?;
    let mut banner = Vec::new();
    std::io::Read::read_to_end(&mut client, &mut banner)?;
    ensure!(banner == b"220 json\r\n");
    client.shutdown(std::net::Shutdown::Write)?;
    let line = mxlb.wait_for_log_count("connection finished", 1, Duration::from_secs(10))?;
    let entry: serde_json::Value = serde_json::from_str(&line[0])?;
    let fields = &entry["fields"];
    ensure!(entry["level"] == "INFO", "{entry}");
    ensure!(
        fields["client"] == client.local_addr()?.to_string(),
        "{entry}"
    );
    ensure!(
        fields["listener"] == "smtp" && fields["server"] == "mail1",
        "{entry}"
    );
    ensure!(
        fields["bytes_in"] == 0 && fields["bytes_out"] == 10,
        "{entry}"
    );
    ensure!(fields["ended"] == "closed", "{entry}");
    // The connection's id is a field of its span.
    ensure!(
        entry["span"]["name"] == "session" && entry["span"]["session"].is_string(),
        "{entry}"
    );
    ensure!(
        fields["connect_ms"].is_number() && fields["duration_ms"].is_number(),
        "{entry}"
    );
    for line in mxlb.log().lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("not JSON: {line}"))?;
    }
    Ok(())
}

/// A user-space configuration with two servers, unchecked: `refusing`, which refuses
/// every connect (of two clients balanced round robin, one is sent there first, a warning,
/// and redispatched), and `mail1`, a [`greeting_backend`] with `banner`. Returns the
/// refusing server's address too.
fn refusing_then_greeting(
    pins: &Path,
    listen: SocketAddr,
    banner: &'static [u8],
) -> Result<(String, SocketAddr)> {
    let backend_addr = greeting_backend(banner)?;
    let refusing = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let text = mxlb_tests::mxlb::config_with_listener_keys(
        RelayKind::UserSpace,
        pins,
        listen,
        &[
            ServerEntry {
                name: "refusing",
                addr: refusing,
                send_proxy: "v1",
            },
            ServerEntry {
                name: "mail1",
                addr: backend_addr,
                send_proxy: "v1",
            },
        ],
        "[listen.check]\ntype = \"none\"\n",
    );
    Ok((text, refusing))
}

/// Every log line of one connection carries its `session=` id, from its acceptance to its
/// end (a failed connect on the way too), and no other connection's; `connect_ms` and
/// `duration_ms` are to the microsecond.
#[test]
fn every_line_of_a_connection_carries_its_session_id() -> Result<()> {
    let listen = free_addr();
    let pins = pin_path("session-id");
    let (text, refusing) = refusing_then_greeting(&pins, listen, b"220 session\r\n")?;
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = std::net::TcpStream::connect(listen)?;
        let mut banner = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut banner)?;
        ensure!(banner == b"220 session\r\n", "{banner:?}");
        client.shutdown(std::net::Shutdown::Write)?;
        clients.push(client);
    }
    let mut sessions = Vec::new();
    for client in &clients {
        let addr = client.local_addr()?;
        let finished = mxlb.finished_for(addr, Duration::from_secs(10))?;
        let lines = mxlb_tests::mxlb::session_lines(&mxlb.log(), &finished.session);
        let has = |needle: &str| lines.iter().any(|line| line.contains(needle));
        ensure!(
            has(&format!("accepted client={addr}"))
                && has("connected to")
                && has("connection finished"),
            "session {}: {lines:#?}\nlog:\n{}",
            finished.session,
            mxlb.log()
        );
        ensure!(
            lines
                .iter()
                .all(|line| !line.contains("client=") || line.contains(&format!("client={addr}"))),
            "another client's line in session {}: {lines:#?}",
            finished.session
        );
        sessions.push(finished.session);
    }
    ensure!(sessions[0] != sessions[1], "{sessions:?}");
    let failures = mxlb.log_lines(&format!("connect to {refusing} failed"));
    ensure!(
        !failures.is_empty()
            && failures.iter().all(|line| sessions
                .iter()
                .any(|s| line.ends_with(&format!("session={s}")))),
        "{failures:#?}"
    );
    Ok(())
}

/// `log_target = "syslog"`: every line goes to the syslog socket as one datagram, with the
/// facility and the line's severity in PRI and the header of the chosen RFC; nothing goes
/// to stderr. Read from a socket the test binds where `syslog_socket` points.
#[test]
fn syslog_gets_every_line_with_its_facility_severity_and_header() -> Result<()> {
    // (format, facility, its code)
    for (format, facility, code) in [("rfc5424", "mail", 2u32), ("rfc3164", "local3", 19)] {
        let dir = tempfile::tempdir()?;
        let socket_path = dir.path().join("log");
        let syslog = std::os::unix::net::UnixDatagram::bind(&socket_path)?;
        syslog.set_read_timeout(Some(Duration::from_secs(10)))?;
        let listen = free_addr();
        let pins = pin_path(&format!("syslog-{format}"));
        let (text, _) = refusing_then_greeting(&pins, listen, b"220 syslog\r\n")?;
        let text = mxlb_tests::mxlb::with_global_keys(
            &text,
            &format!(
                "log_target = \"syslog\"\nsyslog_socket = \"{}\"\nsyslog_facility = \
                 \"{facility}\"\nsyslog_format = \"{format}\"\nhostname = \"mx.syslog.test\"\n",
                socket_path.display()
            ),
        );
        let mxlb = Mxlb::start_logging_elsewhere(&text, listen, &pins)?;
        for _ in 0..2 {
            let mut client = std::net::TcpStream::connect(listen)?;
            let mut banner = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut banner)?;
            client.shutdown(std::net::Shutdown::Write)?;
        }
        let pid = mxlb.pid();
        let mut wanted = vec![
            ("ready pid=", 6),
            ("connection finished client=", 6),
            ("connection finished client=", 6),
            ("failed client=", 4),
        ];
        let mut buffer = vec![0u8; 65536];
        while !wanted.is_empty() {
            let n = syslog
                .recv(&mut buffer)
                .with_context(|| format!("{format}: still waiting for {wanted:?}"))?;
            let datagram = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let (pri, message) = parse_syslog(&datagram, format, "mx.syslog.test", pid)
                .with_context(|| format!("{format}: {datagram:?}"))?;
            ensure!(
                ["ERROR ", "WARN ", "INFO ", "DEBUG "]
                    .iter()
                    .any(|level| message.starts_with(level)),
                "{format}: the message is the log line, level first: {datagram:?}"
            );
            if let Some(at) = wanted.iter().position(|(text, _)| message.contains(text)) {
                let severity = wanted.remove(at).1;
                ensure!(
                    pri == code * 8 + severity,
                    "{format}: PRI {pri}: {datagram:?}"
                );
            }
        }
        ensure!(
            mxlb.log().trim().is_empty(),
            "{format}: stderr: {}",
            mxlb.log()
        );
    }
    Ok(())
}

/// PRI and message of one syslog datagram, checking its header against RFC 5424 (6) or
/// RFC 3164 (4.1): `<PRI>1 TIMESTAMP HOSTNAME mxlb PID - - MSG` or `<PRI>Mmm dd hh:mm:ss
/// HOSTNAME mxlb[PID]: MSG`.
fn parse_syslog(datagram: &str, format: &str, hostname: &str, pid: u32) -> Result<(u32, String)> {
    let rest = datagram.strip_prefix('<').context("no <PRI>")?;
    let (pri, rest) = rest.split_once('>').context("no <PRI>")?;
    let pri: u32 = pri.parse()?;
    let message = if format == "rfc5424" {
        let rest = rest.strip_prefix("1 ").context("no VERSION 1")?;
        let (stamp, rest) = rest.split_once(' ').context("no TIMESTAMP")?;
        // 2026-12-02T05:03:09.250001Z
        let shape: String = stamp
            .chars()
            .map(|c| if c.is_ascii_digit() { 'd' } else { c })
            .collect();
        ensure!(shape == "dddd-dd-ddTdd:dd:dd.ddddddZ", "TIMESTAMP {stamp}");
        rest.strip_prefix(&format!("{hostname} mxlb {pid} - - "))
            .context("HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA")?
    } else {
        let (stamp, rest) = rest.split_at_checked(15).context("no TIMESTAMP")?;
        let months = "JanFebMarAprMayJunJulAugSepOctNovDec";
        ensure!(
            months.contains(&stamp[..3])
                && stamp[3..6]
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|day| (1..=31).contains(&day))
                && stamp.as_bytes()[6] == b' '
                && stamp[7..]
                    .split(':')
                    .all(|part| part.len() == 2 && part.parse::<u32>().is_ok()),
            "TIMESTAMP {stamp:?}"
        );
        rest.strip_prefix(&format!(" {hostname} mxlb[{pid}]: "))
            .context("HOSTNAME TAG[PID]")?
    };
    Ok((pri, message.to_owned()))
}
