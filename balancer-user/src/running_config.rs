//! The configuration in force, written back as TOML: `GET /api/config` and
//! `mxlb show-config`.
//!
//! Every key is written with the value the daemon uses, defaults included, so the answer
//! says what runs rather than what the file left out; after a reload that changed a
//! restart-only key, the value shown is the one still in force ([`crate::reload`]). The
//! text is valid input for `mxlb check-config` and parses back to the same configuration,
//! but for `admin_token`, which is never shown: it becomes a comment saying it is set.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Global, Listener, LogTarget, Server, Stats};

/// Where the token would be: a comment, so that copying the text gives a daemon with the
/// admin API off rather than one whose token is a placeholder.
pub const REDACTED_TOKEN: &str = "# admin_token is set (not shown)";

/// `config` as TOML.
pub fn render(config: &Config) -> String {
    let mut out = String::from(
        "# The configuration mxlb runs: every key with the value in force, defaults included.\n",
    );
    global(&mut out, &config.global);
    if let Some(stats) = &config.stats {
        self::stats(&mut out, stats);
    }
    for listener in &config.listeners {
        self::listener(&mut out, listener);
    }
    out
}

/// A TOML string literal, quoted and escaped.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A configuration enum as the file spells it: its serde name, the one parsing reads.
fn named(value: impl Serialize) -> String {
    toml::Value::try_from(value)
        .map(|value| value.to_string())
        .expect("a unit enum serializes to a TOML string")
}

fn duration(value: Duration) -> String {
    quoted(&humantime::format_duration(value).to_string())
}

/// One `key = value` line; `value` is TOML already.
fn key(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name} = {value}");
}

fn global(out: &mut String, global: &Global) {
    out.push_str("\n[global]\n");
    key(out, "pin_path", quoted(&global.pin_path.to_string_lossy()));
    key(out, "relay", named(global.relay));
    key(out, "maxconn", global.maxconn);
    key(out, "grace", duration(global.grace));
    key(out, "log_format", named(global.log_format));
    key(out, "max_inflight", global.max_inflight);
    key(out, "kernel_relay_after", global.kernel_relay_after);
    key(out, "threads", global.threads);
    if let Some(run_as) = &global.user {
        key(out, "user", quoted(&run_as.user));
        key(out, "group", quoted(&run_as.group));
    }
    if let Some(path) = &global.upgrade_socket {
        key(out, "upgrade_socket", quoted(&path.to_string_lossy()));
    }
    match &global.log_target {
        LogTarget::Stderr => key(out, "log_target", quoted("stderr")),
        LogTarget::Syslog(syslog) => {
            key(out, "log_target", quoted("syslog"));
            key(
                out,
                "syslog_socket",
                quoted(&syslog.socket.to_string_lossy()),
            );
            key(out, "syslog_facility", named(syslog.facility));
            key(out, "syslog_format", named(syslog.format));
        }
    }
    if let Some(hostname) = &global.hostname {
        key(out, "hostname", quoted(hostname));
    }
}

fn stats(out: &mut String, stats: &Stats) {
    out.push_str("\n[stats]\n");
    key(out, "bind", quoted(&stats.bind.to_string()));
    if stats.admin_token.is_some() {
        let _ = writeln!(out, "{REDACTED_TOKEN}");
    }
    key(out, "maxconn", stats.maxconn);
    key(out, "timeout", duration(stats.timeout));
}

