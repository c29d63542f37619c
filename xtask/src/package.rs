//! `cargo xtask package`: the Debian package, built with cargo-deb.
//!
//! What goes in it is declared in `balancer-user/Cargo.toml` (`[package.metadata.deb]`):
//! the release binary with the eBPF object inside, the systemd unit and the maintainer
//! scripts from `packaging/debian/`, the example configuration `packaging/mxlb.toml` as
//! the conffile `/etc/mxlb/mxlb.toml`, and the docs. docs/operations.md ("Install")
//! explains the unit; `tests/tests/package.rs` installs the package, runs the daemon the
//! way the unit does and purges it again.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf, cmd,
    setup::{self, CargoTool},
};

/// cargo-deb 3.8.0 builds with rustc 1.85 and later.
const CARGO_DEB: CargoTool = CargoTool {
    krate: "cargo-deb",
    version: "3.8.0",
};

/// The environment variable that names the package for `tests/tests/package.rs`.
pub const DEB_ENV: &str = "MXLB_DEB";

/// `cargo xtask package`: set up, then [`build`].
pub fn run() -> Result<()> {
    setup::run()?;
    build_ebpf::run()?;
    let deb = build()?;
    println!("install it with: dpkg -i {}", deb.display());
    Ok(())
}

/// Builds the release binary and the .deb (in `<target>/debian/`), and returns the
/// package's path. Expects the machine set up and the eBPF object built.
pub fn build() -> Result<PathBuf> {
    setup::cargo_tool(&CARGO_DEB)?;
    let dir = cmd::host_target_dir().join("debian");
    let started = SystemTime::now();
    // cargo-deb runs `cargo build --release -p balancer-user` itself: the same
    // MXLB_EBPF_OBJECT as every other build, so nothing is rebuilt for it.
    cmd::run(
        cmd::workspace_cargo()
            .args(["deb", "-p", "balancer-user", "--output"])
            .arg(&dir),
    )?;
    let deb = newest_deb(&dir, started)?;
    let size = fs::metadata(&deb)?.len();
    println!("✓ package {} ({} KiB)", deb.display(), size / 1024);
    Ok(deb)
}

/// The `mxlb_*.deb` in `dir` that cargo-deb wrote after `since` (the file name holds the
/// version and the architecture, which cargo-deb decides).
fn newest_deb(dir: &Path, since: SystemTime) -> Result<PathBuf> {
    let mut found: Option<(SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("mxlb_") && name.ends_with(".deb")) {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if found.as_ref().is_none_or(|(newest, _)| modified > *newest) {
            found = Some((modified, entry.path()));
        }
    }
    match found {
        Some((modified, path)) if modified >= since => Ok(path),
        Some((_, path)) => bail!(
            "cargo deb succeeded but did not write a package: the newest is the older {}",
            path.display()
        ),
        None => bail!(
            "cargo deb succeeded but {} holds no mxlb_*.deb",
            dir.display()
        ),
    }
}
