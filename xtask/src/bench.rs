//! `cargo xtask bench`: the side-by-side benchmark (docs/benchmarks.md).

use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    bail!("`cargo xtask bench` is not implemented yet (issue 6)")
}
