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
//! | [`TRAFFIC_MAP`] | `HASH` | eBPF verdict | [`Traffic`]: bytes redirected / passed / held |
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
#![no_std]

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
    // SAFETY: both types are `repr(C)`, made only of `u64`s, with no padding.
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::Event {}
}
