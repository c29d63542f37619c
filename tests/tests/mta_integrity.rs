//! Real MTA traffic through mxlb, every delivered body compared byte for byte with what was
//! sent. A relay that alters a message (a bug report showed the default relay changing most
//! messages over ~32 KiB sent by swaks into Postfix, with every other test green) fails
//! here, naming the variant, client, size and the offset of the first differing byte.
//!
//! The matrix, one `#[test]` (one Postfix instance, one daemon) per row:
//! - relays: `Kernel` (sockmap, `kernel_relay_after = 0`), `Adaptive` (sockmap, default
//!   `kernel_relay_after`), `UserSpace`, and `Adaptive` with `max_inflight = 0` (no bound
//!   on bytes queued between the two sockets);
//! - backends: Postfix's two smtpd services requiring the PROXY protocol, `mail1` (v1) and
//!   `mail2` (v2); round robin alternates them, and each run checks both delivered mail;
//! - clients: `swaks` (its `--data @file`, through [`Swaks`]) from a chosen 127.0.0.x
//!   address, and Postfix's `smtp-source -F file` ([`SmtpSource`]);
//! - bodies: random hex in 76-character lines, new content per message (seeded from the
//!   run, the test and the message number), of 1 KiB, 100 KiB, 300 KiB, 1 MB, 5 MB and
//!   64 MiB over IPv4; 1 KiB, 300 KiB and 5 MB with mxlb listening on `[::1]` (Kernel and
//!   Adaptive; the Postfix instance is restarted with `inet_protocols = ipv4, ipv6` so
//!   its PROXY parser takes IPv6 client addresses, see [`accept_ipv6_proxy_clients`]).
//!   Each size is sent by both clients, which swap order from one size to the next, so
//!   each client meets both backends (and both PROXY versions) over a run.
//!
//! Comparison: the body is everything after the first empty line of the Maildir file
//! (Postfix adds `Return-Path:`, `Delivered-To:` and `Received:` above our headers).
//! Both sides are normalised the same way, CRLF → LF ([`normalise`]): the clients send
//! CRLF on the wire and virtual(8) stores LF. Our bodies are generated with LF and contain
//! no CR, so the sent side is unchanged by it. Then the bytes must be equal exactly
//! (SHA-256, and the first differing offset on a mismatch). The expected body is the
//! generated body for swaks, plus the one empty line smtp-source always appends (see
//! [`SmtpSource::delivered_body`]).
//!
//! Also checked per message: the delivering backend matches the banner swaks saw, Postfix
//! recorded the true client address (from the PROXY header), and mxlb's `connection
//! finished` line: `relay=` true to its byte counters (`user` in user space), `kernel_bytes > 0` from 1 MB up with the kernel
//! relay (the kernel carried part of the stream), `kernel_bytes = 0` in user space. The
//! share `kernel_bytes / bytes_in` of the 64 MiB messages is printed. After each run:
//! `/api/stats` shows no `integrity_errors` (when the daemon has that field), the daemon
//! gives back every descriptor and map entry, Postfix logged no warning, and the daemon
//! stops with success.
//!
//! Maildir files are matched to messages by subject, whenever they arrive, so a late,
//! duplicate or stray delivery is reported against the right message. Every message of a
//! run is sent and checked even after a failure (until [`MAX_FAILED_SENDS`] sends have
//! failed: each may wait out a client timeout); the test then fails with all problems
//! listed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::mxlb::http::get_json;
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, config, pin_path, two_proxy_backends, with_global_keys, with_stats,
};
use mxlb_tests::postfix::{DeliveredMessage, MAIL_DOMAIN, PostfixInstance};
use mxlb_tests::smtp_source::SmtpSource;
use mxlb_tests::swaks::Swaks;
use mxlb_tests::{free_addr, free_port, run_command, sha256_hex};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const MB: usize = 1_000_000;

/// Body sizes over IPv4, in bytes (LF line endings, as stored in the Maildir).
const SIZES: &[usize] = &[KIB, 100 * KIB, 300 * KIB, MB, 5 * MB, 64 * MIB];
/// Body sizes with mxlb on `[::1]`.
const IPV6_SIZES: &[usize] = &[KIB, 300 * KIB, 5 * MB];
/// From this body size on, the kernel relay must have carried bytes.
const KERNEL_FROM: usize = MB;
/// Hex characters per body line, as in a base64 or quoted-printable body.
const LINE: usize = 76;

