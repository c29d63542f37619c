//! Logging set-up: tracing to stderr or to syslog (`global.log_target`), as text or JSON
//! (`global.log_format`), filtered by `RUST_LOG` (default `info`). The eBPF program's
//! diagnostics appear under `mxlb::ebpf` at debug level: `RUST_LOG=info,mxlb::ebpf=debug`
//! turns them on.
//!
//! The text format is tracing's compact one: a line is `LEVEL spans: target: message
//! key=value…`, with the fields of the spans the event happened in (the connection's
//! `session=` id) after the event's own, so every field stays a plain `key=value`. To
//! syslog the line goes without its timestamp (the syslog header has one) and without
//! colours.

mod syslog;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{Global, LogFormat, LogTarget};

/// Sets up the log as `global` says. Fails only when the syslog socket cannot be reached.
pub fn init(global: &Global) -> anyhow::Result<()> {
    match &global.log_target {
        LogTarget::Stderr => {
            install(
                std::io::stderr,
                global.log_format,
                true,
                std::io::stderr().is_terminal(),
            );
        }
        LogTarget::Syslog(target) => {
            let hostname = crate::config::own_hostname(global);
            let writer = syslog::SyslogWriter::connect(target, hostname).with_context(|| {
                format!(
                    "log_target = \"syslog\": cannot reach {}",
                    target.socket.display()
                )
            })?;
            install(syslog::MakeSyslog(writer), global.log_format, false, false);
        }
    }
    Ok(())
}

/// Installs the subscriber; `stamped`: lines begin with their time.
fn install<W>(writer: W, format: LogFormat, stamped: bool, ansi: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // A second init (tests, demo after a failed start) keeps the first subscriber.
    let _ = match (format, stamped) {
        (LogFormat::Text, true) => builder.compact().try_init(),
        (LogFormat::Text, false) => builder.compact().without_time().try_init(),
        (LogFormat::Json, true) => builder.json().try_init(),
        (LogFormat::Json, false) => builder.json().without_time().try_init(),
    };
}

/// A duration in milliseconds, to the microsecond, for a log field: `0.057`, not the
/// `0.056984999999999994` of a plain conversion. Dividing a whole number of microseconds
/// by 1000 gives the double nearest the 3-decimal value, which prints as just that.
pub fn millis(duration: Duration) -> f64 {
    let micros = (duration.as_nanos() + 500) / 1000;
    micros as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_print_with_at_most_three_decimals() {
        let cases = [
            (Duration::from_nanos(56_985), "0.057"),
            (Duration::from_nanos(15_258_400_520), "15258.401"),
            (Duration::from_nanos(15_258_400_499), "15258.4"),
            (Duration::from_millis(8530), "8530"),
            (Duration::from_nanos(499), "0"),
            (Duration::from_nanos(1_500), "0.002"),
        ];
        for (duration, text) in cases {
            assert_eq!(millis(duration).to_string(), text, "{duration:?}");
        }
    }

    #[test]
    fn every_microsecond_up_to_a_minute_prints_as_its_decimal() {
        // Spread over the range, a prime step: each prints as exactly 3 decimals or fewer.
        for micros in (0..60_000_000u64).step_by(7_919) {
            let text = millis(Duration::from_micros(micros)).to_string();
            let expected = format!("{}.{:03}", micros / 1000, micros % 1000);
            let expected = expected.trim_end_matches('0').trim_end_matches('.');
            assert_eq!(text, expected, "{micros} µs");
        }
    }
}
