//! `cargo xtask run [ARGS…]`: set up, build (release), then become `mxlb demo ARGS…`.

use std::os::unix::process::CommandExt;

use anyhow::{Context, Result};

use crate::{build_ebpf, cmd, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    build_ebpf::run()?;
    cmd::run(cmd::workspace_cargo().args(["build", "--release", "-p", "balancer-user"]))?;
    let mxlb = cmd::host_target_dir().join("release/mxlb");
    let mut demo = std::process::Command::new(&mxlb);
    demo.arg("demo").args(args);
    println!("$ {}", cmd::display(&demo));
    // exec: mxlb takes over this process, so Ctrl-C and signals reach it directly.
    let err = demo.exec();
    Err(err).with_context(|| format!("could not start {}", mxlb.display()))
}
