//! Logging set-up: tracing to stderr, as text or JSON (`global.log_format`), filtered by
//! `RUST_LOG` (default `info`). The eBPF program's diagnostics appear under `mxlb::ebpf` at
//! debug level: `RUST_LOG=info,mxlb::ebpf=debug` turns them on.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests, demo after a failed start) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
