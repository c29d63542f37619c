//! A private Postfix instance whose smtpd services play the backends behind a balancer.
//!
//! One instance runs any number of smtpd services (one per simulated backend), each on its
//! own loopback port, with its own `syslog_name` and `myhostname` so both the log and the
//! `Received:` header say which backend handled a session. Mail for `@example.test` is
//! delivered by `virtual(8)` into a single Maildir the test reads back.
//!
//! What it takes to run several instances side by side from arbitrary directories, as root:
//! - `postfix -c <dir>` accepts any config directory when run by root; only non-root users
//!   (and the set-gid `postdrop`/`postqueue`, which we never use) need it listed in
//!   `alternate_config_directories` of the default `/etc/postfix/main.cf`.
//! - Everything that is per-instance on disk is moved into the temporary directory:
//!   `queue_directory` (sockets, pid file, queue), `data_directory` (master.lock),
//!   `maillog_file`, and the Maildir. `postfix start` runs `post-install create-missing`,
//!   which creates the queue tree with the right owners, so no `set-permissions` is needed.
//! - `maillog_file` must be under one of `maillog_file_prefixes` (default `/var,
//!   /dev/stdout`), so the prefix is set to the instance directory.
//! - master.cf is built from the package's pristine copy (`/usr/share/postfix/master.cf.dist`,
//!   which Debian's postinst copies to /etc/postfix/master.cf on first install), never from
//!   the live /etc/postfix/master.cf: an administrator's extra services there (a
//!   `submission` or `127.0.0.1:10025` smtpd) would be started by every instance, and
//!   parallel instances would fight over their ports. To be sure, every `inet` service of
//!   the template is dropped (Debian's only one is the port-25 `smtp`); the instance listens
//!   on its test services' ports and nothing else. main.cf is generated whole, so nothing
//!   of the live one is read either.
//! - Debian's master.cf chroots most daemons (`chroot = y`); a chroot into our queue
//!   directory would lack /etc files, so every service is switched to `chroot = n`.
//! - Without a main.cf, the default `alias_maps = hash:/etc/aliases, nis:mail.aliases`
//!   makes smtpd log an error and a NIS warning on every session; it is emptied.
//! - Postfix programs pause until main.cf is a second or two old (see `write_backdated`);
//!   the generated files are backdated, or every instance would take 2-3 s to start.
//! - The master puts all its children in its own process group, which makes stopping
//!   reliable: after `postfix stop` we wait for that group to disappear, then SIGKILL the
//!   leftovers (only Postfix daemons of this group).

use std::collections::HashSet;
use std::fmt;
use std::fs::FileTimes;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use crate::{create_test_dir, release_test_dir, run_command, sha256_hex, wait_until};

/// The domain Postfix accepts and delivers locally; any local part works.
pub const MAIL_DOMAIN: &str = "example.test";

/// Where Debian installs Postfix's daemons; used to recognise this instance's processes.
const DAEMON_DIRECTORY: &str = "/usr/lib/postfix/sbin";
/// Debian's master.cf as the package ships it; see the module doc for why not the live one.
const PRISTINE_MASTER_CF: &str = "/usr/share/postfix/master.cf.dist";

/// One smtpd service: a simulated backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpdService {
    /// Backend name: the `syslog_name` ("mail1/smtpd[..]" in the log) and the first label
    /// of its `myhostname` ("mail1.test" in the banner and the `Received:` header).
    pub name: String,
    /// Loopback address and port the service listens on.
    pub addr: SocketAddr,
    /// Require a PROXY protocol header (v1 or v2) before SMTP
    /// (`smtpd_upstream_proxy_protocol = haproxy`).
    pub proxy: bool,
}

impl SmtpdService {
    /// A service that expects a PROXY protocol header from the balancer.
    pub fn with_proxy(name: &str, addr: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            proxy: true,
        }
    }

    /// A service that speaks plain SMTP (sees the balancer's address as the client).
    pub fn plain(name: &str, addr: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            proxy: false,
        }
    }

    /// The hostname the service announces, `<name>.test`.
    pub fn hostname(&self) -> String {
        format!("{}.test", self.name)
    }
}

