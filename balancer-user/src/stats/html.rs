//! `GET /`: the snapshot as one self-contained HTML page, in the spirit of HAProxy's stats
//! page: a table per listener, a row per server, the status as a coloured cell.
//!
//! The page has inline CSS only and no JavaScript, so it works offline, behind strict
//! proxies and in text browsers; it refreshes itself with a `<meta http-equiv="refresh">`.
//! Every string from the snapshot is escaped, even though names come from the config.
//!
//! Stable hooks for tests and scrapers: each server row is
//! `<tr id="srv-{listener}-{server}" data-status="UP">` and each status cell carries
//! `class="status status-up"` (`-down`, `-drain`, `-maint`).

use super::model::{CHECKS_OFF, ListenerStats, ServerStats, StatsSnapshot};
use super::units::{finite_or_zero, human_bytes, human_duration};

/// Seconds between the page's self-refreshes.
const REFRESH_SECS: u32 = 5;

/// Renders the whole page.
pub fn render(snapshot: &StatsSnapshot) -> String {
    let listeners: String = snapshot.listeners.iter().map(listener_table).collect();
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mxlb {version} stats</title>
<style>{STYLE}</style>
</head>
<body>
{header}
<main>
{listeners}</main>
<footer>Refreshes every {REFRESH_SECS}&nbsp;s. Also as <a href="api/stats">JSON</a> and <a href="metrics">Prometheus metrics</a>.</footer>
</body>
</html>
"#,
        version = escape(&snapshot.version),
        header = page_header(snapshot),
    )
}

/// The process facts and an at-a-glance count of healthy servers.
fn page_header(snapshot: &StatsSnapshot) -> String {
    let servers = snapshot.listeners.iter().flat_map(|l| &l.servers);
    let total = servers.clone().count();
    let up = servers.filter(|s| s.status == "UP").count();
    format!(
        r#"<header>
<h1>mxlb <span class="version">{version}</span></h1>
<dl class="facts">
<div><dt>relay</dt><dd>{relay}</dd></div>
<div><dt>uptime</dt><dd title="{uptime_exact:.0} s">{uptime}</dd></div>
<div><dt>servers up</dt><dd>{up}/{total}</dd></div>
<div><dt>connections</dt><dd title="global maxconn {maxconn}">{conns}/{maxconn}</dd></div>
<div><dt>reloads</dt><dd title="configuration reloads (SIGHUP): applied, and refused (the file on disk is then not what runs; the log says why)"{reload_class}>{reloads} ok, {reload_failures} failed</dd></div>
<div><dt>integrity errors</dt><dd title="connections whose byte conservation check failed; must be 0"{integrity_class}>{integrity_errors}</dd></div>
</dl>
</header>"#,
        version = escape(&snapshot.version),
        relay = escape(&snapshot.relay),
        uptime_exact = finite_or_zero(snapshot.uptime_secs),
        uptime = human_duration(snapshot.uptime_secs),
        conns = snapshot.conns_cur,
        maxconn = snapshot.maxconn,
        reloads = snapshot.reloads,
        reload_failures = snapshot.reload_failures,
        // A refused reload means the file on disk is not what runs: worth a colour.
        reload_class = warn_if(snapshot.reload_failures > 0),
        integrity_errors = snapshot.integrity_errors,
        integrity_class = warn_if(snapshot.integrity_errors > 0),
    )
}

/// One listener: caption, column headers, a row per server, the totals.
fn listener_table(listener: &ListenerStats) -> String {
    let rows: String = listener
        .servers
        .iter()
        .map(|s| server_row(listener, s))
        .collect();
    format!(
        r#"<section class="listener" id="lst-{id}">
<table>
<caption><span class="name">{name}</span> <span class="bind">{bind}</span> <span class="tag">{balance}</span></caption>
{THEAD}
<tbody>
{rows}</tbody>
<tfoot>
{totals}
</tfoot>
</table>
</section>
"#,
        id = escape(&listener.name),
        name = escape(&listener.name),
        bind = escape(&listener.bind.join(", ")),
        balance = escape(&listener.balance),
        totals = totals_row(listener),
    )
}

