//! Whole files: the snippet users come from, the configurations the project's tests and
//! benchmark give HAProxy, and variants with what mxlb cannot carry. Every output must be
//! accepted by mxlb's configuration parser.

use std::time::Duration;

use super::*;
use crate::config::{Balance, CheckType, SendProxy, SmtpVerb};

/// Converts `text`, checks the output parses, and returns it with the reported lines.
fn import(text: &str) -> (Config, Conversion) {
    let conversion = convert(text, "haproxy.cfg");
    let config = Config::parse(&conversion.toml, "converted.toml")
        .unwrap_or_else(|error| panic!("{error}\n{}", conversion.toml));
    (config, conversion)
}

fn reported_lines(conversion: &Conversion) -> Vec<usize> {
    conversion
        .unmapped
        .iter()
        .map(|unmapped| unmapped.line)
        .collect()
}

fn reason(conversion: &Conversion, line: usize) -> &str {
    conversion
        .unmapped
        .iter()
        .find(|unmapped| unmapped.line == line)
        .map_or("", |unmapped| unmapped.reason.as_str())
}

const SEED: &str = "\
mode tcp
no option http-server-close
balance roundrobin
option smtpchk HELO mail.example.com
server mail1 192.0.2.10:25 send-proxy check
server mail2 192.0.2.11:25 send-proxy check
";

#[test]
fn the_seed_snippet() {
    let (config, conversion) = import(SEED);
    assert_eq!(reported_lines(&conversion), [2]);
    assert_eq!(
        conversion.unmapped[0].to_string(),
        "haproxy.cfg:2: no option http-server-close: option http-server-close is an HTTP \
         option: no effect in mode tcp, none in mxlb"
    );
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "smtp");
    assert_eq!(listener.bind, ["0.0.0.0:25".parse().unwrap()]);
    assert_eq!(listener.balance, Balance::RoundRobin);
    assert!(!listener.redispatch, "HAProxy's default kept");
    assert_eq!(listener.check.kind, CheckType::Smtp);
    assert_eq!(listener.check.verb, SmtpVerb::Helo);
    assert_eq!(listener.check.domain, "mail.example.com");
    let servers: Vec<(&str, String, SendProxy, bool)> = listener
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.addr.to_string(), s.send_proxy, s.check))
        .collect();
    assert_eq!(
        servers,
        [
            ("mail1", "192.0.2.10:25".to_owned(), SendProxy::V1, true),
            ("mail2", "192.0.2.11:25".to_owned(), SendProxy::V1, true),
        ]
    );
    // Each key names its line.
    assert!(
        conversion
            .toml
            .contains("balance = \"roundrobin\"  # haproxy.cfg:3: balance roundrobin"),
        "{}",
        conversion.toml
    );
}

/// tests/src/haproxy.rs's configuration (with smtpchk), as the fixtures render it.
const FIXTURE: &str = "\
global
    log stdout format raw local0
    # Without this HAProxy binds with SO_REUSEPORT, and two instances given the same port
    # would silently share its connections instead of the second failing to start.
    noreuseport
    stats socket /tmp/mxlb-haproxy-x/admin.sock mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_in
    bind 127.0.0.1:20025
    default_backend smtp_servers

backend smtp_servers
    balance roundrobin
    option smtpchk EHLO example.test
    server mail1 127.0.0.1:20026 send-proxy check inter 300ms
    server mail2 127.0.0.1:20027 send-proxy-v2 check inter 300ms
";

#[test]
fn the_test_fixtures_configuration() {
    let (config, conversion) = import(FIXTURE);
    assert_eq!(reported_lines(&conversion), [2, 5, 6, 10]);
    assert!(reason(&conversion, 6).contains("[stats] section"));
    assert!(reason(&conversion, 10).contains("stderr"));
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "smtp_in");
    assert_eq!(listener.bind, ["127.0.0.1:20025".parse().unwrap()]);
    assert_eq!(listener.timeout_connect, Duration::from_secs(5));
    assert_eq!(listener.timeout_idle, Duration::from_secs(60));
    assert_eq!(listener.check.kind, CheckType::Smtp);
    assert_eq!(listener.check.verb, SmtpVerb::Ehlo);
    assert_eq!(listener.check.domain, "example.test");
    assert_eq!(listener.check.inter, Duration::from_millis(300));
    assert_eq!(listener.servers[1].send_proxy, SendProxy::V2);
}

/// xtask/src/bench/balancers.rs's configuration: no checks, no PROXY.
const BENCH: &str = "\
global
    noreuseport

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_in
    bind 127.0.0.1:2600
    default_backend smtp_servers

backend smtp_servers
    balance roundrobin
    server s1 127.0.0.1:2601
    server s2 127.0.0.1:2602
