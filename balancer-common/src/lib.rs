//! Names and `#[repr(C)]` types shared by mxlb's eBPF program (`balancer-ebpf`) and its
//! daemon (`balancer-user`).
//!
//! The kernel relay keeps three maps, each keyed by a socket's cookie
//! (`SO_COOKIE`, unique for the lifetime of the host):
//!
//! | map | kind | written by | holds |
//! |---|---|---|---|
//! | [`SOCKS_MAP`] | `SOCKHASH` | daemon | the *peer* socket of the keyed socket |
//! | [`TRAFFIC_MAP`] | `HASH` | eBPF verdict | [`Traffic`]: bytes redirected / held |
//! | [`HANDOVER_MAP`] | `HASH` | daemon | [`Handover`]: held bytes user space forwarded |
//!
//! The two `HASH` maps are split by writer on purpose: a user-space map update replaces the
//! whole value, so a value both sides wrote would lose the other side's increments.
#![no_std]

/// The stream verdict program, as `bpftool prog show` names it.
pub const VERDICT_PROGRAM: &str = "mxlb_verdict";
/// SOCKHASH: socket cookie -> the peer socket the verdict redirects to.
pub const SOCKS_MAP: &str = "mxlb_socks";
/// HASH: socket cookie -> [`Traffic`], counted by the verdict program.
pub const TRAFFIC_MAP: &str = "mxlb_traffic";
/// HASH: socket cookie -> [`Handover`], written by the daemon.
pub const HANDOVER_MAP: &str = "mxlb_handover";
/// RINGBUF of [`Event`]s: "this socket's redirected bytes crossed another step".
pub const EVENTS_MAP: &str = "mxlb_events";
/// The program global (patched at load) holding the event step in bytes.
pub const EVENT_STEP_GLOBAL: &str = "MXLB_EVENT_STEP";

/// Default capacity of every map; the daemon resizes them at load time from
/// `global.maxconn` (two sockets per relayed connection).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// What the verdict program did with the bytes that arrived on one socket.
///
/// Bytes are *redirected* straight to the peer socket when the kernel path is open, and
/// *held* (verdict `SK_PASS`: they stay in this socket's own receive queue, where the daemon
/// reads them) when it is not: before the peer is paired, or while user space still owns
/// bytes of this direction. Every byte the socket received is counted exactly once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes handed to the peer socket's transmit path by the kernel.
    pub redirected: u64,
    /// Bytes left in this socket's receive queue for the daemon to forward.
    pub held: u64,
}

/// The daemon's side of the hand-over protocol for one socket.
///
/// The verdict redirects only while `forwarded == Traffic::held`: once a byte has been held,
/// every later byte is held too until the daemon has written all held bytes to the peer and
/// published the new total here. That keeps the byte order across the two paths.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// Held bytes the daemon has read from this socket and written to the peer.
    pub forwarded: u64,
    /// Non-zero: hold every byte, because the peer has fallen behind by more than
    /// `global.max_inflight`. Held bytes count against this socket's receive buffer, so the
    /// sender's TCP window closes: the backpressure the redirect path lacks.
    pub paused: u64,
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
    // SAFETY: both types are `repr(C)`, made only of `u64`s, with no padding.
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Handover {}
    unsafe impl aya::Pod for super::Event {}
}
