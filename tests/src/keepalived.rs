//! Debian's `keepalived` (VRRP) in a network namespace of a test's own: one VRRP instance
//! that holds a virtual IPv4 address while a health script (mxlb's stats endpoint, asked
//! with `curl`) succeeds, the way two balancers share the address clients know.
//!
//! Each instance lives in its own temporary directory: configuration, health and notify
//! scripts, pid files (two instances on one host need distinct ones: the defaults under
//! `/run` would make the second refuse to start), its log (`-l`: console, no syslog) and the
//! state transitions its notify script wrote. It runs in the foreground (`-n`), VRRP only
//! (`-P`), started with `ip netns exec` so that `/sys` matches the namespace too. Stopped
//! (SIGTERM, then SIGKILL) on drop.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::{create_test_dir, release_test_dir, run_command};

/// The health script every instance runs: healthy when mxlb's stats API (`$1`, the
/// `/api/stats` URL) answers within a second and lists at least one server `UP`. A killed
/// or hung daemon, or one whose servers are all down, gives up the address.
pub const HEALTH_SCRIPT: &str = "#!/bin/sh
# keepalived vrrp_script: mxlb answers its stats API and has a server UP.
curl -fsS --max-time 1 \"$1\" | grep -q '\"status\":\"UP\"'
";

/// Fails with what to do when keepalived or curl (the health script's client) is missing:
/// `cargo xtask setup` installs both. Tests call it first and never skip.
pub fn ensure_installed() -> Result<()> {
    for (program, args) in [("keepalived", ["--version"]), ("curl", ["--version"])] {
        let out = run_command(Command::new(program).args(args), Duration::from_secs(10))
            .with_context(|| {
                format!(
                    "{program} is not installed: run `cargo xtask setup` (it installs Debian's \
                     keepalived and curl), or `apt-get install -y keepalived curl`"
                )
            })?;
        if !out.status.success() {
            bail!(
                "`{program} --version` failed ({}):\n{}",
                out.status,
                out.output
            );
        }
    }
    Ok(())
}

/// The name `ip netns` knows the [`crate::netns::Netns`] created with `what` by
/// (`mxlb-test-<what>-<pid>`), checked to exist.
pub fn netns_name(what: &str) -> Result<String> {
    let name = format!("mxlb-test-{what}-{}", std::process::id());
    let path = Path::new("/run/netns").join(&name);
    if !path.exists() {
        bail!(
            "no network namespace {name} ({} is missing)",
            path.display()
        );
    }
    Ok(name)
}

/// Whether `ip` is an address of `interface` in namespace `netns` (by name).
pub fn has_address(netns: &str, interface: &str, ip: Ipv4Addr) -> Result<bool> {
    let out = run_command(
        Command::new("ip").args(["-n", netns, "-4", "-o", "addr", "show", "dev", interface]),
        Duration::from_secs(5),
    )?;
    if !out.status.success() {
        // The interface of a namespace whose link was cut still exists; a failure here is
        // a broken namespace.
        bail!("ip -n {netns} addr show dev {interface}: {}", out.output);
    }
    let needle = format!("inet {ip}/");
    Ok(out.output.contains(&needle))
}

/// One VRRP instance: who this node is, its peers, the shared address.
#[derive(Debug, Clone)]
pub struct VrrpInstance {
    /// `global_defs { router_id }`: names the node in the log.
    pub node: String,
    /// The interface VRRP speaks on and the address goes to.
    pub interface: String,
    /// `virtual_router_id`, the same on every node of the pair.
    pub virtual_router_id: u8,
    /// Higher wins; with `preempt` (keepalived's default) a healthy higher-priority node
    /// takes the address back.
    pub priority: u8,
    /// `state MASTER` (the preferred node) or `BACKUP`.
    pub initial_master: bool,
    /// `unicast_src_ip`: this node's own address.
    pub own_ip: Ipv4Addr,
    /// `unicast_peer`: the other nodes (unicast adverts, no multicast needed).
    pub peers: Vec<Ipv4Addr>,
    /// The virtual address and its prefix length.
    pub vip: Ipv4Addr,
    pub vip_prefix: u8,
    /// The URL of this node's mxlb stats API, `http://ADDR/api/stats`.
    pub stats_url: String,
}

