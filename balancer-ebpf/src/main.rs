//! mxlb's kernel relay.
//!
//! One stream verdict program, attached to the `mxlb_socks` SOCKHASH in verdict-only mode
//! (no stream parser). For every chunk of bytes a socket in `mxlb_socks` receives, it looks
//! up the socket's peer in `mxlb_peers` under the socket's own cookie and redirects the
//! chunk out of that peer, counting the bytes, unless the daemon asked it to hold the
//! socket's bytes (`mxlb_control`). Before that, it cuts off bytes the socket delivered
//! before that TCP handed over again at the head of a chunk (an overlapping retransmission
//! queued untrimmed; `balancer_common::stale_head`). Policy (who is paired, when a direction
//! pauses) lives in user space; this stays small on purpose.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::sk_action::{SK_DROP, SK_PASS},
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use balancer_common::{
    Control, DEFAULT_MAX_SOCKETS, Event, SEQ_KNOWN, Traffic, UNTRIMMABLE, stale_head,
};

/// The sockets whose receive path runs this program (it is attached to this map); the
/// program itself never reads it.
#[map(name = "mxlb_socks")]
static MXLB_SOCKS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "mxlb_peers")]
static MXLB_PEERS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "mxlb_traffic")]
static MXLB_TRAFFIC: HashMap<u64, Traffic> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "mxlb_control")]
static MXLB_CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map(name = "mxlb_events")]
static MXLB_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Bytes between two events of one socket; the daemon patches it at load from
/// `global.max_inflight`. Zero turns events off.
#[unsafe(no_mangle)]
static MXLB_EVENT_STEP: Global<u64> = Global::new(0);

/// Where `copied_seq` lies in the running kernel's `struct tcp_sock`, in bytes; the daemon
/// patches it at load from the kernel's BTF. Zero: unknown, the first chunk after an insert
/// is not checked for a stale head.
#[unsafe(no_mangle)]
static MXLB_COPIED_SEQ_OFFSET: Global<u32> = Global::new(0);

#[stream_verdict]
pub fn mxlb_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the skb's socket.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // The peer's FIN arrives as an empty segment; TCP has already recorded the
        // shutdown, which is what the daemon's read reports as EOF. Redirected, the kernel
        // would send zero bytes on the peer and take that for a broken pipe; passed while
        // the socket's queue is busy, the same happens on this socket's own backlog, which
        // then stops for good. Dropping it carries no data.
        return SK_DROP;
    }

    // A socket the daemon has not (or no longer) registered: leave its bytes to the daemon.
    let Some(traffic) = MXLB_TRAFFIC.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: the pointer is valid for this program run. Runs for one socket are serialised
    // by the socket lock, and the daemon never rewrites this value, only reads it.
    let traffic = unsafe { &mut *traffic };
    if traffic.flags & UNTRIMMABLE != 0 {
        // The stream already has a hole: relaying more could hand the server the end of a
        // message that lacks bytes before the daemon resets both sides.
        return SK_DROP;
    }

    // The chunk's TCP sequence range: an sk_skb program's `cb[0..2]` is the start of the
    // skb's control block, where TCP keeps `seq` and `end_seq` (`struct tcp_skb_cb`).
    let (seq, end_seq) = {
        let cb = ctx.skb.cb();
        (cb[0], cb[1])
    };
    // Trust the control block only where it describes this chunk (its span is the chunk's
    // length, one more with a FIN): on a kernel that keeps something else there, nothing is
    // cut, and the ledger alone guards the stream.
    let span = end_seq.wrapping_sub(seq);
    let stale = if span == len as u32 || span == len as u32 + 1 {
        // Where the stream stood before this chunk: the end of the last chunk this program
        // saw, or for the first one after the insert, what user space had read. (Plain
        // integers, not an Option: the verifier rejects the undefined payload LLVM may
        // read for a None.)
        let (known, delivered) = if traffic.flags & SEQ_KNOWN != 0 {
            (true, traffic.next_seq)
        } else {
            read_by_user_space(&ctx)
        };
        // Only forwards: a chunk wholly behind (cut to nothing below) must not pull the
        // mark back, or the next new chunk would look stale.
        if traffic.flags & SEQ_KNOWN == 0 || (end_seq.wrapping_sub(traffic.next_seq) as i32) > 0 {
            traffic.next_seq = end_seq;
        }
        traffic.flags |= SEQ_KNOWN;
        if known {
            stale_head(delivered, seq, len as u32)
        } else {
            0
        }
    } else {
        0
    };
    if stale > 0 {
        // Bytes this socket delivered before, handed over again (a retransmission TCP
        // queued untrimmed): cut them off, so they are neither relayed twice nor counted.
        if !trim_head(&ctx, stale) {
            traffic.flags |= UNTRIMMABLE;
            let _ = MXLB_EVENTS.output::<Event>(Event { cookie }, 0);
            return SK_DROP;
        }
        traffic.trimmed += u64::from(stale);
        debug!(
            &ctx,
            "mxlb: socket {} got {} bytes again, cut off", cookie, stale
        );
    }
    let len = u64::from(ctx.len());
    if len == 0 {
        // Wholly old: nothing left to relay. Dropping an empty skb moves no counter.
        return SK_DROP;
    }

    // Paused, or the daemon has not yet relayed every byte held before: hold this chunk
    // too. SK_PASS queues it on the socket's own psock, charged to its receive buffer, so
    // TCP closes the window; the daemon reads it from there in order.
    // SAFETY: the daemon replaces the value whole; a run sees the old or the new one.
    let (hold, released) = match unsafe { MXLB_CONTROL.get(cookie) } {
        Some(control) => (control.hold != 0, control.released),
        None => (false, 0),
    };
    if hold || traffic.held != released {
        traffic.held += len;
        return SK_PASS;
    }

    if MXLB_PEERS.redirect_skb(&ctx, &mut cookie, 0) == i64::from(SK_PASS) {
        let before = traffic.redirected;
        traffic.redirected += len;
        if before == 0 {
            debug!(&ctx, "mxlb: socket {} relaying in the kernel", cookie);
        }
        let step = MXLB_EVENT_STEP.load();
        if step != 0 && before / step != traffic.redirected / step {
            // Best effort: a full ring only delays the daemon's look until the next step.
            let _ = MXLB_EVENTS.output::<Event>(Event { cookie }, 0);
        }
        return SK_PASS;
    }

    // No peer under our cookie: the peer was reset (which takes it out of the maps) or the
    // daemon is closing the pair. Leave the bytes in this socket; the daemon sees them.
    traffic.passed += len;
    debug!(
        &ctx,
        "mxlb: no peer for cookie {}, passing {} bytes", cookie, len
    );
    SK_PASS
}

