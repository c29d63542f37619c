//! `mxlb import-haproxy`, the real binary: its exit codes and report, `mxlb check-config`
//! on what it prints, and end to end: the HAProxy configuration the fixtures run in front of
//! two Postfix backends (send-proxy v1 and v2, `option smtpchk`) serves mail, then the same
//! file converted runs mxlb (kernel relay) in front of the same backends, and the same mail
//! arrives the same way: alternating, intact, with the true client addresses.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::delivery::{
    Baseline, Delivery, send_round_robin, send_round_robin_since, wait_for_checks,
};
use mxlb_tests::haproxy::{Haproxy, HaproxyConfig, SendProxy};
use mxlb_tests::mxlb::{Mxlb, binary, pin_path};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::{free_addr, wait_until};

/// HAProxy's and mxlb's own address: what Postfix logs for health check sessions.
const BALANCER_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn mxlb(args: &[&str]) -> Result<Output> {
    Command::new(binary())
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", binary().display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Converts `cfg` with the binary: (exit code, stdout, stderr).
fn import(cfg: &Path) -> Result<(i32, String, String)> {
    let output = mxlb(&["import-haproxy", &cfg.display().to_string()])?;
    let code = output.status.code().context("killed by a signal")?;
    Ok((code, text(&output.stdout), text(&output.stderr)))
}

#[test]
fn converts_reports_and_passes_check_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "\
global
    daemon
    maxconn 2000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend smtp_in
    bind :::2525 v6only
    bind 127.0.0.1:2525 accept-proxy
    tcp-request inspect-delay 5s
    default_backend mail

backend mail
    balance leastconn
    option smtpchk EHLO lb.example.test
    default-server inter 3s fall 2
    server mail1 192.0.2.10:25 send-proxy check
    server mail2 [2001:db8::11]:25 send-proxy-v2 check weight 2 slowstart 30s
    server-template mx 2 mx.example.test:25
",
    )?;
    let (code, toml, stderr) = import(&cfg)?;
    let file = cfg.display();
    let expected = [
        format!("{file}:2: daemon: daemon (in global): mxlb runs in the foreground under systemd"),
        format!(
            "{file}:13: bind 127.0.0.1:2525 accept-proxy: accept-proxy differs from the first bind \
             (line 12), which the listener follows: mxlb's accept_proxy is per listener"
        ),
        format!("{file}:14: tcp-request inspect-delay 5s: tcp-request: "),
        format!(
            "{file}:22: server mail2 [2001:db8::11]:25 send-proxy-v2 check weight 2 slowstart 30s: \
             `slowstart 30s` has no mxlb equivalent"
        ),
        format!("{file}:23: server-template mx 2 mx.example.test:25: server-template: "),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    ensure!(lines.len() == expected.len(), "stderr:\n{stderr}");
    for (line, expected) in lines.iter().zip(&expected) {
        ensure!(
            line.starts_with(expected.as_str()),
            "{line:?}\nexpected {expected:?}"
        );
    }
    ensure!(code == 0, "exit {code}, stderr:\n{stderr}");

    let converted = dir.path().join("mxlb.toml");
    std::fs::write(&converted, &toml)?;
    let check = mxlb(&["check-config", &converted.display().to_string()])?;
    ensure!(
        check.status.code() == Some(0),
        "check-config: {}\n{toml}",
        text(&check.stderr)
    );
    ensure!(
        text(&check.stdout).contains("ok (1 listener, 2 servers)"),
        "{}",
        text(&check.stdout)
    );
    for wanted in [
        "name = \"smtp_in\"",
        "\"[::]:2525\",",
        "\"127.0.0.1:2525\",",
        "balance = \"leastconn\"",
        "timeout_idle = \"10m\"",
        "domain = \"lb.example.test\"",
        "inter = \"3s\"",
        "send_proxy = \"v2\"",
        "[global]\nmaxconn = 2000",
    ] {
        ensure!(toml.contains(wanted), "no {wanted:?} in:\n{toml}");
    }
    Ok(())
}