impl VrrpInstance {
    /// The keepalived.conf for this instance, with the health script at `check` and the
    /// notify script at `notify`.
    pub fn config(&self, check: &Path, notify: &Path) -> String {
        let peers: String = self.peers.iter().fold(String::new(), |mut out, peer| {
            let _ = writeln!(out, "        {peer}");
            out
        });
        format!(
            "\
global_defs {{
    router_id {node}
    script_user root
    enable_script_security
}}

# Healthy while mxlb answers its stats API with a server UP: checked every second,
# down after 2 failures, up again after 2 successes.
vrrp_script chk_mxlb {{
    script \"{check} {stats_url}\"
    interval 1
    timeout 2
    fall 2
    rise 2
}}

vrrp_instance mx {{
    state {state}
    interface {interface}
    virtual_router_id {vrid}
    priority {priority}
    advert_int 1
    unicast_src_ip {own_ip}
    unicast_peer {{
{peers}    }}
    virtual_ipaddress {{
        {vip}/{prefix} dev {interface}
    }}
    track_script {{
        chk_mxlb
    }}
    notify \"{notify}\"
}}
",
            node = self.node,
            check = check.display(),
            stats_url = self.stats_url,
            state = if self.initial_master {
                "MASTER"
            } else {
                "BACKUP"
            },
            interface = self.interface,
            vrid = self.virtual_router_id,
            priority = self.priority,
            own_ip = self.own_ip,
            vip = self.vip,
            prefix = self.vip_prefix,
            notify = notify.display(),
        )
    }
}

/// A running keepalived.
pub struct Keepalived {
    child: Child,
    /// `None` only during drop.
    dir: Option<TempDir>,
    root: PathBuf,
    pub node: String,
}

impl Keepalived {
    /// Writes the configuration and scripts, checks the file (`keepalived -t`), and starts
    /// keepalived in namespace `netns` (a name `ip netns` knows).
    pub fn start(netns: &str, instance: &VrrpInstance) -> Result<Keepalived> {
        let dir = create_test_dir("mxlb-keepalived-")?;
        let root = dir.path().to_path_buf();
        let check = root.join("check-mxlb");
        let notify = root.join("notify");
        let transitions = root.join("transitions");
        write_script(&check, HEALTH_SCRIPT)?;
        write_script(
            &notify,
            &format!(
                "#!/bin/sh\n# keepalived notify: TYPE NAME STATE PRIORITY\n\
                 echo \"$(date +%s.%N) $3\" >> {}\n",
                transitions.display()
            ),
        )?;
        let conf = root.join("keepalived.conf");
        std::fs::write(&conf, instance.config(&check, &notify))
            .with_context(|| format!("writing {}", conf.display()))?;

        let test = run_command(
            Command::new("keepalived")
                .arg("-f")
                .arg(&conf)
                .arg("--config-test"),
            Duration::from_secs(10),
        )?;
        if !test.status.success() {
            bail!(
                "keepalived --config-test refused {}:\n{}",
                conf.display(),
                test.output
            );
        }

        let log = std::fs::File::create(root.join("keepalived.log"))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, "keepalived"])
            // Foreground, log to the console (our file) and not syslog, VRRP only.
            .args(["-n", "-l", "-D", "-G", "-P"])
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(root.join("keepalived.pid"))
            .arg("-r")
            .arg(root.join("vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let mut keepalived = Keepalived {
            child,
            dir: Some(dir),
            root,
            node: instance.node.clone(),
        };
        // Started: its VRRP process wrote its pid file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while keepalived.vrrp_pid().is_none() {
            if let Some(status) = keepalived.child.try_wait()? {
                bail!(
                    "keepalived ({}) exited with {status} during start:\n{}",
                    keepalived.node,
                    keepalived.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "keepalived ({}) has no VRRP process after 10 s:\n{}",
                    keepalived.node,
                    keepalived.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(keepalived)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.root.join("keepalived.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// State changes its notify script recorded: (seconds since the epoch, `MASTER`,
    /// `BACKUP`, `FAULT` or `STOP`).
    pub fn transitions(&self) -> Vec<(f64, String)> {
        std::fs::read_to_string(self.root.join("transitions"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (time, state) = line.split_once(' ')?;
                Some((time.parse().ok()?, state.trim().to_owned()))
            })
            .collect()
    }

    /// State changes at or after `since`, each as milliseconds after it.
    pub fn transitions_since(&self, since: SystemTime) -> Vec<(f64, String)> {
        let since = since
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.transitions()
            .into_iter()
            .filter(|(time, _)| *time >= since)
            .map(|(time, state)| ((time - since) * 1000.0, state))
            .collect()
    }

    fn vrrp_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join("vrrp.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        let vrrp = self.vrrp_pid();
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.wait();
        }
        // The VRRP child leaves with its parent; make sure, by its pid file, that it did.
        if let Some(pid) = vrrp {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&self.root.display().to_string()) {
                // SAFETY: as above; the process runs with this instance's files.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if std::env::var_os("MXLB_SHOW_LOGS").is_some() {
            eprintln!("--- keepalived {} log ---\n{}", self.node, self.log());
        }
        if let Some(dir) = self.dir.take() {
            release_test_dir(dir, "keepalived");
        }
    }
}

fn write_script(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", path.display()))
}