/// cleanup(8) compares a queue file's mtime with time(3) and warns when the file is newer.
/// Since Linux 6.13 a file's mtime may be taken from a finer clock than the one time(3)
/// reads, so right at a second boundary a new queue file can look a second "ahead"; CI saw it
/// once in 89 deliveries. Postfix resets the stamps and delivers normally.
const HOST_CLOCK_WARNINGS: [&str; 2] = ["file system clock is", "resetting file time stamps"];

/// A running private Postfix instance; stopped and deleted on drop.
pub struct PostfixInstance {
    /// `None` only during drop.
    dir: Option<TempDir>,
    root: PathBuf,
    services: Vec<SmtpdService>,
    /// Services taken off the network with [`PostfixInstance::disable_service`].
    disabled: Vec<String>,
    startup_time: Duration,
}

impl fmt::Debug for PostfixInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostfixInstance")
            .field("root", &self.root)
            .field("services", &self.services)
            .finish()
    }
}

impl PostfixInstance {
    /// Creates, starts and waits for an instance running `services`.
    ///
    /// Returns once every service listens. Ports are the caller's choice (see
    /// [`crate::free_port`]); everything else is private to the instance.
    pub fn start(services: &[SmtpdService]) -> Result<Self> {
        validate(services)?;
        // Postfix's master reports a failed bind only to a log that does not exist yet
        // (postlogd is not running), so `postfix start` would just say "startup failed".
        for service in services {
            if crate::port_in_use(service.addr.port())? {
                bail!(
                    "service {} cannot listen on {}: port in use:\n{}",
                    service.name,
                    service.addr,
                    crate::sockets_on_port(service.addr.port())
                );
            }
        }
        let started = Instant::now();
        let dir = create_test_dir("mxlb-postfix-")?;
        let root = dir.path().to_path_buf();
        let mut instance = Self {
            dir: Some(dir),
            root,
            services: services.to_vec(),
            disabled: Vec::new(),
            startup_time: Duration::ZERO,
        };
        instance.write_config()?;

        let out = run_command(
            Command::new("postfix")
                .arg("-c")
                .arg(instance.config_dir())
                .arg("start")
                // An inherited MAIL_CONFIG would not override -c, but keep the environment
                // from pointing anywhere else.
                .env_remove("MAIL_CONFIG"),
            Duration::from_secs(60),
        )?;
        if !out.status.success() {
            bail!(
                "postfix start failed ({}) for {}:\n{}\nmaillog:\n{}",
                out.status,
                instance.root.display(),
                out.output,
                instance.maillog()
            );
        }
        let addrs: Vec<SocketAddr> = services.iter().map(|s| s.addr).collect();
        crate::wait_for_listen(&addrs, Duration::from_secs(20)).with_context(|| {
            format!(
                "Postfix in {} started but not all services listen; maillog:\n{}",
                instance.root.display(),
                instance.maillog()
            )
        })?;
        instance.startup_time = started.elapsed();
        Ok(instance)
    }

    /// The services this instance runs.
    pub fn services(&self) -> &[SmtpdService] {
        &self.services
    }

    /// The service called `name`, if any.
    pub fn service(&self, name: &str) -> Option<&SmtpdService> {
        self.services.iter().find(|s| s.name == name)
    }