/// The socket's `copied_seq`: the next byte its reader takes. Before this program has taken
/// any chunk of the socket, that is where user space stopped reading. `(false, 0)` if
/// unknown.
fn read_by_user_space(ctx: &SkBuffContext) -> (bool, u32) {
    let offset = MXLB_COPIED_SEQ_OFFSET.load();
    if offset == 0 {
        return (false, 0);
    }
    // SAFETY: reading the skb's socket pointer from the context, which the verifier allows.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return (false, 0);
    }
    // SAFETY: the helper checks that the socket is a TCP one, or returns null.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast::<c_void>()) };
    if tcp.is_null() {
        return (false, 0);
    }
    // SAFETY: a 4-byte read inside `struct tcp_sock`, at the offset the kernel's BTF gives;
    // the helper fails cleanly rather than fault.
    match unsafe { bpf_probe_read_kernel(tcp.cast::<u8>().add(offset as usize).cast::<u32>()) } {
        Ok(copied_seq) => (true, copied_seq),
        Err(_) => (false, 0),
    }
}

/// The most `bpf_skb_adjust_room` removes from an sk_skb at once.
const TRIM_STEP: u32 = 0xfff;
/// Enough steps for 256 KiB, beyond any skb TCP queues here (64 KiB on loopback, GRO
/// packets on a NIC); a larger stale head is reported instead (`UNTRIMMABLE`).
const TRIM_STEPS: u32 = 64;

/// Removes `bytes` from the front of the chunk; false if that failed (then part of them may
/// be gone already).
fn trim_head(ctx: &SkBuffContext, bytes: u32) -> bool {
    // Loopback and GRO skbs keep their bytes in page fragments: each removal step would
    // otherwise pull into a freshly allocated, ever larger head and copy it all again. One
    // pull makes the stale bytes linear at once; the steps below then only move `data`.
    // If it fails, the steps may still succeed on their own.
    let _ = ctx.pull_data(bytes);
    let mut left = bytes;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            return true;
        }
        let step = if left > TRIM_STEP { TRIM_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        left -= step;
    }
    left == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects programs that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
