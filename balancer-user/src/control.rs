//! The command-line side of the stats and admin API: `mxlb status` prints the stats table,
//! `mxlb server set-state` asks the daemon to change a server's admin state.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::stats::{AdminState, ServerStats, StatsSnapshot};

/// The stats URL when none is given: the contract's default `[stats] bind`.
pub const DEFAULT_STATS_URL: &str = "http://127.0.0.1:8404";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Fetches `/api/stats` from the daemon at `base`.
pub fn fetch(base: &str) -> anyhow::Result<StatsSnapshot> {
    let url = format!("{}/api/stats", base.trim_end_matches('/'));
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

/// Asks the daemon at `base` to set `listener/server` to `state`; returns the server's
/// new stats.
pub fn set_state(
    base: &str,
    target: &str,
    state: AdminState,
    token: &str,
) -> anyhow::Result<ServerStats> {
    let Some((listener, server)) = target.split_once('/') else {
        bail!("expected LISTEN/SERVER, got {target:?}");
    };
    let url = format!(
        "{}/api/servers/{listener}/{server}/state",
        base.trim_end_matches('/')
    );
    let mut response = agent()
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(serde_json::json!({ "state": state }))
        .with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if !status.is_success() {
        bail!("{url} answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("reading the answer of {url}"))
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
            listener.bytes_in,
            listener.bytes_out,
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
            "  {:<16} {:<22} {:<6} {:<26} {:>6} {:>14} {:>12} {:>12} {:>6}",
            "server",
            "address",
            "status",
            "last check",
            "weight",
            "sessions",
            "bytes in",
            "bytes out",
            "errors"
        );
        for server in &listener.servers {
            let name = if server.backup {
                format!("{} (backup)", server.name)
            } else {
                server.name.clone()
            };
            let check = server.check_status.as_deref().unwrap_or(if server.checked {
                "pending"
            } else {
                "no check"
            });
            let _ = writeln!(
                out,
                "  {:<16} {:<22} {:<6} {:<26} {:>6} {:>14} {:>12} {:>12} {:>6}",
                name,
                server.addr,
                server.status,
                check,
                server.weight,
                format!(
                    "{}/{}/{}",
                    server.sessions_cur, server.sessions_max, server.sessions_total
                ),
                server.bytes_in,
                server.bytes_out,
                server.connect_errors
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
}
