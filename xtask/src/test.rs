//! `cargo xtask test [-- CARGO-TEST-ARGS…]`: what CI runs (`.ci/run`).
//!
//! Set up, build the eBPF object, check formatting and lints (both workspaces), build, then
//! the Debian package, then `cargo test --workspace` with MXLB_BIN, MXLB_EBPF_OBJECT and
//! MXLB_DEB pointing at what was built, then the fuzz targets for 20 s each (`cargo xtask fuzz`).

use anyhow::Result;

use crate::{build_ebpf, cmd, fuzz, package, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let object = build_ebpf::run()?;

    cmd::run(cmd::cargo_at_root().args(["fmt", "--all", "--check"]))?;
    // The eBPF crate is outside the workspace, so `--all` does not reach it.
    cmd::run(cmd::cargo_at_root().args([
        "fmt",
        "--check",
        "--manifest-path",
        "balancer-ebpf/Cargo.toml",
    ]))?;
    cmd::run(cmd::cargo_at_root().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))?;

    // Licenses, banned and duplicate crates, sources (deny.toml). The advisory check needs
    // the RustSec database from GitHub, which CI cannot reach: docs/security.md.
    cmd::run(cmd::cargo_at_root().args(["deny", "check", "bans", "licenses", "sources"]))?;

    cmd::run(cmd::workspace_cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut ebpf_clippy = build_ebpf::ebpf_cargo("clippy")?;
    ebpf_clippy.args(["--release", "--", "-D", "warnings"]);
    cmd::run(&mut ebpf_clippy)?;

    cmd::run(cmd::workspace_cargo().args(["build", "--workspace"]))?;

    // The package test (tests/tests/package.rs) installs the .deb: built every time, with
    // or without a filter, so that the test never runs without it (a release build,
    // about 4 minutes from scratch on 2 CPUs, seconds when nothing changed).
    let deb = package::build()?;

    let mxlb = cmd::host_target_dir().join("debug/mxlb");
    cmd::run(
        cmd::workspace_cargo()
            .env("MXLB_BIN", &mxlb)
            .env("MXLB_EBPF_OBJECT", &object)
            .env(package::DEB_ENV, &deb)
            .args(["test", "--workspace"])
            .args(args),
    )?;
    // The relay contract again, with every daemon dropping root for `nobody` (`[global]
    // user`, injected by the fixture): least privilege shown by the same tests passing
    // (docs/operations.md, "Privileges"). About 20 s; skipped when a filter was given.
    if args.is_empty() {
        cmd::run(
            cmd::workspace_cargo()
                .env("MXLB_BIN", &mxlb)
                .env("MXLB_EBPF_OBJECT", &object)
                .env("MXLB_TEST_USER", "nobody")
                .args(["test", "-p", "mxlb-tests", "--test", "relay"]),
        )?;
    }
    // The fuzz targets, briefly (about 80 s and the fuzz build): the corpus and what earlier
    // runs found are replayed, then each parser is explored for a while. Skipped with a
    // filter; `cargo xtask fuzz` runs longer.
    if args.is_empty() {
        fuzz::run(fuzz::SHORT_SECONDS, None)?;
    }
    Ok(())
}
