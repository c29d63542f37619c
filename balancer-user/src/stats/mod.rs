//! The statistics listener (`[stats] bind`): an HTML page, `/api/stats` (JSON),
//! `/metrics` (Prometheus text) and the admin API, all from one [`StatsSnapshot`].
//!
//! - [`model`]: the snapshot and the [`StatsSource`] trait the daemon implements.
//! - [`http`]: the routes and admin authentication.
//! - [`server`]: serving the port within its limits (connection cap, timeouts, sizes).
//! - [`cache`]: the snapshot shared between requests, rebuilt on a budget.
//! - [`html`] and [`prometheus`]: the two renderings of a snapshot.
//! - [`units`]: bytes and durations in human units, shared with `mxlb status`.

pub mod cache;
pub mod html;
pub mod http;
pub mod model;
pub mod prometheus;
pub mod server;
pub mod units;

pub use http::router;
pub use model::{
    AdminError, AdminState, ListenerStats, RefusedLimits, ServerStats, StatsSnapshot, StatsSource,
};
pub use server::{Limits, PortCounters, PortStats, serve};
