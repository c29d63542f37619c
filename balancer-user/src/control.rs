//! The command-line side of the stats and admin API: `mxlb status` prints the stats table,
//! `mxlb server set-state` and `set-weight` change a server, `mxlb show-config` prints the
//! configuration in force.

use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::stats::units::{human_bytes, human_duration};
use crate::stats::{AdminState, ServerStats, StatsSnapshot};

/// The stats URL when none is given: the contract's default `[stats] bind`.
pub const DEFAULT_STATS_URL: &str = "http://127.0.0.1:8404";

/// What `--stats` takes: `[stats] bind` as written in the file (`127.0.0.1:8404`,
/// `[::1]:8404`, `localhost:8404`) or a URL (`http://127.0.0.1:8404`). Returns the base
/// URL the requests go to.
pub fn stats_url(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let (scheme, authority) = match text.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("http", text),
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{text:?}: the stats port speaks plain http (give ADDR:PORT or http://ADDR:PORT)"
        ));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| {
        format!("{text:?} has no port: give the [stats] bind address, such as 127.0.0.1:8404")
    })?;
    let host_ok = !host.is_empty()
        && !host.contains(['/', '?', '#', '@', ' '])
        && (host.starts_with('[') == host.ends_with(']'));
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?} is not ADDR:PORT or http://ADDR:PORT (as [stats] bind, e.g. 127.0.0.1:8404)"
        ));
    }
    Ok(format!("http://{host}:{port}"))
}

