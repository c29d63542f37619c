//! The running listeners: their bound sockets, accept loops and health monitors, and how a
//! reloaded configuration takes their place without dropping a connection.
//!
//! Each configuration is a generation: one [`Frontend`] per listener, one accept loop per
//! bound address, one health monitor per checked server, all stopped by the generation's
//! token. A reload binds the addresses that are new first (if one fails, nothing changes),
//! then builds the new frontends on the old ones' state (health, admin states, counters,
//! open sessions: [`Frontend::reconfigured`]), starts the new generation on the same
//! sockets and stops the old one. Clients that arrive meanwhile wait in the socket's
//! accept queue; sessions already running keep the frontend they started with.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accept::{accept_loop, bind, listen_backlog, set_backlog};
use crate::config::{Listener, SendProxy, Server};
use crate::limits::Gauge;
use crate::pool::{ServerRuntime, same_server};
use crate::relay::Relay;
use crate::session::Frontend;
use crate::upgrade::Inherited;

/// Every listener of the running configuration.
pub struct Listeners {
    relay: Relay,
    /// Client connections over all listeners, against `global.maxconn`.
    connections: Arc<Gauge>,
    sessions: TaskTracker,
    stop: CancellationToken,
    /// Bound sockets by address, kept across reloads while a listener binds the address.
    sockets: HashMap<SocketAddr, Arc<TcpListener>>,
    generation: Generation,
    /// The current frontends, for the stats and the admin API.
    current: watch::Sender<Vec<Arc<Frontend>>>,
}

/// One configuration's frontends and the tasks that serve them.
struct Generation {
    frontends: Vec<Arc<Frontend>>,
    /// Stops this generation's accept loops and health monitors.
    token: CancellationToken,
    acceptors: Vec<JoinHandle<()>>,
}

/// What a reload changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub addresses_bound: Vec<SocketAddr>,
    pub addresses_closed: Vec<SocketAddr>,
    /// `listener/server`, for servers that start afresh (new name or new address).
    pub servers_added: Vec<String>,
    /// `listener/server`, for servers that are gone (or moved to another address).
    pub servers_removed: Vec<String>,
    /// `listener/server: what changed`, for servers that stay with other settings.
    pub servers_changed: Vec<String>,
}

impl Listeners {
    /// Binds every listener's addresses; [`Listeners::serve`] starts accepting on them.
    /// Addresses `inherited` holds (an upgrade: the running daemon's sockets) are served on
    /// those sockets, with their accept queues, rather than bound anew.
    pub fn start(
        listeners: &[Listener],
        relay: Relay,
        connections: Arc<Gauge>,
        sessions: TaskTracker,
        stop: CancellationToken,
        mut inherited: Option<&mut Inherited>,
    ) -> anyhow::Result<Listeners> {
        let sockets = bind_new(listeners, &HashMap::new(), &mut |addr| {
            inherited.as_mut()?.take_listener(addr)
        })?;
        for listener in listeners {
            for addr in &listener.bind {
                info!(listener = %listener.name, %addr, servers = listener.servers.len(), "listening");
            }
            if listener.accept_proxy && listener.accept_proxy_from.is_none() {
                warn!(
                    listener = %listener.name,
                    "accept_proxy without accept_proxy_from: any peer that reaches this \
                     listener can claim any client address; list the upstream balancers"
                );
            }
        }
        let frontends = listeners
            .iter()
            .map(|listener| {
                Arc::new(Frontend::new(
                    listener.clone(),
                    relay.clone(),
                    connections.clone(),
                ))
            })
            .collect();
        let (current, _) = watch::channel(Vec::new());
        Ok(Listeners {
            relay,
            connections,
            sessions,
            // Not running yet: no accept loop, no health monitor.
            generation: Generation {
                frontends,
                token: stop.child_token(),
                acceptors: Vec::new(),
            },
            stop,
            sockets,
            current,
        })
    }

    /// Starts accepting on the bound sockets (and checking the servers): the last step of
    /// the daemon's start, after everything that can fail, so that a start that fails
    /// (an upgrade, whose sockets the old daemon still serves) has taken no client.
    pub fn serve(&mut self) {
        let frontends = std::mem::take(&mut self.generation.frontends);
        self.generation = self.launch(frontends);
    }

    /// The current frontends, following reloads.
    pub fn watch(&self) -> watch::Receiver<Vec<Arc<Frontend>>> {
        self.current.subscribe()
    }

    /// Replaces the running listeners with `listeners`. On an error (an address that
    /// cannot be bound) nothing has changed.
    pub fn reload(&mut self, listeners: &[Listener]) -> anyhow::Result<Changes> {
        let fresh = bind_new(listeners, &self.sockets, &mut |_| None)?;
        let mut changes = Changes::default();
        let frontends = self.next_frontends(listeners, &mut changes);
        self.keep_wanted_sockets(listeners, fresh, &mut changes);
        let next = self.launch(frontends);
        let previous = std::mem::replace(&mut self.generation, next);
        previous.token.cancel();
        Ok(changes)
    }

