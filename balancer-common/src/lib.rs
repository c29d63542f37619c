//! Names and `#[repr(C)]` types shared by mxlb's eBPF program (`balancer-ebpf`) and its
//! daemon (`balancer-user`).
//!
//! The kernel relay keeps these maps, each keyed by a socket's cookie (`SO_COOKIE`, unique
//! for the lifetime of the host):
//!
//! | map | kind | written by | holds |
//! |---|---|---|---|
//! | [`SOCKS_MAP`] | `SOCKHASH`, verdict attached | daemon | the keyed socket itself, while the kernel relays what it receives |
//! | [`PEERS_MAP`] | `SOCKHASH`, no program | daemon | the keyed socket's *peer*: where the verdict sends its bytes |
//! | [`TRAFFIC_MAP`] | `HASH` | eBPF verdict | [`Traffic`]: bytes redirected / passed / held / trimmed, where the stream is |
//! | [`CONTROL_MAP`] | `HASH` | daemon | [`Control`]: hold this socket's bytes; how many held bytes the daemon relayed |
//! | [`EVENTS_MAP`] | `RINGBUF` | eBPF verdict | [`Event`]: a socket redirected another step of bytes |
//!
//! Two socket maps because they answer two questions. A socket in [`SOCKS_MAP`] has the
//! verdict on its receive path; a socket in [`PEERS_MAP`] can be sent to. A socket stays in
//! both for the whole kernel relay: taking one out of [`SOCKS_MAP`] while bytes arrive races
//! with a verdict run on another CPU, which then drops what it read (see
//! docs/architecture.md, "Hand-overs"). A direction is paused instead by [`CONTROL_MAP`]:
//! the verdict *holds* the socket's bytes in the socket itself (`SK_PASS`, charged to its
//! receive buffer, so TCP closes the window) until the daemon has relayed every held byte.
#![cfg_attr(not(test), no_std)]

/// The stream verdict program, as `bpftool prog show` names it.
pub const VERDICT_PROGRAM: &str = "mxlb_verdict";
/// SOCKHASH with the verdict attached: socket cookie -> that socket.
pub const SOCKS_MAP: &str = "mxlb_socks";
/// SOCKHASH without programs: socket cookie -> the peer socket the verdict redirects to.
pub const PEERS_MAP: &str = "mxlb_peers";
/// HASH: socket cookie -> [`Traffic`], counted by the verdict program.
pub const TRAFFIC_MAP: &str = "mxlb_traffic";
/// HASH: socket cookie -> [`Control`], written by the daemon to pause a direction.
pub const CONTROL_MAP: &str = "mxlb_control";
/// RINGBUF of [`Event`]s: "this socket's redirected bytes crossed another step".
pub const EVENTS_MAP: &str = "mxlb_events";
/// The program global (patched at load) holding the event step in bytes.
pub const EVENT_STEP_GLOBAL: &str = "MXLB_EVENT_STEP";
/// The program global (patched at load) holding where `copied_seq` lies in the kernel's
/// `struct tcp_sock`, in bytes; 0 if unknown.
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "MXLB_COPIED_SEQ_OFFSET";

/// Default capacity of every map; the daemon resizes them at load time from
/// `global.maxconn` (two sockets per relayed connection).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// What the verdict program did with the bytes that arrived on one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes handed to the peer socket's transmit path by the kernel.
    pub redirected: u64,
    /// Bytes with no peer to go to (the peer was reset or is being closed), left in this
    /// socket's own receive queue. Non-zero only while a connection is ending.
    pub passed: u64,
    /// Bytes held in this socket (not redirected) because the daemon paused the direction
    /// or had not yet relayed every byte held before; the daemon reads and relays them.
    pub held: u64,
    /// Bytes the kernel handed to the verdict a second time, at the head of a chunk, and
    /// the verdict cut off before relaying it (see [`stale_head`]). Counted nowhere else.
    pub trimmed: u64,
    /// The TCP sequence number just past the last chunk the verdict saw, once
    /// [`SEQ_KNOWN`] is set in `flags`.
    pub next_seq: u32,
    /// [`SEQ_KNOWN`], [`UNTRIMMABLE`].
    pub flags: u32,
}

