//! The real `mxlb` daemon as a child process: config written to a temp dir, stderr
//! captured, and the facts tests check afterwards (log, CPU time, open fds, map entries).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which relay a test runs the daemon with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayKind {
    /// The kernel relay, pairing every connection at once (`kernel_relay_after = 0`): the
    /// kernel path under test for every byte.
    Kernel,
    /// The kernel relay with its default policy: user space first, the kernel once a
    /// connection has moved `kernel_relay_after` bytes.
    Adaptive,
    UserSpace,
}

impl RelayKind {
    /// The `global.relay` value. Kernel tests say `sockmap`, never `auto`: on these machines
    /// the kernel relay must load, and a test must fail rather than fall back.
    pub fn config_value(self) -> &'static str {
        match self {
            RelayKind::Kernel | RelayKind::Adaptive => "sockmap",
            RelayKind::UserSpace => "userspace",
        }
    }

    /// Whether the kernel relay (and its maps) is in use.
    pub fn is_kernel(self) -> bool {
        self != RelayKind::UserSpace
    }

    /// Extra `[global]` keys for this kind.
    fn global_keys(self) -> &'static str {
        match self {
            RelayKind::Kernel => "kernel_relay_after = 0\n",
            RelayKind::Adaptive | RelayKind::UserSpace => "",
        }
    }
}

/// A backend server entry for [`config`].
pub struct ServerEntry<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
    /// `none`, `v1` or `v2`.
    pub send_proxy: &'a str,
}

