//! Nothing is lost on a lossy network. The internet drops, duplicates and re-segments
//! packets; TCP retransmits, and the retransmitted, out-of-order and partly overlapping
//! segments reach the receive queue the kernel relay reads from. Here nftables acts on the
//! data segments of the test's own loopback (a network namespace: client → mxlb and mxlb →
//! server both suffer), and a 32 MiB upload and a 32 MiB download go through the kernel
//! relay: both arrive intact (SHA-256), the namespace's TCP counters show the fault was
//! real, and the daemon's count shows the kernel carried (at least 99 % of) the bytes.
//!
//! - 5 % of data segments dropped: plain retransmissions at the receiver's `rcv_nxt`.
//! - 2 % duplicated (`dup to`): a copy that arrives while the socket is busy is coalesced in
//!   the backlog with the next segment, and TCP queues the result untrimmed, starting before
//!   `rcv_nxt` (docs/architecture.md, "Overlapping retransmissions"). The verdict must cut
//!   the old head off; before it did, every run relayed such heads twice.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{
    Backend, Digest256, digest_until_eof, pattern_digest, read_line, send_pattern,
};
use mxlb_tests::mxlb::{
    Mxlb, RelayKind, ServerEntry, config, log_text, pin_path, with_global_keys,
};
use mxlb_tests::netns::Netns;

const EACH_WAY: u64 = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);
const BANNER: &str = "220 lossy\r\n";

/// `TcpRetransSegs` of the calling thread's namespace.
fn retransmitted_segments() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("Tcp names")?,
        tcp.next().context("Tcp values")?,
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RetransSegs")
        .context("no RetransSegs")?
        .1
        .parse()
        .context("RetransSegs")
}

/// What one run through the faulty namespace showed.
struct Run {
    /// The namespace's `TcpRetransSegs` during the run.
    retransmitted: u64,
    /// The daemon's log.
    log: String,
}

/// A fault on the namespace's loopback, and how the relay is driven through it.
struct Fault {
    /// The namespace's name, also the pin directory's.
    name: &'static str,
    /// The nftables hook of the chain the rule goes in.
    hook: &'static str,
    rule: &'static str,
    /// `global.max_inflight`; `None` keeps the default bound.
    max_inflight: Option<&'static str>,
    /// How long the client waits before it reads the download.
    reader_stall: Duration,
    /// The least share of the bytes the kernel must have carried.
    min_kernel_share: f64,
}

#[test]
fn kernel_relay_loses_nothing_when_packets_are_dropped() -> Result<()> {
    let run = relay_through_faulty_loopback(&Fault {
        name: "lossy",
        hook: "input",
        // Data segments only (ACKs and handshakes pass), 5 in 100 at random.
        rule: "meta l4proto tcp meta length > 200 numgen random mod 100 < 5 drop",
        // Unbounded, as in the first trials by hand (architecture.md, "Bounded memory"):
        // every byte, retransmitted or not, goes through the verdict's read path. With the
        // default 4 MiB bound the client, on a clean leg, outruns the lossy leg to the
        // server, the direction is held, and the daemon relayed 11-28 % of the bytes
        // itself (measured), which this test is not about (memory.rs is).
        max_inflight: Some("0"),
        reader_stall: Duration::ZERO,
        min_kernel_share: 0.99,
    })?;
    ensure!(
        run.retransmitted > 0,
        "no segment was retransmitted: the loss rule did not act"
    );
    Ok(())
}

#[test]
fn kernel_relay_cuts_off_duplicated_bytes() -> Result<()> {
    let mut trimmed = 0;
    for _ in 0..DUPLICATION_ROUNDS {
        let run = relay_through_faulty_loopback(&Fault {
            name: "duplicated",
            hook: "prerouting",
            // A copy of 2 in 100 data segments, delivered again right behind the original.
            rule: "meta l4proto tcp meta length > 200 numgen random mod 100 < 2 dup to 127.0.0.1",
            // The default bound, and a client that reads the download only after a while:
            // the download is held, then the daemon reads the server's socket (its lock
            // taken) while segments arrive, which is when they are coalesced.
            max_inflight: None,
            reader_stall: Duration::from_secs(1),
            // Measured 50-94 %: the daemon relays what is held.
            min_kernel_share: 0.3,
        })?;
        trimmed += trimmed_bytes(&run.log);
    }
    // Whether a copy lands in the backlog right behind its original is up to timing
    // (measured: one round in four to six), so a run without any is reported, not failed.
    // The verdict before it cut them off failed this test in 3 runs of 3 (the ledger's
    // "source at kernel relay: relayed … (+65483)", a whole segment relayed twice).
    eprintln!(
        "in {DUPLICATION_ROUNDS} rounds the verdict cut off {trimmed} bytes handed to it a \
         second time"
    );
    Ok(())
}

