//! One directive of a `defaults`, `listen`, `frontend` or `backend` section: what it sets,
//! or why it is not mapped.

use super::model::{At, Bind, CheckOption, Kind, Reports, Settings};
use super::units::{parse_endpoint, parse_time};

/// Where a directive stands: in `defaults` (`None`) or in a proxy of this kind.
pub(super) type Place = Option<Kind>;

/// Hints for directives mxlb has no equivalent of, where one helps an operator further.
const HINTS: &[(&str, &str)] = &[
    (
        "acl",
        "ACLs have no mxlb equivalent (no content routing in SMTP)",
    ),
    (
        "tcp-request",
        "no rule engine in mxlb; per-source limits are max_conn_per_source and \
         max_rate_per_source",
    ),
    (
        "stick-table",
        "no stick tables in mxlb; per-source limits are max_conn_per_source and \
         max_rate_per_source",
    ),
    (
        "stick",
        "no stickiness in mxlb; balance = \"source\" keeps a client on its server",
    ),
    (
        "server-template",
        "needs DNS (resolvers); mxlb takes servers as IP literals: list them",
    ),
    (
        "log",
        "mxlb logs one line per connection on stderr (journald)",
    ),
    (
        "tcp-check",
        "mxlb's checks are `smtp` or a plain connect (`tcp`); no scripted rules",
    ),
    ("http-check", "HTTP: mxlb balances SMTP over TCP"),
    ("http-request", "HTTP: mxlb balances SMTP over TCP"),
    ("http-response", "HTTP: mxlb balances SMTP over TCP"),
    (
        "stats",
        "mxlb's stats and admin are the [stats] section (HTTP)",
    ),
    (
        "hash-type",
        "mxlb's balance = \"source\" is a weighted rendezvous hash, always",
    ),
];

/// Applies a directive that may stand in `defaults` and in proxies. Returns false when the
/// keyword is not one of them, so that the caller may try its own.
pub(super) fn setting(
    settings: &mut Settings,
    place: Place,
    words: &[String],
    line: usize,
    reports: &mut Reports,
) -> bool {
    let (negated, words) = match words.first().map(String::as_str) {
        Some("no") => (true, &words[1..]),
        _ => (false, words),
    };
    let Some(keyword) = words.first() else {
        return false;
    };
    let args = &words[1..];
    let arg = |index: usize| args.get(index).map_or("", String::as_str);
    match keyword.as_str() {
        "mode" => match arg(0) {
            "tcp" => settings.foreign_mode = None,
            other => {
                settings.foreign_mode = Some(At::new(other.to_owned(), line));
                reports.add(line, format!("mode {other}: mxlb balances TCP only"));
            }
        },
        "balance" => match arg(0) {
            algorithm @ ("roundrobin" | "leastconn" | "source" | "first") => {
                let name = match algorithm {
                    "roundrobin" => "roundrobin",
                    "leastconn" => "leastconn",
                    "source" => "source",
                    _ => "first",
                };
                settings.balance = Some(At::new(name, line));
            }
            other => reports.add(
                line,
                format!(
                    "balance {other}: mxlb has roundrobin, leastconn, source and first; \
                     roundrobin (its default) is used"
                ),
            ),
        },
        "option" => option(settings, negated, args, line, reports),
        "timeout" => timeout(settings, arg(0), arg(1), line, reports),
        "retries" => match arg(0).parse::<u32>() {
            Ok(retries) if retries <= 100 => settings.retries = Some(At::new(retries, line)),
            Ok(retries) => {
                settings.retries = Some(At::new(100, line));
                reports.add(line, format!("retries {retries}: mxlb allows 100 at most"));
            }
            Err(_) => reports.add(line, "not a number of retries"),
        },
        "maxconn" if place == Some(Kind::Backend) => reports.add(
            line,
            "maxconn in a backend: HAProxy refuses it; mxlb's listener maxconn is the \
             frontend's",
        ),
        "maxconn" => match arg(0).parse::<u32>() {
            Ok(maxconn) if maxconn > 0 => settings.maxconn = Some(At::new(maxconn, line)),
            _ => reports.add(line, "maxconn must be a whole number of at least 1"),
        },
        "default-server" => {
            let parsed = settings.default_server.apply(args);
            for lost in parsed.lost {
                reports.add(line, lost);
            }
            if let Some(fatal) = parsed.fatal {
                reports.add(line, fatal);
            }
        }
        _ => return false,
    }
    true
}

