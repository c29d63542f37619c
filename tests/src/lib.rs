//! Fixtures for mxlb integration tests: real programs, not mocks.
//!
//! - [`postfix::PostfixInstance`]: a private Postfix instance with one smtpd service per
//!   simulated backend, delivering into a Maildir the test reads back.
//! - [`swaks::Swaks`]: the `swaks` SMTP client, sending from a chosen loopback address.
//! - [`haproxy::Haproxy`]: Debian's HAProxy 2.6, the reference balancer mxlb is compared with.
//!
//! Everything binds to loopback addresses only. Each fixture lives in its own temporary
//! directory so tests can run in parallel (within one test binary and across binaries);
//! the only shared resource is the port space, see [`free_port`]. Set `MXLB_KEEP_TEST_DIRS`
//! to keep those directories (logs, configs, mail) for a post-mortem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub mod backend;
pub mod delivery;
pub mod haproxy;
pub mod mxlb;
pub mod postfix;
pub mod swaks;

/// Environment variable that keeps fixture directories instead of deleting them.
pub const KEEP_DIRS_ENV: &str = "MXLB_KEEP_TEST_DIRS";

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning so that the fixture (Postfix, HAProxy, mxlb) can
/// bind it itself; another process could grab it in between, but the kernel hands out
/// ports for `bind(0)` randomly, so collisions between parallel tests are very unlikely.
///
/// # Panics
/// If no port can be bound at all, which means the test host is broken.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("cannot bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("bound socket has no local address")
        .port()
}

/// `127.0.0.1:<free port>`, see [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether some socket is listening on exactly `addr` (TCP), according to `/proc/net/tcp*`.
///
/// Fixtures use this instead of a test connection because a connection to an smtpd (or to a
/// balancer in front of one) is a real SMTP session: it would show up in Postfix's log as a
/// connect plus "lost connection" and spoil the assertions tests make about that log.
pub fn is_listening(addr: SocketAddr) -> Result<bool> {
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
    // Lines look like "0: 0100007F:4E21 00000000:0000 0A ...": local address, remote, state.
    Ok(text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        state == "0A" && parse_proc_net_addr(local) == Some(addr)
    }))
}

/// Parses "0100007F:4E21": the address is the in-memory (network order) bytes printed as
/// native-endian 32-bit words, the port is printed big-endian.
fn parse_proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in ip_hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Waits until every address in `addrs` has a listening socket.
pub fn wait_for_listen(addrs: &[SocketAddr], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for &addr in addrs {
        while !is_listening(addr)? {
            if Instant::now() >= deadline {
                bail!("nothing listens on {addr} after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Polls `check` every `interval` until it returns `Some`, or fails after `timeout`
/// with an error describing `what` was awaited.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(interval);
    }
}

/// Exit status and combined stdout+stderr of a finished command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    /// stdout and stderr interleaved in the order they were written.
    pub output: String,
}

/// Runs `cmd` to completion with stdin closed, killing it after `timeout`.
///
/// stdout and stderr go to one anonymous file rather than pipes: the interleaving is kept
/// (handy for swaks transcripts), and daemons forked by the command (Postfix's master) can
/// keep the descriptors open without making us wait for an EOF that never comes.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Result<CommandOutput> {
    let program = format!("{cmd:?}");
    let mut file = tempfile::tempfile().context("creating a temporary file for command output")?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file.try_clone()?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Best effort: the child may exit on its own right now.
            let _ = child.kill();
            let _ = child.wait();
            let output = read_all(&mut file).unwrap_or_default();
            bail!("{program} did not finish within {timeout:?}; output so far:\n{output}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let output = read_all(&mut file)?;
    Ok(CommandOutput { status, output })
}

fn read_all(file: &mut File) -> Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A fixture's private directory, world-traversable because Postfix's unprivileged
/// daemons need to reach paths inside it.
pub(crate) fn create_test_dir(prefix: &str) -> Result<TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", dir.path().display()))?;
    Ok(dir)
}

/// Deletes a fixture's directory, or keeps it (and says where) if `MXLB_KEEP_TEST_DIRS`
/// is set.
pub(crate) fn release_test_dir(dir: TempDir, what: &str) {
    if std::env::var_os(KEEP_DIRS_ENV).is_some() {
        let path = dir.keep();
        eprintln!("{KEEP_DIRS_ENV}: kept {what} directory {}", path.display());
    } else if let Err(err) = dir.close() {
        eprintln!("warning: cannot remove {what} directory: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        let v4 = parse_proc_net_addr("0100007F:4E21").unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(v4, "127.0.0.1:20001".parse().unwrap());
        }
        let v6 = parse_proc_net_addr("00000000000000000000000001000000:0019").unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(v6, "[::1]:25".parse().unwrap());
        }
    }

    #[test]
    fn sees_a_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(is_listening(addr).unwrap());
        drop(listener);
        assert!(!is_listening(addr).unwrap());
    }
}
