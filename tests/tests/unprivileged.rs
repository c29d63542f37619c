//! The daemon without root (`[global] user`): it loads and pins the kernel relay and binds
//! its sockets as root, then runs as `nobody` with only `CAP_NET_BIND_SERVICE` (what a
//! reload binding port 25 needs; docs/operations.md, "Privileges"), and relays exactly as
//! the root daemon does. Checked from outside: /proc/PID/status of every thread, the pin
//! modes, what another process of the same user can reach, digests of the relayed bytes,
//! a reload that binds a port below 1024, and a clean stop that removes every pin.
//!
//! Uses the system's `nobody` user and `nogroup` group (Debian's uid/gid 65534), which the
//! tests do not create or change.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mxlb_tests::backend::{Backend, Digest256, digest_until_eof, pattern_digest, read_line};
use mxlb_tests::backend::{send_pattern, send_pattern_and_finish};
use mxlb_tests::free_addr;
use mxlb_tests::mxlb::{Finished, Mxlb, RelayKind, ServerEntry, config, pin_path};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);
const PINS: [&str; 6] = [
    "mxlb_verdict",
    "mxlb_socks",
    "mxlb_peers",
    "mxlb_traffic",
    "mxlb_control",
    "mxlb_events",
];
/// CAP_NET_BIND_SERVICE is capability 10.
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

/// uid and gid of `name` (`id -u`, `id -g`).
fn ids_of(name: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let output = Command::new("id").arg(flag).arg(name).output()?;
        ensure!(output.status.success(), "no user {name} on this system");
        Ok(String::from_utf8(output.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// The capabilities the daemon documents keeping on this host: CAP_NET_BIND_SERVICE while
/// some port (other than 0) needs it to be bound.
fn documented_capabilities() -> Result<u64> {
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?
        .trim()
        .parse()?;
    Ok(if start > 1 { CAP_NET_BIND_SERVICE } else { 0 })
}

/// One `Key:\tvalue` line of a /proc status file.
fn status_field<'a>(status: &'a str, key: &str) -> Result<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .with_context(|| format!("no {key} in:\n{status}"))
}

fn status_mask(status: &str, key: &str) -> Result<u64> {
    Ok(u64::from_str_radix(status_field(status, key)?, 16)?)
}

/// Checks the credentials of every thread of the daemon: all uids and gids are the user's,
/// no supplementary group, no_new_privs; the thread that runs the daemon (the main one)
/// holds exactly `caps` (effective, permitted, bounding), the others at most that.
fn assert_credentials(mxlb: &Mxlb, uid: u32, gid: u32, caps: u64) -> Result<()> {
    let pid = mxlb.pid();
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let status = std::fs::read_to_string(task.path().join("status"))?;
        threads += 1;
        let main = task.file_name().to_string_lossy() == pid.to_string();
        let uids = status_field(&status, "Uid")?;
        let gids = status_field(&status, "Gid")?;
        ensure!(
            uids.split_whitespace().all(|id| id == uid.to_string()),
            "thread {:?}: Uid {uids}",
            task.file_name()
        );
        ensure!(
            gids.split_whitespace().all(|id| id == gid.to_string()),
            "thread {:?}: Gid {gids}",
            task.file_name()
        );
        ensure!(
            status_field(&status, "Groups")?.is_empty(),
            "supplementary groups left:\n{status}"
        );
        for key in ["CapInh", "CapAmb"] {
            ensure!(
                status_mask(&status, key)? == 0,
                "{key} not empty:\n{status}"
            );
        }
        for key in ["CapEff", "CapPrm"] {
            let mask = status_mask(&status, key)?;
            if main {
                ensure!(
                    mask == caps,
                    "{key} {mask:#x}, documented {caps:#x}:\n{status}"
                );
            } else {
                ensure!(
                    mask & !caps == 0,
                    "{key} {mask:#x} beyond {caps:#x}:\n{status}"
                );
            }
        }
        if main {
            let bounding = status_mask(&status, "CapBnd")?;
            ensure!(
                bounding == caps,
                "CapBnd {bounding:#x}, documented {caps:#x}"
            );
            ensure!(status_field(&status, "NoNewPrivs")? == "1", "{status}");
        }
    }
    ensure!(threads >= 1, "no threads listed");
    Ok(())
}

