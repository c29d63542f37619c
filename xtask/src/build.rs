//! `cargo xtask build [--release]`: set up, build the eBPF object, build the workspace.

use anyhow::Result;

use crate::{build_ebpf, cmd, setup};

pub fn run(release: bool) -> Result<()> {
    setup::run()?;
    build_ebpf::run()?;
    let mut build = cmd::workspace_cargo();
    build.args(["build", "--workspace"]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)
}
