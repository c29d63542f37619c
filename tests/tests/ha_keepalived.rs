//! High availability: two mxlb instances share a virtual IP managed by keepalived (VRRP),
//! whose health script asks each instance's stats API. While a client sends mail through
//! the virtual IP, the active balancer fails twice, once by its daemon being killed and
//! once by its whole link being cut; nothing may be lost.
//!
//! The topology, every piece a network namespace of the test's own, on one bridge
//! (10.77.0.0/24) in `ha-core`:
//!
//! ```text
//!   ha-client 10.77.0.50 ──┐                 ┌── ha-lb1 10.77.0.11  mxlb :25, stats :8404,
//!   (swaks, a TCP probe)   ├── br0 (ha-core) ┤                      keepalived MASTER 150
//!                          │   10.77.0.1:25  └── ha-lb2 10.77.0.12  mxlb :25, stats :8404,
//!                          │   → Postfix                            keepalived BACKUP 100
//!                                 VIP 10.77.0.100 on whichever lb is MASTER
//! ```
//!
//! Postfix (the fixtures' private instance, which listens on loopback only) runs in
//! `ha-core`, reached at 10.77.0.1:25 through a DNAT to its 127.0.0.1 port
//! (`route_localnet`). Both balancers listen on 0.0.0.0:25, so the one that holds the VIP
//! accepts on it, and send PROXY v1: Postfix sees the client's own address.
//!
//! The client sends one message after another through VIP:25 with swaks, each with a unique
//! subject; a send that fails is retried every 200 ms until it succeeds, as a sending MTA
//! defers and retries. A probe connects every 100 ms and waits for the banner, which
//! measures how long the address did not answer. Then:
//!
//! 1. **kill**: lb1's daemon gets SIGKILL. Its health script fails twice, keepalived puts it
//!    in FAULT, and lb2 takes the VIP.
//! 2. **failback**: lb1's daemon starts again; after two good checks lb1 preempts (the
//!    default, `preempt`) and takes the VIP back, which resets the sessions open on lb2.
//! 3. **link cut**: lb1's link to the bridge goes down while it is MASTER; lb2 misses three
//!    adverts and takes the VIP.
//!
//! Every subject is then found in Postfix's Maildir with its body intact; a message is
//! delivered twice only when the client had sent its final dot and never got the reply (the
//! classic SMTP duplicate, RFC 1047), which the test reports. The outage, the deferred
//! messages and the retries of each phase are printed (run with `--nocapture`); only
//! generous sanity bounds are asserted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::keepalived::{self, Keepalived, VrrpInstance, has_address, netns_name};
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, config_with_listener_keys, pin_path};
use mxlb_tests::netns::Netns;
use mxlb_tests::postfix::{PostfixInstance, SmtpdService};
use mxlb_tests::swaks::Swaks;
use mxlb_tests::wait_until;

const CORE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const LB1_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
const LB2_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const PREFIX: u8 = 24;
const SMTP_PORT: u16 = 25;
const STATS_PORT: u16 = 8404;
/// Postfix's own port in `ha-core` (loopback; the DNAT target).
const POSTFIX_PORT: u16 = 10025;
/// The interface inside each lb and client namespace.
const IFACE: &str = "eth0";

/// Generous bounds: a failover that takes this long is broken, not slow.
const SANITY: Duration = Duration::from_secs(30);
/// The client's wait for each reply (swaks `--timeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client gives one message before the test fails.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(90);
const RETRY_DELAY: Duration = Duration::from_millis(200);
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Messages delivered in each phase before the next event.
const PER_PHASE: usize = 5;

/// One balancer node: its namespace, daemon and keepalived.
struct Node {
    what: &'static str,
    ip: Ipv4Addr,
    /// The port of the bridge in `ha-core` that leads to it.
    bridge_port: &'static str,
    priority: u8,
}

const LB1: Node = Node {
    what: "ha-lb1",
    ip: LB1_IP,
    bridge_port: "p-lb1",
    priority: 150,
};
const LB2: Node = Node {
    what: "ha-lb2",
    ip: LB2_IP,
    bridge_port: "p-lb2",
    priority: 100,
};

