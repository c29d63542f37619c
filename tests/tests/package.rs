//! The Debian package (`cargo xtask package`), installed on this machine with `dpkg -i`:
//! the `mxlb` system user, the files, the conffile that passes `check-config`, the unit
//! that `systemd-analyze verify` accepts and that is neither enabled nor started. Then the
//! daemon is started the way the unit starts it, without systemd (PID 1 here is not
//! systemd): the installed unit's `ExecStartPre=` and `ExecStart=` under `prlimit` (its
//! `LimitNOFILE=`) and `setpriv` (its `CapabilityBoundingSet=` and `NoNewPrivileges=`),
//! with `NOTIFY_SOCKET` pointing at the test (`Type=notify`). The only change: the test's
//! own configuration instead of /etc/mxlb/mxlb.toml, with two real Postfix backends and
//! the kernel relay. Mail goes through it intact with the client's address, the daemon
//! runs as `mxlb` with only `CAP_NET_BIND_SERVICE`, stops on SIGTERM, and `dpkg --purge`
//! takes the package, the user and /etc/mxlb away again.
//!
//! Needs root and `MXLB_DEB` (the .deb; `cargo xtask test` builds it and sets it). It
//! refuses to run where an mxlb package, /usr/bin/mxlb or an `mxlb` user already exist,
//! and leaves the machine as it found it, on failure too.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::delivery::send_round_robin;
use mxlb_tests::mxlb::{Mxlb, RelayKind, config_with_listener_keys, pin_path, two_proxy_backends};
use mxlb_tests::run_command;

const DEB_ENV: &str = "MXLB_DEB";
const BINARY: &str = "/usr/bin/mxlb";
const CONFFILE: &str = "/etc/mxlb/mxlb.toml";
/// cargo-deb installs units under /usr/lib; /lib is the same directory on Debian 12.
const UNIT: &str = "/lib/systemd/system/mxlb.service";
/// CAP_NET_BIND_SERVICE is capability 10: all the daemon keeps.
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn the_package_installs_runs_as_its_unit_says_and_purges() -> Result<()> {
    let deb = package_path()?;
    ensure!(
        nix_euid() == 0,
        "the package test installs a .deb: run it as root (CI does)"
    );
    ensure_machine_is_clean()?;

    let installed = Installed::install(&deb)?;
    check_installation()?;
    let unit = Unit::read(Path::new(UNIT))?;
    check_unit(&unit)?;
    run_as_the_unit_does(&unit)?;
    installed.purge()?;
    check_purged()
}

/// The .deb from `MXLB_DEB`: absent is a failure, never a skip.
fn package_path() -> Result<PathBuf> {
    let Some(path) = std::env::var_os(DEB_ENV) else {
        bail!(
            "{DEB_ENV} is not set: this test installs the Debian package. `cargo xtask test` \
             builds it and sets {DEB_ENV}; by hand: `cargo xtask package`, then \
             {DEB_ENV}=target/debian/mxlb_<version>_<arch>.deb cargo test --test package"
        );
    };
    let path = PathBuf::from(path);
    ensure!(path.is_file(), "{DEB_ENV}={} is not a file", path.display());
    Ok(path)
}

fn nix_euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Runs a command to its end; fails unless it exits 0, with its output.
fn run(command: &mut Command) -> Result<String> {
    let out = run_command(command, TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}",
        out.status,
        out.output
    );
    Ok(out.output)
}

/// dpkg's status of the mxlb package: `None` when dpkg knows nothing of it.
fn package_status() -> Result<Option<String>> {
    let out = run_command(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", "mxlb"]),
        TIMEOUT,
    )?;
    Ok(out
        .status
        .success()
        .then(|| out.output.trim().to_owned())
        .filter(|status| !status.is_empty() && status != "unknown ok not-installed"))
}