    /// How long [`PostfixInstance::start`] took, up to all ports listening.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// The instance's private directory (config, queue, log, mail).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Directory holding main.cf and master.cf (for `postfix -c` / `postconf -c`).
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("conf")
    }

    pub fn maillog_path(&self) -> PathBuf {
        self.root.join("maillog")
    }

    /// The Maildir all `@example.test` mail goes to.
    pub fn maildir(&self) -> PathBuf {
        self.root.join("mail").join("sink")
    }

    /// Current contents of the instance's log (empty if not yet written).
    ///
    /// Postfix's `postlogd` writes asynchronously, so a line can show up a little after
    /// the event; use [`PostfixInstance::wait_for_log`] to wait for it.
    pub fn maillog(&self) -> String {
        std::fs::read(self.maillog_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sessions smtpd accepted: (service name, client address Postfix believes in), in log
    /// order, from lines like `mail1/smtpd[123]: connect from unknown[127.0.0.51]`.
    ///
    /// Behind a PROXY-speaking balancer this is the address from the PROXY header; health
    /// checks appear here too (with the balancer's own address).
    pub fn connects(&self) -> Vec<(String, IpAddr)> {
        parse_sessions(&self.maillog(), "connect from ")
    }

    /// Finished sessions, like [`PostfixInstance::connects`] but from `disconnect from` lines.
    pub fn disconnects(&self) -> Vec<(String, IpAddr)> {
        parse_sessions(&self.maillog(), "disconnect from ")
    }

    /// Log lines that point at trouble: `warning:`, `error:`, `fatal:`, `panic:` and
    /// `lost connection` (a client or balancer dropped a session mid-way).
    ///
    /// Leaves out cleanup(8)'s clock warnings ([`HOST_CLOCK_WARNINGS`]): they are about the
    /// host, not about anything a balancer or a client did.
    pub fn warnings(&self) -> Vec<String> {
        self.maillog()
            .lines()
            .filter(|line| {
                ["warning:", "error:", "fatal:", "panic:", "lost connection"]
                    .iter()
                    .any(|needle| line.contains(needle))
            })
            .filter(|line| !HOST_CLOCK_WARNINGS.iter().any(|text| line.contains(text)))
            .map(str::to_owned)
            .collect()
    }

    /// Polls the log until `check` accepts it; `what` describes it for the error, which
    /// includes the log.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> Result<()> {
        wait_until(what, timeout, Duration::from_millis(25), || {
            Ok(check(&self.maillog()).then_some(()))
        })
        .with_context(|| format!("Postfix maillog:\n{}", self.maillog()))
    }

    /// Messages delivered so far, oldest first.
    pub fn messages(&self) -> Result<Vec<DeliveredMessage>> {
        let new_dir = self.maildir().join("new");
        let entries = match std::fs::read_dir(&new_dir) {
            Ok(entries) => entries,
            // virtual(8) creates the Maildir on first delivery.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).with_context(|| format!("reading {}", new_dir.display())),
        };
        let mut messages = Vec::new();
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let raw =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            messages.push(DeliveredMessage {
                file_name: entry.file_name().to_string_lossy().into_owned(),
                raw,
            });
        }
        messages.sort_by_key(|m| (maildir_time(&m.file_name), m.file_name.clone()));
        Ok(messages)
    }

    /// Waits until at least `n` messages are in the Maildir and returns all of them, oldest
    /// first. Delivery files appear atomically (virtual(8) writes to tmp/, then renames).
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Result<Vec<DeliveredMessage>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages()?;
            if messages.len() >= n {
                return Ok(messages);
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {} of {n} messages delivered to {} after {timeout:?}; maillog:\n{}",
                    messages.len(),
                    self.maildir().display(),
                    self.maillog()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Takes the smtpd service `name` off the network, as an operator would for maintenance:
    /// `master.cf` loses the service and `postfix reload` closes its listening socket.
    /// Sessions in progress finish and queued mail is still delivered.
    pub fn disable_service(&mut self, name: &str) -> Result<()> {
        let addr = self.service(name).context("no such service")?.addr;
        self.disabled.push(name.to_owned());
        self.reload()?;
        crate::wait_until(
            "the service to stop listening",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || Ok((!crate::is_listening(addr)?).then_some(())),
        )
    }

    /// Puts a service taken off with [`PostfixInstance::disable_service`] back.
    pub fn enable_service(&mut self, name: &str) -> Result<()> {
        let addr = self.service(name).context("no such service")?.addr;
        self.disabled.retain(|disabled| disabled != name);
        self.reload()?;
        crate::wait_for_listen(&[addr], Duration::from_secs(20))
    }

    fn reload(&self) -> Result<()> {
        let enabled: Vec<SmtpdService> = self
            .services
            .iter()
            .filter(|s| !self.disabled.contains(&s.name))
            .cloned()
            .collect();
        write_backdated(
            &self.config_dir().join("master.cf"),
            &master_cf(&master_template()?, &enabled),
        )?;
        let out = run_command(
            Command::new("postfix")
                .arg("-c")
                .arg(self.config_dir())
                .arg("reload")
                .env_remove("MAIL_CONFIG"),
            Duration::from_secs(20),
        )?;
        if !out.status.success() {
            bail!("postfix reload failed ({}): {}", out.status, out.output);
        }
        Ok(())
    }

    /// Stops the instance (also done on drop). Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(master) = self.master_pid() else {
            return Ok(());
        };
        if instance_processes(master).is_empty() {
            // Never started (startup failed) or already gone: only a stale pid file.
            let _ = std::fs::remove_file(self.root.join("queue/pid/master.pid"));
            return Ok(());
        }
        let stop = run_command(
            Command::new("postfix")
                .arg("-c")
                .arg(self.config_dir())
                .arg("stop")
                .env_remove("MAIL_CONFIG"),
            Duration::from_secs(20),
        );
        // The master SIGTERMs its children on the way out; give them a moment, then make
        // sure: stray daemons would keep files in the directory we are about to delete.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !instance_processes(master).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let leftovers = instance_processes(master);
        for &pid in &leftovers {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a Postfix daemon
            // of this instance's process group, found just above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(self.root.join("queue/pid/master.pid"));
        match stop {
            Ok(out) if out.status.success() && leftovers.is_empty() => Ok(()),
            Ok(out) if !out.status.success() => bail!(
                "postfix stop failed ({}): {}; killed {leftovers:?}",
                out.status,
                out.output
            ),
            Ok(_) => bail!("Postfix processes {leftovers:?} survived postfix stop; killed them"),
            Err(err) => Err(err.context(format!("postfix stop; killed {leftovers:?}"))),
        }
    }

    fn master_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn write_config(&self) -> Result<()> {
        let (uid, gid) = postfix_ids()?;
        for sub in ["conf", "queue", "data", "mail"] {
            std::fs::create_dir(self.root.join(sub))
                .with_context(|| format!("creating {}/{sub}", self.root.display()))?;
        }
        // data_directory holds the master lock and must belong to mail_owner; the Maildir
        // base must be writable by the uid virtual(8) delivers as.
        for sub in ["data", "mail"] {
            let path = self.root.join(sub);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .with_context(|| format!("chown postfix {}", path.display()))?;
        }
        let main_cf = main_cf(&self.root, uid, gid);
        let master_cf = master_cf(&master_template()?, &self.services);
        for (name, text) in [("main.cf", main_cf), ("master.cf", master_cf)] {
            write_backdated(&self.config_dir().join(name), &text)?;
        }
        Ok(())
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!(
                "warning: stopping Postfix in {}: {err:#}",
                self.root.display()
            );
        }
        if let Some(dir) = self.dir.take() {
            release_test_dir(dir, "Postfix instance");
        }
    }
}

