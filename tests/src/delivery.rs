//! The round-robin delivery check shared by every balancer under test (mxlb with either
//! relay, HAProxy as the reference): send one message per client address through the
//! balancer with swaks, then prove from Postfix's Maildir and log that every message
//! arrived intact, at alternating backends, with the true client address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::postfix::PostfixInstance;
use crate::swaks::{Swaks, SwaksOutcome};
use crate::wait_until;

/// One message as sent and as delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub client: IpAddr,
    pub subject: String,
    /// The backend (Postfix service name) that delivered it.
    pub backend: String,
    pub outcome: SwaksOutcome,
}

/// What a Postfix instance had delivered and logged before a check: a second balancer can
/// be checked on the same backends, counting only what came after.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baseline {
    messages: usize,
    connects: usize,
    disconnects: usize,
    warnings: usize,
}

impl Baseline {
    /// The instance's counts now.
    pub fn of(postfix: &PostfixInstance) -> Result<Baseline> {
        Ok(Baseline {
            messages: postfix.messages()?.len(),
            connects: postfix.connects().len(),
            disconnects: postfix.disconnects().len(),
            warnings: postfix.warnings().len(),
        })
    }
}

/// Waits until a health check from `balancer_ip` that started from now on has finished on
/// each of `postfix`'s two services: balancers start their servers UP, before any check.
pub fn wait_for_checks(postfix: &PostfixInstance, balancer_ip: IpAddr) -> Result<()> {
    let before = postfix.disconnects().len();
    wait_until(
        "a finished health check on each backend",
        Duration::from_secs(10),
        Duration::from_millis(25),
        || {
            let checked: BTreeSet<String> = postfix
                .disconnects()
                .split_off(before)
                .into_iter()
                .filter(|(_, ip)| *ip == balancer_ip)
                .map(|(service, _)| service)
                .collect();
            Ok((checked.len() == 2).then_some(()))
        },
    )
    .with_context(|| postfix.maillog())
}

/// Sends one message from each of 127.0.0.`octets` through `balancer` and checks delivery
/// on `postfix`'s two services. `balancer_ip` is the balancer's own address (health-check
/// sessions come from it); `checks` says whether such sessions are expected.
pub fn send_round_robin(
    balancer: SocketAddr,
    postfix: &PostfixInstance,
    octets: std::ops::RangeInclusive<u8>,
    balancer_ip: IpAddr,
    checks: bool,
) -> Result<Vec<Delivery>> {
    let since = Baseline::default();
    send_round_robin_since(balancer, postfix, octets, balancer_ip, checks, since)
}

/// [`send_round_robin`] on a Postfix instance that served before: only what came after
/// `since` counts.
pub fn send_round_robin_since(
    balancer: SocketAddr,
    postfix: &PostfixInstance,
    octets: std::ops::RangeInclusive<u8>,
    balancer_ip: IpAddr,
    checks: bool,
    since: Baseline,
) -> Result<Vec<Delivery>> {
    let mut sent = Vec::new();
    for (i, octet) in octets.enumerate() {
        let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet));
        let subject = format!("round robin {i} from {client}");
        let body = format!("Message {i} from {client}.\n.leading dot, CRLF next\r\nend\n");
        let outcome = Swaks::send(
            balancer,
            client,
            "user@example.test",
            &subject,
            Some(body.as_bytes()),
        )?;
        outcome.ensure_success()?;
        sent.push((subject, client, outcome));
    }

    let expected_total = since.messages + sent.len();
    let delivered = postfix.wait_for_messages(expected_total, Duration::from_secs(20))?;
    ensure!(
        delivered.len() == expected_total,
        "expected {} messages, got {}",
        sent.len(),
        delivered.len() - since.messages
    );

    // Every message arrived intact, from its true client, at the backend whose banner the
    // client saw.
    let mut deliveries = Vec::new();
    for (subject, client, outcome) in sent {
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
            message.client_ip() == Some(client),
            "{subject:?}: Postfix recorded client {:?}, expected {client}",
            message.client_ip()
        );
        let banner = outcome.banner.as_deref().unwrap_or_default();
        ensure!(
            banner.starts_with(&format!("220 {backend}.test ")),
            "{subject:?} delivered by {backend} but the client saw banner {banner:?}"
        );
        deliveries.push(Delivery {
            client,
            subject,
            backend,
            outcome,
        });
    }

    // Strict alternation: roundrobin with equal weights, one connection at a time.
    let backends: Vec<&str> = deliveries.iter().map(|d| d.backend.as_str()).collect();
    ensure!(
        backends.windows(2).all(|pair| pair[0] != pair[1]),
        "backends do not alternate: {backends:?}"
    );
    let mut per_backend = BTreeMap::new();
    for backend in &backends {
        *per_backend.entry(*backend).or_insert(0) += 1;
    }
    let half = deliveries.len() / 2;
    ensure!(
        per_backend.values().all(|&n| n == half) && per_backend.len() == 2,
        "uneven distribution: {per_backend:?}"
    );

    // Postfix's log shows each client session, finished, with the true client address on
    // the backend that delivered it. Health checks (from the balancer's address) come on
    // top when configured.
    let expected: BTreeSet<(String, IpAddr)> = deliveries
        .iter()
        .map(|d| (d.backend.clone(), d.client))
        .collect();
    let client_sessions = |sessions: Vec<(String, IpAddr)>| -> Vec<(String, IpAddr)> {
        sessions
            .into_iter()
            .filter(|(_, ip)| *ip != balancer_ip)
            .collect()
    };
    wait_until(
        "all client sessions logged as finished",
        Duration::from_secs(10),
        Duration::from_millis(25),
        || {
            let disconnects = postfix.disconnects().split_off(since.disconnects);
            Ok((client_sessions(disconnects).len() >= deliveries.len()).then_some(()))
        },
    )
    .with_context(|| postfix.maillog())?;
    let connects = postfix.connects().split_off(since.connects);
    let clients = client_sessions(connects.clone());
    ensure!(
        clients.len() == deliveries.len()
            && clients.iter().cloned().collect::<BTreeSet<_>>() == expected,
        "Postfix logged client sessions {clients:?}, expected {expected:?}"
    );
    let check_sessions = connects.len() - clients.len();
    if checks {
        ensure!(
            check_sessions > 0,
            "no health check sessions in the Postfix log"
        );
    } else {
        ensure!(
            check_sessions == 0,
            "unexpected sessions from {balancer_ip}: {connects:?}"
        );
    }

    // No PROXY trouble, and in fact no trouble at all.
    let warnings = postfix.warnings().split_off(since.warnings);
    ensure!(
        warnings.is_empty(),
        "Postfix logged problems:\n{}",
        warnings.join("\n")
    );
    Ok(deliveries)
}