/// The pin directory is the user's, mode 0700, and every pin root's, mode 0600.
fn assert_pin_modes(pins: &Path, uid: u32, gid: u32) -> Result<()> {
    let dir = std::fs::metadata(pins)?;
    ensure!(
        (dir.uid(), dir.gid(), dir.permissions().mode() & 0o7777) == (uid, gid, 0o700),
        "pin directory {}: {}:{} {:o}",
        pins.display(),
        dir.uid(),
        dir.gid(),
        dir.permissions().mode() & 0o7777
    );
    for name in PINS {
        let pin = std::fs::symlink_metadata(pins.join(name))?;
        ensure!(
            (pin.uid(), pin.gid(), pin.permissions().mode() & 0o7777) == (0, 0, 0o600),
            "pin {name}: {}:{} {:o}",
            pin.uid(),
            pin.gid(),
            pin.permissions().mode() & 0o7777
        );
    }
    Ok(())
}

/// A process of the same user as the daemon, without any capability, can list the pins
/// (the directory is the user's) but cannot open one; bpftool as root can.
fn assert_pins_closed_to_the_user(pins: &Path, uid: u32, gid: u32) -> Result<()> {
    let traffic = pins.join("mxlb_traffic");
    let listed = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .args(["--inh-caps=-all", "--bounding-set=-all", "ls"])
        .arg(pins)
        .output()
        .context("running setpriv (util-linux)")?;
    ensure!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).contains("mxlb_traffic"),
        "uid {uid} cannot list its own pin directory: {listed:?}"
    );
    let as_user = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "bpftool",
            "map",
            "show",
            "pinned",
        ])
        .arg(&traffic)
        .output()
        .context("running setpriv (util-linux)")?;
    let stderr = String::from_utf8_lossy(&as_user.stderr);
    ensure!(
        !as_user.status.success() && stderr.contains("Permission denied"),
        "uid {uid} opened {}: {:?} {stderr}",
        traffic.display(),
        as_user.status
    );
    let as_root = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(&traffic)
        .output()?;
    ensure!(
        as_root.status.success(),
        "root cannot read the pin: {}",
        String::from_utf8_lossy(&as_root.stderr)
    );
    Ok(())
}

/// A backend that greets, digests what the client sends until EOF, answers with `reply`
/// pattern bytes and closes.
fn echo_sink(reply: u64) -> Result<Backend<Digest256>> {
    Backend::spawn(move |mut stream, _| {
        stream.write_all(b"220 sink\r\n")?;
        let received = digest_until_eof(&mut stream)?;
        send_pattern(&mut stream, 7, reply)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(received)
    })
}

/// Sends `size` pattern bytes through `listen` and checks both directions end to end by
/// digest; returns the daemon's line for the connection.
fn relay_checked(
    mxlb: &Mxlb,
    backend: &Backend<Digest256>,
    listen: SocketAddr,
    size: u64,
    reply: u64,
) -> Result<Finished> {
    let mut client = TcpStream::connect(listen)?;
    client.set_read_timeout(Some(TIMEOUT))?;
    ensure!(read_line(&mut client)? == "220 sink\r\n", "no banner");
    let (sent, answer) = send_pattern_and_finish(&mut client, 3, size)?;
    let received = backend.next_report(TIMEOUT)?;
    ensure!(
        received == sent,
        "the backend got {received:?}, sent {sent:?}"
    );
    let answered = digest_until_eof(&mut answer.as_slice())?;
    ensure!(
        answered == pattern_digest(7, reply),
        "the client got {answered:?} back"
    );
    let finished = mxlb.finished_for(client.local_addr()?, TIMEOUT)?;
    ensure!(
        finished.ended == "closed" && finished.bytes_in == size,
        "{}",
        finished.line
    );
    Ok(finished)
}

/// A free port below 1024 on 127.0.0.1, for the reload that needs CAP_NET_BIND_SERVICE.
fn free_low_port() -> Result<u16> {
    mxlb_tests::free_low_port(600..1000)
}