/// A one-listener configuration in the contract's TOML.
pub fn config(
    relay: RelayKind,
    pin_path: &Path,
    listen: SocketAddr,
    servers: &[ServerEntry<'_>],
) -> String {
    config_with_listener_keys(relay, pin_path, listen, servers, "")
}

/// [`config`] with extra TOML after the listener's own keys, before its servers (for
/// example a `[listen.check]` table).
pub fn config_with_listener_keys(
    relay: RelayKind,
    pin_path: &Path,
    listen: SocketAddr,
    servers: &[ServerEntry<'_>],
    listener_keys: &str,
) -> String {
    let mut text = format!(
        "[global]\npin_path = \"{}\"\nrelay = \"{}\"\ngrace = \"2s\"\n{}\n\
         [[listen]]\nname = \"smtp\"\nbind = [\"{listen}\"]\ntimeout_connect = \"2s\"\n",
        pin_path.display(),
        relay.config_value(),
        relay.global_keys()
    );
    text.push_str(listener_keys);
    for server in servers {
        text.push_str(&format!(
            "\n[[listen.server]]\nname = \"{}\"\naddr = \"{}\"\nsend_proxy = \"{}\"\n",
            server.name, server.addr, server.send_proxy
        ));
    }
    text
}

/// Adds keys to the `[global]` section of a configuration made by [`config`].
pub fn with_global_keys(config: &str, keys: &str) -> String {
    config.replacen("[global]\n", &format!("[global]\n{keys}"), 1)
}

/// Adds a `[stats]` section (with an admin token, if given) to a configuration.
pub fn with_stats(config: &str, bind: SocketAddr, admin_token: Option<&str>) -> String {
    let mut stats = format!("[stats]\nbind = \"{bind}\"\n");
    if let Some(token) = admin_token {
        stats.push_str(&format!("admin_token = \"{token}\"\n"));
    }
    config.replacen("[[listen]]", &format!("{stats}\n[[listen]]"), 1)
}

/// The environment variable that makes every daemon a test starts drop root for the user it
/// names (`[global] user`): the relay tests run with `MXLB_TEST_USER=nobody` show that the
/// unprivileged daemon relays as the root one does.
pub const TEST_USER_ENV: &str = "MXLB_TEST_USER";

/// `config_text` with `user = "$MXLB_TEST_USER"` at the end of its `[global]` section
/// (so the lines tests point errors at stay where they were), when that variable is set
/// and the configuration does not name a user itself.
pub fn with_test_user(config_text: &str) -> String {
    match std::env::var(TEST_USER_ENV) {
        Ok(user) if !user.is_empty() => with_user(config_text, &user),
        _ => config_text.to_owned(),
    }
}

/// `config_text` with `user = "<user>"` at the end of its `[global]` section, unless it
/// names a user already.
pub fn with_user(config_text: &str, user: &str) -> String {
    let line = format!("user = \"{user}\"\n");
    let Some(start) = config_text.find("[global]\n") else {
        return format!("[global]\n{line}\n{config_text}");
    };
    let body_start = start + "[global]\n".len();
    let body = &config_text[body_start..];
    let body_end = body_start + body.find("\n[").map_or(body.len(), |at| at + 1);
    let global = &config_text[body_start..body_end];
    if global
        .lines()
        .any(|line| line.trim_start().starts_with("user "))
    {
        return config_text.to_owned();
    }
    // After the last key, before the blank lines that end the section.
    let keys_end = body_start + global.trim_end().len();
    let (before, after) = config_text.split_at(keys_end);
    if before.ends_with('\n') {
        format!("{before}{line}{after}")
    } else {
        format!("{before}\n{}{after}", line.trim_end())
    }
}

/// The daemon's "ready" line, in the text or the JSON log format.
fn is_ready_line(line: &str) -> bool {
    line.contains(": ready pid=") || line.contains(r#""message":"ready""#)
}

/// The `mxlb` binary under test: `MXLB_BIN` (set by `cargo xtask test`), else the debug build.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MXLB_BIN") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mxlb")
}

/// A unique bpffs pin directory for one test.
pub fn pin_path(test: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_stale_pins);
    PathBuf::from(format!(
        "/sys/fs/bpf/mxlb-test-{test}-{}",
        std::process::id()
    ))
}

/// Removes pin directories left by test processes that were killed (a daemon killed with
/// SIGKILL cannot remove its pins, and the pins keep its program and maps loaded).
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mxlb-test-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What tells that a daemon just started is ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ready {
    /// Its "ready" line on stderr.
    LogLine,
    /// Only that it accepts on its listener (it logs elsewhere).
    Listening,
}

/// A running daemon.
pub struct Mxlb {
    child: Child,
    log: Arc<Mutex<String>>,
    pub listen: SocketAddr,
    pub pin_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mxlb {
    /// Starts `mxlb run` with `config_text` and waits until it accepts on `listen`.
    pub fn start(config_text: &str, listen: SocketAddr, pin_path: &Path) -> anyhow::Result<Mxlb> {
        Self::start_with_env(config_text, listen, pin_path, &[])
    }

    /// [`Mxlb::start`] with extra environment variables (fault injection).
    pub fn start_with_env(
        config_text: &str,
        listen: SocketAddr,
        pin_path: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Mxlb> {
        let (command, dir) = Self::run_command(config_text, env)?;
        Self::spawn(command, dir, listen, pin_path)
    }

    /// [`Mxlb::start`] for a configuration that logs elsewhere than stderr (`log_target =
    /// "syslog"`): there is no "ready" line to wait for, so it waits for the port.
    pub fn start_logging_elsewhere(
        config_text: &str,
        listen: SocketAddr,
        pin_path: &Path,
    ) -> anyhow::Result<Mxlb> {
        let (command, dir) = Self::run_command(config_text, &[])?;
        Self::spawn_until(command, dir, listen, pin_path, Ready::Listening)
    }

    /// `mxlb run --config <dir>/mxlb.toml`, with `config_text` written there.
    fn run_command(
        config_text: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Command, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        // Readable by a daemon that dropped root (`[global] user`): it reads the file again
        // at each reload.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let config_path = dir.path().join("mxlb.toml");
        std::fs::write(&config_path, with_test_user(config_text))?;
        let mut command = Command::new(binary());
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().copied());
        Ok((command, dir))
    }

    /// Starts the daemon with `command`, which must become `mxlb run --config
    /// <dir>/mxlb.toml` (or `mxlb upgrade`) in the same process (a wrapper such as `setpriv` that execs it), and
    /// waits until it is ready and accepts on `listen`. `dir` lives as long as the daemon.
    pub fn spawn(
        command: Command,
        dir: tempfile::TempDir,
        listen: SocketAddr,
        pin_path: &Path,
    ) -> anyhow::Result<Mxlb> {
        Self::spawn_until(command, dir, listen, pin_path, Ready::LogLine)
    }

    fn spawn_until(
        mut command: Command,
        dir: tempfile::TempDir,
        listen: SocketAddr,
        pin_path: &Path,
        ready: Ready,
    ) -> anyhow::Result<Mxlb> {
        // The caller's RUST_LOG (fault injection may set one) wins over the tests' default.
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env(
                "RUST_LOG",
                std::env::var("MXLB_TEST_LOG").unwrap_or_else(|_| "info,mxlb=debug".to_owned()),
            );
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("no stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut mxlb = Mxlb {
            child,
            log,
            listen,
            pin_path: pin_path.to_owned(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        // "ready" comes after every listener, the stats server and the signal handlers: the
        // descriptor count the tests take as "idle" is final by then.
        while ready == Ready::LogLine && !mxlb.log().lines().any(is_ready_line) {
            if let Some(status) = mxlb.child.try_wait()? {
                bail!("mxlb exited with {status} during start:\n{}", mxlb.log());
            }
            if Instant::now() > deadline {
                bail!("mxlb was not ready within 20s:\n{}", mxlb.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // No probe connection: it would be a session on the backends too (see `is_listening`).
        crate::wait_for_listen(&[listen], Duration::from_secs(5))?;
        Ok(mxlb)
    }

    /// `mxlb upgrade` with this daemon's configuration (which must set
    /// `global.upgrade_socket`): a new daemon that takes this one's listening sockets over.
    /// Returns once the new one is ready; this one then drains and exits by itself.
    pub fn upgrade(&self) -> anyhow::Result<Mxlb> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let config_path = dir.path().join("mxlb.toml");
        std::fs::copy(self.config_path(), &config_path)?;
        let mut command = Command::new(binary());
        command.arg("upgrade").arg("--config").arg(&config_path);
        Self::spawn(command, dir, self.listen, &self.pin_path)
    }

    /// Waits up to `timeout` for the daemon to exit by itself (after an upgrade took its
    /// sockets); fails if it does not, or if it counted an integrity error.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("mxlb did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.ensure_no_integrity_errors()?;
        Ok(status)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `needle` appears on at least `count` log lines.
    pub fn wait_for_log_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines(needle);
            if lines.len() >= count {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {timeout:?} for {count} log lines with {needle:?}, got {}:\n{}",
                    lines.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's configuration file (what [`Mxlb::reload`] writes).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("mxlb.toml")
    }

    /// The daemon's own CPU time (user + system) so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after_name = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
            + fields.get(12).context("no stime")?.parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// What each open descriptor of the daemon is (socket:[inode], anon_inode:bpf-map, ...),
    /// for leak reports.
    pub fn describe_fds(&self) -> String {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return "(daemon gone)".into();
        };
        let mut fds: Vec<(u32, String)> = dir
            .flatten()
            .filter_map(|entry| {
                let fd = entry.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                Some((fd, target.display().to_string()))
            })
            .collect();
        fds.sort();
        let listed: Vec<String> = fds
            .iter()
            .map(|(fd, what)| format!("{fd}={what}"))
            .collect();
        listed.join(" ")
    }

    /// Entries of a pinned hash map of this daemon, read with bpftool.
    pub fn map_entries(&self, map: &str) -> anyhow::Result<Vec<MapEntry>> {
        self.dump(map)?.iter().map(MapEntry::from_json).collect()
    }

    /// How many keys a pinned map holds. Works for the sockhash too, whose values (sockets)
    /// bpftool cannot read back.
    pub fn map_key_count(&self, map: &str) -> anyhow::Result<usize> {
        Ok(self.dump(map)?.len())
    }

    fn dump(&self, map: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.pin_path.join(map);
        let output = Command::new("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool")?;
        if !output.status.success() {
            bail!(
                "bpftool map dump {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Waits until the daemon holds `fds` descriptors and its maps are empty: every
    /// finished connection gave back its sockets and map entries.
    pub fn wait_until_clean(&self, fds: usize, kernel: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = self.fd_count()?;
            let mut entries = Vec::new();
            if kernel {
                for map in ["mxlb_socks", "mxlb_peers", "mxlb_traffic"] {
                    let count = self.map_key_count(map)?;
                    if count > 0 {
                        entries.push(format!("{count} in {map}"));
                    }
                }
            }
            if open == fds && entries.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "leak: {open} fds open (idle: {fds}), map entries left: {entries:?}; \
                     descriptors: {}",
                    self.describe_fds()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `config_text` over the daemon's configuration file, sends SIGHUP and waits
    /// for the daemon's verdict: the line that says the configuration was reloaded, or the
    /// one that says why not.
    pub fn reload(&self, config_text: &str) -> anyhow::Result<String> {
        const VERDICTS: [&str; 2] = ["configuration reloaded", "reload failed"];
        let before: usize = VERDICTS.iter().map(|v| self.log_lines(v).len()).sum();
        std::fs::write(
            self._dir.path().join("mxlb.toml"),
            with_test_user(config_text),
        )?;
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<String> = VERDICTS.iter().flat_map(|v| self.log_lines(v)).collect();
            if lines.len() > before {
                // The newest verdict: log lines are in order, so the last of either kind.
                let log = self.log();
                let newest = log
                    .lines()
                    .rev()
                    .find(|line| VERDICTS.iter().any(|v| line.contains(v)))
                    .unwrap_or_default();
                return Ok(newest.to_owned());
            }
            if Instant::now() > deadline {
                bail!("no reload verdict within 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the exit status. Fails if the daemon's byte conservation
    /// check failed for any connection.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.terminate();
        let status = self.child.wait()?;
        self.ensure_no_integrity_errors()?;
        Ok(status)
    }

    fn ensure_no_integrity_errors(&self) -> anyhow::Result<()> {
        let errors = self.integrity_errors();
        anyhow::ensure!(
            errors.is_empty(),
            "mxlb counted integrity errors:\n{}",
            errors.join("\n")
        );
        Ok(())
    }

    /// The log lines of failed byte conservation checks (the daemon logs one per
    /// connection it reset for that). Every test fails on one: see `Drop`.
    pub fn integrity_errors(&self) -> Vec<String> {
        self.log_lines(INTEGRITY_ERROR_LOG)
    }

    fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }
}

impl Drop for Mxlb {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.wait();
        }
        if std::env::var_os("MXLB_SHOW_LOGS").is_some() {
            eprintln!("--- mxlb log ---\n{}", self.log());
        }
        // Whatever a test asserted, a daemon that relayed a byte wrong fails it.
        let errors = self.integrity_errors();
        if !errors.is_empty() && !std::thread::panicking() {
            panic!("mxlb counted integrity errors:\n{}", errors.join("\n"));
        }
    }
}

/// The fields of one `connection finished` log line (text log format): how a connection
/// was relayed, by the daemon's own numbers.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The whole line, for failure messages.
    pub line: String,
    pub client: String,
    /// Where the bytes went: `user`, `kernel` or `user+kernel` (docs/operations.md).
    pub relay: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bytes the eBPF verdict redirected, both directions together (from `mxlb_traffic`).
    pub kernel_bytes: u64,
    pub ended: String,
    /// The connection's id, which every log line of it carries.
    pub session: String,
}

impl Finished {
    pub fn parse(line: &str) -> anyhow::Result<Finished> {
        anyhow::ensure!(
            line.contains("connection finished"),
            "not a `connection finished` line: {line}"
        );
        for key in ["connect_ms", "duration_ms"] {
            milliseconds(line, key)?;
        }
        Ok(Finished {
            line: line.to_owned(),
            client: log_text(line, "client")?.to_owned(),
            relay: log_text(line, "relay")?.to_owned(),
            bytes_in: log_field(line, "bytes_in")?,
            bytes_out: log_field(line, "bytes_out")?,
            kernel_bytes: log_field(line, "kernel_bytes")?,
            ended: log_text(line, "ended")?.to_owned(),
            session: log_text(line, "session")?.to_owned(),
        })
    }

    /// Every byte relayed, both directions.
    pub fn total(&self) -> u64 {
        self.bytes_in + self.bytes_out
    }

    /// What `relay=` must say for this line's byte counters, as docs/operations.md
    /// defines it: `user` when the kernel carried nothing, `kernel` when it carried every
    /// byte, `user+kernel` otherwise.
    pub fn path_by_counters(&self) -> &'static str {
        if self.kernel_bytes == 0 {
            "user"
        } else if self.kernel_bytes == self.total() {
            "kernel"
        } else {
            "user+kernel"
        }
    }

    /// The part of [`Finished::total`] the kernel carried (0 when nothing moved).
    pub fn kernel_share(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            self.kernel_bytes as f64 / self.total() as f64
        }
    }
}

/// A `key=value` field's text from a log line.
pub fn log_text<'a>(line: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(&prefix))
        .with_context(|| format!("no {key} in {line}"))
}

/// A `key=value` duration in milliseconds from a log line: a number with at most three
/// decimals (the daemon logs to the microsecond, never a float's rounding noise).
pub fn milliseconds(line: &str, key: &str) -> anyhow::Result<f64> {
    let text = log_text(line, key)?;
    let decimals = text
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    anyhow::ensure!(
        decimals <= 3,
        "{key}={text} has more than 3 decimals in {line}"
    );
    text.parse()
        .with_context(|| format!("{key}={text} is not a number in {line}"))
}

/// The log lines of one connection: those that carry its `session=` id.
pub fn session_lines(log: &str, session: &str) -> Vec<String> {
    let field = format!("session={session}");
    log.lines()
        .filter(|line| line.split_whitespace().any(|word| word == field))
        .map(str::to_owned)
        .collect()
}

/// A `key=value` number from a log line.
pub fn log_field(line: &str, key: &str) -> anyhow::Result<u64> {
    let text = log_text(line, key)?;
    text.parse()
        .with_context(|| format!("{key}={text} is not a number in {line}"))
}

impl Mxlb {
    /// Every `connection finished` line so far, parsed, in log order.
    pub fn finished(&self) -> anyhow::Result<Vec<Finished>> {
        self.log_lines("connection finished")
            .iter()
            .map(|line| Finished::parse(line))
            .collect()
    }

    /// Waits until at least `count` connections have finished; returns them all.
    pub fn wait_finished(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<Finished>> {
        self.wait_for_log_count("connection finished", count, timeout)?
            .iter()
            .map(|line| Finished::parse(line))
            .collect()
    }

    /// Waits for the `connection finished` line of the connection from `client` (the
    /// address mxlb logs: the socket's, or the one an `accept_proxy` header claimed).
    pub fn finished_for(&self, client: SocketAddr, timeout: Duration) -> anyhow::Result<Finished> {
        let wanted = client.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.finished()?.into_iter().find(|f| f.client == wanted) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!(
                    "no `connection finished` line for {client} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the kernel has redirected so far for the connections open now, summed over
    /// every socket in `mxlb_traffic` (field 0 of `balancer_common::Traffic`).
    pub fn redirected_now(&self) -> anyhow::Result<u64> {
        Ok(self
            .map_entries("mxlb_traffic")?
            .iter()
            .map(|entry| entry.u64_field(0))
            .sum())
    }
}

/// What the daemon logs (at ERROR) when a connection's byte conservation check fails.
pub const INTEGRITY_ERROR_LOG: &str = "integrity: byte conservation failed";

/// One entry of a pinned `HASH` map, as raw little-endian integers.
#[derive(Debug, Clone)]
pub struct MapEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl MapEntry {
    fn from_json(entry: &serde_json::Value) -> anyhow::Result<MapEntry> {
        let bytes = |field: &str| -> anyhow::Result<Vec<u8>> {
            entry[field]
                .as_array()
                .with_context(|| format!("bpftool entry without {field}: {entry}"))?
                .iter()
                .map(|b| {
                    let text = b.as_str().context("byte is not a string")?;
                    Ok(u8::from_str_radix(text.trim_start_matches("0x"), 16)?)
                })
                .collect()
        };
        Ok(MapEntry {
            key: bytes("key")?,
            value: bytes("value")?,
        })
    }

    /// The value's `index`-th u64 field.
    pub fn u64_field(&self, index: usize) -> u64 {
        let start = index * 8;
        self.value
            .get(start..start + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }
}

/// The stats/admin HTTP API of a running daemon, read the way an operator's tools would.
pub mod http {
    use std::time::Duration;

    use anyhow::{Context, bail};

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    }

    /// `GET url`: status and body.
    pub fn get(url: &str) -> anyhow::Result<(u16, String)> {
        get_with_token(url, None)
    }

    /// `GET url` that must answer 200 with JSON.
    pub fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = get(url)?;
        if status != 200 {
            bail!("GET {url}: {status} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `POST url` with a JSON body and an optional bearer token: status and body.
    pub fn post_json(
        url: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, String)> {
        send_json("POST", url, token, body)
    }

    /// [`post_json`] as `PUT`.
    pub fn put_json(
        url: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, String)> {
        send_json("PUT", url, token, body)
    }

    fn send_json(
        method: &str,
        url: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, String)> {
        let agent = agent();
        let mut request = match method {
            "PUT" => agent.put(url),
            _ => agent.post(url),
        };
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request
            .send_json(body)
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        Ok((status, response.body_mut().read_to_string()?))
    }

    /// `GET url` with a bearer token, if any: status and body.
    pub fn get_with_token(url: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        let mut request = agent().get(url);
        if let Some(token) = token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        Ok((status, response.body_mut().read_to_string()?))
    }

    /// One sample of the daemon's `/metrics` at `base`, read with a real Prometheus parser:
    /// the first of family `name` whose labels include `labels`.
    pub fn metric(base: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (status, text) = get(&format!("{base}/metrics"))?;
        anyhow::ensure!(status == 200, "/metrics: {status}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .with_context(|| format!("no sample {name}{labels:?} in\n{text}"))
    }

    /// The server called `name` of listener `listener` in an `/api/stats` answer.
    pub fn server<'a>(
        stats: &'a serde_json::Value,
        listener: &str,
        name: &str,
    ) -> anyhow::Result<&'a serde_json::Value> {
        stats["listeners"]
            .as_array()
            .context("no listeners")?
            .iter()
            .find(|l| l["name"] == listener)
            .with_context(|| format!("no listener {listener}"))?["servers"]
            .as_array()
            .context("no servers")?
            .iter()
            .find(|s| s["name"] == name)
            .with_context(|| format!("no server {listener}/{name}"))
    }
}

/// The usual mail setup: one Postfix instance with two smtpd services that require the
/// PROXY protocol (`mail1`, `mail2`), and the mxlb server entries for them (mail1 gets a
/// v1 header, mail2 v2).
pub fn two_proxy_backends()
-> anyhow::Result<(crate::postfix::PostfixInstance, [ServerEntry<'static>; 2])> {
    use crate::postfix::{PostfixInstance, SmtpdService};
    let postfix = PostfixInstance::start(&[
        SmtpdService::with_proxy("mail1", crate::free_addr()),
        SmtpdService::with_proxy("mail2", crate::free_addr()),
    ])?;
    let servers = [
        ServerEntry {
            name: "mail1",
            addr: postfix.services()[0].addr,
            send_proxy: "v1",
        },
        ServerEntry {
            name: "mail2",
            addr: postfix.services()[1].addr,
            send_proxy: "v2",
        },
    ];
    Ok((postfix, servers))
}

#[cfg(test)]
mod tests {
    use super::with_user;

    #[test]
    fn the_test_user_goes_at_the_end_of_global() {
        assert_eq!(
            with_user(
                "[global]\nrelay = \"sockmap\"\n\n[[listen]]\nname = \"a\"\n",
                "nobody"
            ),
            "[global]\nrelay = \"sockmap\"\nuser = \"nobody\"\n\n[[listen]]\nname = \"a\"\n"
        );
        assert_eq!(
            with_user("[global]\n\n[stats]\nbind = \"x\"\n", "nobody"),
            "[global]\nuser = \"nobody\"\n\n[stats]\nbind = \"x\"\n"
        );
        assert_eq!(
            with_user("[[listen]]\nname = \"a\"\n", "nobody"),
            "[global]\nuser = \"nobody\"\n\n[[listen]]\nname = \"a\"\n"
        );
        let named = "[global]\nuser = \"mail\"\n[[listen]]\n";
        assert_eq!(with_user(named, "nobody"), named);
    }
}
