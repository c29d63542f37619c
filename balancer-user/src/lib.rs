//! mxlb: a load balancer for inbound SMTP that relays mail in the kernel.
//!
//! The data path, in the order a connection meets it:
//!
//! - [`daemon`]: binds the listeners, accepts, and stops gracefully on SIGTERM/SIGINT.
//! - [`limits`]: whether a new client may be served (`maxconn` at every level, per-source
//!   concurrency and rate); over a limit it gets `421 4.7.0` and a clean close.
//! - [`session`]: one client: [`balance`] picks a server, connect (with retries), write the
//!   [`proxy_header`], hand the pair to the [`relay`], log one line when it ends.
//! - [`relay`]: moves the bytes. The kernel relay pairs the two sockets in an eBPF SOCKHASH
//!   (program in `balancer-ebpf`, shared types in `balancer-common`) and only watches for
//!   a peer falling behind, half-close and teardown; the user-space relay copies.
//!
//! Beside it: [`config`] (TOML into validated types, errors with file:line:col),
//! [`logging`], [`sockopt`] (the socket facts the kernel relay needs) and [`demo`] (two
//! built-in PROXY-speaking backends for `mxlb demo`).

pub mod accept;
pub mod accept_proxy;
pub mod balance;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod health;
pub mod import_haproxy;
pub mod limits;
pub mod listeners;
pub mod logging;
pub mod notify;
pub mod pool;
pub mod privilege;
pub mod proxy_header;
pub mod relay;
pub mod reload;
pub mod running_config;
pub mod secret_file;
pub mod session;
pub mod session_register;
pub mod sockopt;
pub mod stats;
#[cfg(test)]
mod test_support;
pub mod upgrade;
pub mod upstreams;