";

#[test]
fn the_benchmark_configuration() {
    let (config, conversion) = import(BENCH);
    assert_eq!(reported_lines(&conversion), [2]);
    let listener = &config.listeners[0];
    assert_eq!(listener.check.kind, CheckType::None);
    assert!(
        listener
            .servers
            .iter()
            .all(|s| s.send_proxy == SendProxy::None)
    );
    assert!(!conversion.toml.contains("[listen.check]"));
}

/// The "Coming from HAProxy" example of docs/configuration.md.
#[test]
fn the_documented_example() {
    let (config, conversion) = import(
        "listen smtp
    mode tcp
    bind :25
    balance roundrobin
    option smtpchk EHLO lb.example.com
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    retries 3
    option redispatch
    default-server inter 2s fall 3 rise 2
    server mail1 192.0.2.10:25 send-proxy check
    server mail2 192.0.2.11:25 send-proxy-v2 check weight 2
    server mail3 192.0.2.12:25 backup
",
    );
    assert!(conversion.unmapped.is_empty(), "{:?}", conversion.unmapped);
    let listener = &config.listeners[0];
    assert!(listener.redispatch);
    assert_eq!(listener.retries, 3);
    assert_eq!(listener.timeout_idle, Duration::from_secs(600));
    assert_eq!((listener.check.rise, listener.check.fall), (2, 3));
    assert_eq!(listener.check.inter, Duration::from_secs(2));
    let mail3 = &listener.servers[2];
    assert!(mail3.backup && !mail3.check);
    assert_eq!(listener.servers[1].weight, 2);
}

#[test]
fn ipv6_binds_and_servers() {
    let (config, conversion) = import(
        "listen smtp
    bind :::25
    bind ipv6@:2525 v6only
    bind [2001:db8::1]:26,*:27
    server mail1 [2001:db8::10]:25
    server mail2 ipv6@2001:db8::11:25
",
    );
    assert!(conversion.unmapped.is_empty(), "{:?}", conversion.unmapped);
    let binds: Vec<String> = config.listeners[0]
        .bind
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        binds,
        [
            "0.0.0.0:25",
            "[::]:25",
            "[::]:2525",
            "[2001:db8::1]:26",
            "0.0.0.0:27"
        ]
    );
    let servers: Vec<String> = config.listeners[0]
        .servers
        .iter()
        .map(|s| s.addr.to_string())
        .collect();
    assert_eq!(servers, ["[2001:db8::10]:25", "[2001:db8::11]:25"]);
}

#[test]
fn globals_limits_and_timeouts() {
    let (config, conversion) = import(
        "global
    maxconn 5000
    user haproxy
    group haproxy
    hard-stop-after 1m
    daemon
    chroot /var/lib/haproxy
defaults
    maxconn 800
    timeout client 5m
    timeout server 10m
    timeout check 3s
    retries 200
listen smtp
    bind 127.0.0.1:25 accept-proxy
    balance leastconn
    server a 192.0.2.1:25 maxconn 10 check fastinter 500 downinter 5s
    server b 192.0.2.2:25 check inter 4s
    server c 192.0.2.3:25 disabled
",
    );
    assert_eq!(config.global.maxconn, 5000);
    assert_eq!(config.global.grace, Duration::from_secs(60));
    assert!(config.global.user.is_none());
    assert!(
        conversion.toml.contains("# user = \"haproxy\""),
        "{}",
        conversion.toml
    );
    let listener = &config.listeners[0];
    assert_eq!(listener.maxconn, 800);
    assert!(listener.accept_proxy);
    assert_eq!(listener.balance, Balance::LeastConn);
    assert_eq!(listener.retries, 100);
    assert_eq!(listener.timeout_idle, Duration::from_secs(600));
    assert_eq!(listener.check.kind, CheckType::Tcp);
    assert_eq!(listener.check.timeout, Duration::from_secs(3));
    assert_eq!(listener.check.fastinter, Duration::from_millis(500));
    assert_eq!(listener.servers[0].maxconn, 10);
    assert_eq!(
        (listener.servers[2].weight, listener.servers[2].check),
        (0, false)
    );
    assert_eq!(reported_lines(&conversion), [3, 4, 6, 7, 10, 13, 18, 19]);
    assert!(reason(&conversion, 10).contains("takes the larger (10m, line 11)"));
    assert!(reason(&conversion, 18).contains("differs from server a (line 17)"));
    assert!(reason(&conversion, 19).contains("weight = 0"));
}