/// Writes `path` with a modification time a minute in the past.
///
/// Postfix treats a file modified within the last second or two as "hot" (maybe still being
/// written): `dict_load_file()` re-reads it after 300 ms pauses until it "cools down".
/// Every Postfix program that reads main.cf does this, and `postfix start` runs many of
/// them, which turned a 0.2 s start into 2-3 s.
fn write_backdated(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    let past = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_times(FileTimes::new().set_accessed(past).set_modified(past)))
        .with_context(|| format!("backdating {}", path.display()))
}

fn validate(services: &[SmtpdService]) -> Result<()> {
    ensure!(
        !services.is_empty(),
        "a Postfix instance needs at least one smtpd service"
    );
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for service in services {
        ensure!(
            !service.name.is_empty()
                && service
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "service name {:?} must be a hostname label (letters, digits, '-')",
            service.name
        );
        ensure!(
            service.addr.ip().is_loopback(),
            "service {} must listen on a loopback address, not {}",
            service.name,
            service.addr
        );
        ensure!(
            service.addr.is_ipv4(),
            "service {}: the instance is configured for IPv4 only",
            service.name
        );
        ensure!(
            names.insert(&service.name),
            "duplicate service name {}",
            service.name
        );
        ensure!(
            addrs.insert(service.addr),
            "duplicate service address {}",
            service.addr
        );
    }
    Ok(())
}