/// `getent DATABASE mxlb`, split at the colons, if there is such an entry.
fn getent(database: &str) -> Result<Option<Vec<String>>> {
    let out = run_command(Command::new("getent").args([database, "mxlb"]), TIMEOUT)?;
    Ok(out
        .status
        .success()
        .then(|| out.output.trim().split(':').map(str::to_owned).collect()))
}

/// The test installs and purges a package on this machine: only where nothing of mxlb is.
fn ensure_machine_is_clean() -> Result<()> {
    if let Some(status) = package_status()? {
        bail!(
            "the mxlb package is already on this machine ({status}): the test would replace \
             it (a test run that was killed leaves it: `dpkg --purge mxlb`)"
        );
    }
    for path in [BINARY, "/etc/mxlb", UNIT] {
        ensure!(
            !Path::new(path).exists(),
            "{path} exists already: the test would install over it"
        );
    }
    ensure!(
        getent("passwd")?.is_none() && getent("group")?.is_none(),
        "an mxlb user or group exists already: the package's purge would remove it"
    );
    Ok(())
}

/// The installed package; purged on drop if the test did not get that far.
struct Installed {
    purged: bool,
}

impl Installed {
    fn install(deb: &Path) -> Result<Installed> {
        let installed = Installed { purged: false };
        run(Command::new("dpkg").arg("-i").arg(deb)).context("dpkg -i")?;
        Ok(installed)
    }

    fn purge(mut self) -> Result<()> {
        self.purged = true;
        run(Command::new("dpkg").args(["--purge", "mxlb"])).context("dpkg --purge mxlb")?;
        Ok(())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let purge = run(Command::new("dpkg").args(["--purge", "mxlb"]));
            if let Err(error) = purge {
                eprintln!("cleaning up: {error:#}");
            }
        }
    }
}

/// The user, the files and their modes, the conffile.
fn check_installation() -> Result<()> {
    let status = package_status()?;
    ensure!(
        status.as_deref() == Some("install ok installed"),
        "dpkg status after dpkg -i: {status:?}"
    );
    let user = getent("passwd")?.context("postinst made no mxlb user")?;
    let group = getent("group")?.context("postinst made no mxlb group")?;
    let uid: u32 = user[2].parse()?;
    let gid: u32 = group[2].parse()?;
    ensure!(uid > 0 && uid < 1000, "mxlb is not a system user: {user:?}");
    ensure!(
        user[3] == group[2],
        "mxlb's primary group is not mxlb: {user:?}"
    );
    ensure!(user[5] == "/nonexistent", "mxlb's home: {user:?}");
    ensure!(
        !Path::new("/nonexistent").exists(),
        "postinst created /nonexistent"
    );
    ensure!(user[6].ends_with("nologin"), "mxlb's shell: {user:?}");

    let listed = run(Command::new("dpkg").args(["-L", "mxlb"]))?;
    for path in [
        BINARY,
        "/usr/lib/systemd/system/mxlb.service",
        CONFFILE,
        "/usr/share/doc/mxlb/README.md",
        "/usr/share/doc/mxlb/operations.md",
        "/usr/share/doc/mxlb/configuration.md",
        "/usr/share/doc/mxlb/security.md",
    ] {
        ensure!(
            listed.lines().any(|line| line == path),
            "{path} is not in the package:\n{listed}"
        );
        ensure!(Path::new(path).is_file(), "{path} is not installed");
    }
    ensure!(Path::new(UNIT).is_file(), "{UNIT} missing");
    let binary = std::fs::metadata(BINARY)?;
    ensure!(
        binary.permissions().mode() & 0o777 == 0o755,
        "{BINARY} mode"
    );

    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "mxlb"]))?;
    ensure!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is not a conffile: {conffiles:?}"
    );
    let conf = std::fs::metadata(CONFFILE)?;
    ensure!(
        (conf.uid(), conf.gid(), conf.permissions().mode() & 0o777) == (0, gid, 0o640),
        "{CONFFILE} is {}:{} {:o}, not root:mxlb 0640",
        conf.uid(),
        conf.gid(),
        conf.permissions().mode() & 0o777
    );
    let checked = run(Command::new(BINARY).args(["check-config", CONFFILE]))?;
    ensure!(
        checked.contains(": ok (1 listener, 2 servers)") && !checked.contains("warning"),
        "check-config of the shipped example: {checked}"
    );
    // Installed, not enabled: a balancer on port 25 with an example configuration does not
    // start unasked (docs/operations.md, "Install").
    ensure!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/mxlb.service").exists(),
        "the package enabled mxlb.service"
    );
    Ok(())
}

