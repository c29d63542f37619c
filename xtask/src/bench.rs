//! `cargo xtask bench [--quick]`: the side-by-side benchmark (issue 6, docs/benchmarks.md).
//!
//! Same client (smtp-source), same two backends (smtp-sink), on loopback, for each of:
//! direct, HAProxy, NGINX (if it installs), mxlb with the kernel relay and with the
//! user-space relay. Each measurement starts its balancer fresh; the balancers alternate
//! within a round and the starting one rotates between rounds.

mod balancers;
mod idle;
mod measure;
mod procs;
mod report;
mod tools;
mod workloads;

use std::{thread, time::Duration};

use anyhow::{Context, Result};

use crate::{build_ebpf, cmd, setup};
use balancers::{Backends, Balancer};
use workloads::Workload;

/// One measurement.
pub struct Sample {
    pub round: usize,
    pub workload: Workload,
    pub balancer: Balancer,
    pub messages: u32,
    pub wall_s: f64,
    /// System-wide busy CPU seconds during the run.
    pub cpu_s: f64,
    pub client_commands: Vec<String>,
    /// Workload 4: memory and latency of its idle sessions.
    pub idle: Option<idle::IdleMetrics>,
}

impl Sample {
    pub fn msgs_per_s(&self) -> f64 {
        f64::from(self.messages) / self.wall_s
    }

    pub fn cpu_per_10k(&self) -> f64 {
        self.cpu_s * 10_000.0 / f64::from(self.messages)
    }
}

/// What the report needs besides the samples.
pub struct Run {
    pub quick: bool,
    /// Only some workloads ran (`--only`): not a report for docs/.
    pub partial: bool,
    pub rounds: usize,
    pub balancers: Vec<Balancer>,
    pub nginx: Result<String, String>,
    pub haproxy_version: String,
    /// Busy CPUs measured for 2 s before each round, with nothing of ours running.
    pub background_cpus: Vec<f64>,
    pub samples: Vec<Sample>,
    pub elapsed_s: f64,
}

pub fn run(quick: bool, only: Option<&str>) -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    build_ebpf::run()?;
    cmd::run(cmd::workspace_cargo().args(["build", "--release", "-p", "balancer-user"]))?;
    let mxlb = cmd::host_target_dir().join("release/mxlb");
    let tools = tools::ensure()?;

    let dir = procs::WorkDir::new()?;
    let backends = Backends::start(&dir.0)?;
    let balancers: Vec<Balancer> = Balancer::ALL
        .into_iter()
        .filter(|b| *b != Balancer::Nginx || tools.nginx.is_ok())
        .collect();
    let rounds = if quick { 1 } else { 3 };
    let divisor = if quick { 10 } else { 1 };

    // Warm-up, not recorded: the backends' first sessions, page cache, the mxlb binary.
    println!("bench: warm-up");
    for balancer in &balancers {
        let running = balancers::start(*balancer, &backends, &tools, &mxlb, &dir.0)?;
        workloads::run(
            Workload::SessionPerMessage,
            &running.targets,
            200,
            &dir.0,
            Duration::from_secs(60),
        )
        .with_context(|| format!("warm-up through {}", balancer.id()))?;
    }

    let mut samples = Vec::new();
    let mut background_cpus = Vec::new();
    for round in 0..rounds {
        let background = measure::background_load(Duration::from_secs(2))?;
        println!(
            "bench: round {}/{rounds} (background load {background:.2} CPUs)",
            round + 1
        );
        background_cpus.push(background);
        for workload in Workload::ALL {
            if only.is_some_and(|prefix| !workload.id().starts_with(prefix)) {
                continue;
            }
            let messages = (workload.messages() / divisor).max(2);
            for k in 0..balancers.len() {
                let balancer = balancers[(k + round) % balancers.len()];
                let sample = measure_one(
                    round, workload, balancer, messages, &backends, &tools, &mxlb, &dir.0,
                )
                .with_context(|| format!("{} through {}", workload.id(), balancer.id()))?;
                println!(
                    "  {:<24} {:<16} {:>8.0} msgs/s  {:>6.2} CPU s/10k msgs  ({:.2} s)",
                    workload.id(),
                    balancer.id(),
                    sample.msgs_per_s(),
                    sample.cpu_per_10k(),
                    sample.wall_s
                );
                samples.push(sample);
            }
        }
    }
    drop(backends);

    let run = Run {
        quick,
        partial: only.is_some(),
        rounds,
        balancers,
        nginx: tools.nginx.map(|n| n.version),
        haproxy_version: tools.haproxy_version,
        background_cpus,
        samples,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    report::write(&run)
}

#[allow(clippy::too_many_arguments)]
fn measure_one(
    round: usize,
    workload: Workload,
    balancer: Balancer,
    messages: u32,
    backends: &Backends,
    tools: &tools::Tools,
    mxlb: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Sample> {
    let mut running = balancers::start(balancer, backends, tools, mxlb, dir)?;
    // Let the balancer finish starting (threads, eBPF attach) before the clock starts.
    thread::sleep(Duration::from_millis(300));
    // Workload 4: the idle sessions are opened (and measured) before the clock starts and
    // stay open until the messages are through.
    let idle = if workload == Workload::IdleAndMany {
        let pid = running.proc.as_ref().map(|p| p.pid());
        Some(idle::open(&running.targets, pid)?)
    } else {
        None
    };
    let cpu_before = measure::busy_seconds()?;
    let (wall, client_commands) = workloads::run(
        workload,
        &running.targets,
        messages,
        dir,
        Duration::from_secs(300),
    )?;
    let cpu_s = measure::busy_seconds()? - cpu_before;
    running.check_alive()?;
    let idle = idle.map(|(sessions, metrics)| {
        drop(sessions);
        metrics
    });
    Ok(Sample {
        round,
        workload,
        balancer,
        messages,
        wall_s: wall.as_secs_f64(),
        cpu_s,
        client_commands,
        idle,
    })
}