/// The uid and gid of the `postfix` user (mail_owner), from /etc/passwd.
fn postfix_ids() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == "postfix")
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .context("no valid 'postfix' user in /etc/passwd (is postfix installed?)")
}

fn main_cf(root: &Path, uid: u32, gid: u32) -> String {
    let root = root.display();
    format!(
        "\
# Generated by mxlb-tests: a private Postfix instance for integration tests.
compatibility_level = 3.6

# Everything on disk is per instance.
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}

# Loopback only, IPv4 only, no DNS: tests must not depend on the network.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = instance.test
mydomain = test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
append_dot_mydomain = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no

# All of {MAIL_DOMAIN} lands in one Maildir the tests read.
virtual_mailbox_domains = {MAIL_DOMAIN}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:sink/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_limit = 0
message_size_limit = 0

# Deliver now, retry soon, never slow clients down: tests and benchmarks measure the
# balancer, not Postfix's politeness.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
in_flow_delay = 0
smtpd_error_sleep_time = 0
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 256
"
    )
}

/// The package's pristine master.cf, the template of every instance's.
fn master_template() -> Result<String> {
    std::fs::read_to_string(PRISTINE_MASTER_CF)
        .with_context(|| format!("reading {PRISTINE_MASTER_CF} (is postfix installed?)"))
}

/// `template` (Debian's master.cf) without any `inet` service (Debian has one, `smtp` on
/// port 25), with chroot switched off, plus one smtpd per test service.
fn master_cf(template: &str, services: &[SmtpdService]) -> String {
    let mut out = String::from("# Generated by mxlb-tests from Debian's pristine master.cf.\n");
    let mut skipping = false;
    for line in template.lines() {
        let continuation = line.starts_with(char::is_whitespace) && !line.trim().is_empty();
        if continuation {
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        skipping = false;
        if line.starts_with('#') || line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 2 && fields[1] == "inet" {
            skipping = true;
            continue;
        }
        // Fields: service type private unpriv chroot wakeup maxproc command [args].
        if fields.len() >= 8 {
            fields[4] = "n";
        }
        out.push_str(&fields.join(" "));
        out.push('\n');
    }
    out.push_str("\n# mxlb-tests smtpd services (simulated backends).\n");
    for service in services {
        out.push_str(&format!(
            "{addr} inet n - n - - smtpd\n  -o syslog_name={name}\n  -o myhostname={host}\n",
            addr = service.addr,
            name = service.name,
            host = service.hostname(),
        ));
        if service.proxy {
            out.push_str("  -o smtpd_upstream_proxy_protocol=haproxy\n");
        }
    }
    out
}

/// Parses `<name>/smtpd[pid]: <marker>host[ip]` lines.
fn parse_sessions(log: &str, marker: &str) -> Vec<(String, IpAddr)> {
    log.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once("/smtpd[")?;
            let service = before.rsplit(' ').next()?;
            let (_, rest) = after.split_once("]: ")?;
            let client = rest.strip_prefix(marker)?;
            let ip = bracketed_ip(client)?;
            Some((service.to_owned(), ip))
        })
        .collect()
}

/// The address in the first `[...]` of `text`, e.g. `unknown[127.0.0.1]` or
/// `unknown [IPv6:::1]`.
fn bracketed_ip(text: &str) -> Option<IpAddr> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    let inner = &text[start..end];
    inner.strip_prefix("IPv6:").unwrap_or(inner).parse().ok()
}

/// Delivery time encoded in a Maildir file name: `<secs>.V..I..M<usecs>.<host>`.
fn maildir_time(name: &str) -> (u64, u64) {
    let mut parts = name.split('.');
    let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let usecs = parts
        .next()
        .and_then(|unique| unique.rsplit_once('M'))
        .and_then(|(_, us)| us.parse().ok())
        .unwrap_or(0);
    (secs, usecs)
}