/// Variants with what mxlb has no equivalent for: each line reported, with its number.
#[test]
fn unsupported_directives_are_reported() {
    let cases: &[(&str, &str, &[usize])] = &[
        (
            "acl and conditional routing",
            "frontend f\n bind :25\n acl local src 10.0.0.0/8\n use_backend a if local\n \
             default_backend b\nbackend a\n server x 192.0.2.1:25\nbackend b\n server y 192.0.2.2:25\n\
             listen ok\n bind :26\n server z 192.0.2.3:25\n",
            &[1, 2, 3, 4, 5, 6, 7, 8, 9],
        ),
        (
            "http mode",
            "listen web\n mode http\n bind :80\n server w 192.0.2.1:80\nlisten ok\n bind :25\n \
             server z 192.0.2.3:25\n",
            &[1, 2, 3, 4],
        ),
        (
            "http mode from defaults",
            "defaults\n mode http\n option httplog\nlisten web\n bind :80\n server w 192.0.2.1:80\n\
             listen ok\n mode tcp\n bind :25\n server z 192.0.2.3:25\n",
            &[2, 3, 4, 5, 6],
        ),
        (
            "stick table and tcp-request",
            "listen smtp\n bind :25\n stick-table type ip size 100k expire 30s store conn_cur\n \
             tcp-request connection track-sc0 src\n tcp-request connection reject if { sc0_conn_cur gt 10 }\n \
             server a 192.0.2.1:25\n",
            &[3, 4, 5],
        ),
        (
            "server-template and resolvers",
            "resolvers dns\n nameserver ns 192.0.2.53:53\nlisten smtp\n bind :25\n \
             server-template mx 3 mx.example.com:25 resolvers dns\n server a 192.0.2.1:25 resolvers dns init-addr none\n",
            &[1, 2, 5, 6],
        ),
        (
            "ssl bind and ssl server",
            "listen smtps\n bind :465 ssl crt /etc/ssl/mail.pem\n bind :25\n server a 192.0.2.1:25\n \
             server b 192.0.2.2:465 ssl verify none\n",
            &[2, 5],
        ),
        (
            "unmapped balance and checks",
            "listen smtp\n bind :25\n balance static-rr\n option httpchk GET /\n \
             server a 192.0.2.1:25 check slowstart 10s\n",
            &[3, 4, 5],
        ),
        (
            "tcp-check rules",
            "listen smtp\n bind :25\n option tcp-check\n tcp-check connect\n tcp-check expect string 220\n \
             server a 192.0.2.1:25 check\n",
            &[4, 5],
        ),
        (
            "host names and unix sockets",
            "listen smtp\n bind unix@/run/smtp.sock\n bind :25\n server a mail.example.com:25\n \
             server b 192.0.2.2\n server c 192.0.2.3:25\n",
            &[2, 4, 5],
        ),
        (
            "unused backend and a frontend without backend",
            "frontend f\n bind :26\nbackend lonely\n server a 192.0.2.1:25\nlisten ok\n bind :25\n \
             server z 192.0.2.3:25\n",
            &[1, 2, 3, 4],
        ),
        (
            "quotes, environment and odd lines",
            "listen smtp\n bind \"${SMTP_ADDR}:25\"\n bind :25 # comment\n description \"the MX\"\n \
             server a 192.0.2.1:25 'weight\n server b 192.0.2.2:25\n",
            &[2, 5],
        ),
        (
            "timeouts without equivalent",
            "listen smtp\n bind :25\n timeout tunnel 1h\n timeout queue 30s\n timeout client-fin 5s\n \
             timeout connect 0\n server a 192.0.2.1:25\n",
            &[3, 4, 5, 6],
        ),
    ];
    for (what, text, expected) in cases {
        let (_, conversion) = import(text);
        assert_eq!(
            reported_lines(&conversion),
            *expected,
            "{what}: {:#?}\n{}",
            conversion.unmapped,
            conversion.toml
        );
        assert!(conversion.listeners > 0, "{what}");
    }
}

#[test]
fn nothing_mappable() {
    for text in [
        "",
        "global\n daemon\n",
        "listen web\n mode http\n bind :80\n server w 192.0.2.1:80\n",
        "frontend f\n bind :25\n default_backend b\nbackend b\n server-template mx 3 mx.example.com:25\n",
    ] {
        let conversion = convert(text, "haproxy.cfg");
        assert_eq!(conversion.listeners, 0, "{text}");
    }
}

#[test]
fn names_are_made_valid_and_values_quoted() {
    let (config, _) = import(
        "listen smtp:in\n bind :25\n option smtpchk EHLO \"mx\\\"1\"\n server mail:1 192.0.2.1:25 check\n \
         server mail_1 192.0.2.2:25 check\n",
    );
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "smtp_in");
    let names: Vec<&str> = listener.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["mail_1", "mail_1-2"]);
    assert_eq!(listener.check.domain, "mx\"1");
}