    /// The frontends of `listeners`, each built on the running one of the same name.
    fn next_frontends(&self, listeners: &[Listener], changes: &mut Changes) -> Vec<Arc<Frontend>> {
        let old = &self.generation.frontends;
        let frontends = listeners
            .iter()
            .map(|listener| {
                let before = old.iter().find(|f| f.config.name == listener.name);
                let frontend = match before {
                    Some(before) => before.reconfigured(listener.clone()),
                    None => {
                        changes.listeners_added.push(listener.name.clone());
                        Frontend::new(
                            listener.clone(),
                            self.relay.clone(),
                            self.connections.clone(),
                        )
                    }
                };
                changes.note_servers(before.map(AsRef::as_ref), Some(&frontend));
                Arc::new(frontend)
            })
            .collect();
        for gone in old
            .iter()
            .filter(|f| !listeners.iter().any(|l| l.name == f.config.name))
        {
            changes.listeners_removed.push(gone.config.name.clone());
            changes.note_servers(Some(gone), None);
        }
        frontends
    }

    /// Keeps the sockets `listeners` still bind (with the new accept queue size), adds the
    /// `fresh` ones, and lets the rest go: they close once the old loops have let go of
    /// them.
    fn keep_wanted_sockets(
        &mut self,
        listeners: &[Listener],
        fresh: HashMap<SocketAddr, Arc<TcpListener>>,
        changes: &mut Changes,
    ) {
        let wanted: BTreeSet<SocketAddr> = listeners.iter().flat_map(|l| l.bind.clone()).collect();
        changes.addresses_bound = fresh.keys().copied().collect();
        changes.addresses_bound.sort();
        self.sockets.retain(|addr, _| {
            let keep = wanted.contains(addr);
            if !keep {
                changes.addresses_closed.push(*addr);
            }
            keep
        });
        changes.addresses_closed.sort();
        for listener in listeners {
            for addr in &listener.bind {
                if let Some(socket) = self.sockets.get(addr)
                    && let Err(error) = set_backlog(socket, listen_backlog(listener.maxconn))
                {
                    // The old queue keeps working; not worth failing the reload for.
                    warn!(listener = %listener.name, %addr, %error, "cannot resize the accept queue");
                }
            }
        }
        self.sockets.extend(fresh);
    }

    /// Starts a generation for `frontends` on the bound sockets, and publishes it.
    fn launch(&self, frontends: Vec<Arc<Frontend>>) -> Generation {
        let token = self.stop.child_token();
        let mut acceptors = Vec::new();
        for frontend in &frontends {
            frontend.pool.start_monitors(&frontend.config, &token);
            for addr in &frontend.config.bind {
                let Some(socket) = self.sockets.get(addr) else {
                    continue;
                };
                acceptors.push(tokio::spawn(accept_loop(
                    socket.clone(),
                    *addr,
                    frontend.clone(),
                    self.sessions.clone(),
                    token.clone(),
                )));
            }
        }
        self.current.send_replace(frontends.clone());
        Generation {
            frontends,
            token,
            acceptors,
        }
    }

