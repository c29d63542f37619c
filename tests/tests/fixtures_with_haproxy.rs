//! The reference behaviour mxlb must match, shown with HAProxy instead of mxlb: round robin
//! over two Postfix backends that require the PROXY protocol (one v1, one v2), with every
//! backend seeing the true client address and logging no PROXY trouble.
//!
//! It also proves the fixtures (Postfix, swaks, HAProxy) work end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mxlb_tests::haproxy::{Haproxy, HaproxyConfig, SendProxy};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, wait_until};

/// Clients 127.0.0.11 ..= 127.0.0.16, one message each.
const CLIENT_OCTETS: std::ops::RangeInclusive<u8> = 11..=16;
/// HAProxy's own address: what Postfix logs for health check sessions.
const BALANCER_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn haproxy_round_robin_with_proxy_v1_and_v2() -> Result<()> {
    round_robin_through_haproxy(false)
}

#[test]
fn haproxy_round_robin_with_proxy_v1_and_v2_and_smtpchk() -> Result<()> {
    round_robin_through_haproxy(true)
}

fn round_robin_through_haproxy(smtpchk: bool) -> Result<()> {
    let started = Instant::now();
    let postfix = PostfixInstance::start(&[
        SmtpdService::with_proxy("mail1", free_addr()),
        SmtpdService::with_proxy("mail2", free_addr()),
    ])?;
    eprintln!("Postfix started in {:?}", postfix.startup_time());

    let mut config = HaproxyConfig::new(free_addr())
        .server("mail1", postfix.services()[0].addr, SendProxy::V1)
        .server("mail2", postfix.services()[1].addr, SendProxy::V2);
    if smtpchk {
        config = config.smtpchk("EHLO example.test");
        config.check_interval = Duration::from_millis(300);
    }
    let haproxy = Haproxy::start(config)?;
    if smtpchk {
        haproxy.wait_servers_up(Duration::from_secs(10))?;
        // Servers start out UP; wait until a check has really reached each backend.
        wait_until(
            "a finished health check on each backend",
            Duration::from_secs(10),
            Duration::from_millis(25),
            || {
                let checked: BTreeSet<String> = postfix
                    .disconnects()
                    .into_iter()
                    .filter(|(_, ip)| *ip == BALANCER_IP)
                    .map(|(service, _)| service)
                    .collect();
                Ok((checked.len() == 2).then_some(()))
            },
        )
        .with_context(|| postfix.maillog())?;
    }

    // Message i comes from 127.0.0.(11 + i) and says so in its subject.
    let mut sent = Vec::new();
    for (i, octet) in CLIENT_OCTETS.enumerate() {
        let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet));
        let subject = format!("fixture test {i} from {client}");
        let body = format!("Message {i} from {client}.\n.leading dot, CRLF next\r\nend\n");
        let outcome = Swaks::send(
            haproxy.addr(),
            client,
            "user@example.test",
            &subject,
            Some(body.as_bytes()),
        )?;
        outcome.ensure_success()?;
        sent.push((subject, client, outcome));
    }

    let delivered = postfix.wait_for_messages(sent.len(), Duration::from_secs(20))?;
    ensure!(
        delivered.len() == sent.len(),
        "expected {} messages, got {}",
        sent.len(),
        delivered.len()
    );

    // Every message arrived intact, from its true client, at the backend whose banner the
    // client saw.
    let mut backends = Vec::new();
    for (subject, client, outcome) in &sent {
        let message = delivered
            .iter()
            .find(|m| m.subject().as_deref() == Some(subject.as_str()))
            .with_context(|| format!("no delivered message with subject {subject:?}"))?;
        ensure!(
            message.body_intact() && message.body_sha256() == outcome.body_sha256,
            "body of {subject:?} changed in transit:\n{}",
            String::from_utf8_lossy(&message.raw)
        );
        ensure!(
            message.header("Message-Id").as_deref() == Some(outcome.message_id.as_str()),
            "Message-Id of {subject:?} changed"
        );
        let backend = message.backend().context("no backend in Received header")?;
        ensure!(
            message.client_ip() == Some(*client),
            "{subject:?}: Postfix recorded client {:?}, expected {client}",
            message.client_ip()
        );
        let banner = outcome.banner.as_deref().unwrap_or_default();
        ensure!(
            banner.starts_with(&format!("220 {backend}.test ")),
            "{subject:?} delivered by {backend} but the client saw banner {banner:?}"
        );
        backends.push(backend);
    }

    // Strict alternation: roundrobin with equal weights, one connection at a time.
    ensure!(
        backends.windows(2).all(|pair| pair[0] != pair[1]),
        "backends do not alternate: {backends:?}"
    );
    let mut per_backend = BTreeMap::new();
    for backend in &backends {
        *per_backend.entry(backend.as_str()).or_insert(0) += 1;
    }
    ensure!(
        per_backend == BTreeMap::from([("mail1", 3), ("mail2", 3)]),
        "uneven distribution: {per_backend:?}"
    );

    // The log shows each client session, finished, with the true client address on the
    // backend that delivered it. Health checks (with the balancer's address) come on top.
    let expected: BTreeSet<(String, IpAddr)> = backends
        .iter()
        .zip(&sent)
        .map(|(backend, (_, client, _))| (backend.clone(), *client))
        .collect();
    let client_sessions = |sessions: Vec<(String, IpAddr)>| -> Vec<(String, IpAddr)> {
        sessions
            .into_iter()
            .filter(|(_, ip)| *ip != BALANCER_IP)
            .collect()
    };
    wait_until(
        "all client sessions logged as finished",
        Duration::from_secs(10),
        Duration::from_millis(25),
        || Ok((client_sessions(postfix.disconnects()).len() >= sent.len()).then_some(())),
    )
    .with_context(|| postfix.maillog())?;
    let connects = postfix.connects();
    let clients = client_sessions(connects.clone());
    ensure!(
        clients.len() == sent.len() && clients.iter().cloned().collect::<BTreeSet<_>>() == expected,
        "Postfix logged client sessions {clients:?}, expected {expected:?}"
    );
    let checks = connects.len() - clients.len();
    if smtpchk {
        ensure!(checks > 0, "no health check sessions in the Postfix log");
    } else {
        ensure!(
            checks == 0,
            "unexpected sessions from {BALANCER_IP}: {connects:?}"
        );
    }

    // No PROXY trouble, and in fact no trouble at all: Debian's HAProxy 2.6 ends its
    // SMTP checks with QUIT, so even checks leave no "lost connection".
    let warnings = postfix.warnings();
    ensure!(
        warnings.is_empty(),
        "Postfix logged problems:\n{}",
        warnings.join("\n")
    );

    eprintln!(
        "smtpchk={smtpchk}: {} messages via HAProxy, {checks} check sessions, {:?} total",
        sent.len(),
        started.elapsed()
    );
    Ok(())
}
