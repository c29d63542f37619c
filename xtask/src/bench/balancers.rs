//! The backends (two smtp-sink) and the balancers in front of them, each started fresh for
//! one measurement and stopped when its [`Running`] is dropped. No balancer sends a PROXY
//! header (smtp-sink does not read one) and none runs health checks or logs connections,
//! so they all do the same work: accept, pick a backend round-robin, connect, relay.

use std::{fmt::Write as _, fs, net::SocketAddr, path::Path, process::Command};

use anyhow::Result;

use super::{
    procs::{Proc, free_port},
    tools::{self, Tools},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balancer {
    Direct,
    Haproxy,
    Nginx,
    /// mxlb with its default policy: user space first, the kernel after 32 KiB.
    MxlbAdaptive,
    /// mxlb pairing every connection in the kernel at once (`kernel_relay_after = 0`).
    MxlbKernel,
    MxlbUser,
}

impl Balancer {
    pub const ALL: [Balancer; 6] = [
        Balancer::Direct,
        Balancer::Haproxy,
        Balancer::Nginx,
        Balancer::MxlbAdaptive,
        Balancer::MxlbKernel,
        Balancer::MxlbUser,
    ];

    /// Short id used in JSON and file names.
    pub fn id(self) -> &'static str {
        match self {
            Balancer::Direct => "direct",
            Balancer::Haproxy => "haproxy",
            Balancer::Nginx => "nginx",
            Balancer::MxlbAdaptive => "mxlb-default",
            Balancer::MxlbKernel => "mxlb-sockmap",
            Balancer::MxlbUser => "mxlb-userspace",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Balancer::Direct => "direct (no balancer)",
            Balancer::Haproxy => "HAProxy (mode tcp)",
            Balancer::Nginx => "NGINX (stream)",
            Balancer::MxlbAdaptive => "mxlb, default (kernel after 32 KiB)",
            Balancer::MxlbKernel => "mxlb, kernel relay at once",
            Balancer::MxlbUser => "mxlb, user-space relay",
        }
    }
}

/// The two smtp-sink backends, alive for the whole benchmark.
pub struct Backends {
    pub addrs: [SocketAddr; 2],
    _procs: Vec<Proc>,
}

impl Backends {
    pub fn start(dir: &Path) -> Result<Backends> {
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        for i in 1..=2 {
            let addr = free_port()?;
            let log = dir.join(format!("sink{i}.log"));
            // -u: required as root (drops to nobody after binding); -m: up to 2,048
            // sessions at once (default 256; workload 4 holds 500 idle ones per sink);
            // backlog 1024.
            let mut proc = Proc::spawn(
                &format!("smtp-sink {i}"),
                Command::new(tools::SMTP_SINK)
                    .args([
                        "-u",
                        "nobody",
                        "-m",
                        "2048",
                        "-h",
                        &format!("sink{i}.bench.test"),
                    ])
                    .arg(addr.to_string())
                    .arg("1024"),
                &log,
            )?;
            proc.wait_listening(addr, &log)?;
            procs.push(proc);
            addrs.push(addr);
        }
        Ok(Backends {
            addrs: [addrs[0], addrs[1]],
            _procs: procs,
        })
    }
}

/// A balancer in front of the backends: where clients connect.
pub struct Running {
    /// One address for a balancer; both backends for `direct` (the client is split in two).
    pub targets: Vec<SocketAddr>,
    pub proc: Option<Proc>,
    log: std::path::PathBuf,
}

impl Running {
    /// Fails if the balancer died during the measurement.
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(p) => p.check_alive(&self.log),
            None => Ok(()),
        }
    }
}