    /// Copies of the listening sockets, each with its address, for a daemon taking over
    /// ([`crate::upgrade`]).
    pub fn listening_sockets(&self) -> std::io::Result<Vec<(SocketAddr, OwnedFd)>> {
        self.sockets
            .iter()
            .map(|(addr, socket)| Ok((*addr, socket.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    /// Stops accepting on every listener and waits until every accept loop has ended.
    pub async fn stop_accepting(&mut self) {
        self.generation.token.cancel();
        for acceptor in self.generation.acceptors.drain(..) {
            let _ = acceptor.await;
        }
        self.sockets.clear();
    }
}

/// Binds the addresses of `listeners` that `bound` does not hold yet, or takes the socket
/// `adopt` has for one. All or nothing: on an error the sockets bound so far are closed
/// again.
fn bind_new(
    listeners: &[Listener],
    bound: &HashMap<SocketAddr, Arc<TcpListener>>,
    adopt: &mut dyn FnMut(SocketAddr) -> Option<std::net::TcpListener>,
) -> anyhow::Result<HashMap<SocketAddr, Arc<TcpListener>>> {
    let mut fresh = HashMap::new();
    for listener in listeners {
        for &addr in &listener.bind {
            if bound.contains_key(&addr) || fresh.contains_key(&addr) {
                continue;
            }
            let backlog = listen_backlog(listener.maxconn);
            let socket = match adopt(addr) {
                Some(socket) => {
                    info!(listener = %listener.name, %addr, "serving the socket taken over");
                    adopted(socket, backlog)
                }
                None => bind(addr, backlog),
            }
            .with_context(|| format!("listener {}: binding {addr}", listener.name))?;
            fresh.insert(addr, Arc::new(socket));
        }
    }
    Ok(fresh)
}

/// A listening socket taken over, with this configuration's accept queue size (the
/// connections already queued stay queued).
fn adopted(socket: std::net::TcpListener, backlog: u32) -> std::io::Result<TcpListener> {
    socket.set_nonblocking(true)?;
    let socket = TcpListener::from_std(socket)?;
    set_backlog(&socket, backlog)?;
    Ok(socket)
}

impl Changes {
    /// Servers of `after` that start afresh and servers of `before` that are gone, where
    /// a server is the same when its name and address are.
    fn note_servers(&mut self, before: Option<&Frontend>, after: Option<&Frontend>) {
        let Some(listener) = after.or(before).map(|f| &f.config.name) else {
            return;
        };
        let (old, new) = (servers_of(before), servers_of(after));
        // `listener/server` for each server of `of` that `against` has no continuation of.
        let unmatched = |of: &[Arc<ServerRuntime>], against: &[Arc<ServerRuntime>]| {
            of.iter()
                .filter(|s| !against.iter().any(|t| same_server(&s.config, &t.config)))
                .map(|s| format!("{listener}/{}", s.config.name))
                .collect::<Vec<_>>()
        };
        self.servers_added.extend(unmatched(new, old));
        self.servers_removed.extend(unmatched(old, new));
        for after in new {
            let Some(before) = old.iter().find(|s| same_server(&s.config, &after.config)) else {
                continue;
            };
            let changed = server_changes(&before.config, &after.config);
            if !changed.is_empty() {
                let name = &after.config.name;
                self.servers_changed
                    .push(format!("{listener}/{name}: {}", changed.join(", ")));
            }
        }
    }
}

/// What differs between two configurations of the same server, as `key old→new`.
fn server_changes(before: &Server, after: &Server) -> Vec<String> {
    let mut changed = Vec::new();
    let mut compare = |key: &str, old: String, new: String| {
        if old != new {
            changed.push(format!("{key} {old}\u{2192}{new}"));
        }
    };
    compare(
        "weight",
        before.weight.to_string(),
        after.weight.to_string(),
    );
    compare(
        "backup",
        before.backup.to_string(),
        after.backup.to_string(),
    );
    compare("check", before.check.to_string(), after.check.to_string());
    compare(
        "maxconn",
        before.maxconn.to_string(),
        after.maxconn.to_string(),
    );
    let proxy = |send: SendProxy| match send {
        SendProxy::None => "none".to_owned(),
        SendProxy::V1 => "v1".to_owned(),
        SendProxy::V2 => "v2".to_owned(),
    };
    compare(
        "send_proxy",
        proxy(before.send_proxy),
        proxy(after.send_proxy),
    );
    changed
}

/// The servers of a frontend, none for a listener that is not there.
fn servers_of(frontend: Option<&Frontend>) -> &[Arc<ServerRuntime>] {
    frontend.map_or(&[], |f| f.pool.servers.as_slice())
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut list = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                parts.push(format!("{what} {}", items.join(", ")));
            }
        };
        list("listeners added:", self.listeners_added.clone());
        list("listeners removed:", self.listeners_removed.clone());
        let addrs = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect();
        list("bound:", addrs(&self.addresses_bound));
        list("closed:", addrs(&self.addresses_closed));
        list("servers added:", self.servers_added.clone());
        list("servers removed:", self.servers_removed.clone());
        list("servers changed:", self.servers_changed.clone());
        if parts.is_empty() {
            f.write_str("no listener, address or server added, removed or changed")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(weight: u32, backup: bool) -> Server {
        Server {
            name: "mail1".into(),
            addr: "192.0.2.10:25".parse().unwrap(),
            send_proxy: SendProxy::V1,
            weight,
            backup,
            check: true,
            maxconn: 0,
        }
    }

    #[test]
    fn a_server_change_names_each_setting_with_its_old_and_new_value() {
        assert!(server_changes(&server(1, false), &server(1, false)).is_empty());
        assert_eq!(
            server_changes(&server(1, false), &server(3, true)),
            ["weight 1\u{2192}3", "backup false\u{2192}true"]
        );
        let after = Server {
            send_proxy: SendProxy::V2,
            check: false,
            maxconn: 50,
            ..server(1, false)
        };
        assert_eq!(
            server_changes(&server(1, false), &after),
            [
                "check true\u{2192}false",
                "maxconn 0\u{2192}50",
                "send_proxy v1\u{2192}v2"
            ]
        );
    }

    #[test]
    fn the_summary_lists_changed_servers() {
        let changes = Changes {
            servers_changed: vec!["mx/mail1: weight 1\u{2192}3".into()],
            ..Changes::default()
        };
        assert_eq!(
            changes.to_string(),
            "servers changed: mx/mail1: weight 1\u{2192}3"
        );
        assert_eq!(
            Changes::default().to_string(),
            "no listener, address or server added, removed or changed"
        );
    }
}