/// The `[Service]` section of a unit file: (key, value) in file order.
struct Unit {
    service: Vec<(String, String)>,
}

impl Unit {
    fn read(path: &Path) -> Result<Unit> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Unit::parse(&text))
    }

    fn parse(text: &str) -> Unit {
        let mut section = "";
        let mut service = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
            } else if section == "Service"
                && let Some((key, value)) = line.split_once('=')
            {
                service.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        Unit { service }
    }

    /// The last value of `key` (systemd's rule for single-valued keys).
    fn get(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn require(&self, key: &str) -> Result<&str> {
        self.get(key)
            .with_context(|| format!("the unit has no {key}="))
    }
}

/// `systemd-analyze verify`, and the keys the daemon's start depends on.
fn check_unit(unit: &Unit) -> Result<()> {
    let verify = run_command(
        Command::new("systemd-analyze").args(["verify", UNIT]),
        TIMEOUT,
    )
    .context("systemd-analyze (Debian's systemd package) is needed to check the unit")?;
    ensure!(
        verify.status.success() && !verify.output.contains("mxlb.service"),
        "systemd-analyze verify {UNIT} ({}):\n{}",
        verify.status,
        verify.output
    );
    ensure!(unit.require("Type")? == "notify", "Type=");
    // The daemon starts as root and drops to `[global] user` itself.
    ensure!(unit.get("User").is_none(), "User= is set");
    ensure!(
        unit.all("ExecReload")
            .iter()
            .any(|line| line.contains("-HUP $MAINPID")),
        "ExecReload= sends no SIGHUP"
    );
    Ok(())
}

/// An `Exec*=` line as words, with the installed configuration's path replaced by
/// `config`: the test's configuration runs where the unit names /etc/mxlb/mxlb.toml.
fn exec_words(line: &str, config: &Path) -> Result<Vec<String>> {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|word| {
            if word == CONFFILE {
                config.display().to_string()
            } else {
                word.to_owned()
            }
        })
        .collect();
    ensure!(
        line.split_whitespace().any(|word| word == CONFFILE),
        "{line:?} does not name {CONFFILE}"
    );
    ensure!(words[0] == BINARY, "{line:?} does not run {BINARY}");
    Ok(words)
}

/// The unit's `LimitNOFILE=`, which must fit the default `global.maxconn` (20000): two
/// descriptors per connection and the 256 the daemon keeps beside them.
fn unit_open_files(unit: &Unit) -> Result<u64> {
    let files: u64 = unit
        .require("LimitNOFILE")?
        .parse()
        .context("LimitNOFILE= as a number")?;
    ensure!(
        files >= 2 * 20_000 + 256,
        "LimitNOFILE={files} is below the 40256 descriptors the default maxconn needs"
    );
    Ok(files)
}

/// The open-files limit the test can give the daemon: the unit's, or, where this process
/// may not raise its hard limit (a container without CAP_SYS_RESOURCE, which systemd has),
/// the hard limit it has, said on stderr.
fn open_files_limit(unit: &Unit) -> Result<u64> {
    let wanted = unit_open_files(unit)?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    const CAP_SYS_RESOURCE: u64 = 1 << 24;
    if u64::from_str_radix(effective.trim(), 16)? & CAP_SYS_RESOURCE != 0 {
        return Ok(wanted);
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "getrlimit"
    );
    let hard = limit.rlim_max.min(wanted);
    eprintln!(
        "this test process lacks CAP_SYS_RESOURCE: the daemon gets its hard open-files \
         limit {hard}, not the unit's LimitNOFILE={wanted}"
    );
    Ok(hard)
}

