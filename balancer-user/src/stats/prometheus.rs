//! `/metrics`: the snapshot as OpenMetrics text, the format prometheus-client writes.
//!
//! A [`Registry`] is built per scrape around a [`Collector`] that owns a copy of the
//! snapshot: the daemon's numbers already live in its own counters, so mirroring them into
//! long-lived prometheus-client metrics would only add a second source of truth. The
//! collector writes families in a fixed order (listeners and servers as configured), so a
//! scrape reads like the HTML page and diffs cleanly.
//!
//! prometheus-client appends `_total` to counters and the unit to unit-carrying names, so
//! the names below are written without them.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::model::{ListenerStats, ServerStats, StatsSnapshot};
use super::server::PortStats;

/// The `Content-Type` of [`render`]'s output (OpenMetrics 1.0 text, ending in `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every server status, in the order `mxlb_server_status` lists them.
const STATUSES: [&str; 4] = ["UP", "DOWN", "DRAIN", "MAINT"];

/// Renders `snapshot` as a complete OpenMetrics exposition.
pub fn render(snapshot: &StatsSnapshot) -> String {
    encode_collector(SnapshotCollector(snapshot.clone(), None))
}

/// [`render`] with the stats port's own counters (`mxlb_stats_*`).
pub fn render_with_port(snapshot: &StatsSnapshot, port: &PortStats) -> String {
    encode_collector(SnapshotCollector(snapshot.clone(), Some(*port)))
}

fn encode_collector(collector: SnapshotCollector) -> String {
    let mut registry = Registry::with_prefix("mxlb");
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    // Writing to a String cannot fail and every value is range-checked below, so an error
    // here is a bug; Prometheus rejects the truncated text (no `# EOF`), which is visible.
    if let Err(error) = encode(&mut out, &registry) {
        tracing::error!(%error, "encoding /metrics failed");
    }
    out
}

/// The snapshot (and the stats port's counters), handed to prometheus-client at encode
/// time.
#[derive(Debug)]
struct SnapshotCollector(StatsSnapshot, Option<PortStats>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        encode_process(&mut enc, &self.0)?;
        if let Some(port) = &self.1 {
            encode_port(&mut enc, port)?;
        }
        encode_listeners(&mut enc, &self.0.listeners)?;
        encode_servers(&mut enc, &self.0.listeners)
    }
}

/// A label value escaped as the text format requires (`\`, `"` and newline). Names are
/// validated by the config parser, but the exposition must stay parseable regardless.
#[derive(Clone, Debug)]
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A label set: label names with their (escaped) values, written in this order.
type Labels<'a, const N: usize> = [(&'static str, Escaped<'a>); N];

/// A metric family's name (without prefix, unit or `_total`), help text and unit.
struct Desc<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<&'a Unit>,
}

const fn desc<'a>(name: &'a str, help: &'a str) -> Desc<'a> {
    Desc {
        name,
        help,
        unit: None,
    }
}

/// Writes one family without labels.
fn write_single<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    desc: Desc,
    metric: M,
) -> fmt::Result {
    let metric_encoder = enc.encode_descriptor(desc.name, desc.help, desc.unit, M::TYPE)?;
    metric.encode(metric_encoder)
}

