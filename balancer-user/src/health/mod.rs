//! Health checks: is a server fit to take mail?
//!
//! The pieces, from the wire up:
//!
//! - [`reply`]: parses SMTP replies (multi-line, strict, bounded), never panicking on
//!   what a server sends.
//! - [`check`]: one check of one server, like HAProxy's `option smtpchk`: connect, PROXY
//!   header if the server wants one, banner, HELO/EHLO, QUIT, clean close; or a bare TCP
//!   connect. It yields a [`CheckResult`].
//! - [`status`]: HAProxy's vocabulary for results (`L4CON`, `L7STS/421 in 3ms`, …), shared
//!   by checks, the stats page and logs.
//! - [`state`]: rise/fall hysteresis that turns results into UP/DOWN transitions and
//!   picks the interval before the next check (`inter`, `fastinter`, `downinter`).
//!
//! The scheduler that runs a check per server and publishes state lives with the daemon;
//! everything here is usable on its own and tested in isolation.

pub mod check;
pub mod reply;
pub mod state;
pub mod status;

pub use check::{CheckSpec, run_check};
pub use reply::{Reply, ReplyParse, ReplyParser, parse_reply};
pub use state::{HealthState, Transition};
pub use status::{CheckResult, CheckStatus};
