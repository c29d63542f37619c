//! The reference behaviour mxlb must match, shown with HAProxy instead of mxlb: round robin
//! over two Postfix backends that require the PROXY protocol (one v1, one v2), with every
//! backend seeing the true client address and logging no PROXY trouble.
//!
//! It also proves the fixtures (Postfix, swaks, HAProxy) work end to end.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Result;
use mxlb_tests::delivery::{send_round_robin, wait_for_checks};
use mxlb_tests::free_addr;
use mxlb_tests::haproxy::{Haproxy, HaproxyConfig, SendProxy};
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};

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
        wait_for_checks(&postfix, BALANCER_IP)?;
    }

    // One message from each of 127.0.0.11..=16: intact, alternating, true client
    // addresses, clean Postfix logs (the check shared with the mxlb tests).
    let deliveries = send_round_robin(
        haproxy.addr(),
        &postfix,
        CLIENT_OCTETS,
        BALANCER_IP,
        smtpchk,
    )?;
    let checks = postfix.connects().len() - deliveries.len();

    eprintln!(
        "smtpchk={smtpchk}: {} messages via HAProxy, {checks} check sessions, {:?} total",
        deliveries.len(),
        started.elapsed()
    );
    Ok(())
}