fn listener(out: &mut String, listener: &Listener) {
    out.push_str("\n[[listen]]\n");
    key(out, "name", quoted(&listener.name));
    let binds: Vec<String> = listener
        .bind
        .iter()
        .map(|addr| quoted(&addr.to_string()))
        .collect();
    key(out, "bind", format!("[{}]", binds.join(", ")));
    key(out, "balance", quoted(listener.balance.as_str()));
    key(out, "accept_proxy", listener.accept_proxy);
    if let Some(trusted) = &listener.accept_proxy_from {
        let blocks: Vec<String> = trusted
            .blocks()
            .iter()
            .map(|block| quoted(&block.to_string()))
            .collect();
        key(out, "accept_proxy_from", format!("[{}]", blocks.join(", ")));
    }
    key(out, "retries", listener.retries);
    key(out, "redispatch", listener.redispatch);
    key(out, "timeout_connect", duration(listener.timeout_connect));
    key(out, "timeout_idle", duration(listener.timeout_idle));
    key(out, "maxconn", listener.maxconn);
    let limits = &listener.source_limits;
    key(out, "max_conn_per_source", limits.max_conn);
    key(out, "max_rate_per_source", limits.max_rate);
    key(out, "rate_window", duration(limits.rate_window));
    key(out, "source_prefix_v4", limits.prefix_v4);
    key(out, "source_prefix_v6", limits.prefix_v6);

    let check = &listener.check;
    out.push_str("\n[listen.check]\n");
    key(out, "type", named(check.kind));
    key(out, "verb", quoted(check.verb.as_str()));
    key(out, "domain", quoted(&check.domain));
    key(out, "inter", duration(check.inter));
    key(out, "fastinter", duration(check.fastinter));
    key(out, "downinter", duration(check.downinter));
    key(out, "rise", check.rise);
    key(out, "fall", check.fall);
    key(out, "timeout", duration(check.timeout));

    for server in &listener.servers {
        self::server(out, server);
    }
}

fn server(out: &mut String, server: &Server) {
    out.push_str("\n[[listen.server]]\n");
    key(out, "name", quoted(&server.name));
    key(out, "addr", quoted(&server.addr.to_string()));
    key(out, "send_proxy", named(server.send_proxy));
    key(out, "weight", server.weight);
    key(out, "backup", server.backup);
    key(out, "check", server.check);
    key(out, "maxconn", server.maxconn);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key set away from its default, so a key the rendering forgot shows as a
    /// difference after the round trip.
    const EVERY_KEY: &str = r#"
[global]
pin_path = "/sys/fs/bpf/other"
relay = "sockmap"
maxconn = 1234
grace = "1m 30s"
log_format = "json"
max_inflight = "1MiB"
kernel_relay_after = 0
threads = 3
upgrade_socket = "/run/mxlb/up.sock"
log_target = "syslog"
syslog_socket = "/run/other.sock"
syslog_facility = "local3"
syslog_format = "rfc5424"
hostname = "mx.example.com"

[stats]
bind = "127.0.0.1:8405"
admin_token = "very-secret-token"
maxconn = 7
timeout = "3s"

[[listen]]
name = "smtp"
bind = ["0.0.0.0:2525", "[::1]:2525"]
balance = "leastconn"
accept_proxy = true
accept_proxy_from = ["192.0.2.10", "10.0.0.0/8", "2001:db8::/32"]
retries = 5
redispatch = false
timeout_connect = "750ms"
timeout_idle = "7m"
maxconn = 99
max_conn_per_source = 4
max_rate_per_source = 30
rate_window = "20s"
source_prefix_v4 = 24
source_prefix_v6 = 48

[listen.check]
type = "tcp"
verb = "EHLO"
domain = "lb.example.com"
inter = "3s"
fastinter = "500ms"
downinter = "9s"
rise = 4
fall = 5
timeout = "1s"

[[listen.server]]
name = "mail1"
addr = "192.0.2.20:25"
send_proxy = "v2"
weight = 7
backup = true
check = false
maxconn = 11

[[listen.server]]
name = "mail2"
addr = "[2001:db8::25]:25"

[[listen]]
name = "plain"
bind = ["127.0.0.1:2526"]

[[listen.server]]
name = "only"
addr = "127.0.0.1:25"
"#;

    #[test]
    fn the_rendering_parses_back_to_the_same_configuration_without_the_token() {
        let config = Config::parse(EVERY_KEY, "every.toml").unwrap();
        let text = render(&config);
        let back = Config::parse(&text, "rendered.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut expected = config.clone();
        expected.stats.as_mut().unwrap().admin_token = None;
        assert_eq!(back, expected, "{text}");
        assert!(!text.contains("very-secret-token"), "{text}");
        assert!(text.contains(&format!("\n{REDACTED_TOKEN}\n")), "{text}");
    }

    #[test]
    fn strings_are_quoted_as_toml() {
        for text in ["a\"b\\c", "it's", "line\nbreak", "plain"] {
            let line = format!("k = {}", quoted(text));
            let table: toml::Table = toml::from_str(&line).unwrap();
            assert_eq!(table["k"].as_str(), Some(text), "{line}");
        }
        assert_eq!(duration(Duration::from_millis(1500)), r#""1s 500ms""#);
    }
}
