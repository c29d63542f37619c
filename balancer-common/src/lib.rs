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
//! | [`TRAFFIC_MAP`] | `HASH` | eBPF verdict | [`Traffic`]: bytes redirected / passed |
//!
//! Two socket maps because they answer two questions. A socket in [`SOCKS_MAP`] has the
//! verdict on its receive path; a socket in [`PEERS_MAP`] can be sent to. Taking a socket out
//! of the first stops the kernel from reading it (its bytes wait in its own receive queue,
//! and TCP flow control slows the sender) while its peer can still send to it: that is how
//! the daemon pauses one direction without losing a byte of the other.
#![no_std]

/// The stream verdict program, as `bpftool prog show` names it.
pub const VERDICT_PROGRAM: &str = "mxlb_verdict";
/// SOCKHASH with the verdict attached: socket cookie -> that socket.
pub const SOCKS_MAP: &str = "mxlb_socks";
/// SOCKHASH without programs: socket cookie -> the peer socket the verdict redirects to.
pub const PEERS_MAP: &str = "mxlb_peers";
/// HASH: socket cookie -> [`Traffic`], counted by the verdict program.
pub const TRAFFIC_MAP: &str = "mxlb_traffic";
/// RINGBUF of [`Event`]s: "this socket's redirected bytes crossed another step".
pub const EVENTS_MAP: &str = "mxlb_events";
/// The program global (patched at load) holding the event step in bytes.
pub const EVENT_STEP_GLOBAL: &str = "MXLB_EVENT_STEP";

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
    unsafe impl aya::Pod for super::Event {}
}