fn option(
    settings: &mut Settings,
    negated: bool,
    args: &[String],
    line: usize,
    reports: &mut Reports,
) {
    let name = args.first().map_or("", String::as_str);
    match (name, negated) {
        ("smtpchk", false) => {
            let greeting = match (args.get(1), args.get(2)) {
                (Some(verb), Some(domain)) if verb == "HELO" || verb == "EHLO" => {
                    Some((verb.clone(), domain.clone()))
                }
                (None, _) => None,
                (Some(verb), _) => {
                    reports.add(
                        line,
                        format!(
                            "`{verb}` without HELO|EHLO and a domain: HAProxy sends HELO \
                             localhost, mxlb HELO with the host name"
                        ),
                    );
                    None
                }
            };
            settings.check = Some(At::new(CheckOption::Smtp { greeting }, line));
        }
        ("tcp-check", false) => settings.check = Some(At::new(CheckOption::Tcp, line)),
        ("redispatch", _) => settings.redispatch = Some(At::new(!negated, line)),
        // mxlb always logs one line per finished connection, and backups always share.
        ("tcplog" | "allbackups", false) => {}
        (
            "httpchk" | "ldap-check" | "mysql-check" | "pgsql-check" | "redis-check"
            | "ssl-hello-chk",
            _,
        ) => {
            settings.check = None;
            reports.add(
                line,
                format!("option {name}: mxlb's checks are smtp or tcp"),
            );
        }
        (http, _) if http.starts_with("http") || http == "forwardfor" => reports.add(
            line,
            format!("option {http} is an HTTP option: no effect in mode tcp, none in mxlb"),
        ),
        _ => reports.add(line, format!("option {name} has no mxlb equivalent")),
    }
}

fn timeout(settings: &mut Settings, which: &str, value: &str, line: usize, reports: &mut Reports) {
    let slot = match which {
        "connect" => &mut settings.timeout_connect,
        "client" => &mut settings.timeout_client,
        "server" => &mut settings.timeout_server,
        "check" => &mut settings.timeout_check,
        "queue" => {
            return reports.add(
                line,
                "timeout queue: mxlb has no queue (a full server gets no clients; all full: 421)",
            );
        }
        other => return reports.add(line, format!("timeout {other} has no mxlb equivalent")),
    };
    match parse_time(value) {
        Ok(duration) if duration.is_zero() => reports.add(
            line,
            "0 means no timeout in HAProxy; mxlb needs one, its default is kept",
        ),
        Ok(duration) => *slot = Some(At::new(duration, line)),
        Err(why) => reports.add(line, why),
    }
}

/// The reason a directive with no mxlb equivalent is reported with.
pub(super) fn unmapped_reason(keyword: &str, place: Place) -> String {
    if let Some((_, hint)) = HINTS.iter().find(|(word, _)| *word == keyword) {
        return format!("{keyword}: {hint}");
    }
    let section = place.map_or("defaults", Kind::keyword);
    format!("{keyword} (in {section}) has no mxlb equivalent")
}

/// Bind options that take a value.
const BIND_WITH_VALUE: &[&str] = &[
    "alpn",
    "backlog",
    "ca-file",
    "ciphers",
    "ciphersuites",
    "crl-file",
    "crt",
    "crt-list",
    "curves",
    "ecdhe",
    "gid",
    "group",
    "id",
    "interface",
    "label",
    "level",
    "maxconn",
    "mode",
    "mss",
    "name",
    "namespace",
    "nice",
    "npn",
    "process",
    "proto",
    "severity-output",
    "shards",
    "ssl-max-ver",
    "ssl-min-ver",
    "tcp-ut",
    "thread",
    "uid",
    "user",
    "verify",
];