/// PIDs of Postfix daemons in the process group led by `master` (the master calls
/// setsid(), so its children share its pid as group id).
fn instance_processes(master: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after ')'.
            let pgrp = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                .and_then(|p| p.parse::<i32>().ok());
            let is_postfix = std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.starts_with(DAEMON_DIRECTORY));
            pgrp == Some(master) && is_postfix
        })
        .collect()
}

/// A message as virtual(8) wrote it into the Maildir (LF line endings).
#[derive(Debug, Clone)]
pub struct DeliveredMessage {
    /// File name in `new/`.
    pub file_name: String,
    /// The file's bytes: Postfix's delivery headers, then the message as received.
    pub raw: Vec<u8>,
}

impl DeliveredMessage {
    /// The header part, up to the first empty line.
    fn header_text(&self) -> String {
        let end = find_subslice(&self.raw, b"\n\n").map_or(self.raw.len(), |i| i + 1);
        String::from_utf8_lossy(&self.raw[..end]).into_owned()
    }

    /// All values of header `name` (case-insensitive), unfolded, in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let mut values: Vec<(String, String)> = Vec::new();
        for line in self.header_text().lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = values.last_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
            } else if let Some((field, value)) = line.split_once(':') {
                values.push((field.to_owned(), value.trim().to_owned()));
            }
        }
        values
            .into_iter()
            .filter(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
            .collect()
    }

    /// The first value of header `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    pub fn subject(&self) -> Option<String> {
        self.header("Subject")
    }

    /// The body: everything after the first empty line.
    pub fn body(&self) -> &[u8] {
        find_subslice(&self.raw, b"\n\n").map_or(&[], |i| &self.raw[i + 2..])
    }

    /// SHA-256 (hex) of [`DeliveredMessage::body`]; compare with the digest the sender put
    /// in [`crate::swaks::BODY_DIGEST_HEADER`] (see [`DeliveredMessage::body_intact`]).
    pub fn body_sha256(&self) -> String {
        sha256_hex(self.body())
    }

    /// Whether the body arrived exactly as [`crate::swaks::Swaks`] sent it.
    pub fn body_intact(&self) -> bool {
        self.header(crate::swaks::BODY_DIGEST_HEADER)
            .is_some_and(|sent| sent == self.body_sha256())
    }

    /// The newest `Received:` header: the one the receiving smtpd added.
    fn own_received(&self) -> Option<String> {
        self.header("Received")
    }

    /// The backend (service name) that received the message, from `by <name>.test` in the
    /// `Received:` header it added.
    pub fn backend(&self) -> Option<String> {
        let received = self.own_received()?;
        let (_, after_by) = received.split_once(" by ")?;
        let host = after_by.split_whitespace().next()?;
        Some(host.strip_suffix(".test").unwrap_or(host).to_owned())
    }

    /// The client address Postfix recorded, from `from helo (unknown [127.0.0.51])` in the
    /// `Received:` header: behind a PROXY-speaking balancer, the address from the header.
    pub fn client_ip(&self) -> Option<IpAddr> {
        let received = self.own_received()?;
        let (from_clause, _) = received.split_once(" by ")?;
        bracketed_ip(from_clause)
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_sessions() {
        let log = "\
Nov 28 02:30:35 mail2 mail2/smtpd[8152]: connect from unknown[127.0.0.11]
Nov 28 02:30:35 mail2 mail2/smtpd[8152]: 16A1D516039: client=unknown[127.0.0.11]
Nov 28 02:30:35 instance postfix/cleanup[8158]: 16A1D516039: message-id=<x@vm>
Nov 28 02:30:35 mail2 mail2/smtpd[8152]: disconnect from unknown[127.0.0.11] ehlo=1 quit=1
";
        assert_eq!(
            parse_sessions(log, "connect from "),
            vec![("mail2".to_owned(), "127.0.0.11".parse().unwrap())]
        );
        assert_eq!(parse_sessions(log, "disconnect from ").len(), 1);
    }

    #[test]
    fn parses_delivered_message() {
        let raw = b"Return-Path: <s@example.test>\n\
Received: from client.test (unknown [127.0.0.12])\n\
\tby mail2.test (Postfix) with ESMTP id 8D3F2516044\n\
\tfor <b@example.test>; Sat, 28 Nov 2026 02:31:17 +0000 (UTC)\n\
Subject: t2\n\
\n\
body\n";
        let m = DeliveredMessage {
            file_name: "1.V1I1M1.host".into(),
            raw: raw.to_vec(),
        };
        assert_eq!(m.backend().as_deref(), Some("mail2"));
        assert_eq!(m.client_ip(), Some("127.0.0.12".parse().unwrap()));
        assert_eq!(m.subject().as_deref(), Some("t2"));
        assert_eq!(m.body(), b"body\n");
    }

    #[test]
    fn master_cf_drops_port_25_and_chroot() {
        let template = "\
# comment
smtp      inet  n       -       y       -       -       smtpd
  -o something=1
pickup    unix  n       -       y       60      1       pickup
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
";
        let services = [SmtpdService::with_proxy(
            "mail1",
            "127.0.0.1:2525".parse().unwrap(),
        )];
        let cf = master_cf(template, &services);
        assert!(!cf.contains("smtp inet"));
        assert!(!cf.contains("something=1"));
        assert!(cf.contains("pickup unix n - n 60 1 pickup"));
        assert!(cf.contains("relay unix - - n - - smtp\n        -o syslog_name"));
        assert!(cf.contains("127.0.0.1:2525 inet n - n - - smtpd\n  -o syslog_name=mail1"));
        assert!(cf.contains("smtpd_upstream_proxy_protocol=haproxy"));
    }

    /// The listening (`inet`) services of a master.cf: their first field.
    fn inet_services(cf: &str) -> Vec<&str> {
        cf.lines()
            .filter(|line| !line.starts_with(char::is_whitespace) && !line.starts_with('#'))
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let service = fields.next()?;
                (fields.next()? == "inet").then_some(service)
            })
            .collect()
    }

    fn two_services() -> [SmtpdService; 2] {
        [
            SmtpdService::with_proxy("mail1", "127.0.0.1:2525".parse().unwrap()),
            SmtpdService::plain("mail2", "127.0.0.1:2526".parse().unwrap()),
        ]
    }

    /// A live master.cf an administrator has extended: none of its listeners reach an
    /// instance's, which listens on the test services' ports only.
    #[test]
    fn master_cf_keeps_no_listener_of_the_template() {
        let live = "\
smtp      inet  n       -       y       -       1       postscreen
smtpd     pass  -       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
127.0.0.1:10025 inet n  -       n       -       -       smtpd
  -o content_filter=
pickup    unix  n       -       y       60      1       pickup
";
        let cf = master_cf(live, &two_services());
        assert_eq!(
            inet_services(&cf),
            ["127.0.0.1:2525", "127.0.0.1:2526"],
            "{cf}"
        );
        assert!(
            !cf.contains("submission") && !cf.contains("content_filter"),
            "{cf}"
        );
        assert!(cf.contains("pickup unix n - n 60 1 pickup"), "{cf}");
    }

    /// The template is a file of the postfix package itself, not the live
    /// /etc/postfix/master.cf (nor /etc/postfix/master.cf.proto, which postinst copies
    /// there and postmulti uses, both the administrator's to edit); built from it, an
    /// instance listens on its test services only.
    #[test]
    fn template_is_the_package_copy() {
        let owned = std::fs::read_to_string("/var/lib/dpkg/info/postfix.list")
            .expect("the postfix package's file list");
        assert!(
            owned.lines().any(|path| path == PRISTINE_MASTER_CF),
            "{PRISTINE_MASTER_CF} is not a file of the postfix package"
        );
        let template = master_template().expect("postfix's pristine master.cf");
        assert_eq!(inet_services(&template), ["smtp"], "{template}");
        let cf = master_cf(&template, &two_services());
        assert_eq!(
            inet_services(&cf),
            ["127.0.0.1:2525", "127.0.0.1:2526"],
            "{cf}"
        );
        assert!(cf.contains("\nqmgr unix n - n 300 1 qmgr\n"), "{cf}");
    }
}