fn config_as(
    user: &str,
    relay: RelayKind,
    pins: &Path,
    listen: SocketAddr,
    sink: SocketAddr,
) -> String {
    config(
        relay,
        pins,
        listen,
        &[ServerEntry {
            name: "sink",
            addr: sink,
            send_proxy: "v2",
        }],
    )
    .replacen("[global]\n", &format!("[global]\nuser = \"{user}\"\n"), 1)
}

/// The kernel relay as `nobody`: credentials, pins, 16 MiB relayed in the kernel, a reload
/// that binds a port below 1024 and relays through it, a stop that removes every pin.
#[test]
fn kernel_relay_runs_as_nobody() -> Result<()> {
    let (uid, gid) = ids_of("nobody")?;
    let caps = documented_capabilities()?;
    let backend = echo_sink(MIB)?;
    let listen = free_addr();
    let pins = pin_path("unprivileged-kernel");
    let text = config_as("nobody", RelayKind::Kernel, &pins, listen, backend.addr);
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let dropped = mxlb.log_lines("privileges dropped");
    ensure!(
        dropped.len() == 1
            && dropped[0].contains(&format!("user=nobody uid={uid}"))
            && dropped[0].contains(if caps == 0 {
                "capabilities=none"
            } else {
                "capabilities=cap_net_bind_service"
            }),
        "{dropped:?}"
    );
    assert_credentials(&mxlb, uid, gid, caps)?;
    assert_pin_modes(&pins, uid, gid)?;
    assert_pins_closed_to_the_user(&pins, uid, gid)?;
    let fds = mxlb.fd_count()?;

    // The kernel pairs the sockets at once (kernel_relay_after = 0): map updates, lookups,
    // deletes and the event ring work without root. (With the default max_inflight, a
    // backend that digests slower than the client sends also gets bytes held and relayed by
    // the daemon through mxlb_control: how many is timing, that the kernel carried some is
    // not.)
    let finished = relay_checked(&mxlb, &backend, listen, 16 * MIB, MIB)?;
    ensure!(
        finished.relay != "user" && finished.kernel_bytes > 0,
        "the kernel carried bytes: {}",
        finished.line
    );
    mxlb.wait_until_clean(fds, true)?;

    // A reload that adds a listener on a port only CAP_NET_BIND_SERVICE may bind.
    if caps & CAP_NET_BIND_SERVICE != 0 {
        let low = SocketAddr::from(([127, 0, 0, 1], free_low_port()?));
        let reloaded = format!(
            "{text}\n[[listen]]\nname = \"low\"\nbind = [\"{low}\"]\n\n\
             [[listen.server]]\nname = \"sink\"\naddr = \"{}\"\nsend_proxy = \"v2\"\n",
            backend.addr
        );
        let verdict = mxlb.reload(&reloaded)?;
        ensure!(
            verdict.contains("configuration reloaded") && verdict.contains("listeners added: low"),
            "{verdict}\n{}",
            mxlb.log()
        );
        let finished = relay_checked(&mxlb, &backend, low, MIB, MIB)?;
        ensure!(finished.kernel_bytes > 0, "{}", finished.line);
    }

    let status = mxlb.stop()?;
    ensure!(status.success(), "exit status {status}");
    for name in PINS {
        ensure!(
            !pins.join(name).exists(),
            "pin {name} left after a clean stop"
        );
    }
    // In a parent the user may write to (a sticky, world-writable /sys/fs/bpf as here),
    // the directory goes too; under a root-only parent the empty directory stays.
    let parent = std::fs::metadata(pins.parent().context("pin dir has a parent")?)?;
    if parent.permissions().mode() & 0o1002 == 0o1002 {
        ensure!(!pins.exists(), "{} left after a clean stop", pins.display());
    } else {
        let _ = std::fs::remove_dir(&pins);
    }
    Ok(())
}

