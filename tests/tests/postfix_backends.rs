//! mxlb in front of real Postfix: two smtpd services that require the PROXY protocol
//! (mail1 reads v1, mail2 reads v2), swaks as the client from several 127.0.0.x addresses.
//! Every message is delivered, the backends alternate, Postfix records the true client
//! address of each, and mxlb's own log names the server of each connection. Run with the
//! kernel relay and with the user-space relay.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::delivery::send_round_robin;
use mxlb_tests::free_addr;
use mxlb_tests::mxlb::{Mxlb, RelayKind, config, pin_path, two_proxy_backends};

#[test]
fn kernel_relay_delivers_round_robin_with_client_addresses() -> Result<()> {
    deliver_through_mxlb(RelayKind::Kernel, 21..=26)
}

#[test]
fn userspace_relay_delivers_round_robin_with_client_addresses() -> Result<()> {
    deliver_through_mxlb(RelayKind::UserSpace, 31..=36)
}

fn deliver_through_mxlb(relay: RelayKind, clients: std::ops::RangeInclusive<u8>) -> Result<()> {
    let (postfix, servers) = two_proxy_backends()?;
    let listen = free_addr();
    let pins = pin_path(&format!("postfix-{relay:?}"));
    let text = config(relay, &pins, listen, &servers);
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let idle_fds = mxlb.fd_count()?;

    let balancer_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let deliveries = send_round_robin(listen, &postfix, clients, balancer_ip, false)?;

    // mxlb's log has one line per connection naming the server, and it agrees with the
    // backend Postfix says delivered the message.
    let lines = mxlb.wait_for_log_count(
        "connection finished",
        deliveries.len(),
        Duration::from_secs(10),
    )?;
    for delivery in &deliveries {
        let client = format!("client={}:", delivery.client);
        let line = lines
            .iter()
            .find(|line| line.contains(&client))
            .with_context(|| format!("no log line for {}", delivery.client))?;
        ensure!(
            line.contains(&format!("server={} ", delivery.backend)),
            "log line for {} names the wrong server (Postfix says {}): {line}",
            delivery.client,
            delivery.backend
        );
        let finished = mxlb_tests::mxlb::Finished::parse(line)?;
        let relay_field = match relay {
            RelayKind::Kernel | RelayKind::Adaptive => finished.path_by_counters(),
            RelayKind::UserSpace => "user",
        };
        ensure!(finished.relay == relay_field, "{line}");
        ensure!(line.contains("ended=closed"), "{line}");
    }
    mxlb.wait_until_clean(idle_fds, relay.is_kernel())?;
    let status = mxlb.stop()?;
    ensure!(status.success(), "mxlb exited with {status}");
    ensure!(!pins.exists(), "pins left behind at {}", pins.display());
    Ok(())
}