fn vrrp(node: &Node, peer: &Node) -> VrrpInstance {
    VrrpInstance {
        node: node.what.replace('-', "_"),
        interface: IFACE.to_owned(),
        virtual_router_id: 51,
        priority: node.priority,
        initial_master: node.priority > peer.priority,
        own_ip: node.ip,
        peers: vec![peer.ip],
        vip: VIP,
        vip_prefix: PREFIX,
        stats_url: format!("http://{}:{STATS_PORT}/api/stats", node.ip),
    }
}

fn mxlb_config(node: &Node) -> String {
    let text = config_with_listener_keys(
        RelayKind::UserSpace,
        &pin_path(node.what),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, SMTP_PORT)),
        &[ServerEntry {
            name: "mail",
            addr: SocketAddr::from((CORE_IP, SMTP_PORT)),
            send_proxy: "v1",
        }],
        "\n[listen.check]\ntype = \"smtp\"\ninter = \"1s\"\nrise = 2\nfall = 2\ntimeout = \"1s\"\n",
    );
    mxlb_tests::mxlb::with_stats(&text, SocketAddr::from((node.ip, STATS_PORT)), None)
}

/// Starts `node`'s daemon inside its namespace (listening on 0.0.0.0:25 there).
fn start_mxlb(netns: &Netns, node: &Node) -> Result<Mxlb> {
    let text = mxlb_config(node);
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, SMTP_PORT));
    let pins = pin_path(node.what);
    netns
        .run(|| Mxlb::start(&text, listen, &pins))
        .with_context(|| format!("starting mxlb in {}", node.what))
}

/// The bridge in `core` and one veth into each other namespace, addresses, the DNAT to
/// Postfix.
fn build_topology(core: &Netns, members: &[(&str, &str, Ipv4Addr)]) -> Result<()> {
    core.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
    core.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{CORE_IP}/{PREFIX}"),
        "dev",
        "br0",
    ])?;
    core.exec(&["ip", "link", "set", "br0", "up"])?;
    for &(what, port, ip) in members {
        let name = netns_name(what)?;
        core.exec(&[
            "ip", "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", &name,
        ])?;
        core.exec(&["ip", "link", "set", port, "master", "br0"])?;
        core.exec(&["ip", "link", "set", port, "up"])?;
        let run = |args: &[&str]| -> Result<()> {
            let mut command = vec!["ip", "-n", name.as_str()];
            command.extend_from_slice(args);
            let out = mxlb_tests::run_command(
                std::process::Command::new(command[0]).args(&command[1..]),
                Duration::from_secs(10),
            )?;
            ensure!(out.status.success(), "{command:?}: {}", out.output);
            Ok(())
        };
        run(&["addr", "add", &format!("{ip}/{PREFIX}"), "dev", IFACE])?;
        run(&["link", "set", IFACE, "up"])?;
    }
    // Postfix listens on loopback only: 10.77.0.1:25 is DNATed to it.
    core.exec(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])?;
    core.exec(&["sysctl", "-qw", "net.ipv4.conf.br0.route_localnet=1"])?;
    core.exec(&["nft", "add", "table", "ip", "ha"])?;
    core.exec(&[
        "nft",
        "add chain ip ha prerouting { type nat hook prerouting priority -100 ; }",
    ])?;
    core.exec(&[
        "nft",
        &format!(
            "add rule ip ha prerouting ip daddr {CORE_IP} tcp dport {SMTP_PORT} \
             dnat to 127.0.0.1:{POSTFIX_PORT}"
        ),
    ])?;
    Ok(())
}

/// One attempt to send a message.
#[derive(Debug, Clone)]
struct Attempt {
    start: Instant,
    end: Instant,
    ok: bool,
    /// Failed after the final dot was sent: the server may have taken the message.
    after_dot: bool,
    what: String,
}

/// One message and its attempts, the last one successful.
#[derive(Debug, Clone)]
struct Sent {
    subject: String,
    body_sha256: String,
    attempts: Vec<Attempt>,
}

impl Sent {
    fn failures(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|attempt| !attempt.ok)
    }
}

/// One probe: connected and got the banner, or not.
#[derive(Debug, Clone, Copy)]
struct Probe {
    start: Instant,
    ok: bool,
}

