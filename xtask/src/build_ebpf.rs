//! `cargo xtask build-ebpf`: build the kernel relay (balancer-ebpf) with nightly.
//!
//! balancer-ebpf is its own workspace (excluded from the main one) and builds for
//! `bpfel-unknown-none` with `-Z build-std=core`, linked by bpf-linker. Its target directory
//! is `<workspace>/target/ebpf`, so the object lands at
//! `target/ebpf/bpfel-unknown-none/release/mxlb`, where balancer-user's build script finds it.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The nightly cargo command for the eBPF crate, with `args` after the common part
/// (`cargo +nightly <subcommand> --target bpfel-unknown-none -Z build-std=core`).
pub fn ebpf_cargo(subcommand: &str) -> Result<Command> {
    let root = cmd::workspace_root();
    let mut c = Command::new("cargo");
    cmd::clear_outer_cargo_env(&mut c)
        .current_dir(root.join("balancer-ebpf"))
        .env("CARGO_TARGET_DIR", root.join("target/ebpf"))
        .args([
            "+nightly",
            subcommand,
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    // rustc runs `bpf-linker` by name: make sure a freshly `cargo install`ed one is found.
    let bin = cmd::cargo_bin_dir();
    if cmd::which("bpf-linker").is_none() && bin.join("bpf-linker").is_file() {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined =
            env::join_paths(std::iter::once(bin).chain(env::split_paths(&path))).context("PATH")?;
        c.env("PATH", joined);
    }
    Ok(c)
}

/// Builds the eBPF object and returns its path.
pub fn run() -> Result<PathBuf> {
    let mut build = ebpf_cargo("build")?;
    build.arg("--release");
    cmd::run(&mut build)
        .context("building the eBPF object failed (`cargo xtask setup` installs what it needs)")?;
    let object = cmd::ebpf_object();
    let size = fs::metadata(&object)
        .with_context(|| format!("the build succeeded but {} is missing", object.display()))?
        .len();
    if size == 0 {
        bail!("{} is empty", object.display());
    }
    println!("✓ eBPF object {} ({size} bytes)", object.display());
    Ok(object)
}