/// Writes one family with a sample per label set, in the order given.
fn write_family<S, M>(
    enc: &mut DescriptorEncoder,
    desc: Desc,
    samples: impl IntoIterator<Item = (S, M)>,
) -> fmt::Result
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let mut metric_encoder = enc.encode_descriptor(desc.name, desc.help, desc.unit, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(metric_encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Gauges are signed in the text encoder; a u64 beyond i64::MAX would make it fail, so
/// saturate (no real count gets there).
fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

fn encode_process(enc: &mut DescriptorEncoder, snapshot: &StatsSnapshot) -> fmt::Result {
    let seconds = Unit::Seconds;
    write_single(
        enc,
        desc("up", "1 while the mxlb process is serving"),
        ConstGauge::new(1i64),
    )?;
    write_single(
        enc,
        Desc {
            unit: Some(&seconds),
            ..desc("uptime", "Seconds since mxlb started")
        },
        ConstGauge::new(snapshot.uptime_secs),
    )?;
    write_single(
        enc,
        desc(
            "connections_current",
            "Client connections open over all listeners",
        ),
        gauge(snapshot.conns_cur),
    )?;
    write_single(
        enc,
        desc(
            "connections_limit",
            "global.maxconn: the most client connections open at once",
        ),
        gauge(snapshot.maxconn),
    )?;
    write_single(
        enc,
        desc(
            "relay_integrity_errors",
            "Connections whose byte conservation check failed (both sides reset); must stay 0",
        ),
        ConstCounter::new(snapshot.integrity_errors),
    )?;
    let reloads = [
        ("ok", snapshot.reloads),
        ("failed", snapshot.reload_failures),
    ];
    write_family(
        enc,
        desc(
            "config_reloads",
            "Configuration reloads (SIGHUP) by result; a failed one left the running configuration in force",
        ),
        reloads
            .into_iter()
            .map(|(result, count)| ([("result", Escaped(result))], ConstCounter::new(count))),
    )
}

/// The stats port itself: how it holds up under load and attack.
fn encode_port(enc: &mut DescriptorEncoder, port: &PortStats) -> fmt::Result {
    write_single(
        enc,
        desc(
            "stats_connections_current",
            "Connections the stats port is serving now",
        ),
        gauge(port.connections_cur),
    )?;
    write_single(
        enc,
        desc(
            "stats_connections_limit",
            "stats.maxconn: the most connections the stats port serves at once",
        ),
        gauge(port.connections_limit),
    )?;
    write_single(
        enc,
        desc(
            "stats_connections",
            "Connections the stats port accepted under its limit",
        ),
        ConstCounter::new(port.connections_total),
    )?;
    write_single(
        enc,
        desc(
            "stats_connections_refused",
            "Connections the stats port refused (503, closed) because stats.maxconn were open",
        ),
        ConstCounter::new(port.refused),
    )?;
    write_single(
        enc,
        desc(
            "stats_connections_timed_out",
            "Stats port connections closed at stats.timeout (slow or idle clients)",
        ),
        ConstCounter::new(port.timed_out),
    )?;
    write_single(
        enc,
        desc(
            "stats_snapshots",
            "Snapshots of the daemon built for the stats endpoints (shared between requests under load)",
        ),
        ConstCounter::new(port.snapshots_built),
    )
}

fn encode_listeners(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    fn labels(l: &ListenerStats) -> Labels<'_, 1> {
        [("listener", Escaped(&l.name))]
    }
    write_family(
        enc,
        desc(
            "listener_sessions_current",
            "Client sessions open on the listener",
        ),
        listeners.iter().map(|l| (labels(l), gauge(l.sessions_cur))),
    )?;
    write_family(
        enc,
        desc(
            "listener_sessions",
            "Client sessions accepted by the listener",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), ConstCounter::new(l.sessions_total))),
    )?;
    write_family(
        enc,
        desc(
            "listener_sessions_limit",
            "The listener's maxconn: the most client sessions at once",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), gauge(l.sessions_limit))),
    )?;
    write_family(
        enc,
        desc(
            "listener_refused_no_server",
            "Clients answered 421 because no server could take them",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), ConstCounter::new(l.refused_no_server))),
    )?;
    let refused = listeners.iter().flat_map(|l| {
        l.refused_limits.by_reason().map(|(reason, count)| {
            let labels = [("listener", Escaped(&l.name)), ("reason", Escaped(reason))];
            (labels, ConstCounter::new(count))
        })
    });
    write_family(
        enc,
        desc(
            "listener_refused",
            "Clients answered 421 because a connection limit was reached, by limit",
        ),
        refused,
    )?;
    write_family(
        enc,
        desc(
            "listener_accept_errors",
            "Failed accepts (out of descriptors or memory, mostly)",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), ConstCounter::new(l.accept_errors))),
    )?;
    write_family(
        enc,
        desc(
            "listener_bad_proxy_headers",
            "Connections closed for a missing or bad PROXY header (accept_proxy)",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), ConstCounter::new(l.bad_proxy_headers))),
    )?;
    write_family(
        enc,
        desc(
            "listener_sources_tracked",
            "Client sources (addresses or blocks) the per-source limits track",
        ),
        listeners
            .iter()
            .map(|l| (labels(l), gauge(l.sources_tracked))),
    )
}