pub fn start(
    balancer: Balancer,
    backends: &Backends,
    tools: &Tools,
    mxlb: &Path,
    dir: &Path,
) -> Result<Running> {
    let [a, b] = backends.addrs;
    if balancer == Balancer::Direct {
        return Ok(Running {
            targets: vec![a, b],
            proc: None,
            log: dir.join("none"),
        });
    }
    let listen = free_port()?;
    let sub = dir.join(balancer.id());
    fs::create_dir_all(&sub)?;
    let log = sub.join("output.log");
    let mut command = match balancer {
        Balancer::Direct => unreachable!(),
        Balancer::Haproxy => {
            let cfg = sub.join("haproxy.cfg");
            fs::write(&cfg, haproxy_config(listen, &[a, b]))?;
            let mut c = Command::new("haproxy");
            c.arg("-f").arg(&cfg).arg("-db");
            c
        }
        Balancer::Nginx => {
            let module = match &tools.nginx {
                Ok(n) => n.stream_module.as_deref(),
                Err(why) => anyhow::bail!("NGINX is not available: {why}"),
            };
            let cfg = sub.join("nginx.conf");
            fs::write(&cfg, nginx_config(listen, &[a, b], module, &sub))?;
            let mut c = Command::new("nginx");
            c.arg("-p")
                .arg(&sub)
                .arg("-e")
                .arg(sub.join("error.log"))
                .arg("-c")
                .arg(&cfg);
            c
        }
        Balancer::MxlbAdaptive | Balancer::MxlbKernel | Balancer::MxlbUser => {
            let (relay, extra) = match balancer {
                Balancer::MxlbKernel => ("sockmap", "kernel_relay_after = 0\n"),
                Balancer::MxlbAdaptive => ("sockmap", ""),
                _ => ("userspace", ""),
            };
            let pin = format!("/sys/fs/bpf/mxlb-bench-{}", std::process::id());
            let cfg = sub.join("mxlb.toml");
            fs::write(&cfg, mxlb_config(relay, extra, &pin, listen, &[a, b]))?;
            let mut c = Command::new(mxlb);
            // Warnings only: one log line per connection would be work the others skip.
            c.arg("run")
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "warn");
            c
        }
    };
    let mut proc = Proc::spawn(balancer.id(), &mut command, &log)?;
    proc.wait_listening(listen, &log)?;
    Ok(Running {
        targets: vec![listen],
        proc: Some(proc),
        log,
    })
}

/// tests/src/haproxy.rs's configuration without logging, checks or PROXY header.
fn haproxy_config(bind: SocketAddr, servers: &[SocketAddr]) -> String {
    let mut cfg = format!(
        "\
global
    noreuseport

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_in
    bind {bind}
    default_backend smtp_servers

backend smtp_servers
    balance roundrobin
"
    );
    for (i, addr) in servers.iter().enumerate() {
        let _ = writeln!(cfg, "    server s{} {addr}", i + 1);
    }
    cfg
}

/// NGINX stream proxy: round-robin (the default) over the backends, no access log.
fn nginx_config(
    bind: SocketAddr,
    servers: &[SocketAddr],
    module: Option<&Path>,
    dir: &Path,
) -> String {
    let mut cfg = String::new();
    if let Some(module) = module {
        let _ = writeln!(cfg, "load_module {};", module.display());
    }
    let _ = write!(
        cfg,
        "\
daemon off;
master_process on;
worker_processes auto;
pid {pid};
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    upstream smtp_servers {{
",
        pid = dir.join("nginx.pid").display(),
        dir = dir.display()
    );
    for addr in servers {
        let _ = writeln!(cfg, "        server {addr};");
    }
    let _ = write!(
        cfg,
        "    }}
    server {{
        listen {bind};
        proxy_pass smtp_servers;
        proxy_connect_timeout 5s;
        proxy_timeout 60s;
    }}
}}
"
    );
    cfg
}

/// tests/src/mxlb.rs's configuration format, `send_proxy = "none"`.
fn mxlb_config(
    relay: &str,
    extra_global: &str,
    pin: &str,
    bind: SocketAddr,
    servers: &[SocketAddr],
) -> String {
    let mut text = format!(
        "[global]\npin_path = \"{pin}\"\nrelay = \"{relay}\"\ngrace = \"2s\"\n{extra_global}\n\
         [[listen]]\nname = \"smtp\"\nbind = [\"{bind}\"]\ntimeout_connect = \"2s\"\n"
    );
    for (i, addr) in servers.iter().enumerate() {
        let _ = write!(
            text,
            "\n[[listen.server]]\nname = \"s{}\"\naddr = \"{addr}\"\nsend_proxy = \"none\"\n",
            i + 1
        );
    }
    text
}