#[test]
fn bad_input_exits_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, stdout, stderr) = import(&dir.path().join("missing.cfg"))?;
    ensure!(code == 2 && stdout.is_empty(), "{code} {stdout} {stderr}");
    ensure!(stderr.contains("No such file"), "{stderr}");

    let cfg = dir.path().join("http.cfg");
    std::fs::write(
        &cfg,
        "defaults\n    mode http\nlisten web\n    bind :80\n    server w 192.0.2.1:80\n",
    )?;
    let (code, stdout, stderr) = import(&cfg)?;
    ensure!(code == 2 && stdout.is_empty(), "{code} {stdout} {stderr}");
    let file = cfg.display();
    ensure!(
        stderr.contains(&format!("{file}:2: mode http: ")),
        "{stderr}"
    );
    ensure!(
        stderr.contains(&format!(
            "{file}:3: listen web: listen web is not converted"
        )),
        "{stderr}"
    );
    ensure!(stderr.contains("nothing mxlb can balance"), "{stderr}");
    Ok(())
}

#[test]
fn the_same_mail_through_haproxy_then_through_its_converted_config() -> Result<()> {
    let postfix = PostfixInstance::start(&[
        SmtpdService::with_proxy("mail1", free_addr()),
        SmtpdService::with_proxy("mail2", free_addr()),
    ])?;
    let mut config = HaproxyConfig::new(free_addr())
        .server("mail1", postfix.services()[0].addr, SendProxy::V1)
        .server("mail2", postfix.services()[1].addr, SendProxy::V2)
        .smtpchk("EHLO example.test");
    config.check_interval = Duration::from_millis(300);
    let haproxy = Haproxy::start(config)?;
    haproxy.wait_servers_up(Duration::from_secs(10))?;
    wait_for_checks(&postfix, BALANCER_IP)?;
    let through_haproxy = send_round_robin(haproxy.addr(), &postfix, 41..=46, BALANCER_IP, true)?;

    // The file HAProxy ran, converted. HAProxy goes first: its health checks would count
    // as mxlb's, and it holds the address.
    let cfg = haproxy.dir().join("haproxy.cfg");
    let (code, toml, stderr) = import(&cfg)?;
    ensure!(code == 0, "import-haproxy exit {code}:\n{stderr}");
    let haproxy_addr = haproxy.addr();
    drop(haproxy);
    // Sessions HAProxy left (a check cut short) are logged before the baseline is taken.
    wait_until(
        "every Postfix session HAProxy opened to end",
        Duration::from_secs(10),
        Duration::from_millis(25),
        || Ok((postfix.connects().len() == postfix.disconnects().len()).then_some(())),
    )?;
    let since = Baseline::of(&postfix)?;

    let listen = free_addr();
    let pins = pin_path("import-haproxy");
    let mxlb_config = kernel_relay(&toml, &pins, haproxy_addr, listen)?;
    let mxlb = Mxlb::start(&mxlb_config, listen, &pins)?;
    wait_for_checks(&postfix, BALANCER_IP)?;
    let through_mxlb = send_round_robin_since(listen, &postfix, 51..=56, BALANCER_IP, true, since)?;

    // Both alternated over both backends (send_round_robin checks that); the same two.
    let backends = |deliveries: &[Delivery]| -> BTreeSet<String> {
        deliveries.iter().map(|d| d.backend.clone()).collect()
    };
    ensure!(
        backends(&through_haproxy) == backends(&through_mxlb),
        "HAProxy: {through_haproxy:?}\nmxlb: {through_mxlb:?}"
    );
    let lines = mxlb.wait_for_log_count(
        "connection finished",
        through_mxlb.len(),
        Duration::from_secs(10),
    )?;
    ensure!(
        lines.iter().all(|line| line.contains("relay=kernel")),
        "not every session went through the kernel relay:\n{}",
        lines.join("\n")
    );
    let status = mxlb.stop()?;
    ensure!(status.success(), "mxlb exited with {status}");
    Ok(())
}

/// The converted configuration with the kernel relay (every connection paired at once)
/// and a listener moved from HAProxy's address to `listen`.
fn kernel_relay(
    toml: &str,
    pins: &Path,
    haproxy: SocketAddr,
    listen: SocketAddr,
) -> Result<String> {
    let bind = format!("\"{haproxy}\",");
    ensure!(toml.contains(&bind), "{bind} not in:\n{toml}");
    ensure!(!toml.contains("[global]"), "a [global] already:\n{toml}");
    Ok(format!(
        "[global]\npin_path = \"{}\"\nrelay = \"sockmap\"\nkernel_relay_after = 0\ngrace = \"2s\"\n\n{}",
        pins.display(),
        toml.replacen(&bind, &format!("\"{listen}\","), 1)
    ))
}