/// Every (listener, server) pair, in configuration order.
fn servers(listeners: &[ListenerStats]) -> impl Iterator<Item = (&ListenerStats, &ServerStats)> {
    listeners
        .iter()
        .flat_map(|l| l.servers.iter().map(move |s| (l, s)))
}

fn server_labels<'a>(l: &'a ListenerStats, s: &'a ServerStats) -> Labels<'a, 2> {
    [("listener", Escaped(&l.name)), ("server", Escaped(&s.name))]
}

/// Listener and server, then `extra` (a label name and value): for the families that split
/// a server's numbers further.
fn server_labels_with<'a>(
    l: &'a ListenerStats,
    s: &'a ServerStats,
    extra: (&'static str, &'static str),
) -> Labels<'a, 3> {
    let [listener, server] = server_labels(l, s);
    [listener, server, (extra.0, Escaped(extra.1))]
}

/// Writes one per-server family whose only labels are listener and server.
fn write_per_server<'a, M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    desc: Desc,
    listeners: &'a [ListenerStats],
    value: impl Fn(&'a ServerStats) -> M,
) -> fmt::Result {
    write_family(
        enc,
        desc,
        servers(listeners).map(|(l, s)| (server_labels(l, s), value(s))),
    )
}

fn encode_servers(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    write_per_server(
        enc,
        desc("server_up", "1 if the server's status is UP, else 0"),
        listeners,
        |s| ConstGauge::new(i64::from(s.status == "UP")),
    )?;
    encode_server_status(enc, listeners)?;
    write_per_server(
        enc,
        desc(
            "server_weight",
            "The weight selection uses: the file's, or one set at run time",
        ),
        listeners,
        |s| ConstGauge::new(i64::from(s.weight)),
    )?;
    encode_server_sessions(enc, listeners)?;
    encode_server_bytes(enc, listeners)?;
    write_per_server(
        enc,
        desc(
            "server_connect_errors",
            "Failed connection attempts to the server",
        ),
        listeners,
        |s| ConstCounter::new(s.connect_errors),
    )?;
    encode_server_health(enc, listeners)
}

/// The health history, HAProxy's Chk, Dwn, LastChg and Downtime.
fn encode_server_health(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    write_per_server(
        enc,
        desc(
            "server_checks_failed",
            "Health checks of the server that failed",
        ),
        listeners,
        |s| ConstCounter::new(s.checks_failed),
    )?;
    write_per_server(
        enc,
        desc(
            "server_down_transitions",
            "Times the server went from UP to DOWN",
        ),
        listeners,
        |s| ConstCounter::new(s.down_transitions),
    )?;
    let seconds = Unit::Seconds;
    write_per_server(
        enc,
        Desc {
            unit: Some(&seconds),
            ..desc(
                "server_last_change",
                "Seconds since the server's status last changed",
            )
        },
        listeners,
        |s| ConstGauge::new(s.last_change_secs),
    )?;
    write_per_server(
        enc,
        Desc {
            unit: Some(&seconds),
            ..desc("server_downtime", "Seconds the server has spent DOWN")
        },
        listeners,
        |s| ConstCounter::new(s.downtime_secs),
    )
}