/// Column headers, grouped as on HAProxy's page.
const THEAD: &str = r#"<thead>
<tr><th rowspan="2" class="left">Server</th><th rowspan="2" class="left">Address</th><th rowspan="2">Status</th><th rowspan="2" class="left">Last check</th><th rowspan="2">Weight</th><th colspan="4">Sessions</th><th colspan="2">Bytes</th><th rowspan="2" title="Share of the bytes the kernel relay moved">Kernel</th><th rowspan="2" title="Failed connection attempts">Conn. errors</th><th rowspan="2">Last change</th><th rowspan="2">Downtime</th><th rowspan="2" title="Failed health checks">Chk</th><th rowspan="2" title="Times the server went from UP to DOWN">Dwn</th></tr>
<tr><th>cur</th><th>max</th><th title="maxconn">limit</th><th>total</th><th>in</th><th>out</th></tr>
</thead>"#;

fn server_row(listener: &ListenerStats, s: &ServerStats) -> String {
    let status = escape(&s.status);
    let backup = if s.backup {
        r#" <span class="tag">backup</span>"#
    } else {
        ""
    };
    format!(
        r#"<tr id="srv-{lid}-{sid}" data-status="{status}" class="row-{class}">
<td class="left"><b>{name}</b>{backup}</td><td class="left mono">{addr}</td><td class="status status-{class}">{status}</td>{check}{weight}
<td>{cur}</td><td>{max}</td>{limit}<td>{total}</td>{bytes_in}{bytes_out}{kernel}<td{err_class}>{errors}</td>
<td title="{change_exact:.0} s, at {change_at}">{change} ago</td><td title="{down_exact:.0} s">{down}</td>
<td{chk_class}>{checks_failed}</td><td{dwn_class}>{down_transitions}</td>
</tr>
"#,
        lid = escape(&listener.name),
        sid = escape(&s.name),
        class = status_class(&s.status),
        name = escape(&s.name),
        addr = escape(&s.addr),
        check = check_cell(s),
        weight = weight_cell(s),
        cur = s.sessions_cur,
        max = s.sessions_max,
        limit = limit_cell(s.sessions_limit),
        total = s.sessions_total,
        bytes_in = bytes_cell(s.bytes_in),
        bytes_out = bytes_cell(s.bytes_out),
        kernel = kernel_cell(s.kernel_bytes, s.bytes_in.saturating_add(s.bytes_out)),
        err_class = warn_if(s.connect_errors > 0),
        errors = s.connect_errors,
        change_exact = finite_or_zero(s.last_change_secs),
        change = human_duration(s.last_change_secs),
        down_exact = finite_or_zero(s.downtime_secs),
        down = human_duration(s.downtime_secs),
        change_at = escape(&s.last_change_at),
        chk_class = warn_if(s.checks_failed > 0),
        checks_failed = s.checks_failed,
        dwn_class = warn_if(s.down_transitions > 0),
        down_transitions = s.down_transitions,
    )
}

/// The weight in force; one set at run time is marked, the file's in the tooltip.
fn weight_cell(s: &ServerStats) -> String {
    if s.weight == s.config_weight {
        format!("<td>{}</td>", s.weight)
    } else {
        format!(
            r#"<td title="set at run time; the configuration says {}">{}*</td>"#,
            s.config_weight, s.weight
        )
    }
}

/// The attribute that colours a cell as a warning, when `warn`.
fn warn_if(warn: bool) -> &'static str {
    if warn { r#" class="warn""# } else { "" }
}