/// One row of the matrix.
struct Variant {
    name: &'static str,
    relay: RelayKind,
    /// Extra `[global]` keys.
    global_keys: &'static str,
    ipv6: bool,
    sizes: &'static [usize],
}

#[test]
fn kernel_relay_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "kernel",
        relay: RelayKind::Kernel,
        global_keys: "",
        ipv6: false,
        sizes: SIZES,
    })
}

#[test]
fn adaptive_relay_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "adaptive",
        relay: RelayKind::Adaptive,
        global_keys: "",
        ipv6: false,
        sizes: SIZES,
    })
}

#[test]
fn userspace_relay_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "userspace",
        relay: RelayKind::UserSpace,
        global_keys: "",
        ipv6: false,
        sizes: SIZES,
    })
}

/// No bound on what may queue between the two sockets: a connection never leaves the
/// kernel relay for a slow receiver. (`0` is an integer: a size string needs a unit.)
#[test]
fn adaptive_relay_without_inflight_bound_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "adaptive-inflight0",
        relay: RelayKind::Adaptive,
        global_keys: "max_inflight = 0\n",
        ipv6: false,
        sizes: SIZES,
    })
}

#[test]
fn kernel_relay_over_ipv6_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "kernel-ipv6",
        relay: RelayKind::Kernel,
        global_keys: "",
        ipv6: true,
        sizes: IPV6_SIZES,
    })
}