/// `prlimit` and `setpriv` in front of `words`, as the unit's limits and capabilities say
/// (`files`: see [`open_files_limit`]).
fn as_the_unit(unit: &Unit, files: u64, words: &[String]) -> Result<Command> {
    let bounding: Vec<String> = unit
        .require("CapabilityBoundingSet")?
        .split_whitespace()
        .map(|cap| {
            let name = cap.strip_prefix("CAP_").unwrap_or(cap).to_lowercase();
            format!("+{name}")
        })
        .collect();
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={files}:{files}"))
        .arg("--")
        .arg("setpriv")
        .arg(format!("--bounding-set=-all,{}", bounding.join(",")));
    if unit.require("NoNewPrivileges")? == "yes" {
        command.arg("--no-new-privs");
    }
    command.arg("--").args(words);
    Ok(command)
}

/// A free port below 1024: the start must be able to bind port 25 and its kin. Another
/// range than unprivileged.rs's, which looks for one at the same time.
fn free_low_port() -> Result<u16> {
    mxlb_tests::free_low_port(400..600)
}

fn run_as_the_unit_does(unit: &Unit) -> Result<()> {
    let (postfix, servers) = two_proxy_backends()?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_low_port()?));
    let pins = pin_path("package");
    let text = config_with_listener_keys(
        RelayKind::Kernel,
        &pins,
        listen,
        &servers,
        "\n[listen.check]\ntype = \"smtp\"\nverb = \"EHLO\"\ndomain = \"lb.example.test\"\n\
         inter = \"1s\"\n",
    );
    let text = mxlb_tests::mxlb::with_user(&text, "mxlb");

    // As the package keeps its conffile: root:mxlb 0640 in a directory anyone may enter.
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let config = dir.path().join("mxlb.toml");
    std::fs::write(&config, &text)?;
    let gid: u32 = getent("group")?.context("no mxlb group")?[2].parse()?;
    std::os::unix::fs::chown(&config, Some(0), Some(gid))?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640))?;

    let files = open_files_limit(unit)?;
    for pre in unit.all("ExecStartPre") {
        let words = exec_words(pre, &config)?;
        let checked = run(&mut as_the_unit(unit, files, &words)?)?;
        ensure!(checked.contains(": ok"), "ExecStartPre={pre}: {checked}");
    }

    // systemd's side of Type=notify: an abstract datagram socket, as systemd uses.
    let name = format!("mxlb-package-test-{}", std::process::id());
    let notify = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;

    let words = exec_words(unit.require("ExecStart")?, &config)?;
    let mut command = as_the_unit(unit, files, &words)?;
    command.env("NOTIFY_SOCKET", format!("@{name}"));
    let mxlb = Mxlb::spawn(command, dir, listen, &pins)?;

    let ready = wait_for_notification(&notify, "READY=1")?;
    ensure!(
        ready.contains(&format!("MAINPID={}", mxlb.pid())),
        "READY=1 names another process: {ready}"
    );
    check_credentials(&mxlb, gid, files)?;
    let log = mxlb.log();
    // The daemon warns when the limit does not fit maxconn: never with the unit's.
    ensure!(
        log.contains("open files limit") == (files < unit_open_files(unit)?),
        "open files limit {files}:\n{log}"
    );
    ensure!(
        log.contains("relay: kernel")
            && log.contains("privileges dropped user=mxlb")
            && log.contains("capabilities=cap_net_bind_service"),
        "{log}"
    );

    // Mail through the kernel relay, checked by the Maildir and Postfix's log: intact,
    // alternating backends, the true client address; health checks came from 127.0.0.1.
    let deliveries = send_round_robin(
        listen,
        &postfix,
        41..=44,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        true,
    )?;
    let finished = mxlb.wait_for_log_count("connection finished", deliveries.len(), TIMEOUT)?;
    ensure!(
        finished.iter().all(|line| line.contains("relay=kernel")),
        "{finished:?}"
    );

    let started = Instant::now();
    let status = mxlb.stop()?;
    ensure!(status.success(), "SIGTERM: mxlb exited with {status}");
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "the stop took {:?}",
        started.elapsed()
    );
    wait_for_notification(&notify, "STOPPING=1")?;
    ensure!(!pins.exists(), "pins left behind at {}", pins.display());
    Ok(())
}

