//! Makes the eBPF object (built by `cargo xtask build-ebpf`) available to the daemon:
//! exports `MXLB_EBPF_OBJECT=<absolute path>` so the code can
//! `include_bytes_aligned!(env!("MXLB_EBPF_OBJECT"))`.
//!
//! The object is `<workspace>/target/ebpf/bpfel-unknown-none/release/mxlb`, or the file that
//! the environment variable `MXLB_EBPF_OBJECT` names (a relative path is taken from the
//! workspace root). std only: this runs before anything else in the package builds.

use std::{
    env,
    path::{Path, PathBuf},
};

const ENV: &str = "MXLB_EBPF_OBJECT";
const DEFAULT: &str = "target/ebpf/bpfel-unknown-none/release/mxlb";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed={ENV}");

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("balancer-user sits one level below the workspace root");

    let object = match env::var_os(ENV) {
        Some(path) if !path.is_empty() => workspace.join(path),
        _ => workspace.join(DEFAULT),
    };
    let object = std::path::absolute(&object).unwrap_or(object);

    // Watch the file even when it is missing: cargo then reruns this script until it appears.
    println!("cargo::rerun-if-changed={}", object.display());

    if !is_nonempty_file(&object) {
        // `cargo::error` fails the build with just this line (no script backtrace).
        println!(
            "cargo::error=eBPF object not found at {}: run `cargo xtask build-ebpf` (or `cargo xtask build`)",
            object.display()
        );
        return;
    }

    println!("cargo::rustc-env={ENV}={}", object.display());
}

fn is_nonempty_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
}