/// One sample per possible status, 1 for the current one: lets a dashboard count servers
/// by state with `sum by (state)` (the HAProxy exporter's layout).
fn encode_server_status(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    let samples = servers(listeners).flat_map(|(l, s)| {
        STATUSES.iter().map(move |&state| {
            let labels = server_labels_with(l, s, ("state", state));
            (labels, ConstGauge::new(i64::from(s.status == state)))
        })
    });
    write_family(
        enc,
        desc(
            "server_status",
            "The server's current status (UP, DOWN, DRAIN or MAINT) as 1, the others as 0",
        ),
        samples,
    )
}

fn encode_server_sessions(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    write_per_server(
        enc,
        desc(
            "server_sessions_current",
            "Client sessions currently relayed to the server",
        ),
        listeners,
        |s| gauge(s.sessions_cur),
    )?;
    write_per_server(
        enc,
        desc(
            "server_sessions_max",
            "Most concurrent sessions the server has had",
        ),
        listeners,
        |s| gauge(s.sessions_max),
    )?;
    write_per_server(
        enc,
        desc(
            "server_sessions_limit",
            "The server's maxconn; 0 means no limit",
        ),
        listeners,
        |s| gauge(s.sessions_limit),
    )?;
    write_per_server(
        enc,
        desc("server_sessions", "Client sessions sent to the server"),
        listeners,
        |s| ConstCounter::new(s.sessions_total),
    )
}