/// The daemon's main thread after the switch: uid and gid mxlb's, no supplementary group,
/// only CAP_NET_BIND_SERVICE (effective, permitted, bounding), no_new_privs, `files` open
/// files at most.
fn check_credentials(mxlb: &Mxlb, gid: u32, files: u64) -> Result<()> {
    let uid: u32 = getent("passwd")?.context("no mxlb user")?[2].parse()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", mxlb.pid()))?;
    let field = |key: &str| -> Result<String> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .with_context(|| format!("no {key} in:\n{status}"))
    };
    let ids = |key: &str, id: u32| -> Result<()> {
        let value = field(key)?;
        ensure!(
            value.split_whitespace().all(|v| v == id.to_string()),
            "{key}: {value}, not {id}:\n{status}"
        );
        Ok(())
    };
    ids("Uid", uid)?;
    ids("Gid", gid)?;
    ensure!(field("Groups")?.is_empty(), "{status}");
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        let mask = u64::from_str_radix(&field(key)?, 16)?;
        ensure!(mask == CAP_NET_BIND_SERVICE, "{key} {mask:#x}:\n{status}");
    }
    ensure!(field("NoNewPrivs")? == "1", "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", mxlb.pid()))?;
    ensure!(
        limits
            .lines()
            .filter(|line| line.starts_with("Max open files"))
            .any(|line| line.split_whitespace().nth(3) == Some(&files.to_string())),
        "{limits}"
    );
    Ok(())
}

/// Waits for the sd_notify datagram that starts with `state`.
fn wait_for_notification(socket: &UnixDatagram, state: &str) -> Result<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut buffer = [0u8; 512];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match socket.recv(&mut buffer) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
                if message.starts_with(state) {
                    return Ok(message);
                }
                seen.push(message);
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error.into()),
        }
    }
    bail!("no {state} from the daemon within {TIMEOUT:?}; got {seen:?}")
}

/// Nothing of the package is left: not in dpkg, no files, no user, no group.
fn check_purged() -> Result<()> {
    let status = package_status()?;
    ensure!(
        status.is_none(),
        "dpkg still knows mxlb after --purge: {status:?}"
    );
    for path in [BINARY, "/etc/mxlb", UNIT, "/usr/share/doc/mxlb"] {
        ensure!(!Path::new(path).exists(), "{path} left after --purge");
    }
    ensure!(
        getent("passwd")?.is_none(),
        "the mxlb user is left after --purge"
    );
    ensure!(
        getent("group")?.is_none(),
        "the mxlb group is left after --purge"
    );
    Ok(())
}

#[test]
fn units_read_like_systemd() {
    let unit = Unit::parse(
        "[Unit]\nDescription=x\n[Service]\n# LimitNOFILE=1\nType=notify\n\
         ExecReload=/a\nExecReload=/b\nLimitNOFILE=10\nLimitNOFILE=20\n[Install]\nType=no\n",
    );
    assert_eq!(unit.get("Type"), Some("notify"));
    assert_eq!(unit.all("ExecReload"), ["/a", "/b"]);
    assert_eq!(unit.get("LimitNOFILE"), Some("20"));
    assert_eq!(unit.get("Description"), None);
}