/// A server as the admin commands name it: `LISTEN/SERVER`, the names of the
/// configuration (and of `mxlb status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub listener: String,
    pub server: String,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        match text.split_once('/') {
            Some((listener, server))
                if !listener.is_empty() && !server.is_empty() && !server.contains('/') =>
            {
                Ok(Target {
                    listener: listener.to_owned(),
                    server: server.to_owned(),
                })
            }
            _ => Err(format!(
                "{text:?} is not LISTEN/SERVER: write the listener's name, a slash and the \
                 server's, as `mxlb status` shows them (e.g. smtp/{})",
                if text.is_empty() || text.contains('/') {
                    "mail1"
                } else {
                    text
                }
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.listener, self.server)
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Fetches `/api/stats` from the daemon at `base`.
pub fn fetch(base: &str) -> anyhow::Result<StatsSnapshot> {
    let url = format!("{base}/api/stats");
    let mut response = agent()
        .get(&url)
        .call()
        .with_context(|| format!("asking {url}"))?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    response
        .body_mut()
        .read_json()
        .with_context(|| format!("reading the stats from {url}"))
}

/// Asks the daemon at `base` to set `target` to `state`; returns the server's new stats.
pub fn set_state(
    base: &str,
    target: &Target,
    state: AdminState,
    token: &str,
) -> anyhow::Result<ServerStats> {
    change_server(
        base,
        target,
        "state",
        serde_json::json!({ "state": state }),
        token,
    )
}

/// Asks the daemon at `base` to set `target`'s weight; returns the server's new stats.
pub fn set_weight(
    base: &str,
    target: &Target,
    weight: u32,
    token: &str,
) -> anyhow::Result<ServerStats> {
    change_server(
        base,
        target,
        "weight",
        serde_json::json!({ "weight": weight }),
        token,
    )
}

/// `POST /api/servers/{listen}/{server}/{what}` with `body`.
fn change_server(
    base: &str,
    target: &Target,
    what: &str,
    body: serde_json::Value,
    token: &str,
) -> anyhow::Result<ServerStats> {
    let url = format!(
        "{base}/api/servers/{}/{}/{what}",
        target.listener, target.server
    );
    let mut response = agent()
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .with_context(|| format!("asking {url}"))?;
    let answer = answer_text(&url, &mut response)?;
    serde_json::from_str(&answer).with_context(|| format!("reading the answer of {url}"))
}

/// `GET /api/config`: the configuration the daemon at `base` runs, as TOML.
pub fn running_config(base: &str, token: &str) -> anyhow::Result<String> {
    let url = format!("{base}/api/config");
    let mut response = agent()
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("asking {url}"))?;
    answer_text(&url, &mut response)
}

/// The body of a successful answer; an error naming the status and the daemon's words
/// otherwise.
fn answer_text(
    url: &str,
    response: &mut ureq::http::Response<ureq::Body>,
) -> anyhow::Result<String> {
    let status = response.status();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if !status.is_success() {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("{url} answered {status}: {reason}");
    }
    Ok(body)
}

/// A server's weight for the table: one set at run time is marked with `*`.
fn weight_shown(server: &ServerStats) -> String {
    if server.weight == server.config_weight {
        server.weight.to_string()
    } else {
        format!("{}*", server.weight)
    }
}

/// The stats as a terminal table, one block per listener.
pub fn render_table(snapshot: &StatsSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mxlb {} — relay {} — up {} — connections {}/{}",
        snapshot.version,
        snapshot.relay,
        humantime::format_duration(Duration::from_secs(snapshot.uptime_secs as u64)),
        snapshot.conns_cur,
        snapshot.maxconn
    );
    if snapshot.reloads + snapshot.reload_failures > 0 {
        let _ = writeln!(
            out,
            "reloads: {} applied, {} refused{}",
            snapshot.reloads,
            snapshot.reload_failures,
            if snapshot.reload_failures > 0 {
                " (the log says why; the file on disk may not be what runs)"
            } else {
                ""
            }
        );
    }
    if snapshot.integrity_errors > 0 {
        let _ = writeln!(
            out,
            "INTEGRITY ERRORS: {} connections failed the byte conservation check and were \
             reset (the log has each: grep 'integrity:')",
            snapshot.integrity_errors
        );
    }
    for listener in &snapshot.listeners {
        let _ = writeln!(
            out,
            "\nlistener {} ({}, {}): sessions {}/{}/{} (cur/max/total), in {} out {}, no server {}",
            listener.name,
            listener.bind.join(" "),
            listener.balance,
            listener.sessions_cur,
            listener.sessions_max,
            listener.sessions_total,
            human_bytes(listener.bytes_in),
            human_bytes(listener.bytes_out),
            listener.refused_no_server
        );
        let limits: Vec<String> = listener
            .refused_limits
            .by_reason()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        if !limits.is_empty() {
            let _ = writeln!(out, "  refused over limits: {}", limits.join(", "));
        }
        if listener.bad_proxy_headers > 0 {
            let _ = writeln!(
                out,
                "  closed without a usable PROXY header: {}",
                listener.bad_proxy_headers
            );
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:<6} {:<26} {:>6} {:>14} {:>10} {:>10} {:>6} {:>5} {:>4} {:>9} {:>9}",
            "server",
            "address",
            "status",
            "last check",
            "weight",
            "sessions",
            "bytes in",
            "bytes out",
            "errors",
            "chk",
            "dwn",
            "last chg",
            "downtime"
        );
        for server in &listener.servers {
            let name = if server.backup {
                format!("{} (backup)", server.name)
            } else {
                server.name.clone()
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<22} {:<6} {:<26} {:>6} {:>14} {:>10} {:>10} {:>6} {:>5} {:>4} {:>9} {:>9}",
                name,
                server.addr,
                server.status,
                server.check_shown(),
                weight_shown(server),
                format!(
                    "{}/{}/{}",
                    server.sessions_cur, server.sessions_max, server.sessions_total
                ),
                human_bytes(server.bytes_in),
                human_bytes(server.bytes_out),
                server.connect_errors,
                server.checks_failed,
                server.down_transitions,
                human_duration(server.last_change_secs),
                human_duration(server.downtime_secs)
            );
        }
        for server in listener
            .servers
            .iter()
            .filter(|s| s.weight != s.config_weight)
        {
            let _ = writeln!(
                out,
                "  * {}: weight {} set at run time; the configuration says {}",
                server.name, server.weight, server.config_weight
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::prometheus::tests::sample_without_reloads_or_bad_headers;

    #[test]
    fn the_table_names_reloads_and_bad_headers_only_when_there_are_any() {
        let mut snapshot = sample_without_reloads_or_bad_headers();
        let quiet = render_table(&snapshot);
        assert!(
            !quiet.contains("reloads:")
                && !quiet.contains("PROXY header")
                && !quiet.contains("INTEGRITY"),
            "{quiet}"
        );

        snapshot.reloads = 2;
        snapshot.reload_failures = 1;
        snapshot.listeners[0].bad_proxy_headers = 7;
        snapshot.integrity_errors = 3;
        let table = render_table(&snapshot);
        assert!(
            table.contains("INTEGRITY ERRORS: 3 connections failed the byte conservation"),
            "{table}"
        );
        assert!(
            table.contains("reloads: 2 applied, 1 refused (the log says why"),
            "{table}"
        );
        assert!(
            table.contains("  closed without a usable PROXY header: 7\n"),
            "{table}"
        );
        assert!(
            table.contains("listener smtp (0.0.0.0:25 [::]:25, roundrobin)"),
            "{table}"
        );
    }

    #[test]
    fn stats_takes_the_bind_address_or_a_url() {
        for (given, url) in [
            ("127.0.0.1:8601", "http://127.0.0.1:8601"),
            ("http://127.0.0.1:8601", "http://127.0.0.1:8601"),
            ("http://127.0.0.1:8601/", "http://127.0.0.1:8601"),
            ("HTTP://127.0.0.1:8601", "http://127.0.0.1:8601"),
            ("[::1]:8404", "http://[::1]:8404"),
            ("http://[::1]:8404", "http://[::1]:8404"),
            ("localhost:8404", "http://localhost:8404"),
        ] {
            assert_eq!(stats_url(given).as_deref(), Ok(url), "{given}");
        }
        for bad in [
            "127.0.0.1",
            "https://127.0.0.1:8404",
            "127.0.0.1:http",
            "127.0.0.1:99999",
            ":8404",
            "http://127.0.0.1:8404/api",
            "[::1:8404",
        ] {
            let error = stats_url(bad).unwrap_err();
            assert!(
                error.contains("8404") || error.contains("http"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn targets_are_listen_slash_server() {
        let target: Target = "smtp/mail1".parse().unwrap();
        assert_eq!(
            (target.listener.as_str(), target.server.as_str()),
            ("smtp", "mail1")
        );
        assert_eq!(target.to_string(), "smtp/mail1");
        let error = "mail1".parse::<Target>().unwrap_err();
        assert!(error.contains("is not LISTEN/SERVER"), "{error}");
        assert!(error.contains("e.g. smtp/mail1"), "{error}");
        for bad in ["", "/mail1", "smtp/", "a/b/c"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_table_shows_human_units_health_history_and_runtime_weights() {
        let mut snapshot = sample_without_reloads_or_bad_headers();
        snapshot.listeners[0].servers[0].weight = 3;
        let table = render_table(&snapshot);
        assert!(table.contains("in 1.2 MiB out 8.0 KiB"), "{table}");
        let row = table
            .lines()
            .find(|line| line.trim_start().starts_with("mx1 "))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "mx1",
                "192.0.2.10:25",
                "UP",
                "L7OK/250",
                "in",
                "1ms",
                "3*",
                "2/7/123",
                "1.2",
                "MiB",
                "4.0",
                "KiB",
                "3",
                "9",
                "2",
                "2m13s",
                "12s"
            ],
            "{table}"
        );
        assert!(
            table.contains("  * mx1: weight 3 set at run time; the configuration says 10\n"),
            "{table}"
        );
        let maint = table
            .lines()
            .find(|line| line.trim_start().starts_with("mx3 "))
            .unwrap();
        assert!(maint.contains(" MAINT  MAINT (checks off) "), "{maint}");
        let pending = table
            .lines()
            .find(|line| line.trim_start().starts_with("mx4 "))
            .unwrap();
        assert!(pending.contains(" DOWN   pending "), "{pending}");
    }

    /// The `mxlb status` sample in docs/operations.md is this renderer's output for the
    /// numbers it shows (taken from `mxlb demo`): the page cannot drift from the binary.
    #[test]
    fn the_documented_sample_is_what_the_table_prints() {
        let docs = include_str!("../../docs/operations.md");
        let start = docs
            .find("$ mxlb status --stats 127.0.0.1:8404\n")
            .expect("the sample in operations.md");
        let sample = &docs[start..];
        let sample = &sample[sample.find('\n').unwrap() + 1..sample.find("\n$ ").unwrap() + 1];
        let mut snapshot = sample_without_reloads_or_bad_headers();
        snapshot.uptime_secs = 4.2;
        snapshot.relay = "kernel".to_owned();
        snapshot.conns_cur = 0;
        snapshot.integrity_errors = 0;
        let listener = &mut snapshot.listeners[0];
        listener.bind = vec!["127.0.0.1:2525".to_owned()];
        (
            listener.sessions_cur,
            listener.sessions_max,
            listener.sessions_total,
        ) = (0, 1, 3);
        (
            listener.bytes_in,
            listener.bytes_out,
            listener.refused_no_server,
        ) = (927, 849, 0);
        listener.refused_limits = Default::default();
        let template = listener.servers[0].clone();
        // name, port, status, weight, sessions, bytes in, bytes out, seconds since a change
        let demo = |(name, port, status, weight, total, bytes_in, bytes_out, change)| ServerStats {
            name: String::from(name),
            addr: format!("127.0.0.1:{port}"),
            status: String::from(status),
            check_status: Some("L7OK/250 in 0ms".to_owned()),
            weight,
            config_weight: 1,
            sessions_cur: 0,
            sessions_max: 1,
            sessions_total: total,
            bytes_in,
            bytes_out,
            connect_errors: 0,
            checks_failed: 0,
            down_transitions: 0,
            last_change_secs: change,
            downtime_secs: 0.0,
            ..template.clone()
        };
        listener.servers = vec![
            demo(("demo1", 10025, "UP", 3, 2, 618, 566, 4.1)),
            demo(("demo2", 10026, "DRAIN", 1, 1, 309, 283, 0.3)),
        ];
        snapshot.listeners.truncate(1);
        assert_eq!(render_table(&snapshot), sample);
    }
}