/// [`Traffic::flags`]: `next_seq` holds the end of the last chunk seen.
pub const SEQ_KNOWN: u32 = 1;
/// [`Traffic::flags`]: a chunk began with bytes delivered before and the verdict could not
/// cut them off; it dropped the chunk, and the daemon must end the connection as an
/// integrity failure (both sides reset).
pub const UNTRIMMABLE: u32 = 2;

/// How many bytes at the head of a chunk of `len` bytes starting at TCP sequence `seq` the
/// socket has already delivered, when the previous chunk ended at `next_seq`: 0 for a chunk
/// that follows on (or, defensively, one after a gap), at most `len`.
///
/// TCP queues a segment that overlaps what it already received *untrimmed* (`seq <
/// rcv_nxt < end_seq`, `tcp_data_queue`); `tcp_recvmsg` skips the old part by offset, but
/// the verdict's read path (`tcp_read_skb`) hands the whole skb over. Such segments come
/// from a spurious retransmission coalesced with new data in the socket backlog (a full
/// MSS of old data at once) or a retransmission that overlaps the last received segment.
/// Relayed whole, their old bytes reach the peer twice.
pub fn stale_head(next_seq: u32, seq: u32, len: u32) -> u32 {
    // Sequence numbers wrap: compare by the signed distance, as TCP's `before()` does.
    let behind = next_seq.wrapping_sub(seq) as i32;
    if behind <= 0 {
        0
    } else {
        (behind as u32).min(len)
    }
}

/// The daemon's word on one socket's direction.
///
/// The verdict redirects a chunk only when `hold` is 0 *and* `released` equals
/// [`Traffic::held`]: every byte held so far has been read and written on by the daemon.
/// Otherwise it holds the chunk too, behind the others, so no redirected byte can overtake
/// a held one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Non-zero: hold this socket's bytes.
    pub hold: u64,
    /// Held bytes the daemon has read from this socket and fully written to its peer.
    pub released: u64,
}

/// A ring-buffer record: the socket with this cookie redirected another
/// `MXLB_EVENT_STEP` bytes, so the daemon should check how far its peer has fallen behind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub cookie: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are `repr(C)`, made of `u64`s (and in `Traffic`, two `u32`s at the
    // end that fill its last 8 bytes), with no padding.
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::stale_head;

    #[test]
    fn a_chunk_that_follows_on_has_no_stale_head() {
        assert_eq!(stale_head(1000, 1000, 500), 0);
    }

    #[test]
    fn a_retransmitted_mss_coalesced_with_new_data_is_cut_to_the_new_data() {
        // The case seen on loopback: a spurious retransmission of the last 65483-byte
        // segment, coalesced in the socket backlog with the next segment.
        let next = 5_000_000;
        assert_eq!(stale_head(next, next - 65_483, 65_483 + 65_483), 65_483);
        // Partly overlapping retransmission.
        assert_eq!(stale_head(next, next - 100, 1000), 100);
    }

    #[test]
    fn a_wholly_old_chunk_is_cut_entirely() {
        assert_eq!(stale_head(10_000, 5_000, 3_000), 3_000);
        assert_eq!(stale_head(10_000, 5_000, 5_000), 5_000);
    }

    #[test]
    fn a_gap_is_not_a_stale_head() {
        assert_eq!(stale_head(1000, 2000, 500), 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        // The previous chunk ended just after the wrap; this one starts before it.
        assert_eq!(stale_head(10, u32::MAX - 9, 100), 20);
        // Follows on across the wrap.
        assert_eq!(stale_head(u32::MAX - 9, u32::MAX - 9, 100), 0);
        // A gap across the wrap.
        assert_eq!(stale_head(u32::MAX - 9, 5, 100), 0);
    }
}
