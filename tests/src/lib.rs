//! Fixtures for mxlb integration tests: real programs, not mocks.
//!
//! - [`postfix::PostfixInstance`]: a private Postfix instance with one smtpd service per
//!   simulated backend, delivering into a Maildir the test reads back.
//! - [`swaks::Swaks`]: the `swaks` SMTP client, sending from a chosen loopback address.
//! - [`haproxy::Haproxy`]: Debian's HAProxy 2.6, the reference balancer mxlb is compared with.
//! - [`mxlb::Mxlb`]: the daemon under test as a child process, with its log, CPU time, fds,
//!   pinned maps (through bpftool) and stats API.
//! - [`backend`]: scripted TCP peers for exact control over bytes, half-closes and resets.
//! - [`delivery`]: the round-robin delivery check every balancer under test must pass.
//!
//! Everything binds to loopback addresses only. Each fixture lives in its own temporary
//! directory so tests can run in parallel (within one test binary and across binaries);
//! the only shared resource is the port space, see [`free_port`]. Set `MXLB_KEEP_TEST_DIRS`
//! to keep those directories (logs, configs, mail) for a post-mortem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub mod backend;
pub mod chaos;
pub mod delivery;
pub mod haproxy;
pub mod keepalived;
pub mod mxlb;
pub mod netns;
pub mod postfix;
pub mod smtp_source;
pub mod swaks;

/// Runs each named test body, `fn name(relay: RelayKind) -> anyhow::Result<()>`, once per
/// relay: it becomes a module `name` with the tests `kernel`, `adaptive` and `userspace`
/// (so `cargo test name::kernel` picks one).
#[macro_export]
macro_rules! for_each_relay {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn kernel() -> ::anyhow::Result<()> {
                super::$name($crate::mxlb::RelayKind::Kernel)
            }
            #[test]
            fn adaptive() -> ::anyhow::Result<()> {
                super::$name($crate::mxlb::RelayKind::Adaptive)
            }
            #[test]
            fn userspace() -> ::anyhow::Result<()> {
                super::$name($crate::mxlb::RelayKind::UserSpace)
            }
        }
    )*};
}

/// Environment variable that keeps fixture directories instead of deleting them.
pub const KEEP_DIRS_ENV: &str = "MXLB_KEEP_TEST_DIRS";

/// A TCP port on 127.0.0.1 for a fixture to listen on, reserved for the rest of this
/// process's life.
///
/// Not simply "bind port 0 and release it": the kernel hands the released port to the next
/// `bind(0)` of any process, so two parallel test binaries got the same port, and HAProxy
/// (which sets SO_REUSEPORT) happily shared it, mixing up their sessions. Instead ports
/// come from below the kernel's ephemeral range (so outgoing connections never occupy
/// them), are reserved across processes by a `flock` on `$TMPDIR/mxlb-test-ports/<port>`
/// held until the process exits, and must have no listener right now.
///
/// # Panics
/// If no port can be reserved, which means the test host is broken.
pub fn free_port() -> u16 {
    reserve_port().expect("cannot reserve a free TCP port on 127.0.0.1")
}

fn reserve_port() -> Result<u16> {
    static RESERVATIONS: Mutex<Vec<File>> = Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // With an unusually low ephemeral range, share it with outgoing connections: the locks
    // and the listener check still keep fixtures apart.
    let end = if ephemeral_start >= LOWEST + 1_000 {
        ephemeral_start
    } else {
        u16::MAX
    };
    let candidates = end - LOWEST;
    let dir = std::env::temp_dir().join("mxlb-test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // Random candidates, so parallel processes rarely contend for the same locks.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut state = u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1;
    for _ in 0..1000 {
        // xorshift64: plenty for spreading candidates.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = LOWEST + (state % u64::from(candidates)) as u16;
        let lock_path = dir.join(port.to_string());
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // Taken by another thread or process of ours (locks are per open file, so this
        // covers both), or in use by anything else: try the next one.
        if lock.try_lock().is_err() || port_in_use(port)? {
            continue;
        }
        RESERVATIONS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(lock);
        return Ok(port);
    }
    bail!("no free port found in 1000 attempts")
}

/// A TCP connection to `to` from the local address `source` (port chosen by the kernel):
/// tests stand in for many clients with the loopback block's many addresses.
pub fn connect_from(
    source: IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket
        .connect_timeout(&to.into(), timeout)
        .with_context(|| format!("connecting from {source} to {to}"))?;
    Ok(socket.into())
}

/// The highest port of `ports` (below 1024, for binds that need CAP_NET_BIND_SERVICE)
/// that nothing listens on. Not reserved like [`free_port`]: tests that look for one at
/// the same time use ranges of their own.
pub fn free_low_port(ports: std::ops::Range<u16>) -> Result<u16> {
    for port in ports.clone().rev() {
        if !port_in_use(port)? {
            return Ok(port);
        }
    }
    bail!("no free port in {ports:?}")
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
    Ok(tcp_sockets()?
        .iter()
        .any(|&(local, state)| state == TCP_LISTEN && local == addr))
}

/// Whether any TCP socket, on any address, listens on `port` (such a socket makes binding
/// the port on 127.0.0.1 fail).
///
/// Looked up rather than tried with a bind: a test socket, even closed at once, lives on in
/// any child another test thread forks at that moment until that child execs, and makes
/// the real server's bind fail.
pub fn port_in_use(port: u16) -> Result<bool> {
    Ok(tcp_sockets()?
        .iter()
        .any(|&(local, state)| state == TCP_LISTEN && local.port() == port))
}

/// `TCP_LISTEN` as printed in `/proc/net/tcp`.
const TCP_LISTEN: u8 = 0x0A;

/// (local address, state) of every TCP socket in this network namespace.
fn tcp_sockets() -> Result<Vec<(SocketAddr, u8)>> {
    let mut sockets = Vec::new();
    // The calling thread's own tables: a test thread may have joined a network namespace
    // of its own (`/proc/net` would show the main thread's).
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // No IPv6 in this kernel or namespace.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("reading {table}")),
        };
        // Lines look like "0: 0100007F:4E21 00000000:0000 0A ...": local, remote, state.
        sockets.extend(text.lines().skip(1).filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = parse_proc_net_addr(fields.next()?)?;
            let state = u8::from_str_radix(fields.nth(1)?, 16).ok()?;
            Some((local, state))
        }));
    }
    Ok(sockets)
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

/// `ss` output for every TCP socket using local port `port`, for error messages.
pub fn sockets_on_port(port: u16) -> String {
    run_command(
        Command::new("ss").args(["-tanpe", "sport", "=", &format!(":{port}")]),
        Duration::from_secs(5),
    )
    .map_or_else(|err| format!("(ss failed: {err:#})"), |out| out.output)
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
    use std::net::TcpListener;

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
    fn reserves_distinct_unused_ports() {
        let ports: std::collections::HashSet<u16> = (0..20).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|&p| !port_in_use(p).unwrap()));
    }

    #[test]
    fn sees_a_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(is_listening(addr).unwrap());
        assert!(port_in_use(addr.port()).unwrap());
        drop(listener);
        assert!(!is_listening(addr).unwrap());
        assert!(!port_in_use(addr.port()).unwrap());
    }
}