fn probe_once(addr: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut banner = String::new();
        reader.read_line(&mut banner)?;
        if !banner.starts_with("220 ") {
            return Ok(false);
        }
        (&stream).write_all(b"QUIT\r\n")?;
        let mut bye = String::new();
        let _ = reader.read_line(&mut bye);
        Ok(true)
    };
    attempt().unwrap_or(false)
}

/// The client: messages through the VIP, one after another, each retried until accepted.
fn send_loop(
    stop: &AtomicBool,
    abort: &AtomicBool,
    sent: &Mutex<Vec<Sent>>,
    accepted: &AtomicUsize,
) -> Result<()> {
    let vip = SocketAddr::from((VIP, SMTP_PORT));
    let run = std::process::id();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
            return Ok(());
        }
        let subject = format!("ha {run} message {i}");
        let mut swaks = Swaks::new(vip);
        swaks.from_ip = Some(IpAddr::V4(CLIENT_IP));
        swaks.to = "user@example.test".to_owned();
        swaks.subject = subject.clone();
        swaks.body = format!(
            "Message {i} of run {run} through the virtual IP.\n.a leading dot\n{}\nend\n",
            "0123456789abcdef".repeat(4 * (i % 8 + 1))
        )
        .into_bytes();
        swaks.timeout = SEND_TIMEOUT;
        let first = Instant::now();
        let mut attempts = Vec::new();
        let body_sha256 = loop {
            let start = Instant::now();
            let (ok, after_dot, what, sha) = match swaks.run() {
                Ok(outcome) => {
                    let after_dot = outcome.transcript.lines().any(|line| line.trim() == "-> .");
                    let what = outcome
                        .transcript
                        .lines()
                        .rev()
                        .find(|line| line.starts_with("<") || line.starts_with("***"))
                        .unwrap_or("")
                        .to_owned();
                    (
                        outcome.success(),
                        after_dot,
                        format!("{}: {what}", outcome.status),
                        outcome.body_sha256,
                    )
                }
                Err(err) => (false, true, format!("{err:#}"), String::new()),
            };
            attempts.push(Attempt {
                start,
                end: Instant::now(),
                ok,
                after_dot: !ok && after_dot,
                what,
            });
            if ok {
                break sha;
            }
            if abort.load(Ordering::SeqCst) {
                return Ok(());
            }
            if first.elapsed() > MESSAGE_DEADLINE {
                bail!(
                    "{subject} not accepted after {MESSAGE_DEADLINE:?} and {} attempts; last: {}",
                    attempts.len(),
                    attempts.last().map_or("", |a: &Attempt| a.what.as_str())
                );
            }
            thread::sleep(RETRY_DELAY);
        };
        sent.lock().unwrap().push(Sent {
            subject,
            body_sha256,
            attempts,
        });
        accepted.fetch_add(1, Ordering::SeqCst);
        // Modest load: the machine is shared.
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sets `abort` when the orchestration leaves early, so the client threads end.
struct AbortOnDrop<'a>(&'a AtomicBool);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One failure event and what it cost.
#[derive(Debug)]
struct Event {
    name: &'static str,
    at: Instant,
    wall: SystemTime,
    /// When the VIP was seen on its new holder.
    vip_moved: Option<Instant>,
}

/// Waits until the VIP is on `holder` and not on `other`.
fn wait_for_vip(holder: &str, other: &str, timeout: Duration) -> Result<Instant> {
    wait_until(
        &format!("the VIP on {holder} only"),
        timeout,
        Duration::from_millis(20),
        || {
            Ok(
                (has_address(holder, IFACE, VIP)? && !has_address(other, IFACE, VIP)?)
                    .then(Instant::now),
            )
        },
    )
}

