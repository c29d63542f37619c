//! `cargo xtask <command>`: the project's developer tasks.
//!
//! Every task that builds first runs [`setup`], which checks the machine for what the build
//! and the tests need (apt packages, the nightly toolchain's library source, bpf-linker, a
//! mounted bpffs) and installs only what is missing.

mod bench;
mod build;
mod build_ebpf;
mod cmd;
mod fuzz;
mod package;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "mxlb's developer tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the machine and install what is missing (apt packages, rust-src, bpf-linker, bpffs)
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/mxlb) with nightly
    BuildEbpf,
    /// Set up, build the eBPF object, then `cargo build --workspace`
    Build {
        /// Build the workspace in release mode
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release), then start `mxlb demo`; extra arguments go to `mxlb demo`
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, fmt + clippy, then `cargo test --workspace`; arguments after `--` go to
    /// `cargo test` (e.g. a test name filter)
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), then the side-by-side benchmark against HAProxy, NGINX and
    /// direct; writes docs/benchmarks.{md,json,svg}
    Bench {
        /// One round with a tenth of the messages: a smoke test (under 2 minutes)
        #[arg(long)]
        quick: bool,
        /// Only the workloads whose id starts with this (w1, w2, w3, w4), for working on
        /// one; the report then goes to target/bench-only/, not docs/
        #[arg(long)]
        only: Option<String>,
    },
    /// Run the libFuzzer targets (fuzz/) with cargo-fuzz and nightly, each for a bounded
    /// time; fails on a crash and names the crashing input
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Only this target (proxy_header, smtp_reply, config, admin_api)
        target: Option<String>,
    },
    /// Set up, build (release, with the eBPF object), then the Debian package with its
    /// systemd unit (cargo-deb, installed when missing): target/debian/mxlb_*.deb
    Package,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => setup::run().and_then(|()| build_ebpf::run().map(drop)),
        Task::Build { release } => build::run(release),
        Task::Run { args } => run::run(&args),
        Task::Test { args } => test::run(&args),
        Task::Bench { quick, only } => bench::run(quick, only.as_deref()),
        Task::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Task::Package => package::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain of causes, without the backtrace that RUST_BACKTRACE=1 would add:
            // a failed command already printed its own output.
            eprintln!("xtask error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
