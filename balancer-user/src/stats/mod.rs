//! The statistics listener (`[stats] bind`): an HTML page, `/api/stats` (JSON),
//! `/metrics` (Prometheus text) and the admin API, all from one [`StatsSnapshot`].
//!
//! - [`model`]: the snapshot and the [`StatsSource`] trait the daemon implements.
//! - [`http`]: the routes, admin authentication, and serving until stopped.
//! - [`html`] and [`prometheus`]: the two renderings of a snapshot.

pub mod html;
pub mod http;
pub mod model;
pub mod prometheus;

pub use http::{router, serve};
pub use model::{
    AdminError, AdminState, ListenerStats, RefusedLimits, ServerStats, StatsSnapshot, StatsSource,
};