/// The listener's own counters (not a sum of the rows: sessions refused for want of a
/// server never reach one), plus the servers' kernel share and connect errors.
fn totals_row(listener: &ListenerStats) -> String {
    let kernel: u64 = listener.servers.iter().map(|s| s.kernel_bytes).sum();
    let errors: u64 = listener.servers.iter().map(|s| s.connect_errors).sum();
    let limits = &listener.refused_limits;
    let refused_class = warn_if(listener.refused_no_server > 0 || limits.total() > 0);
    // Only on listeners that saw any: most listeners have no upstream balancer.
    let bad_headers = if listener.bad_proxy_headers > 0 {
        format!(" · bad PROXY headers: {}", listener.bad_proxy_headers)
    } else {
        String::new()
    };
    let by_limit = limits
        .by_reason()
        .iter()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"<tr class="totals"><th colspan="5" class="left">Total</th><td>{cur}</td><td>{max}</td>{limit}<td>{total}</td>{bytes_in}{bytes_out}{kernel}<td>{errors}</td><td colspan="4"{refused_class} title="Clients answered 421: no server could take them (4.3.0), or a limit was reached (4.7.0, 4.3.2: {by_limit}); {accept_errors} failed accepts">refused (no server): {refused} · (limits): {refused_limits}{bad_headers}</td></tr>"#,
        cur = listener.sessions_cur,
        max = listener.sessions_max,
        limit = limit_cell(listener.sessions_limit),
        total = listener.sessions_total,
        bytes_in = bytes_cell(listener.bytes_in),
        bytes_out = bytes_cell(listener.bytes_out),
        kernel = kernel_cell(kernel, listener.bytes_in.saturating_add(listener.bytes_out)),
        refused = listener.refused_no_server,
        refused_limits = limits.total(),
        accept_errors = listener.accept_errors,
    )
}

/// A `maxconn`; a dash for none (0).
fn limit_cell(limit: u64) -> String {
    if limit == 0 {
        r#"<td class="muted" title="no limit">—</td>"#.to_owned()
    } else {
        format!("<td>{limit}</td>")
    }
}