fn encode_server_bytes(enc: &mut DescriptorEncoder, listeners: &[ListenerStats]) -> fmt::Result {
    let samples = servers(listeners).flat_map(|(l, s)| {
        [("in", s.bytes_in), ("out", s.bytes_out)].map(|(direction, value)| {
            let labels = server_labels_with(l, s, ("direction", direction));
            (labels, ConstCounter::new(value))
        })
    });
    write_family(
        enc,
        desc(
            "server_bytes",
            "Bytes relayed: in is client to server, out is server to client",
        ),
        samples,
    )?;
    write_per_server(
        enc,
        desc(
            "server_kernel_bytes",
            "The part of the relayed bytes (both directions) the kernel relay moved",
        ),
        listeners,
        |s| ConstCounter::new(s.kernel_bytes),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::RefusedLimits;

    /// [`sample`] of a daemon never reloaded and never sent a bad PROXY header.
    pub(crate) fn sample_without_reloads_or_bad_headers() -> StatsSnapshot {
        let mut snapshot = sample();
        snapshot.reloads = 0;
        snapshot.reload_failures = 0;
        snapshot.listeners[0].bad_proxy_headers = 0;
        snapshot
    }

    /// A small snapshot shared by the stats tests: two listeners, one of them with a
    /// server in each state.
    pub(crate) fn sample() -> StatsSnapshot {
        let server = |name: &str, status: &str| ServerStats {
            name: name.to_owned(),
            addr: "192.0.2.10:25".to_owned(),
            status: status.to_owned(),
            admin_state: "ready".to_owned(),
            checked: true,
            check_status: Some("L7OK/250 in 1ms".to_owned()),
            check_detail: Some("250 mail1.example".to_owned()),
            weight: 10,
            config_weight: 10,
            backup: false,
            sessions_cur: 2,
            sessions_max: 7,
            sessions_limit: 50,
            sessions_total: 123,
            bytes_in: 1_258_291,
            bytes_out: 4_096,
            kernel_bytes: 1_200_000,
            connect_errors: 3,
            last_change_secs: 133.4,
            last_change_at: "2026-12-02T05:40:00Z".to_owned(),
            downtime_secs: 12.5,
            checks_failed: 9,
            down_transitions: 2,
        };
        let mut drain = server("mx2", "DRAIN");
        drain.admin_state = "drain".to_owned();
        drain.backup = true;
        let mut maint = server("mx3", "MAINT");
        maint.admin_state = "maint".to_owned();
        maint.check_status = Some(crate::stats::model::CHECKS_OFF.to_owned());
        maint.check_detail = Some("the last check, before: L7OK/250 in 1ms".to_owned());
        let mut pending = server("mx4", "DOWN");
        pending.check_status = None;
        pending.check_detail = None;
        StatsSnapshot {
            version: "0.1.0".to_owned(),
            uptime_secs: 3725.25,
            relay: "kernel".to_owned(),
            conns_cur: 2,
            maxconn: 20000,
            reloads: 3,
            reload_failures: 1,
            integrity_errors: 0,
            listeners: vec![
                ListenerStats {
                    name: "smtp".to_owned(),
                    bind: vec!["0.0.0.0:25".to_owned(), "[::]:25".to_owned()],
                    balance: "roundrobin".to_owned(),
                    sessions_cur: 2,
                    sessions_max: 9,
                    sessions_limit: 20000,
                    sessions_total: 250,
                    bytes_in: 1_262_387,
                    bytes_out: 8_192,
                    refused_no_server: 4,
                    refused_limits: RefusedLimits {
                        global: 1,
                        listener: 2,
                        server: 3,
                        source_conn: 5,
                        source_rate: 8,
                        resources: 0,
                    },
                    accept_errors: 6,
                    bad_proxy_headers: 5,
                    sources_tracked: 42,
                    servers: vec![server("mx1", "UP"), drain, maint, pending],
                },
                ListenerStats {
                    name: "submission".to_owned(),
                    bind: vec!["0.0.0.0:587".to_owned()],
                    balance: "leastconn".to_owned(),
                    sessions_cur: 0,
                    sessions_max: 0,
                    sessions_limit: 100,
                    sessions_total: 0,
                    bytes_in: 0,
                    bytes_out: 0,
                    refused_no_server: 0,
                    refused_limits: RefusedLimits::default(),
                    accept_errors: 0,
                    bad_proxy_headers: 0,
                    sources_tracked: 0,
                    servers: vec![server("sub1", "UP")],
                },
            ],
        }
    }

    /// Every family [`render`] writes, with its OpenMetrics type.
    const FAMILIES: [(&str, &str); 25] = [
        ("mxlb_up", "gauge"),
        ("mxlb_uptime_seconds", "gauge"),
        ("mxlb_connections_current", "gauge"),
        ("mxlb_connections_limit", "gauge"),
        ("mxlb_listener_sessions_current", "gauge"),
        ("mxlb_listener_sessions", "counter"),
        ("mxlb_listener_sessions_limit", "gauge"),
        ("mxlb_listener_refused_no_server", "counter"),
        ("mxlb_listener_refused", "counter"),
        ("mxlb_listener_accept_errors", "counter"),
        ("mxlb_listener_sources_tracked", "gauge"),
        ("mxlb_server_up", "gauge"),
        ("mxlb_server_status", "gauge"),
        ("mxlb_server_weight", "gauge"),
        ("mxlb_server_sessions_current", "gauge"),
        ("mxlb_server_sessions_max", "gauge"),
        ("mxlb_server_sessions_limit", "gauge"),
        ("mxlb_server_sessions", "counter"),
        ("mxlb_server_bytes", "counter"),
        ("mxlb_server_kernel_bytes", "counter"),
        ("mxlb_server_connect_errors", "counter"),
        ("mxlb_server_checks_failed", "counter"),
        ("mxlb_server_down_transitions", "counter"),
        ("mxlb_server_last_change_seconds", "gauge"),
        ("mxlb_server_downtime_seconds", "counter"),
    ];

    #[test]
    fn every_family_has_help_and_type() {
        let text = render(&sample());
        for (name, kind) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "HELP {name}");
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "TYPE {name}"
            );
        }
        assert!(!text.contains("_total_total"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn sample_lines_are_exact() {
        let text = render(&sample());
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "mxlb_up 1",
            "mxlb_uptime_seconds 3725.25",
            "# UNIT mxlb_uptime_seconds seconds",
            "mxlb_listener_sessions_current{listener=\"smtp\"} 2",
            "mxlb_listener_sessions_total{listener=\"smtp\"} 250",
            "mxlb_listener_sessions_total{listener=\"submission\"} 0",
            "mxlb_listener_refused_no_server_total{listener=\"smtp\"} 4",
            "mxlb_connections_current 2",
            "mxlb_connections_limit 20000",
            "mxlb_relay_integrity_errors_total 0",
            "mxlb_config_reloads_total{result=\"ok\"} 3",
            "mxlb_config_reloads_total{result=\"failed\"} 1",
            "mxlb_listener_sessions_limit{listener=\"smtp\"} 20000",
            "mxlb_listener_refused_total{listener=\"smtp\",reason=\"global\"} 1",
            "mxlb_listener_refused_total{listener=\"smtp\",reason=\"source_rate\"} 8",
            "mxlb_listener_refused_total{listener=\"submission\",reason=\"source_conn\"} 0",
            "mxlb_listener_accept_errors_total{listener=\"smtp\"} 6",
            "mxlb_listener_bad_proxy_headers_total{listener=\"smtp\"} 5",
            "mxlb_listener_sources_tracked{listener=\"smtp\"} 42",
            "mxlb_server_sessions_limit{listener=\"smtp\",server=\"mx1\"} 50",
            "mxlb_server_up{listener=\"smtp\",server=\"mx1\"} 1",
            "mxlb_server_up{listener=\"smtp\",server=\"mx2\"} 0",
            "mxlb_server_status{listener=\"smtp\",server=\"mx2\",state=\"DRAIN\"} 1",
            "mxlb_server_status{listener=\"smtp\",server=\"mx2\",state=\"UP\"} 0",
            "mxlb_server_status{listener=\"smtp\",server=\"mx4\",state=\"DOWN\"} 1",
            "mxlb_server_weight{listener=\"smtp\",server=\"mx1\"} 10",
            "mxlb_server_sessions_current{listener=\"smtp\",server=\"mx1\"} 2",
            "mxlb_server_sessions_max{listener=\"smtp\",server=\"mx1\"} 7",
            "mxlb_server_sessions_total{listener=\"smtp\",server=\"mx1\"} 123",
            "mxlb_server_bytes_total{listener=\"smtp\",server=\"mx1\",direction=\"in\"} 1258291",
            "mxlb_server_bytes_total{listener=\"smtp\",server=\"mx1\",direction=\"out\"} 4096",
            "mxlb_server_kernel_bytes_total{listener=\"smtp\",server=\"mx1\"} 1200000",
            "mxlb_server_connect_errors_total{listener=\"smtp\",server=\"mx1\"} 3",
            "mxlb_server_downtime_seconds_total{listener=\"smtp\",server=\"mx1\"} 12.5",
            "mxlb_server_checks_failed_total{listener=\"smtp\",server=\"mx1\"} 9",
            "mxlb_server_down_transitions_total{listener=\"smtp\",server=\"mx1\"} 2",
            "mxlb_server_last_change_seconds{listener=\"smtp\",server=\"mx1\"} 133.4",
            "mxlb_server_up{listener=\"submission\",server=\"sub1\"} 1",
        ] {
            assert!(
                lines.contains(&expected),
                "missing line {expected:?} in\n{text}"
            );
        }
    }

    #[test]
    fn one_status_sample_per_state_per_server() {
        let text = render(&sample());
        let count = text
            .lines()
            .filter(|l| l.starts_with("mxlb_server_status{"))
            .count();
        assert_eq!(count, 5 * STATUSES.len());
    }

    #[test]
    fn label_values_are_escaped() {
        let mut snapshot = sample();
        snapshot.listeners[0].servers[0].name = "a\"b\\c\nd".to_owned();
        let text = render(&snapshot);
        assert!(
            text.contains("mxlb_server_up{listener=\"smtp\",server=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn no_listeners_still_valid() {
        let mut snapshot = sample();
        snapshot.listeners.clear();
        let text = render(&snapshot);
        assert!(text.contains("mxlb_up 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }
}