/// The user-space relay as `nobody` on two runtime threads: the worker threads hold no
/// capability, the relayed bytes are exact, and the stop is clean.
#[test]
fn user_space_relay_runs_as_nobody_on_two_threads() -> Result<()> {
    let (uid, gid) = ids_of("nobody")?;
    let caps = documented_capabilities()?;
    let backend = echo_sink(MIB)?;
    let listen = free_addr();
    let pins = pin_path("unprivileged-user-space");
    let text = config_as("nobody", RelayKind::UserSpace, &pins, listen, backend.addr).replacen(
        "[global]\n",
        "[global]\nthreads = 2\n",
        1,
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    assert_credentials(&mxlb, uid, gid, caps)?;
    let threads = std::fs::read_dir(format!("/proc/{}/task", mxlb.pid()))?.count();
    ensure!(
        threads >= 3,
        "two workers and the main thread, found {threads}"
    );
    let fds = mxlb.fd_count()?;
    let finished = relay_checked(&mxlb, &backend, listen, 8 * MIB, MIB)?;
    ensure!(
        finished.relay == "user" && finished.kernel_bytes == 0,
        "{}",
        finished.line
    );
    mxlb.wait_until_clean(fds, false)?;
    ensure!(mxlb.stop()?.success());
    Ok(())
}

/// The configuration file is read again at each reload, by the unprivileged daemon: one it
/// cannot read fails the reload with the reason, and the running configuration stays.
#[test]
fn a_configuration_the_user_cannot_read_fails_the_reload() -> Result<()> {
    let backend = echo_sink(0)?;
    let listen = free_addr();
    let pins = pin_path("unprivileged-unreadable");
    let text = config_as("nobody", RelayKind::UserSpace, &pins, listen, backend.addr);
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    std::fs::write(mxlb.config_path(), &text)?;
    std::fs::set_permissions(mxlb.config_path(), std::fs::Permissions::from_mode(0o600))?;
    let before = mxlb.log_lines("reload failed").len();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(mxlb.pid() as libc::pid_t, libc::SIGHUP) };
    let failed = mxlb.wait_for_log_count("reload failed", before + 1, TIMEOUT)?;
    ensure!(
        failed
            .last()
            .is_some_and(|line| line.contains("Permission denied")),
        "{failed:?}"
    );
    // Still serving with the configuration it had.
    relay_checked(&mxlb, &backend, listen, 1024, 0)?;
    ensure!(mxlb.stop()?.success());
    Ok(())
}

/// A user or group the system does not know is a configuration error (exit 2, with the
/// place in the file), found by `check-config` and `run` before anything starts; so is root.
#[test]
fn unknown_or_root_users_are_configuration_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mxlb.toml");
    let base = "[[listen]]\nname = \"smtp\"\nbind = \"127.0.0.1:2525\"\n\
                [[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:10025\"\n";
    let cases = [
        (
            "[global]\nuser = \"mxlb-no-such-user\"\n",
            "mxlb.toml:2:8: unknown user \"mxlb-no-such-user\": not in the system's password database",
        ),
        (
            "[global]\nuser = \"nobody\"\ngroup = \"mxlb-no-such-group\"\n",
            "mxlb.toml:3:9: unknown group \"mxlb-no-such-group\"",
        ),
        (
            "[global]\nuser = \"root\"\n",
            "mxlb.toml:2:8: user \"root\" is uid 0",
        ),
        (
            "[global]\ngroup = \"nogroup\"\n",
            "mxlb.toml:2:9: group needs user",
        ),
    ];
    for (global, expected) in cases {
        std::fs::write(&path, format!("{global}\n{base}"))?;
        for args in [vec!["check-config"], vec!["run", "--config"]] {
            let output = Command::new(mxlb_tests::mxlb::binary())
                .args(&args)
                .arg(&path)
                .output()?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(
                output.status.code() == Some(2) && stderr.contains(expected),
                "{args:?} with {global:?}: {:?} {stderr}",
                output.status
            );
        }
    }
    // And a known user passes the check.
    std::fs::write(&path, format!("[global]\nuser = \"nobody\"\n\n{base}"))?;
    let output = Command::new(mxlb_tests::mxlb::binary())
        .arg("check-config")
        .arg(&path)
        .output()?;
    ensure!(output.status.success(), "{output:?}");
    Ok(())
}
