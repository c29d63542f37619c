//! The `mxlb` command as an operator types it: its name and version, what `check-config`
//! says, and how a daemon that cannot start says why (once, in its log format).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use mxlb_tests::mxlb::{RelayKind, ServerEntry, binary, config, pin_path, with_global_keys};
use mxlb_tests::{CommandOutput, free_addr, run_command};

fn mxlb(args: &[&str]) -> Result<CommandOutput> {
    run_command(Command::new(binary()).args(args), Duration::from_secs(20))
}

#[test]
fn version_names_the_command() -> Result<()> {
    let output = mxlb(&["--version"])?;
    ensure!(output.status.success(), "{}", output.output);
    // The workspace shares one version: the tests' package has the binary's.
    let expected = format!("mxlb {}\n", env!("CARGO_PKG_VERSION"));
    ensure!(output.output == expected, "{:?}", output.output);
    Ok(())
}

/// `check-config` counts in words: "1 listener", "2 servers".
#[test]
fn check_config_counts_listeners_and_servers_in_words() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = |name: &str, port: u16| {
        format!("[[listen.server]]\nname = \"{name}\"\naddr = \"127.0.0.1:{port}\"\n")
    };
    let listener = |name: &str, port: u16| {
        format!("[[listen]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\n")
    };
    for (text, summary) in [
        (
            format!("{}{}", listener("smtp", 2525), server("a", 10025)),
            "ok (1 listener, 1 server)",
        ),
        (
            format!(
                "{}{}{}{}{}",
                listener("smtp", 2525),
                server("a", 10025),
                server("b", 10026),
                listener("submission", 2587),
                server("c", 10027)
            ),
            "ok (2 listeners, 3 servers)",
        ),
    ] {
        let path = dir.path().join("mxlb.toml");
        std::fs::write(&path, text)?;
        let output = mxlb(&["check-config", &path.display().to_string()])?;
        let expected = format!("{}: {summary}\n", path.display());
        ensure!(
            output.status.success() && output.output == expected,
            "{}: expected {expected:?}, got {:?}",
            output.status,
            output.output
        );
    }
    Ok(())
}

/// A daemon that cannot bind says so in one log line, in the configured format, and
/// exits 1.
#[test]
fn a_start_failure_is_one_log_line_and_exit_1() -> Result<()> {
    let taken = TcpListener::bind(free_addr())?;
    let listen = taken.local_addr()?;
    let server = ServerEntry {
        name: "mail1",
        addr: free_addr(),
        send_proxy: "none",
    };
    let text = config(
        RelayKind::UserSpace,
        &pin_path("start-failure"),
        listen,
        &[server],
    );
    for format in ["text", "json"] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mxlb.toml");
        let text = with_global_keys(&text, &format!("log_format = \"{format}\"\n"));
        std::fs::write(&path, text)?;
        let output = run(&path)?;
        ensure!(
            output.status.code() == Some(1),
            "{format}: expected exit 1, got {}: {}",
            output.status,
            output.output
        );
        let why = format!("binding {listen}: Address already in use");
        let mentions: Vec<&str> = output.output.lines().filter(|l| l.contains(&why)).collect();
        ensure!(
            mentions.len() == 1,
            "{format}: expected one line with {why:?}, got:\n{}",
            output.output
        );
        let line = mentions[0];
        match format {
            "text" => ensure!(line.contains(" ERROR mxlb: "), "{line}"),
            _ => {
                for line in output.output.lines() {
                    let parsed: serde_json::Value = serde_json::from_str(line)
                        .map_err(|error| anyhow::anyhow!("not JSON ({error}): {line}"))?;
                    if line.contains(&why) {
                        ensure!(parsed["level"] == "ERROR", "{line}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn run(path: &Path) -> Result<CommandOutput> {
    mxlb(&["run", "--config", &path.display().to_string()])
}