/// Waits until the client had `count` more messages accepted than `since`.
fn wait_for_accepted(accepted: &AtomicUsize, since: usize, count: usize) -> Result<()> {
    wait_until(
        &format!("{count} more accepted messages"),
        Duration::from_secs(120),
        Duration::from_millis(50),
        || Ok((accepted.load(Ordering::SeqCst) >= since + count).then_some(())),
    )
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[test]
fn a_pair_under_keepalived_loses_no_mail_when_the_master_fails() -> Result<()> {
    keepalived::ensure_installed()?;

    let core = Netns::create("ha-core")?;
    let lb1 = Netns::create(LB1.what)?;
    let lb2 = Netns::create(LB2.what)?;
    let client = Netns::create("ha-client")?;
    build_topology(
        &core,
        &[
            (LB1.what, LB1.bridge_port, LB1.ip),
            (LB2.what, LB2.bridge_port, LB2.ip),
            ("ha-client", "p-client", CLIENT_IP),
        ],
    )?;
    let lb1_name = netns_name(LB1.what)?;
    let lb2_name = netns_name(LB2.what)?;

    let postfix = core.run(|| {
        PostfixInstance::start(&[SmtpdService::with_proxy(
            "mail",
            SocketAddr::from((Ipv4Addr::LOCALHOST, POSTFIX_PORT)),
        )])
    })?;
    let mut mxlb1 = Some(start_mxlb(&lb1, &LB1)?);
    let mxlb2 = start_mxlb(&lb2, &LB2)?;
    let ka1 = Keepalived::start(&lb1_name, &vrrp(&LB1, &LB2))?;
    let ka2 = Keepalived::start(&lb2_name, &vrrp(&LB2, &LB1))?;
    let diagnostics = |what: &str| {
        format!(
            "{what}\n--- keepalived lb1 ---\n{}\n--- keepalived lb2 ---\n{}",
            ka1.log(),
            ka2.log()
        )
    };
    wait_for_vip(&lb1_name, &lb2_name, SANITY)
        .with_context(|| diagnostics("lb1 never became MASTER"))?;
    eprintln!("ha: lb1 holds the VIP {VIP}; the client starts sending");

    let stop = AtomicBool::new(false);
    let abort = AtomicBool::new(false);
    let sent = Mutex::new(Vec::<Sent>::new());
    let accepted = AtomicUsize::new(0);
    let probes = Arc::new(Mutex::new(Vec::<Probe>::new()));
    let mut events: Vec<Event> = Vec::new();

    let (client_ref, stop_ref, abort_ref, sent_ref, accepted_ref) =
        (&client, &stop, &abort, &sent, &accepted);
    thread::scope(|scope| -> Result<()> {
        let _abort = AbortOnDrop(abort_ref);
        let sender = scope.spawn(move || {
            client_ref.run(move || send_loop(stop_ref, abort_ref, sent_ref, accepted_ref))
        });
        let probe_log = probes.clone();
        let prober = scope.spawn(move || {
            client_ref.run(move || {
                let vip = SocketAddr::from((VIP, SMTP_PORT));
                while !stop_ref.load(Ordering::SeqCst) && !abort_ref.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let ok = probe_once(vip);
                    probe_log.lock().unwrap().push(Probe { start, ok });
                    thread::sleep(PROBE_INTERVAL.saturating_sub(start.elapsed()));
                }
                Ok(())
            })
        });

        wait_for_accepted(&accepted, 0, PER_PHASE)?;

        // 1. The daemon dies; the health script notices, lb2 takes over.
        let before = accepted.load(Ordering::SeqCst);
        let pid = mxlb1.as_ref().context("lb1's daemon")?.pid();
        let mut event = Event {
            name: "kill mxlb on lb1",
            at: Instant::now(),
            wall: SystemTime::now(),
            vip_moved: None,
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        event.vip_moved = Some(
            wait_for_vip(&lb2_name, &lb1_name, SANITY)
                .with_context(|| diagnostics("the VIP did not move to lb2 after the kill"))?,
        );
        events.push(event);
        wait_for_accepted(&accepted, before, PER_PHASE)?;

        // 2. The daemon is back; lb1 preempts once its script rises.
        let before = accepted.load(Ordering::SeqCst);
        drop(mxlb1.take());
        let mut event = Event {
            name: "restart mxlb on lb1 (preempt)",
            at: Instant::now(),
            wall: SystemTime::now(),
            vip_moved: None,
        };
        mxlb1 = Some(start_mxlb(&lb1, &LB1)?);
        event.vip_moved = Some(
            wait_for_vip(&lb1_name, &lb2_name, SANITY)
                .with_context(|| diagnostics("lb1 did not take the VIP back"))?,
        );
        events.push(event);
        wait_for_accepted(&accepted, before, PER_PHASE)?;

        // 3. lb1's link goes down while it is MASTER; lb2 misses its adverts.
        let before = accepted.load(Ordering::SeqCst);
        let mut event = Event {
            name: "cut lb1's link",
            at: Instant::now(),
            wall: SystemTime::now(),
            vip_moved: None,
        };
        core.exec(&["ip", "link", "set", LB1.bridge_port, "down"])?;
        event.vip_moved = Some(
            wait_until("the VIP on lb2", SANITY, Duration::from_millis(20), || {
                Ok(has_address(&lb2_name, IFACE, VIP)?.then(Instant::now))
            })
            .with_context(|| diagnostics("the VIP did not move to lb2 after the link cut"))?,
        );
        events.push(event);
        wait_for_accepted(&accepted, before, PER_PHASE)?;

        stop.store(true, Ordering::SeqCst);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        prober
            .join()
            .map_err(|_| anyhow::anyhow!("the prober panicked"))??;
        Ok(())
    })?;

    let sent = sent.into_inner().unwrap();
    let probes = probes.lock().unwrap().clone();

    // Every message the client saw accepted is in the Maildir, intact, once (twice only
    // where an attempt failed after its final dot).
    let deadline = Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        let messages = postfix.messages()?;
        let mut by_subject: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for message in messages {
            let subject = message.subject().unwrap_or_default();
            by_subject.entry(subject).or_default().push(message);
        }
        if sent.iter().all(|s| by_subject.contains_key(&s.subject)) {
            // Let a late duplicate show up too.
            thread::sleep(Duration::from_secs(2));
            let mut by_subject: BTreeMap<String, Vec<_>> = BTreeMap::new();
            for message in postfix.messages()? {
                by_subject
                    .entry(message.subject().unwrap_or_default())
                    .or_default()
                    .push(message);
            }
            break by_subject;
        }
        if Instant::now() > deadline {
            let missing: Vec<&str> = sent
                .iter()
                .filter(|s| !by_subject.contains_key(&s.subject))
                .map(|s| s.subject.as_str())
                .collect();
            bail!(
                "lost: {} accepted messages never delivered: {missing:?}\nmaillog:\n{}",
                missing.len(),
                postfix.maillog()
            );
        }
        thread::sleep(Duration::from_millis(100));
    };
    let mut duplicates = Vec::new();
    for message in &sent {
        let copies = &delivered[&message.subject];
        for copy in copies {
            ensure!(
                copy.body_intact() && copy.body_sha256() == message.body_sha256,
                "{}: body not intact:\n{}",
                message.subject,
                String::from_utf8_lossy(&copy.raw)
            );
            ensure!(
                copy.client_ip() == Some(IpAddr::V4(CLIENT_IP)),
                "{}: Postfix saw client {:?}, not {CLIENT_IP}",
                message.subject,
                copy.client_ip()
            );
        }
        if copies.len() > 1 {
            let ambiguous = message.failures().filter(|a| a.after_dot).count();
            ensure!(
                copies.len() <= 1 + ambiguous,
                "{} delivered {} times, but only {ambiguous} attempt(s) failed after the \
                 final dot",
                message.subject,
                copies.len()
            );
            duplicates.push(message.subject.clone());
        }
    }
    let unknown: Vec<&String> = delivered
        .keys()
        .filter(|subject| !sent.iter().any(|s| &s.subject == *subject))
        .collect();
    ensure!(
        unknown.is_empty(),
        "unexpected messages delivered: {unknown:?}"
    );

    // The measurements, per event.
    let start = sent
        .first()
        .and_then(|s| s.attempts.first())
        .map(|a| a.start)
        .context("nothing sent")?;
    eprintln!(
        "\nha: {} messages accepted and delivered, {} attempts, {} probes; lb1 priority {}, \
         lb2 {}, advert_int 1 s, health script every 1 s (fall 2, rise 2)",
        sent.len(),
        sent.iter().map(|s| s.attempts.len()).sum::<usize>(),
        probes.len(),
        LB1.priority,
        LB2.priority
    );
    let mut report = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let until = events.get(index + 1).map(|next| next.at);
        let in_phase = |t: Instant| t >= event.at && until.is_none_or(|until| t < until);
        let vip_moved = event.vip_moved.map(|t| t - event.at);
        // The address: from the first failed probe to the first good one after the last
        // failure, among the probes of this phase.
        let phase_probes: Vec<&Probe> = probes.iter().filter(|p| in_phase(p.start)).collect();
        let failed_probes = phase_probes.iter().filter(|p| !p.ok).count();
        let unreachable = match (
            phase_probes.iter().position(|p| !p.ok),
            phase_probes.iter().rposition(|p| !p.ok),
        ) {
            (Some(first), Some(last)) => {
                let back = phase_probes[last + 1..].iter().find(|p| p.ok);
                back.map(|back| back.start - phase_probes[first].start)
            }
            _ => Some(Duration::ZERO),
        };
        // The mail: messages with an attempt that failed in this phase (by when the client
        // saw it fail), their failed attempts, and the longest time without an accepted
        // message around the event.
        let deferred: Vec<&Sent> = sent
            .iter()
            .filter(|s| s.failures().any(|a| in_phase(a.end)))
            .collect();
        let failed_here = || {
            sent.iter()
                .flat_map(|s| s.failures())
                .filter(|a| in_phase(a.end))
        };
        let retries = failed_here().count();
        let after_dot = failed_here().filter(|a| a.after_dot).count();
        let longest = deferred
            .iter()
            .map(|s| s.attempts.last().unwrap().end - s.attempts[0].start)
            .max()
            .unwrap_or_default();
        let mut accepted_at: Vec<Instant> = sent
            .iter()
            .filter_map(|s| s.attempts.last())
            .map(|a| a.end)
            .collect();
        accepted_at.sort();
        let last_before = accepted_at.iter().rev().find(|t| **t < event.at).copied();
        let mut mail_gap = Duration::ZERO;
        let mut previous = last_before;
        for &t in accepted_at.iter().filter(|t| in_phase(**t)) {
            if let Some(previous) = previous {
                mail_gap = mail_gap.max(t - previous);
            }
            previous = Some(t);
        }
        let ka = [(&ka1, "lb1"), (&ka2, "lb2")]
            .iter()
            .map(|(ka, name)| {
                let states: Vec<String> = ka
                    .transitions_since(event.wall)
                    .iter()
                    .filter(|(after, _)| until.is_none_or(|u| *after < ms(u - event.at)))
                    .map(|(after, state)| format!("{state} +{after:.0}ms"))
                    .collect();
                format!("{name} [{}]", states.join(", "))
            })
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!(
            "ha: {:<31} at +{:>6.0} ms: VIP moved after {:>6.0} ms; address unreachable {} \
             ({failed_probes} failed probes); {} messages deferred and delivered by retry \
             ({retries} failed attempts, {after_dot} after the final dot), the longest \
             {:.0} ms from first try to acceptance; longest gap between accepted \
             messages {:.0} ms; keepalived: {ka}",
            event.name,
            ms(event.at - start),
            vip_moved.map_or(f64::NAN, ms),
            unreachable.map_or("until the end".to_owned(), |d| format!("{:.0} ms", ms(d))),
            deferred.len(),
            ms(longest),
            ms(mail_gap),
        );
        eprintln!("{line}");
        report.push((event.name, vip_moved, unreachable));
    }
    eprintln!(
        "ha: every one of the {} messages delivered intact; {} delivered twice \
         (failed after the final dot): {duplicates:?}\n",
        sent.len(),
        duplicates.len()
    );
    for (name, vip_moved, unreachable) in report {
        ensure!(
            vip_moved.is_some_and(|d| d < SANITY),
            "{name}: the VIP took {vip_moved:?} to move"
        );
        ensure!(
            unreachable.is_some_and(|d| d < SANITY),
            "{name}: the address was unreachable for {unreachable:?}"
        );
    }

    drop(ka1);
    drop(ka2);
    drop(mxlb1);
    drop(mxlb2);
    drop(postfix);
    Ok(())
}