/// A `bind` line: its addresses (comma-separated) and options. `None` when nothing of it
/// can be listened on; the reasons are reported either way.
pub(super) fn bind(args: &[String], line: usize, reports: &mut Reports) -> Option<Bind> {
    let Some((addresses, options)) = args.split_first() else {
        reports.add(line, "bind without an address");
        return None;
    };
    let mut accept_proxy = false;
    let mut v6only = false;
    let mut options = options.iter().map(String::as_str);
    while let Some(option) = options.next() {
        match option {
            "accept-proxy" => accept_proxy = true,
            "v6only" => v6only = true,
            "v4v6" => v6only = false,
            "ssl" | "quic" => {
                reports.add(
                    line,
                    format!("`{option}`: mxlb relays plain TCP and cannot terminate TLS"),
                );
                return None;
            }
            // Names for HAProxy's stats: nothing to lose.
            "name" | "id" => {
                options.next();
            }
            _ if BIND_WITH_VALUE.contains(&option) => {
                let value = options.next().unwrap_or_default();
                reports.add(
                    line,
                    format!("bind option `{option} {value}` has no mxlb equivalent"),
                );
            }
            _ => reports.add(
                line,
                format!("bind option `{option}` has no mxlb equivalent"),
            ),
        }
    }
    let mut addrs = Vec::new();
    for address in addresses.split(',') {
        match parse_endpoint(address).and_then(|endpoint| endpoint.listen_addrs(v6only)) {
            Ok(found) => addrs.extend(found),
            Err(why) => reports.add(line, format!("{address}: {why}")),
        }
    }
    (!addrs.is_empty()).then_some(Bind {
        addrs,
        accept_proxy,
        line,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    /// Applies `lines` to fresh settings; the reasons reported, by line (1-based).
    fn apply(lines: &[&str]) -> (Settings, Vec<(usize, String, String)>) {
        let mut settings = Settings::default();
        let mut reports = Reports::default();
        for (index, text) in lines.iter().enumerate() {
            reports.know(index + 1, text);
            let handled = setting(
                &mut settings,
                Some(Kind::Listen),
                &words(text),
                index + 1,
                &mut reports,
            );
            assert!(handled, "{text}");
        }
        (settings, reports.into_lines())
    }

    #[test]
    fn timeouts_and_counts() {
        let (settings, reported) = apply(&[
            "timeout connect 5s",
            "timeout client 10m",
            "timeout server 600000",
            "timeout check 2s",
            "retries 2",
            "maxconn 500",
            "timeout queue 30s",
            "timeout tunnel 1h",
            "timeout connect 0",
        ]);
        assert_eq!(
            settings.timeout_connect.unwrap().value,
            Duration::from_secs(5)
        );
        assert_eq!(
            settings.timeout_client.unwrap().value,
            Duration::from_secs(600)
        );
        assert_eq!(
            settings.timeout_server.unwrap().value,
            Duration::from_secs(600)
        );
        assert_eq!(
            settings.timeout_check.unwrap(),
            At::new(Duration::from_secs(2), 4)
        );
        assert_eq!(settings.retries.unwrap().value, 2);
        assert_eq!(settings.maxconn.unwrap().value, 500);
        let lines: Vec<usize> = reported.iter().map(|(line, _, _)| *line).collect();
        assert_eq!(lines, [7, 8, 9]);
        assert!(reported[0].2.contains("no queue"));
    }

    #[test]
    fn balance_and_options() {
        let (settings, reported) = apply(&[
            "balance leastconn",
            "option smtpchk EHLO lb.example.com",
            "option redispatch",
            "option tcplog",
            "balance static-rr",
            "no option http-server-close",
            "option dontlognull",
        ]);
        assert_eq!(settings.balance.unwrap().value, "leastconn");
        assert_eq!(
            settings.check.unwrap().value,
            CheckOption::Smtp {
                greeting: Some(("EHLO".into(), "lb.example.com".into()))
            }
        );
        assert!(settings.redispatch.unwrap().value);
        let lines: Vec<usize> = reported.iter().map(|(line, _, _)| *line).collect();
        assert_eq!(lines, [5, 6, 7]);
        assert!(reported[1].2.contains("HTTP option"));

        let (settings, reported) = apply(&[
            "option redispatch",
            "no option redispatch",
            "option tcp-check",
        ]);
        assert_eq!(settings.redispatch.unwrap(), At::new(false, 2));
        assert_eq!(settings.check.unwrap().value, CheckOption::Tcp);
        assert!(reported.is_empty());

        let (settings, reported) = apply(&["option smtpchk"]);
        assert_eq!(
            settings.check.unwrap().value,
            CheckOption::Smtp { greeting: None }
        );
        assert!(reported.is_empty());
        let (_, reported) = apply(&["option smtpchk HELLO x"]);
        assert!(reported[0].2.contains("HELO localhost"));
    }

    #[test]
    fn modes() {
        let (settings, reported) = apply(&["mode http", "mode tcp"]);
        assert!(settings.foreign_mode.is_none());
        assert_eq!(reported.len(), 1);
        let (settings, _) = apply(&["mode http"]);
        assert_eq!(
            settings.foreign_mode.unwrap(),
            At::new("http".to_owned(), 1)
        );
    }

    #[test]
    fn default_server_accumulates() {
        let (settings, reported) = apply(&[
            "default-server inter 3s fall 2",
            "default-server rise 4 slowstart 10s",
        ]);
        let options = settings.default_server;
        assert_eq!(options.inter, Some(Duration::from_secs(3)));
        assert_eq!((options.fall, options.rise), (Some(2), Some(4)));
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].0, 2);
    }

    fn bind_line(text: &str) -> (Option<Bind>, Vec<String>) {
        let mut reports = Reports::default();
        let found = bind(&words(text), 1, &mut reports);
        (
            found,
            reports
                .into_lines()
                .into_iter()
                .map(|(_, _, why)| why)
                .collect(),
        )
    }

    fn addrs(bind: &Bind) -> Vec<String> {
        bind.addrs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn binds() {
        let (found, lost) = bind_line(":25,[::]:2525 accept-proxy name smtp");
        let found = found.unwrap();
        assert_eq!(addrs(&found), ["0.0.0.0:25", "0.0.0.0:2525", "[::]:2525"]);
        assert!(found.accept_proxy);
        assert!(lost.is_empty(), "{lost:?}");

        let (found, lost) = bind_line(":::25 v6only");
        assert_eq!(addrs(&found.unwrap()), ["[::]:25"]);
        assert!(lost.is_empty());

        let (found, lost) = bind_line("ipv6@:25 v4v6 backlog 100 transparent");
        assert_eq!(addrs(&found.unwrap()), ["0.0.0.0:25", "[::]:25"]);
        assert_eq!(
            lost,
            [
                "bind option `backlog 100` has no mxlb equivalent; bind option `transparent` has no mxlb equivalent"
            ]
        );
    }

    #[test]
    fn unmappable_binds() {
        let (found, lost) = bind_line(":465 ssl crt /etc/ssl/mail.pem");
        assert!(found.is_none());
        assert!(lost[0].contains("TLS"));
        let (found, lost) = bind_line("unix@/run/smtp.sock");
        assert!(found.is_none());
        assert!(lost[0].contains("not a TCP address"));
        let (found, lost) = bind_line(":25,mx.example.com:25");
        assert_eq!(addrs(&found.unwrap()), ["0.0.0.0:25"]);
        assert!(lost[0].contains("host name"));
    }

    #[test]
    fn hints() {
        assert!(
            unmapped_reason("tcp-request", Some(Kind::Frontend)).contains("max_conn_per_source")
        );
        assert_eq!(
            unmapped_reason("fullconn", Some(Kind::Backend)),
            "fullconn (in backend) has no mxlb equivalent"
        );
    }
}
