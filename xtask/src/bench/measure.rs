//! System-wide CPU time from /proc/stat: the kernel relay runs in softirq and in kworkers,
//! so per-process CPU would miss it (docs/benchmarks.md, "Method").

use std::{fs, process::Command, sync::OnceLock, thread, time::Duration};

use anyhow::{Context, Result};

/// Busy CPU time of all CPUs so far: user + nice + system + irq + softirq, in seconds.
pub fn busy_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let ticks = f[0] + f[1] + f[2] + f[5] + f[6];
    Ok(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Busy CPUs (0..=nproc) while nothing of ours runs: what else loads the machine.
pub fn background_load(over: Duration) -> Result<f64> {
    let before = busy_seconds()?;
    thread::sleep(over);
    Ok((busy_seconds()? - before) / over.as_secs_f64())
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