/// The last check as HAProxy words it, its detail (the server's reply or the OS error) in
/// the tooltip.
fn check_cell(s: &ServerStats) -> String {
    match (&s.check_status, &s.check_detail) {
        (Some(status), Some(detail)) if status == CHECKS_OFF => format!(
            r#"<td class="left muted" title="{}">{}</td>"#,
            escape(detail),
            escape(status)
        ),
        (Some(status), Some(detail)) => format!(
            r#"<td class="left mono" title="{}">{}</td>"#,
            escape(detail),
            escape(status)
        ),
        (Some(status), None) => format!(r#"<td class="left mono">{}</td>"#, escape(status)),
        (None, _) if !s.checked => r#"<td class="left muted">no check</td>"#.to_owned(),
        (None, _) => r#"<td class="left muted">pending</td>"#.to_owned(),
    }
}

/// A byte count in human units, the exact number in the tooltip.
fn bytes_cell(bytes: u64) -> String {
    format!(r#"<td title="{bytes} bytes">{}</td>"#, human_bytes(bytes))
}

/// The share of `total` the kernel relay moved; a dash before any byte has flowed.
fn kernel_cell(kernel: u64, total: u64) -> String {
    if total == 0 {
        return r#"<td class="muted">—</td>"#.to_owned();
    }
    let percent = (kernel as f64 / total as f64 * 100.0).clamp(0.0, 100.0);
    format!(r#"<td title="{kernel} bytes moved by the kernel">{percent:.0}%</td>"#)
}

/// The CSS class suffix for a status; anything unexpected gets a neutral look.
fn status_class(status: &str) -> &'static str {
    match status {
        "UP" => "up",
        "DOWN" => "down",
        "DRAIN" => "drain",
        "MAINT" => "maint",
        _ => "unknown",
    }
}

/// Escapes text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root{--fg:#1d232a;--muted:#6b7580;--bg:#f6f7f9;--card:#fff;--line:#e3e6ea;--head:#eef1f4;
--up:#1b7a36;--up-bg:#e3f4e8;--down:#b3261e;--down-bg:#fde7e6;--drain:#9a5b00;--drain-bg:#fff1d6;
--maint:#6d5646;--maint-bg:#eee8e3;--warn:#b3261e}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ed;--muted:#97a1ab;--bg:#14171b;--card:#1c2026;
--line:#2c323a;--head:#232830;--up:#6fd58b;--up-bg:#17351f;--down:#ff8a80;--down-bg:#3d1a18;
--drain:#ffc266;--drain-bg:#3a2c10;--maint:#c9b3a3;--maint-bg:#2e2824;--warn:#ff8a80}}
*{box-sizing:border-box}
body{margin:0;padding:1.25rem 1.5rem;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:1rem 2.5rem;margin-bottom:1.25rem}
h1{margin:0;font-size:1.5rem;letter-spacing:.02em}
.version{color:var(--muted);font-weight:400;font-size:1rem}
.facts{display:flex;flex-wrap:wrap;gap:1.5rem;margin:0}
.facts div{display:flex;flex-direction:column}
.facts dt{color:var(--muted);font-size:.75rem;text-transform:uppercase;letter-spacing:.06em}
.facts dd{margin:0;font-size:1.1rem;font-weight:600;font-variant-numeric:tabular-nums}
.listener{margin-bottom:1.5rem;overflow-x:auto}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);border-radius:6px;font-variant-numeric:tabular-nums}
caption{text-align:left;padding:.4rem 0;font-size:1.05rem}
caption .name{font-weight:700}
caption .bind{color:var(--muted);font-family:ui-monospace,monospace;font-size:.9rem;margin:0 .5rem}
th,td{padding:.35rem .6rem;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
thead th{background:var(--head);font-weight:600;font-size:.8rem;text-align:center}
tbody tr:hover{background:var(--head)}
.left{text-align:left}
.mono{font-family:ui-monospace,monospace;font-size:.85rem}
.muted{color:var(--muted)}
.warn{color:var(--warn);font-weight:600}
.tag{display:inline-block;padding:0 .4rem;border:1px solid var(--line);border-radius:999px;font-size:.75rem;color:var(--muted);vertical-align:middle}
.status{text-align:center;font-weight:700;letter-spacing:.04em}
.status-up{color:var(--up);background:var(--up-bg)}
.status-down{color:var(--down);background:var(--down-bg)}
.status-drain{color:var(--drain);background:var(--drain-bg)}
.status-maint{color:var(--maint);background:var(--maint-bg)}
tr.row-down td:first-child{box-shadow:inset 3px 0 var(--down)}
tr.row-drain td:first-child{box-shadow:inset 3px 0 var(--drain)}
tr.row-maint td:first-child{box-shadow:inset 3px 0 var(--maint)}
tfoot th,tfoot td{background:var(--head);font-weight:600;border-bottom:0}
footer{color:var(--muted);font-size:.8rem}
footer a{color:inherit}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::prometheus::tests::{sample, sample_without_reloads_or_bad_headers};

    #[test]
    fn one_row_per_server_with_its_status() {
        let page = render(&sample());
        for (id, status, class) in [
            ("srv-smtp-mx1", "UP", "up"),
            ("srv-smtp-mx2", "DRAIN", "drain"),
            ("srv-smtp-mx3", "MAINT", "maint"),
            ("srv-smtp-mx4", "DOWN", "down"),
            ("srv-submission-sub1", "UP", "up"),
        ] {
            let row = format!(r#"<tr id="{id}" data-status="{status}""#);
            assert_eq!(page.matches(&row).count(), 1, "{row}");
            let cell = format!(r#"<td class="status status-{class}">{status}</td>"#);
            assert!(page.contains(&cell), "{cell}");
        }
        assert_eq!(page.matches("<tr id=\"srv-").count(), 5);
    }

    #[test]
    fn shows_the_operator_facts() {
        let page = render(&sample());
        for needle in [
            r#"<meta http-equiv="refresh" content="5">"#,
            "mxlb <span class=\"version\">0.1.0</span>",
            "<dd>kernel</dd>",
            "<dd title=\"3725 s\">1h2m</dd>",
            "<dd>2/5</dd>",
            r#"<dd title="global maxconn 20000">2/20000</dd>"#,
            "<td>50</td>",
            "(limits): 19",
            "source_conn 5, source_rate 8, resources 0); 6 failed accepts",
            "0.0.0.0:25, [::]:25",
            "<span class=\"tag\">roundrobin</span>",
            "<span class=\"tag\">backup</span>",
            r#"<td class="left mono" title="250 mail1.example">L7OK/250 in 1ms</td>"#,
            r#"<td title="1258291 bytes">1.2 MiB</td>"#,
            r#"<td title="4096 bytes">4.0 KiB</td>"#,
            "2m13s ago",
            "<td title=\"12 s\">12s</td>",
            "refused (no server): 4",
            "<td class=\"left muted\">pending</td>",
            r#"<td class="left muted" title="the last check, before: L7OK/250 in 1ms">MAINT (checks off)</td>"#,
            r#"<td class="warn">9</td><td class="warn">2</td>"#,
            r#"title="133 s, at 2026-12-02T05:40:00Z""#,
        ] {
            assert!(page.contains(needle), "missing {needle:?}");
        }
    }

    #[test]
    fn reloads_and_bad_proxy_headers_show_and_a_refused_reload_warns() {
        let mut snapshot = sample_without_reloads_or_bad_headers();
        let page = render(&snapshot);
        assert!(page.contains(r#"says why)">0 ok, 0 failed</dd>"#), "{page}");
        assert!(!page.contains("bad PROXY headers"));
        snapshot.reloads = 4;
        snapshot.reload_failures = 1;
        snapshot.listeners[0].bad_proxy_headers = 3;
        let page = render(&snapshot);
        assert!(
            page.contains(r#"says why)" class="warn">4 ok, 1 failed</dd>"#),
            "{page}"
        );
        assert!(page.contains(" · bad PROXY headers: 3</td>"), "{page}");
    }

    #[test]
    fn integrity_errors_show_and_warn_when_not_zero() {
        let mut snapshot = sample_without_reloads_or_bad_headers();
        let page = render(&snapshot);
        assert!(page.contains(r#"must be 0">0</dd>"#), "{page}");
        snapshot.integrity_errors = 2;
        let page = render(&snapshot);
        assert!(page.contains(r#"must be 0" class="warn">2</dd>"#), "{page}");
    }

    #[test]
    fn a_weight_set_at_run_time_is_marked() {
        let mut snapshot = sample();
        snapshot.listeners[0].servers[0].weight = 3;
        let page = render(&snapshot);
        assert!(
            page.contains(r#"<td title="set at run time; the configuration says 10">3*</td>"#),
            "{page}"
        );
        assert_eq!(page.matches("<td>10</td>").count(), 4, "{page}");
    }

    #[test]
    fn escapes_snapshot_strings() {
        let mut snapshot = sample();
        snapshot.listeners[0].servers[0].name = "<script>alert('x')</script>".to_owned();
        snapshot.listeners[0].servers[0].check_detail = Some("\"><script>".to_owned());
        let page = render(&snapshot);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(page.contains("title=\"&quot;&gt;&lt;script&gt;\""));
    }

    #[test]
    fn no_external_assets() {
        let page = render(&sample());
        for needle in ["<script", "<link", "src=", "http://", "https://", "@import"] {
            assert!(!page.contains(needle), "{needle}");
        }
    }

    #[test]
    fn kernel_share() {
        assert_eq!(kernel_cell(5, 0), r#"<td class="muted">—</td>"#);
        assert_eq!(
            kernel_cell(1, 4),
            r#"<td title="1 bytes moved by the kernel">25%</td>"#
        );
    }
}
