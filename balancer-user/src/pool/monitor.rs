//! The health monitor of one server: check, record, wait the interval its state calls for.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Pool, ServerRuntime};
use crate::config::Listener;
use crate::health::{CheckSpec, run_check};
use crate::stats::AdminState;

/// The check intervals of a listener.
#[derive(Clone, Copy)]
struct Intervals {
    inter: Duration,
    fastinter: Duration,
    downinter: Duration,
}

/// Starts a monitor for every checked server of `pool`.
pub(super) fn start(pool: &Arc<Pool>, listener: &Listener, stop: &CancellationToken) {
    let intervals = Intervals {
        inter: listener.check.inter,
        fastinter: listener.check.fastinter,
        downinter: listener.check.downinter,
    };
    let count = pool.servers.len().max(1) as u32;
    for (index, server) in pool.servers.iter().enumerate() {
        let Some(spec) = server.check.clone() else {
            continue;
        };
        // Spread the first checks over one interval, as HAProxy does, so servers are not
        // all checked in the same instant.
        let first = intervals.inter * index as u32 / count;
        tokio::spawn(monitor(
            pool.clone(),
            server.clone(),
            spec,
            intervals,
            first,
            stop.clone(),
        ));
    }
}

async fn monitor(
    pool: Arc<Pool>,
    server: Arc<ServerRuntime>,
    spec: CheckSpec,
    intervals: Intervals,
    first: Duration,
    stop: CancellationToken,
) {
    let mut wait = first;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // Maintenance takes the server out of checks too: look again an interval later.
        if server.admin_state() == AdminState::Maint {
            wait = intervals.inter;
            continue;
        }
        let result = run_check(&spec, server.config.addr).await;
        tracing::trace!(server = %server.config.name, "check {result}");
        pool.record_check(&server, result);
        wait = server.next_check_in(intervals.inter, intervals.fastinter, intervals.downinter);
    }
}
