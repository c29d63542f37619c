//! SIGHUP: read the configuration file again and apply it in place. Listeners, servers
//! and limits change at once; connections already relayed (in the kernel or not) are not
//! touched. A file that does not parse, or an address that cannot be bound, leaves the
//! running configuration as it was.
//!
//! Some `[global]` keys and the `[stats]` section shape the process itself (the relay and
//! its kernel maps and program, the log format, the runtime's threads, the stats socket);
//! a reload that changes them warns and keeps the running values until the next restart.
//! `maxconn`, `grace` and `kernel_relay_after` change at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Config, Global};
use crate::limits::Gauge;
use crate::listeners::Listeners;
use crate::relay::Relay;

/// Reloads so far, by outcome, for the stats.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ReloadCounters {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The running configuration and where it came from.
pub struct Reloader {
    /// `None` for `mxlb demo`, whose configuration is built in.
    path: Option<PathBuf>,
    running: Config,
    /// `running`, for the stats thread (`GET /api/config`).
    published: watch::Sender<Arc<Config>>,
    pub counters: Arc<ReloadCounters>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, running: Config) -> Reloader {
        let (published, _) = watch::channel(Arc::new(running.clone()));
        Reloader {
            path,
            running,
            published,
            counters: Arc::default(),
        }
    }

    /// The configuration in force, kept up to date across reloads.
    pub fn watch(&self) -> watch::Receiver<Arc<Config>> {
        self.published.subscribe()
    }

    /// The configuration in force (for `global.grace` at shutdown).
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Reads the file again and applies it; logs the outcome either way and returns it in
    /// a few words (systemd's status line).
    pub fn reload(
        &mut self,
        listeners: &mut Listeners,
        connections: &Gauge,
        relay: &Relay,
    ) -> &'static str {
        let Some(path) = self.path.clone() else {
            warn!("SIGHUP received: the demo's configuration is built in; nothing to reload");
            return "serving (the demo has nothing to reload)";
        };
        info!(path = %path.display(), "SIGHUP received: reloading the configuration");
        match self.apply(&path, listeners, connections, relay) {
            Ok(summary) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                info!(path = %path.display(), "configuration reloaded: {summary}");
                "serving (configuration reloaded)"
            }
            Err(error) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                error!(
                    path = %path.display(),
                    "reload failed, the running configuration stays: {error:#}"
                );
                "serving (the last reload failed; see the log)"
            }
        }
    }

    fn apply(
        &mut self,
        path: &std::path::Path,
        listeners: &mut Listeners,
        connections: &Gauge,
        relay: &Relay,
    ) -> anyhow::Result<String> {
        // The parse error already names file:line:col.
        let mut next = Config::load(path).map_err(|error| anyhow::anyhow!("{error}"))?;
        for key in restart_only_changes(&self.running.global, &next.global) {
            warn!("{key} changed: takes effect at the next restart; the running value stays");
        }
        if next.stats != self.running.stats {
            warn!("[stats] changed: takes effect at the next restart; the running one stays");
        }
        keep_restart_only(&self.running, &mut next);
        let changes = listeners
            .reload(&next.listeners)
            .context("applying the listeners")?;
        if next.global.maxconn != self.running.global.maxconn {
            connections.set_limit(next.global.maxconn);
            crate::daemon::raise_fd_limit(next.global.maxconn);
        }
        relay.set_kernel_relay_after(next.global.kernel_relay_after);
        self.running = next;
        self.published.send_replace(Arc::new(self.running.clone()));
        Ok(changes.to_string())
    }
}

/// The `[global]` keys a reload cannot apply that differ between `running` and `next`.
pub fn restart_only_changes(running: &Global, next: &Global) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("global.pin_path", running.pin_path != next.pin_path);
    check("global.relay", running.relay != next.relay);
    check("global.log_format", running.log_format != next.log_format);
    check(
        "global.max_inflight",
        running.max_inflight != next.max_inflight,
    );
    check("global.threads", running.threads != next.threads);
    // Root, once given up, cannot be had back.
    check("global.user", running.user != next.user);
    // The running daemon listens there; `mxlb upgrade` is how a new path takes effect.
    check(
        "global.upgrade_socket",
        running.upgrade_socket != next.upgrade_socket,
    );
    // The log's writer is set up once, at start (as `log_format`).
    check("global.log_target", running.log_target != next.log_target);
    changed
}

/// Puts the running values of the restart-only settings into `next`, so the running
/// configuration says what is in force and the next reload compares against it.
fn keep_restart_only(running: &Config, next: &mut Config) {
    let global = &running.global;
    next.global = Global {
        maxconn: next.global.maxconn,
        grace: next.global.grace,
        kernel_relay_after: next.global.kernel_relay_after,
        // New sessions' idle-timeout reply has the new name (syslog's keeps the old one).
        hostname: next.global.hostname.clone(),
        ..global.clone()
    };
    next.stats.clone_from(&running.stats);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, RelayMode};

    #[test]
    fn only_the_process_wide_keys_need_a_restart() {
        let running = Global::default();
        let live = Global {
            maxconn: 7,
            grace: std::time::Duration::from_secs(1),
            kernel_relay_after: 0,
            hostname: Some("mx2.example.com".into()),
            ..Global::default()
        };
        assert!(restart_only_changes(&running, &live).is_empty());
        let restart = Global {
            relay: RelayMode::Sockmap,
            log_format: LogFormat::Json,
            max_inflight: 1 << 20,
            upgrade_socket: Some("/run/mxlb/upgrade.sock".into()),
            log_target: crate::config::LogTarget::Syslog(crate::config::Syslog {
                socket: "/dev/log".into(),
                facility: crate::config::Facility::Mail,
                format: crate::config::SyslogFormat::Rfc5424,
            }),
            ..Global::default()
        };
        assert_eq!(
            restart_only_changes(&running, &restart),
            [
                "global.relay",
                "global.log_format",
                "global.max_inflight",
                "global.upgrade_socket",
                "global.log_target"
            ]
        );
    }

    #[test]
    fn the_running_configuration_keeps_what_a_reload_cannot_change() {
        let running = Config::parse(
            "[global]\nrelay = \"userspace\"\nmaxconn = 10\n\
             [stats]\nbind = \"127.0.0.1:8404\"\n\
             [[listen]]\nname = \"a\"\nbind = [\"127.0.0.1:2525\"]\n\
             [[listen.server]]\nname = \"s\"\naddr = \"127.0.0.1:25\"\n",
            "running.toml",
        )
        .expect("valid");
        let mut next = Config::parse(
            "[global]\nrelay = \"sockmap\"\nmaxconn = 20\n\
             [[listen]]\nname = \"b\"\nbind = [\"127.0.0.1:2526\"]\n\
             [[listen.server]]\nname = \"t\"\naddr = \"127.0.0.1:26\"\n",
            "next.toml",
        )
        .expect("valid");
        keep_restart_only(&running, &mut next);
        assert_eq!(next.global.relay, RelayMode::Userspace);
        assert_eq!(next.global.maxconn, 20);
        assert_eq!(next.stats, running.stats);
        assert_eq!(next.listeners[0].name, "b");
    }
}