#[test]
fn adaptive_relay_over_ipv6_delivers_mta_mail_intact() -> Result<()> {
    run(&Variant {
        name: "adaptive-ipv6",
        relay: RelayKind::Adaptive,
        global_keys: "",
        ipv6: true,
        sizes: IPV6_SIZES,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    Swaks,
    SmtpSource,
}

/// What one message's check found, for the summary.
struct Checked {
    label: String,
    size: usize,
    backend: Option<String>,
    /// (kernel_bytes, bytes_in, bytes_out) from mxlb's log line.
    bytes: Option<(u64, u64, u64)>,
    /// Whether the client reported success.
    sent: bool,
    /// Every problem found with this message.
    problems: Vec<String>,
}

/// After this many failed sends (each may wait out a client timeout) a run stops sending:
/// the relay is broken, and the rest would only make the failing test slow.
const MAX_FAILED_SENDS: usize = 4;

fn run(variant: &Variant) -> Result<()> {
    let started = Instant::now();
    let (mut postfix, servers) = two_proxy_backends()?;
    if variant.ipv6 {
        accept_ipv6_proxy_clients(&mut postfix)?;
    }
    let listen = if variant.ipv6 {
        SocketAddr::from((Ipv6Addr::LOCALHOST, free_port()))
    } else {
        free_addr()
    };
    let stats_addr = free_addr();
    let pins = pin_path(&format!("mta-{}", variant.name));
    let mut text = config(variant.relay, &pins, listen, &servers);
    if !variant.global_keys.is_empty() {
        text = with_global_keys(&text, variant.global_keys);
    }
    let text = with_stats(&text, stats_addr, None);
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let idle_fds = mxlb.fd_count()?;

    let nonce = run_nonce();
    eprintln!(
        "[{}] run seed {nonce:#018x}, mxlb on {listen}, Postfix in {}",
        variant.name,
        postfix.dir().display()
    );
    let files = tempfile::tempdir().context("creating a directory for message files")?;
    let mut inbox = Inbox::new(&postfix);
    let mut checked: Vec<Checked> = Vec::new();
    let mut problems = Vec::new();
    let mut number = 0u64;
    'sizes: for (i, &size) in variant.sizes.iter().enumerate() {
        let order = if i % 2 == 0 {
            [Client::Swaks, Client::SmtpSource]
        } else {
            [Client::SmtpSource, Client::Swaks]
        };
        for client in order {
            if checked.iter().filter(|c| !c.sent).count() >= MAX_FAILED_SENDS {
                problems.push(format!(
                    "{MAX_FAILED_SENDS} sends failed: the remaining messages were not sent"
                ));
                break 'sizes;
            }
            number += 1;
            let seed = mix(nonce ^ mix(name_hash(variant.name)) ^ mix(number));
            let message = Message {
                variant,
                number,
                client,
                size,
                seed,
            };
            let one = Instant::now();
            let result = send_and_check(&message, &mxlb, &mut inbox, files.path());
            eprintln!(
                "[{}] {}: {} in {:.1?}{}",
                variant.name,
                result.label,
                if result.problems.is_empty() {
                    "intact"
                } else {
                    "FAILED"
                },
                one.elapsed(),
                result
                    .bytes
                    .map(|(kernel, bytes_in, bytes_out)| format!(
                        ", kernel_bytes={kernel} bytes_in={bytes_in} bytes_out={bytes_out}"
                    ))
                    .unwrap_or_default()
            );
            checked.push(result);
        }
    }
    // Anything delivered after its turn (a duplicate, or a message whose client gave up).
    std::thread::sleep(Duration::from_millis(500));
    if let Err(err) = inbox.scan(None) {
        problems.push(format!("reading the Maildir: {err:#}"));
    }

    let mut all_problems: Vec<String> = checked
        .iter()
        .flat_map(|c| c.problems.iter().map(|p| format!("{}: {p}", c.label)))
        .collect();
    all_problems.append(&mut inbox.problems);
    all_problems.append(&mut problems);
    let mut problems = all_problems;

    // The 64 MiB messages' kernel share, for the record.
    for c in checked.iter().filter(|c| c.size == 64 * MIB) {
        if let Some((kernel, bytes_in, bytes_out)) = c.bytes {
            // kernel_bytes counts both directions: over bytes_in alone it can pass 1.
            eprintln!(
                "[{}] 64 MiB kernel share: {}: kernel_bytes / bytes_in = {kernel} / {bytes_in} \
                 = {:.4} (of bytes_in + bytes_out: {:.4})",
                variant.name,
                c.label,
                share(kernel, bytes_in),
                share(kernel, bytes_in + bytes_out)
            );
        }
    }
    if variant.relay.is_kernel() {
        for c in checked.iter().filter(|c| c.size >= KERNEL_FROM) {
            if let Some((kernel, bytes_in, _)) = c.bytes
                && share(kernel, bytes_in) < 0.01
            {
                eprintln!(
                    "[{}] note: {}: the kernel carried under 1 % of the message \
                     (kernel_bytes={kernel}, bytes_in={bytes_in})",
                    variant.name, c.label
                );
            }
        }
    }

    // Round robin reached both backends, so both PROXY versions carried mail.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for backend in checked.iter().filter_map(|c| c.backend.as_deref()) {
        *per_backend.entry(backend).or_default() += 1;
    }
    for server in &servers {
        if !per_backend.contains_key(server.name) {
            problems.push(format!(
                "{} (PROXY {}) delivered no message: {per_backend:?}",
                server.name, server.send_proxy
            ));
        }
    }

    match get_json(&format!("http://{stats_addr}/api/stats")) {
        Ok(stats) => match stats.get("integrity_errors") {
            Some(value) => {
                if value.as_u64() != Some(0) {
                    problems.push(format!("/api/stats integrity_errors = {value}"));
                }
            }
            // A daemon without that counter (yet): nothing to check.
            None => eprintln!(
                "[{}] /api/stats has no integrity_errors field; not checked",
                variant.name
            ),
        },
        Err(err) => problems.push(format!("/api/stats: {err:#}")),
    }

    if let Err(err) = mxlb.wait_until_clean(idle_fds, variant.relay.is_kernel()) {
        problems.push(format!("{err:#}"));
    }
    let warnings = postfix.warnings();
    if !warnings.is_empty() {
        problems.push(format!("Postfix logged problems:\n{}", warnings.join("\n")));
    }
    match mxlb.stop() {
        Ok(status) if status.success() => {}
        Ok(status) => problems.push(format!("mxlb exited with {status}")),
        Err(err) => problems.push(format!("stopping mxlb: {err:#}")),
    }
    if pins.exists() {
        problems.push(format!("pins left behind at {}", pins.display()));
    }
    eprintln!(
        "[{}] {} messages in {:.1?}",
        variant.name,
        checked.len(),
        started.elapsed()
    );
    if !problems.is_empty() {
        bail!(
            "[{}] {} problem(s) (run seed {nonce:#018x}):\n{}",
            variant.name,
            problems.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

/// One message to send.
struct Message<'a> {
    variant: &'a Variant,
    number: u64,
    client: Client,
    size: usize,
    seed: u64,
}

impl Message<'_> {
    fn label(&self) -> String {
        format!(
            "#{} {:?} {} (seed {:#018x})",
            self.number,
            self.client,
            size_label(self.size),
            self.seed
        )
    }

    fn subject(&self) -> String {
        format!(
            "mta-integrity {} #{} {:?} {}",
            self.variant.name, self.number, self.client, self.size
        )
    }

    /// Time allowed for one wait: a reply (swaks's per-reply timeout) or a delivery. A
    /// 64 MiB message takes about 5 s end to end on 2 busy CPUs with a debug daemon; a
    /// relay that loses or adds bytes leaves Postfix waiting for the end of the data,
    /// and the client waits this long.
    fn wait(&self) -> Duration {
        Duration::from_secs(20 + (self.size / MIB) as u64 / 4)
    }

    /// The whole client run, sending included.
    fn run_time(&self) -> Duration {
        Duration::from_secs(30 + (self.size / MIB) as u64 / 2)
    }

    fn client_ip(&self) -> IpAddr {
        match (self.variant.ipv6, self.client) {
            (true, _) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            (false, Client::Swaks) => {
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 100 + (self.number % 100) as u8))
            }
            // smtp-source cannot choose its source address.
            (false, Client::SmtpSource) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Sends `message`, finds it in the Maildir and checks it and mxlb's log line.
fn send_and_check(
    message: &Message<'_>,
    mxlb: &Mxlb,
    inbox: &mut Inbox<'_>,
    dir: &Path,
) -> Checked {
    let mut checked = Checked {
        label: message.label(),
        size: message.size,
        backend: None,
        bytes: None,
        sent: false,
        problems: Vec::new(),
    };
    if let Err(err) = send_and_check_inner(message, mxlb, inbox, dir, &mut checked) {
        checked.problems.push(format!("{err:#}"));
    }
    checked
}

fn send_and_check_inner(
    message: &Message<'_>,
    mxlb: &Mxlb,
    inbox: &mut Inbox<'_>,
    dir: &Path,
    checked: &mut Checked,
) -> Result<()> {
    let body = hex_body(message.seed, message.size);
    let subject = message.subject();
    let client_ip = message.client_ip();
    let finished_before = mxlb.log_lines("connection finished").len();

    // What must arrive, and the send.
    let expected = match message.client {
        Client::Swaks => body.clone(),
        Client::SmtpSource => SmtpSource::delivered_body(&body),
    };
    inbox.expect(&subject, &checked.label, &expected);
    let sent = match message.client {
        Client::Swaks => send_swaks(message, mxlb.listen, &subject, body),
        Client::SmtpSource => {
            send_smtp_source(message, mxlb.listen, &subject, &body, dir).map(|()| None)
        }
    };
    let banner = match sent {
        Ok(banner) => {
            checked.sent = true;
            banner
        }
        Err(err) => {
            checked.problems.push(format!("sending failed: {err:#}"));
            None
        }
    };

    // mxlb's line for this connection: the first new one from this client's address.
    let client_field = match client_ip {
        IpAddr::V4(ip) => format!("client={ip}:"),
        IpAddr::V6(ip) => format!("client=[{ip}]:"),
    };
    let line = mxlb_tests::wait_until(
        "mxlb's connection finished line",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            Ok(mxlb
                .log_lines("connection finished")
                .into_iter()
                .skip(finished_before)
                .find(|line| line.contains(&client_field)))
        },
    )?;
    let kernel = log_field(&line, "kernel_bytes")?;
    let bytes_in = log_field(&line, "bytes_in")?;
    let bytes_out = log_field(&line, "bytes_out")?;
    checked.bytes = Some((kernel, bytes_in, bytes_out));
    let finished = mxlb_tests::mxlb::Finished::parse(&line)?;
    let relay_ok = if message.variant.relay.is_kernel() {
        finished.relay == finished.path_by_counters()
    } else {
        finished.relay == "user"
    };
    // smtp-source closes with SO_LINGER 0, a reset, after its QUIT was answered.
    let ended_ok = line.contains("ended=closed")
        || (message.client == Client::SmtpSource && line.contains("ended=client-reset"));
    if !relay_ok || !ended_ok {
        checked
            .problems
            .push(format!("unexpected mxlb log line: {line}"));
    }
    if message.variant.relay.is_kernel() {
        if message.size >= KERNEL_FROM && kernel == 0 {
            checked.problems.push(format!(
                "the kernel relay carried no byte of {} (bytes_in={bytes_in}): {line}",
                size_label(message.size)
            ));
        }
    } else if kernel != 0 {
        checked.problems.push(format!(
            "user-space relay with kernel_bytes={kernel}: {line}"
        ));
    }
    if !checked.sent {
        // Whatever Postfix made of it shows up later (see `Inbox::scan`).
        return Ok(());
    }

    // The delivered message.
    let delivered = inbox.wait_for(&subject, message.wait())?;
    let backend = delivered.backend();
    checked.backend.clone_from(&backend);
    match &backend {
        Some(name) => {
            if let Some(banner) = banner.as_deref()
                && !banner.starts_with(&format!("220 {name}.test "))
            {
                checked.problems.push(format!(
                    "delivered by {name} but swaks saw banner {banner:?}"
                ));
            }
        }
        None => checked
            .problems
            .push("no backend in the Received header".to_owned()),
    }
    if delivered.client_ip() != Some(client_ip) {
        checked.problems.push(format!(
            "Postfix recorded client {:?}, the client was {client_ip}",
            delivered.client_ip()
        ));
    }
    if let Some(mismatch) = compare_bodies(&expected, delivered.body()) {
        checked.problems.push(format!(
            "body altered in transit (backend {}): {mismatch}",
            backend.as_deref().unwrap_or("?")
        ));
    }
    Ok(())
}

/// swaks with the fixture's `--data @file`: our headers (with `subject`), `body` as is.
/// Returns the banner swaks saw.
fn send_swaks(
    message: &Message<'_>,
    server: SocketAddr,
    subject: &str,
    body: Vec<u8>,
) -> Result<Option<String>> {
    let sha = sha256_hex(&body);
    let mut swaks = Swaks::new(server);
    swaks.from_ip = Some(message.client_ip());
    swaks.to = format!("user@{MAIL_DOMAIN}");
    swaks.subject = subject.to_owned();
    swaks.body = body;
    swaks.timeout = message.wait();
    let outcome = swaks.run()?;
    outcome.ensure_success()?;
    // The fixture's own normalisation (LF, final newline) leaves our body as it is.
    ensure!(
        outcome.body_sha256 == sha,
        "the swaks fixture changed the body before sending"
    );
    Ok(outcome.banner)
}

/// `smtp-source -F` with a file of our headers (with `subject`) and `body`.
fn send_smtp_source(
    message: &Message<'_>,
    server: SocketAddr,
    subject: &str,
    body: &[u8],
    dir: &Path,
) -> Result<()> {
    let path = dir.join(format!("message-{}.eml", message.number));
    let mut file = format!(
        "From: <sender@{MAIL_DOMAIN}>\nTo: <user@{MAIL_DOMAIN}>\nSubject: {subject}\n\
         Message-Id: <mta-integrity-{:016x}@{MAIL_DOMAIN}>\n\n",
        message.seed
    )
    .into_bytes();
    file.extend_from_slice(body);
    std::fs::write(&path, &file).with_context(|| format!("writing {}", path.display()))?;
    drop(file);
    let mut source = SmtpSource::new(server);
    source.timeout = message.run_time();
    let sent = source.send_file(&path);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    sent.map(|_| ())
}

/// CRLF → LF, the one normalisation applied to both the sent and the delivered body.
fn normalise(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// `None` if the normalised bodies are equal, else what differs: lengths, digests, the
/// offset of the first differing byte and a few bytes around it on each side.
fn compare_bodies(sent: &[u8], delivered: &[u8]) -> Option<String> {
    let sent = normalise(sent);
    let delivered = normalise(delivered);
    let (sent_sha, delivered_sha) = (sha256_hex(&sent), sha256_hex(&delivered));
    if sent_sha == delivered_sha && sent == delivered {
        return None;
    }
    let first = sent
        .iter()
        .zip(&delivered)
        .position(|(a, b)| a != b)
        .unwrap_or(sent.len().min(delivered.len()));
    let around = |bytes: &[u8]| {
        let start = first.saturating_sub(16);
        let end = (first + 48).min(bytes.len());
        String::from_utf8_lossy(bytes.get(start..end).unwrap_or_default()).into_owned()
    };
    Some(format!(
        "sent {} bytes (sha256 {sent_sha}), delivered {} bytes (sha256 {delivered_sha}); \
         first difference at offset {first} (line {}, column {}); from offset {}: \
         sent {:?}, delivered {:?}",
        sent.len(),
        delivered.len(),
        first / (LINE + 1),
        first % (LINE + 1),
        first.saturating_sub(16),
        around(&sent),
        around(&delivered),
    ))
}

/// The Maildir as the test reads it: every new file is matched to a sent message by its
/// subject, whenever it shows up.
///
/// Not [`PostfixInstance::messages`]: that reads every message on each call, and a run's
/// Maildir holds hundreds of MiB.
struct Inbox<'a> {
    postfix: &'a PostfixInstance,
    /// Files already read.
    seen: HashSet<String>,
    /// Sent messages by subject: label, SHA-256 and length of the expected body
    /// (normalised), and whether it was delivered.
    sent: HashMap<String, (String, String, usize, bool)>,
    /// What arrived out of turn: duplicates, strays, messages whose client had failed.
    problems: Vec<String>,
}

impl<'a> Inbox<'a> {
    fn new(postfix: &'a PostfixInstance) -> Self {
        Self {
            postfix,
            seen: HashSet::new(),
            sent: HashMap::new(),
            problems: Vec::new(),
        }
    }

    /// Registers a message about to be sent.
    fn expect(&mut self, subject: &str, label: &str, body: &[u8]) {
        let body = normalise(body);
        self.sent.insert(
            subject.to_owned(),
            (label.to_owned(), sha256_hex(&body), body.len(), false),
        );
    }

    /// Waits for the message with `subject`; files for other messages that arrive
    /// meanwhile are checked by [`Inbox::scan`].
    fn wait_for(&mut self, subject: &str, timeout: Duration) -> Result<DeliveredMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.scan(Some(subject))? {
                return Ok(message);
            }
            if Instant::now() >= deadline {
                bail!(
                    "not delivered to {} within {timeout:?}; Postfix log tail:\n{}",
                    self.postfix.maildir().display(),
                    tail(&self.postfix.maillog(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Reads every new file. Returns the one with subject `wanted`, if any; every other
    /// one must be the first delivery of a message sent earlier whose client failed, and
    /// is compared by digest (a problem either way: its client had failed).
    fn scan(&mut self, wanted: Option<&str>) -> Result<Option<DeliveredMessage>> {
        let mut found = None;
        let mut names = maildir_names(self.postfix)?;
        names.sort();
        for name in names {
            if !self.seen.insert(name.clone()) {
                continue;
            }
            let path = self.postfix.maildir().join("new").join(&name);
            let raw =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let message = DeliveredMessage {
                file_name: name,
                raw,
            };
            let subject = message.subject().unwrap_or_default();
            let Some((label, sha, len, delivered)) = self.sent.get_mut(&subject) else {
                self.problems.push(format!(
                    "{}: a message nobody sent (subject {subject:?}, {} bytes)",
                    message.file_name,
                    message.raw.len()
                ));
                continue;
            };
            if *delivered {
                self.problems
                    .push(format!("{label}: delivered twice ({})", message.file_name));
                continue;
            }
            *delivered = true;
            if wanted == Some(subject.as_str()) {
                found = Some(message);
                continue;
            }
            let body = normalise(message.body());
            let verdict = if sha256_hex(&body) == *sha {
                "intact".to_owned()
            } else {
                format!(
                    "altered: sent {len} bytes (sha256 {sha}), delivered {} bytes \
                     (sha256 {})",
                    body.len(),
                    sha256_hex(&body)
                )
            };
            self.problems.push(format!(
                "{label}: delivered after its client had failed, {verdict}"
            ));
        }
        Ok(found)
    }
}

/// File names in the Maildir's `new/` (virtual(8) writes to `tmp/`, then renames).
fn maildir_names(postfix: &PostfixInstance) -> Result<Vec<String>> {
    let dir = postfix.maildir().join("new");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    entries
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// The fixture's Postfix runs with `inet_protocols = ipv4`, and its PROXY parser then
/// refuses a header that carries IPv6 addresses (`TCP6` in v1, AF_INET6 in v2). With mxlb
/// on `[::1]` the clients are IPv6: let this instance take them (its services still listen
/// on 127.0.0.1 only). The master takes a new `inet_protocols` only at a start, not on
/// reload (it warns), hence stop and start.
fn accept_ipv6_proxy_clients(postfix: &mut PostfixInstance) -> Result<()> {
    let conf = postfix.config_dir();
    postfix.stop()?;
    let out = run_command(
        Command::new("postconf")
            .arg("-c")
            .arg(&conf)
            .args(["-e", "inet_protocols = ipv4, ipv6"])
            .env_remove("MAIL_CONFIG"),
        Duration::from_secs(20),
    )?;
    ensure!(out.status.success(), "postconf -e failed: {}", out.output);
    // Postfix programs wait for a just-written main.cf to "cool down"; spare them that.
    let main_cf = conf.join("main.cf");
    let past = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&main_cf)
        .and_then(|file| {
            file.set_times(
                std::fs::FileTimes::new()
                    .set_accessed(past)
                    .set_modified(past),
            )
        })
        .with_context(|| format!("backdating {}", main_cf.display()))?;
    let out = run_command(
        Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .env_remove("MAIL_CONFIG"),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "postfix start failed: {}\n{}",
        out.output,
        postfix.maillog()
    );
    let addrs: Vec<SocketAddr> = postfix.services().iter().map(|s| s.addr).collect();
    mxlb_tests::wait_for_listen(&addrs, Duration::from_secs(20))
}

/// `value` of ` name=value` in a log line.
fn log_field(line: &str, name: &str) -> Result<u64> {
    let needle = format!(" {name}=");
    let start = line
        .find(&needle)
        .with_context(|| format!("no {name} in {line}"))?
        + needle.len();
    let value = line[start..].split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{name}={value:?} in {line}"))
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn size_label(size: usize) -> String {
    match size {
        s if s >= MIB && s % MIB == 0 => format!("{} MiB", s / MIB),
        s if s >= MB && s % MB == 0 => format!("{} MB", s / MB),
        s if s % KIB == 0 => format!("{} KiB", s / KIB),
        s => format!("{s} B"),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `size` bytes of text: lines of 76 random hex digits and LF; the last line is shorter
/// (possibly empty) so the total is exact. Contains no `.` at a line start, no backslash,
/// no `%`: nothing swaks or smtp-source rewrites.
fn hex_body(seed: u64, size: usize) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut state = seed;
    let mut word = 0u64;
    let mut digits = 0;
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let line = (size - out.len()).min(LINE + 1);
        for _ in 0..line - 1 {
            if digits == 0 {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                word = mix(state);
                digits = 16;
            }
            out.push(HEX[(word & 0xf) as usize]);
            word >>= 4;
            digits -= 1;
        }
        out.push(b'\n');
    }
    out
}

/// splitmix64's finaliser: a well-mixed 64-bit value from any input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Different bodies every run: time and process id.
fn run_nonce() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(nanos ^ (u64::from(std::process::id()) << 40))
}

#[test]
fn bodies_are_exact_hex_lines_and_differ_per_seed() {
    for size in [1, 2, 76, 77, 78, 1024, MB] {
        let body = hex_body(7, size);
        assert_eq!(body.len(), size);
        assert!(body.ends_with(b"\n"));
        assert!(body.split(|&b| b == b'\n').all(|line| line.len() <= LINE));
        assert!(body.iter().all(|&b| b == b'\n' || b.is_ascii_hexdigit()));
    }
    assert_ne!(hex_body(1, 1024), hex_body(2, 1024));
}

#[test]
fn comparison_reports_the_first_difference() {
    assert_eq!(compare_bodies(b"ab\ncd\n", b"ab\r\ncd\r\n"), None);
    let report = compare_bodies(b"abcdef\n", b"abXdef\n").unwrap();
    assert!(report.contains("first difference at offset 2"), "{report}");
    let report = compare_bodies(b"abc\n", b"abc\nmore\n").unwrap();
    assert!(
        report.contains("sent 4 bytes") && report.contains("delivered 9 bytes"),
        "{report}"
    );
    assert!(report.contains("offset 4"), "{report}");
}
