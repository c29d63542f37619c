//! The statistics listener (`[stats] bind`): an HTML page, `/api/stats` (JSON),
//! `/metrics` (Prometheus text) and the admin API, all from one [`StatsSnapshot`].

pub mod model;

pub use model::{AdminError, AdminState, ListenerStats, ServerStats, StatsSnapshot, StatsSource};
