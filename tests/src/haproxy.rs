//! Debian's HAProxy (2.6) as the reference SMTP balancer.
//!
//! The generated configuration is the setup mxlb's users come from: `mode tcp`,
//! `balance roundrobin`, PROXY protocol v1 or v2 per server, optionally
//! `option smtpchk EHLO <domain>` health checks. HAProxy runs in the foreground
//! (`-db`) as our child, logs every connection (`option tcplog`) to its output file, and
//! exposes its runtime API on a Unix socket in its private directory for
//! [`Haproxy::server_states`].

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use crate::{create_test_dir, release_test_dir, wait_until};

/// The PROXY protocol header HAProxy sends to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    None,
    /// `send-proxy`: the text header.
    V1,
    /// `send-proxy-v2`: the binary header.
    V2,
}

/// One backend server.
#[derive(Debug, Clone)]
pub struct HaproxyServer {
    pub name: String,
    pub addr: SocketAddr,
    pub send_proxy: SendProxy,
}

/// What to generate the configuration from.
#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    /// The frontend's listening address.
    pub bind: SocketAddr,
    pub servers: Vec<HaproxyServer>,
    /// `Some("EHLO example.test")` enables `option smtpchk EHLO example.test` and `check`
    /// on every server.
    pub smtpchk: Option<String>,
    /// Health check interval (`inter`).
    pub check_interval: Duration,
}

impl HaproxyConfig {
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            servers: Vec::new(),
            smtpchk: None,
            check_interval: Duration::from_secs(2),
        }
    }

    pub fn server(mut self, name: &str, addr: SocketAddr, send_proxy: SendProxy) -> Self {
        self.servers.push(HaproxyServer {
            name: name.to_owned(),
            addr,
            send_proxy,
        });
        self
    }

    /// Enables SMTP health checks with `helo`, e.g. `"EHLO example.test"`.
    pub fn smtpchk(mut self, helo: &str) -> Self {
        self.smtpchk = Some(helo.to_owned());
        self
    }

    /// The haproxy.cfg text; `stats_socket` is where the runtime API listens.
    pub fn render(&self, stats_socket: &Path) -> String {
        let mut cfg = format!(
            "\
global
    log stdout format raw local0
    # Without this HAProxy binds with SO_REUSEPORT, and two instances given the same port
    # would silently share its connections instead of the second failing to start.
    noreuseport
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_in
    bind {bind}
    default_backend smtp_servers

backend smtp_servers
    balance roundrobin
",
            socket = stats_socket.display(),
            bind = self.bind,
        );
        if let Some(helo) = &self.smtpchk {
            let _ = writeln!(cfg, "    option smtpchk {helo}");
        }
        for server in &self.servers {
            let _ = write!(cfg, "    server {} {}", server.name, server.addr);
            match server.send_proxy {
                SendProxy::None => {}
                SendProxy::V1 => cfg.push_str(" send-proxy"),
                SendProxy::V2 => cfg.push_str(" send-proxy-v2"),
            }
            if self.smtpchk.is_some() {
                let _ = write!(cfg, " check inter {}ms", self.check_interval.as_millis());
            }
            cfg.push('\n');
        }
        cfg
    }
}

/// A running HAProxy; killed and cleaned up on drop.
pub struct Haproxy {
    child: Child,
    dir: Option<TempDir>,
    root: PathBuf,
    config: HaproxyConfig,
}

impl Haproxy {
    /// Writes the configuration, starts `haproxy -f <cfg> -db` and waits until the
    /// frontend listens.
    pub fn start(config: HaproxyConfig) -> Result<Self> {
        ensure!(
            config.bind.ip().is_loopback(),
            "HAProxy must bind a loopback address, not {}",
            config.bind
        );
        ensure!(
            !config.servers.is_empty(),
            "HAProxy needs at least one server"
        );
        let dir = create_test_dir("mxlb-haproxy-")?;
        let root = dir.path().to_path_buf();
        let cfg_path = root.join("haproxy.cfg");
        std::fs::write(&cfg_path, config.render(&root.join("admin.sock")))
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log = std::fs::File::create(root.join("haproxy.log"))?;
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot run haproxy (is it installed?)")?;
        let mut haproxy = Self {
            child,
            dir: Some(dir),
            root,
            config,
        };
        haproxy.wait_until_listening()?;
        Ok(haproxy)
    }

    fn wait_until_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("haproxy exited ({status}) at startup:\n{}", self.log());
            }
            // HAProxy binds the frontend and creates the runtime socket at separate points
            // of its startup; both must be there for the fixture to be usable.
            if crate::is_listening(self.config.bind)? && self.root.join("admin.sock").exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "haproxy is not ready (listening on {} with its runtime socket) after 10s:\n{}",
                    self.config.bind,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The frontend address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.config.bind
    }

    pub fn config(&self) -> &HaproxyConfig {
        &self.config
    }

    /// The private directory (haproxy.cfg, haproxy.log, admin.sock).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// HAProxy's output so far: startup messages, one tcplog line per connection, and
    /// health check state changes.
    pub fn log(&self) -> String {
        std::fs::read(self.root.join("haproxy.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends one command to the runtime API and returns the answer.
    pub fn runtime_command(&self, command: &str) -> Result<String> {
        let path = self.root.join("admin.sock");
        let mut stream = UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .with_context(|| format!("reading the answer to {command:?}"))?;
        Ok(answer)
    }

    /// `(server name, status)` for every server, status as in `show stat`
    /// (`UP`, `DOWN`, `no check`, `UP 1/2`, ...).
    pub fn server_states(&self) -> Result<Vec<(String, String)>> {
        let csv = self.runtime_command("show stat")?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .context("show stat answered without a CSV header")?
            .split(',')
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|c| *c == name)
                .with_context(|| format!("no {name} column in show stat"))
        };
        let (proxy, server, status) = (column("pxname")?, column("svname")?, column("status")?);
        Ok(lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|row| {
                row.len() > status
                    && row[proxy] == "smtp_servers"
                    && !matches!(row[server], "BACKEND" | "FRONTEND")
            })
            .map(|row| (row[server].to_owned(), row[status].to_owned()))
            .collect())
    }

    /// Waits until every server's health check has passed (status exactly `UP`).
    pub fn wait_servers_up(&self, timeout: Duration) -> Result<()> {
        wait_until(
            "all HAProxy servers UP",
            timeout,
            Duration::from_millis(50),
            || {
                // A failing runtime command is retried too: the answer is what matters.
                let up = self
                    .server_states()
                    .is_ok_and(|states| states.iter().all(|(_, s)| s == "UP"));
                Ok(up.then_some(()))
            },
        )
        .with_context(|| {
            format!(
                "server states: {:?}; haproxy log:\n{}",
                self.server_states(),
                self.log()
            )
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // A reference balancer in a test has nothing worth a graceful stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.dir.take() {
            release_test_dir(dir, "HAProxy");
        }
    }
}