/// Rounds of the duplication test.
const DUPLICATION_ROUNDS: usize = 5;

/// What the daemon logged it cut off, summed over its connections (logged when a pair is
/// released).
fn trimmed_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains("were cut off"))
        .flat_map(|line| {
            ["trimmed_client", "trimmed_server"]
                .map(|key| log_text(line, key).ok().and_then(|v| v.parse::<u64>().ok()))
        })
        .map(Option::unwrap_or_default)
        .sum()
}

/// Runs a 32 MiB upload and a 32 MiB download through the kernel relay in a namespace whose
/// loopback suffers `fault`, and checks both digests and that the kernel carried the bytes.
fn relay_through_faulty_loopback(fault: &Fault) -> Result<Run> {
    let Fault {
        name, hook, rule, ..
    } = *fault;
    let netns = Netns::create(name)?;
    netns.exec(&["nft", "add", "table", "ip", "fault"])?;
    netns.exec(&[
        "nft",
        &format!("add chain ip fault {hook} {{ type filter hook {hook} priority 0 ; }}"),
    ])?;
    netns.exec(&["nft", &format!("add rule ip fault {hook} {rule}")])?;
    netns.run(|| {
        let backend = Backend::spawn(|mut stream, _| {
            stream.write_all(BANNER.as_bytes())?;
            let received = digest_until_eof(&mut stream)?;
            send_pattern(&mut stream, 32, EACH_WAY)?;
            Ok(received)
        })?;
        let listen = mxlb_tests::free_addr();
        let pins = pin_path(name);
        let text = config(
            RelayKind::Kernel,
            &pins,
            listen,
            &[ServerEntry {
                name: "far",
                addr: backend.addr,
                send_proxy: "v1",
            }],
        );
        let text = match fault.max_inflight {
            Some(bound) => with_global_keys(&text, &format!("max_inflight = {bound}\n")),
            None => text,
        };
        let mxlb = Mxlb::start(&text, listen, &pins)?;
        let retransmitted_before = retransmitted_segments()?;

        let mut client = TcpStream::connect(listen)?;
        client.set_read_timeout(Some(TIMEOUT))?;
        ensure!(read_line(&mut client)? == BANNER);
        let sent = send_pattern(&mut client, 31, EACH_WAY)?;
        client.shutdown(Shutdown::Write)?;
        std::thread::sleep(fault.reader_stall);
        let downloaded = digest_until_eof(&mut client)?;
        let uploaded: Digest256 = backend.next_report(TIMEOUT)?;

        let retransmitted = retransmitted_segments()? - retransmitted_before;
        eprintln!("{retransmitted} segments retransmitted in the namespace");
        ensure!(
            uploaded == sent,
            "upload through the kernel relay: {uploaded:?}"
        );
        ensure!(
            downloaded == pattern_digest(32, EACH_WAY),
            "download through the kernel relay: {downloaded:?}"
        );
        // The connection stayed in the kernel: by the daemon's own count the verdict
        // redirected (almost) every byte of both transfers, so the retransmitted,
        // duplicated and out-of-order segments went through the kernel's read path, not
        // the daemon's.
        let finished = mxlb.finished_for(client.local_addr()?, TIMEOUT)?;
        let line = &finished.line;
        ensure!(
            finished.relay != "user" && finished.ended == "closed",
            "{line}"
        );
        ensure!(
            finished.bytes_in == EACH_WAY && finished.bytes_out == EACH_WAY + BANNER.len() as u64,
            "{line}"
        );
        eprintln!(
            "the kernel carried {} of {} bytes ({:.3}%)",
            finished.kernel_bytes,
            finished.total(),
            finished.kernel_share() * 100.0
        );
        ensure!(
            finished.kernel_share() >= fault.min_kernel_share,
            "the kernel carried less than {:.0}% of the bytes: {line}",
            fault.min_kernel_share * 100.0
        );
        // Dropping `mxlb` fails the test on any integrity error it logged.
        Ok(Run {
            retransmitted,
            log: mxlb.log(),
        })
    })
}
