//! `cargo xtask fuzz [--seconds N] [TARGET]`: run the libFuzzer targets in `fuzz/` for a
//! bounded time each; fails on the first crash and names the input that caused it.
//!
//! The fuzz crate is its own workspace, built by cargo-fuzz with nightly into
//! `fuzz/target` (never the main target directory: the instrumentation flags would rebuild
//! everything there). Each target starts from the committed seeds in `fuzz/corpus/TARGET`
//! plus what earlier runs found, kept in `fuzz/target/fuzz-corpus/TARGET`: libFuzzer
//! writes new inputs only to the first corpus directory it is given, so the committed
//! seeds stay as they are.
//!
//! No sanitizer: the parsers are safe Rust, so AddressSanitizer would find nothing that
//! the bounds checks do not, at several times the cost per input. Debug assertions and
//! overflow checks are on (cargo-fuzz's default).

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd,
    setup::{self, CargoTool},
};

/// One target per parser that reads outside input (fuzz/fuzz_targets/*.rs).
pub const TARGETS: [&str; 4] = ["proxy_header", "smtp_reply", "config", "admin_api"];

/// Seconds per target for `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 60;

/// Seconds per target when `cargo xtask test` runs the fuzzers: four targets in about
/// 80 s, enough to replay the corpus and catch a regression in what it covers.
pub const SHORT_SECONDS: u64 = 20;

/// A unit slower than this counts as a crash (a hang): every parser answers in microseconds.
const UNIT_TIMEOUT_SECS: u64 = 10;

const CARGO_FUZZ: CargoTool = CargoTool {
    krate: "cargo-fuzz",
    version: "0.13.2",
};

/// What one target did in its time.
struct Outcome {
    target: &'static str,
    execs: Option<u64>,
    per_sec: Option<u64>,
}

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&'static str> = match only {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(target) => vec![*target],
            None => bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS.join(", ")
            ),
        },
    };
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    setup::cargo_tool(&CARGO_FUZZ)?;
    cmd::run(&mut fuzz_cargo("build"))?;
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, seconds)?);
    }
    println!("✓ no crash in {seconds} s per target:");
    for o in outcomes {
        let show = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
        println!(
            "  {:<13} {:>10} executions, {:>7} per second",
            o.target,
            show(o.execs),
            show(o.per_sec)
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz <subcommand>` for the fuzz crate, with the options every call
/// shares (cargo-fuzz builds again when they differ).
fn fuzz_cargo(subcommand: &str) -> Command {
    let mut c = Command::new("cargo");
    cmd::clear_outer_cargo_env(&mut c)
        .current_dir(cmd::workspace_root())
        .args(["+nightly", "fuzz", subcommand, "--sanitizer", "none"])
        .args(["--fuzz-dir", "fuzz"]);
    c
}

fn run_target(target: &'static str, seconds: u64) -> Result<Outcome> {
    let root = cmd::workspace_root();
    let seeds = root.join("fuzz/corpus").join(target);
    let found = root.join("fuzz/target/fuzz-corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
    let before = files(&artifacts);

    let mut c = fuzz_cargo("run");
    c.arg(target)
        .args([&found, &seeds])
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={UNIT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    println!("$ {}", cmd::display(&c));
    let mut child = c
        .spawn()
        .with_context(|| format!("could not start cargo fuzz for {target}"))?;
    let mut outcome = Outcome {
        target,
        execs: None,
        per_sec: None,
    };
    // libFuzzer logs every new input and, at the end, the dictionary it recommends; pass
    // the rest through (build output, the panic message and backtrace of a crash, the
    // final stats).
    let stderr = child.stderr.take().context("cargo fuzz's stderr")?;
    let mut in_dictionary = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz's output")?;
        if let Some(n) = stat(&line, "stat::number_of_executed_units:") {
            outcome.execs = Some(n);
        }
        if let Some(n) = stat(&line, "stat::average_exec_per_sec:") {
            outcome.per_sec = Some(n);
        }
        if line.starts_with("###### Recommended dictionary") {
            in_dictionary = true;
        }
        if !in_dictionary && !is_progress(&line) {
            eprintln!("{line}");
        }
        if line.starts_with("###### End of recommended dictionary") {
            in_dictionary = false;
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if status.success() {
        return Ok(outcome);
    }
    let new: Vec<PathBuf> = files(&artifacts).difference(&before).cloned().collect();
    if new.is_empty() {
        bail!("fuzz target {target} failed ({status}) without leaving an input; see above");
    }
    for artifact in &new {
        eprintln!("✗ {target}: crashing input {}", artifact.display());
        eprintln!(
            "  replay: cargo +nightly fuzz run --sanitizer none --fuzz-dir fuzz {target} {}",
            artifact.display()
        );
    }
    bail!(
        "fuzz target {target} crashed; the input is in {}",
        artifacts.display()
    )
}

/// The number after `key` on a libFuzzer final-stats line.
fn stat(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?.trim().parse().ok()
}

/// libFuzzer's per-input progress lines: `#1234  NEW cov: …`, `#4096 pulse …`.
fn is_progress(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('#') else {
        return false;
    };
    let mut words = rest.split_whitespace();
    words
        .next()
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        && words
            .next()
            .is_some_and(|kind| ["NEW", "REDUCE", "pulse"].contains(&kind))
}

/// The files in `dir` (none if it does not exist yet).
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect()
}
