//! The TOML configuration (`/etc/mxlb/mxlb.toml`), parsed into validated types.
//!
//! Parsing happens in two steps. serde reads the text into private `Raw*` structs that
//! keep the position of every value that a later check may complain about
//! ([`toml::Spanned`]); conversions that need no context (durations, addresses, enum
//! words) run inside `Deserialize` so that toml attaches the position by itself. Then the
//! raw structs are checked and turned into the public types, which carry no positions.
//!
//! Every error tied to a place in the file reads `file:line:col: message` (1-based), the
//! format `mxlb check-config` prints and editors understand.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::privilege::RunAs;
use crate::proxy_header::ProxyVersion;
use crate::upstreams::TrustedUpstreams;

mod table_headers;

const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/mxlb";
const DEFAULT_MAXCONN: u32 = 20_000;
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;
const MAX_RETRIES: u32 = 100;
const DEFAULT_TIMEOUT_CONNECT: Duration = Duration::from_secs(5);
/// RFC 5321 section 4.5.3.2 asks for 5 to 10 minute timeouts between commands.
const DEFAULT_TIMEOUT_IDLE: Duration = Duration::from_secs(600);
const DEFAULT_INTER: Duration = Duration::from_secs(2);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_WEIGHT: u32 = 1;
/// HAProxy's maximum server weight.
pub const MAX_WEIGHT: u32 = 256;
/// A few MiB: deep enough that a receiver that keeps up never pauses its sender, small next
/// to the socket buffers TCP grants anyway (docs/architecture.md, "Bounded memory").
const DEFAULT_MAX_INFLIGHT: u64 = 4 << 20;
/// Measured with `cargo xtask bench` (docs/benchmarks.md): pairing costs more than it saves
/// for a session of a few KiB, and the kernel path only pays for streams.
const DEFAULT_KERNEL_RELAY_AFTER: u64 = 32 << 10;
/// A floor, so that a slip such as `"64B"` cannot throttle every relay to a crawl.
const MIN_MAX_INFLIGHT: u64 = 64 << 10;
const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(10);
/// One IPv4 address per source: NAT is rare among sending MTAs.
const DEFAULT_SOURCE_PREFIX_V4: u8 = 32;
/// One /64 per source: the smallest block a site is usually given, and the block one
/// host can pick fresh addresses from at will.
const DEFAULT_SOURCE_PREFIX_V6: u8 = 64;

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub global: Global,
    /// The HTTP stats and admin endpoint; `None` when `[stats]` is absent.
    pub stats: Option<Stats>,
    pub listeners: Vec<Listener>,
}

/// `[global]`: process-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// Where maps and programs are pinned, for bpftool.
    pub pin_path: PathBuf,
    pub relay: RelayMode,
    /// Most client connections open at once, over all listeners; clients beyond it are
    /// answered `421 4.7.0`. Also sizes the kernel maps.
    pub maxconn: u32,
    /// How long relays may finish after SIGTERM/SIGINT.
    pub grace: Duration,
    pub log_format: LogFormat,
    /// Most bytes of one direction of a kernel-relayed connection that may wait between the
    /// two sockets for a slow receiver before that direction pauses (default 4 MiB); 0 is
    /// off (unbounded), otherwise at least 64 KiB.
    pub max_inflight: u64,
    /// With the kernel relay: bytes a connection must move in full 16 KiB reads (a stream,
    /// not a conversation) before its sockets are paired in the kernel. Short sessions and
    /// runs of small messages never pay for pairing; 0 pairs at once.
    pub kernel_relay_after: u64,
    /// Threads that run the daemon; 0 (the default) picks one per CPU but one, at least
    /// one: the kernel relay's own work runs in softirq on every CPU, and on the 2-CPU
    /// machines measured, one thread beat two (docs/benchmarks.md).
    pub threads: u32,
    /// The user (and group) the daemon becomes once it has loaded the kernel relay and
    /// bound its sockets; `None` (the default) stays root.
    pub user: Option<RunAs>,
    /// The unix socket on which the daemon hands its listening sockets to `mxlb upgrade`
    /// ([`crate::upgrade`]); `None` (the default) allows no upgrade in place.
    pub upgrade_socket: Option<PathBuf>,
    /// Where log lines go: stderr (the default) or a syslog socket.
    pub log_target: LogTarget,
    /// The name the daemon gives itself: in the idle timeout's `421` and in syslog
    /// messages; `None` (the default): the system's host name.
    pub hostname: Option<String>,
}

impl Global {
    /// The number of daemon threads `threads` asks for on this machine.
    pub fn daemon_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads as usize;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        cpus.saturating_sub(1).max(1)
    }
}

impl Default for Global {
    fn default() -> Self {
        Global {
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            // User space by default: it is the relay proven not to duplicate or drop a byte
            // on any network (docs/architecture.md, "Hand-overs"); the kernel relay is opt-in.
            relay: RelayMode::Userspace,
            maxconn: DEFAULT_MAXCONN,
            grace: DEFAULT_GRACE,
            log_format: LogFormat::Text,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            kernel_relay_after: DEFAULT_KERNEL_RELAY_AFTER,
            threads: 0,
            user: None,
            upgrade_socket: None,
            log_target: LogTarget::Stderr,
            hostname: None,
        }
    }
}

/// `log_target`, with the `syslog_*` keys when it is `"syslog"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LogTarget {
    #[default]
    Stderr,
    Syslog(Syslog),
}

/// Where and how log lines go to syslog (`[global] syslog_socket`, `syslog_facility`,
/// `syslog_format`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syslog {
    /// A unix datagram socket, `/dev/log` by default.
    pub socket: PathBuf,
    pub facility: Facility,
    pub format: SyslogFormat,
}

/// The syslog facilities of RFC 5424, 6.2.1, by their usual names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    Kern,
    User,
    #[default]
    Mail,
    Daemon,
    Auth,
    Syslog,
    Lpr,
    News,
    Uucp,
    Cron,
    Authpriv,
    Ftp,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    /// The facility's number, as the PRI field carries it (`facility * 8 + severity`).
    pub fn code(self) -> u8 {
        match self {
            Facility::Kern => 0,
            Facility::User => 1,
            Facility::Mail => 2,
            Facility::Daemon => 3,
            Facility::Auth => 4,
            Facility::Syslog => 5,
            Facility::Lpr => 6,
            Facility::News => 7,
            Facility::Uucp => 8,
            Facility::Cron => 9,
            Facility::Authpriv => 10,
            Facility::Ftp => 11,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// The header syslog messages carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    /// `<PRI>Mmm dd hh:mm:ss HOSTNAME mxlb[PID]: MSG` (RFC 3164, 4.1).
    #[default]
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOSTNAME mxlb PID - - MSG` (RFC 5424, 6).
    Rfc5424,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawLogTarget {
    #[default]
    Stderr,
    Syslog,
}

const DEFAULT_SYSLOG_SOCKET: &str = "/dev/log";

/// `log_target` and the `syslog_*` keys, which mean something only with `"syslog"`.
fn log_target(global: &RawGlobal) -> Validated<LogTarget> {
    let target = global.log_target.unwrap_or_default();
    if target == RawLogTarget::Stderr {
        let stray = [
            global.syslog_socket.as_ref().map(Spanned::span),
            global.syslog_facility.as_ref().map(Spanned::span),
            global.syslog_format.as_ref().map(Spanned::span),
        ];
        if let Some(span) = stray.into_iter().flatten().next() {
            return invalid(span, "syslog_* keys need log_target = \"syslog\"");
        }
        return Ok(LogTarget::Stderr);
    }
    let socket = match &global.syslog_socket {
        Some(path) if !path.get_ref().is_absolute() => {
            return invalid(path.span(), "syslog_socket must be an absolute path");
        }
        Some(path) => path.get_ref().clone(),
        None => PathBuf::from(DEFAULT_SYSLOG_SOCKET),
    };
    Ok(LogTarget::Syslog(Syslog {
        socket,
        facility: global
            .syslog_facility
            .as_ref()
            .map_or_else(Facility::default, |f| *f.get_ref()),
        format: global
            .syslog_format
            .as_ref()
            .map_or_else(SyslogFormat::default, |f| *f.get_ref()),
    }))
}

/// `hostname` goes into an SMTP reply and a syslog header: one word of visible ASCII.
fn hostname(raw: Option<&Spanned<String>>) -> Validated<Option<String>> {
    match raw {
        None => Ok(None),
        Some(name) if is_visible_ascii(name.get_ref()) => Ok(Some(name.get_ref().clone())),
        Some(name) => invalid(name.span(), "hostname must be one word of visible ASCII"),
    }
}

/// The name the daemon gives itself: `hostname`, or the system's host name.
pub fn own_hostname(global: &Global) -> String {
    global.hostname.clone().unwrap_or_else(default_domain)
}

/// How established connections are relayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// The sockmap if the kernel allows it, otherwise userspace.
    #[default]
    Auto,
    /// In the kernel through the eBPF sockmap; failing to load it is an error.
    Sockmap,
    /// Copies in userspace, without eBPF.
    Userspace,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[stats]`: the HTTP stats page, API and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    pub bind: SocketAddr,
    /// Bearer token for the admin endpoints; `None` turns them off.
    pub admin_token: Option<String>,
    /// Connections the stats port serves at once; past it they get a 503 and are closed.
    pub maxconn: u32,
    /// A request's deadline, from the connection's start or the previous request: slow
    /// and idle clients are closed there.
    pub timeout: Duration,
}

/// One `[[listen]]` section: addresses to accept on and the servers behind them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub balance: Balance,
    /// Read a PROXY header (v1 or v2) from each client before relaying.
    pub accept_proxy: bool,
    /// The peers whose PROXY headers are believed; `None`: any peer (`accept_proxy_from`
    /// not set).
    pub accept_proxy_from: Option<TrustedUpstreams>,
    /// Connect attempts to servers before giving up on the client.
    pub retries: u32,
    /// A retry goes to another server.
    pub redispatch: bool,
    pub timeout_connect: Duration,
    pub timeout_idle: Duration,
    /// Most clients this listener serves at once (`global.maxconn` when not set); clients
    /// beyond it are answered `421 4.7.0`.
    pub maxconn: u32,
    /// Limits per client address (or address block).
    pub source_limits: SourceLimits,
    pub check: Check,
    /// In file order; the TOML key is `[[listen.server]]`.
    pub servers: Vec<Server>,
    /// The name in the idle timeout's `421` (`[global] hostname`, or the system's).
    pub hostname: String,
}

/// Per-source limits of a listener: clients over them are answered `421 4.7.0` before any
/// server is contacted. Sources are grouped by prefix, so one host cannot dodge the limits
/// by hopping between the addresses of its IPv6 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimits {
    /// Most connections open at once per source; 0: no limit.
    pub max_conn: u32,
    /// Most new connections per source within `rate_window`; 0: no limit.
    pub max_rate: u32,
    pub rate_window: Duration,
    /// IPv4 sources (and IPv4-mapped IPv6 ones) are grouped by this prefix length.
    pub prefix_v4: u8,
    /// IPv6 sources are grouped by this prefix length.
    pub prefix_v6: u8,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_conn: 0,
            max_rate: 0,
            rate_window: DEFAULT_RATE_WINDOW,
            prefix_v4: DEFAULT_SOURCE_PREFIX_V4,
            prefix_v6: DEFAULT_SOURCE_PREFIX_V6,
        }
    }
}

impl SourceLimits {
    /// Whether any per-source limit is on (else no per-source state is kept at all).
    pub fn any(&self) -> bool {
        self.max_conn > 0 || self.max_rate > 0
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// The server with the fewest current connections.
    LeastConn,
    /// A hash of the client address, so a client keeps its server.
    Source,
    /// The first server (in file order) with a free slot.
    First,
}

impl Balance {
    /// The configuration spelling, as the stats show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
            Balance::Source => "source",
            Balance::First => "first",
        }
    }
}

/// `[listen.check]`: the health check of the listener's servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// `None` when `[listen.check]` is absent: servers are always considered up.
    pub kind: CheckType,
    pub verb: SmtpVerb,
    /// Sent with HELO/EHLO. Defaults to the host name, because Postfix with strict HELO
    /// restrictions answers `HELO localhost` with 504.
    pub domain: String,
    /// Between checks while the state is stable and up.
    pub inter: Duration,
    /// Between checks while a state change is pending.
    pub fastinter: Duration,
    /// Between checks while down.
    pub downinter: Duration,
    /// Consecutive successes to go up.
    pub rise: u32,
    /// Consecutive failures to go down.
    pub fall: u32,
    /// For one whole check, connect to QUIT.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// Banner, HELO/EHLO, QUIT; only 2xx replies pass (HAProxy `option smtpchk`).
    Smtp,
    /// A TCP connect only.
    Tcp,
    /// No check: always up.
    None,
}

/// The greeting command of SMTP checks. HELO is HAProxy's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SmtpVerb {
    #[default]
    #[serde(rename = "HELO", alias = "helo")]
    Helo,
    #[serde(rename = "EHLO", alias = "ehlo")]
    Ehlo,
}

impl SmtpVerb {
    /// The command as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpVerb::Helo => "HELO",
            SmtpVerb::Ehlo => "EHLO",
        }
    }
}

/// One `[[listen.server]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    /// PROXY header sent first on every connection, health checks included.
    pub send_proxy: SendProxy,
    /// Relative share of new connections, 0..=256; 0 takes no new connections.
    pub weight: u32,
    /// Used only when no non-backup server is up.
    pub backup: bool,
    /// Health-check this server (when the listener has a check).
    pub check: bool,
    /// Most sessions open to this server at once; a full server takes no new clients.
    /// 0: no limit.
    pub maxconn: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    None,
    V1,
    V2,
}

impl SendProxy {
    /// The PROXY protocol version to send, if any.
    pub fn version(self) -> Option<ProxyVersion> {
        match self {
            SendProxy::None => None,
            SendProxy::V1 => Some(ProxyVersion::V1),
            SendProxy::V2 => Some(ProxyVersion::V2),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Anything wrong inside the file, with its 1-based position.
    #[error("{origin}:{line}:{col}: {message}")]
    At {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The process exit code for a refused configuration (bad config or bad arguments).
    pub fn exit_code(&self) -> i32 {
        2
    }

    /// Builds a positioned error from a byte offset into `text`.
    fn at(origin: &str, text: &str, offset: usize, message: &str) -> ConfigError {
        let (line, col) = line_col(text, offset);
        ConfigError::At {
            origin: origin.to_owned(),
            line,
            col,
            // toml's messages may span lines; the contract wants one line per error.
            message: message
                .trim()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count();
    (before.matches('\n').count() + 1, column + 1)
}

impl Config {
    /// Reads and validates the file at `path`; errors name `path` as the origin.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` is the file name used in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            // A header with the wrong brackets makes toml complain about something else:
            // name the header and the fix instead.
            let (offset, message) = table_headers::misbracketed(text).unwrap_or_else(|| {
                let offset = error.span().map_or(0, |span| span.start);
                (offset, error.message().to_owned())
            });
            ConfigError::at(origin, text, offset, &message)
        })?;
        raw.validate()
            .map_err(|invalid| ConfigError::at(origin, text, invalid.span.start, &invalid.message))
    }
}

// ---------------------------------------------------------------------------------------
// Validation: raw structs to public types.

/// A semantic error at a place in the file, before it is turned into a [`ConfigError`].
struct Invalid {
    span: Range<usize>,
    message: String,
}

type Validated<T> = Result<T, Invalid>;

fn invalid<T>(span: Range<usize>, message: impl Into<String>) -> Validated<T> {
    Err(Invalid {
        span,
        message: message.into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    global: RawGlobal,
    stats: Option<RawStats>,
    listen: Option<Spanned<Vec<RawListener>>>,
}

impl RawConfig {
    /// Sections are checked in the order they usually appear in the file.
    fn validate(self) -> Validated<Config> {
        let global = self.global.validate()?;
        let stats = self.stats.map(RawStats::validate).transpose()?;
        let listeners = match self.listen {
            Some(listen) if listen.get_ref().is_empty() => {
                return invalid(listen.span(), "at least one [[listen]] is needed");
            }
            Some(listen) => listeners(listen.into_inner(), &global)?,
            None => return invalid(0..0, "no [[listen]] section: nothing to balance"),
        };
        Ok(Config {
            global,
            stats,
            listeners,
        })
    }
}

/// Validates each listener, then what must be unique across listeners. `global` gives
/// the defaults listeners inherit.
fn listeners(raw: Vec<RawListener>, global: &Global) -> Validated<Vec<Listener>> {
    let mut names = HashSet::new();
    let mut binds: HashMap<SocketAddr, String> = HashMap::new();
    let mut listeners = Vec::with_capacity(raw.len());
    for raw in raw {
        let name_span = raw.name.span();
        let bind_span = raw.bind.span();
        let listener = raw.validate(global)?;
        if !names.insert(listener.name.clone()) {
            return invalid(
                name_span,
                format!("duplicate listener name {:?}", listener.name),
            );
        }
        for addr in &listener.bind {
            if let Some(other) = binds.insert(*addr, listener.name.clone()) {
                return invalid(
                    bind_span,
                    format!("{addr} is already bound by listener {other:?}"),
                );
            }
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    pin_path: Option<PathBuf>,
    relay: Option<RelayMode>,
    maxconn: Option<Spanned<u32>>,
    grace: Option<HumanDuration>,
    log_format: Option<LogFormat>,
    max_inflight: Option<Spanned<HumanSize>>,
    kernel_relay_after: Option<Spanned<HumanSize>>,
    threads: Option<Spanned<u32>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    upgrade_socket: Option<Spanned<PathBuf>>,
    log_target: Option<RawLogTarget>,
    syslog_socket: Option<Spanned<PathBuf>>,
    syslog_facility: Option<Spanned<Facility>>,
    syslog_format: Option<Spanned<SyslogFormat>>,
    hostname: Option<Spanned<String>>,
}

impl RawGlobal {
    fn validate(self) -> Validated<Global> {
        let defaults = Global::default();
        let log_target = log_target(&self)?;
        let hostname = hostname(self.hostname.as_ref())?;
        Ok(Global {
            pin_path: self.pin_path.unwrap_or(defaults.pin_path),
            relay: self.relay.unwrap_or(defaults.relay),
            maxconn: bounded(self.maxconn, defaults.maxconn, 1..=u32::MAX, "maxconn")?,
            grace: self.grace.map_or(defaults.grace, |grace| grace.0),
            log_format: self.log_format.unwrap_or(defaults.log_format),
            max_inflight: zero_or_at_least(
                self.max_inflight,
                defaults.max_inflight,
                MIN_MAX_INFLIGHT,
                "max_inflight",
            )?,
            kernel_relay_after: self
                .kernel_relay_after
                .map_or(defaults.kernel_relay_after, |size| size.into_inner().0),
            threads: bounded(self.threads, defaults.threads, 0..=1024, "threads")?,
            user: run_as(self.user, self.group)?,
            upgrade_socket: self.upgrade_socket.map(socket_path).transpose()?,
            log_target,
            hostname,
        })
    }
}

/// `user` and `group` looked up in the system's databases: an unknown name is a
/// configuration error, found by `mxlb check-config` before any start.
fn run_as(
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
) -> Validated<Option<RunAs>> {
    let Some(user) = user else {
        return match group {
            Some(group) => invalid(group.span(), "group needs user: it is the user's group"),
            None => Ok(None),
        };
    };
    let group_name = group.as_ref().map(|group| group.get_ref().as_str());
    match RunAs::lookup(user.get_ref(), group_name) {
        Ok(run_as) => Ok(Some(run_as)),
        Err(error) => {
            let span = match &group {
                Some(group) if error.key() == "group" => group.span(),
                _ => user.span(),
            };
            invalid(span, error.to_string())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStats {
    bind: SocketAddress,
    admin_token: Option<Spanned<String>>,
    maxconn: Option<Spanned<u32>>,
    timeout: Option<Spanned<HumanDuration>>,
}

impl RawStats {
    fn validate(self) -> Validated<Stats> {
        // The token travels in an HTTP header: visible ASCII only, and not empty, which
        // would make "Bearer " a valid credential.
        let admin_token = self
            .admin_token
            .map(|token| {
                visible_ascii(
                    token,
                    "admin_token",
                    "leave the key out to turn the admin API off",
                )
            })
            .transpose()?;
        let defaults = crate::stats::Limits::default();
        Ok(Stats {
            bind: self.bind.0,
            admin_token,
            // At most 128: the port's descriptors come out of the 256 the daemon keeps
            // beside its sessions (daemon.rs, FD_RESERVE).
            maxconn: bounded(self.maxconn, defaults.maxconn, 1..=128, "stats.maxconn")?,
            timeout: nonzero(self.timeout, defaults.timeout, "stats.timeout")?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<BindList>,
    balance: Option<Balance>,
    accept_proxy: Option<bool>,
    accept_proxy_from: Option<Spanned<Vec<Spanned<String>>>>,
    retries: Option<Spanned<u32>>,
    redispatch: Option<bool>,
    timeout_connect: Option<Spanned<HumanDuration>>,
    timeout_idle: Option<Spanned<HumanDuration>>,
    maxconn: Option<Spanned<u32>>,
    max_conn_per_source: Option<u32>,
    max_rate_per_source: Option<u32>,
    rate_window: Option<Spanned<HumanDuration>>,
    source_prefix_v4: Option<Spanned<u32>>,
    source_prefix_v6: Option<Spanned<u32>>,
    check: Option<RawCheck>,
    #[serde(default)]
    server: Vec<RawServer>,
}

impl RawListener {
    fn validate(self, global: &Global) -> Validated<Listener> {
        let name_span = self.name.span();
        let name = url_safe_name(self.name, "listener")?;
        if self.bind.get_ref().0.is_empty() {
            return invalid(self.bind.span(), "bind needs at least one address");
        }
        let accept_proxy = self.accept_proxy.unwrap_or(false);
        let accept_proxy_from = trusted_upstreams(self.accept_proxy_from, accept_proxy)?;
        Ok(Listener {
            bind: self.bind.into_inner().0,
            balance: self.balance.unwrap_or_default(),
            accept_proxy,
            accept_proxy_from,
            retries: bounded(self.retries, DEFAULT_RETRIES, 0..=MAX_RETRIES, "retries")?,
            redispatch: self.redispatch.unwrap_or(true),
            timeout_connect: nonzero(
                self.timeout_connect,
                DEFAULT_TIMEOUT_CONNECT,
                "timeout_connect",
            )?,
            timeout_idle: nonzero(self.timeout_idle, DEFAULT_TIMEOUT_IDLE, "timeout_idle")?,
            maxconn: bounded(self.maxconn, global.maxconn, 1..=u32::MAX, "maxconn")?,
            source_limits: SourceLimits {
                max_conn: self.max_conn_per_source.unwrap_or(0),
                max_rate: self.max_rate_per_source.unwrap_or(0),
                rate_window: nonzero(self.rate_window, DEFAULT_RATE_WINDOW, "rate_window")?,
                prefix_v4: prefix(self.source_prefix_v4, DEFAULT_SOURCE_PREFIX_V4, 32, "v4")?,
                prefix_v6: prefix(self.source_prefix_v6, DEFAULT_SOURCE_PREFIX_V6, 128, "v6")?,
            },
            check: check(self.check)?,
            servers: servers(self.server, &name, name_span)?,
            name,
            hostname: own_hostname(global),
        })
    }
}

/// A listener's servers; `listener` and its span are for the error when there are none.
fn servers(raw: Vec<RawServer>, listener: &str, span: Range<usize>) -> Validated<Vec<Server>> {
    if raw.is_empty() {
        return invalid(
            span,
            format!("listener {listener:?} has no [[listen.server]]"),
        );
    }
    let mut names = HashSet::new();
    let mut servers = Vec::with_capacity(raw.len());
    for raw in raw {
        let name_span = raw.name.span();
        let server = raw.validate()?;
        if !names.insert(server.name.clone()) {
            return invalid(
                name_span,
                format!("duplicate server name {:?} in this listener", server.name),
            );
        }
        servers.push(server);
    }
    Ok(servers)
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: Option<CheckType>,
    verb: Option<SmtpVerb>,
    domain: Option<Spanned<String>>,
    inter: Option<Spanned<HumanDuration>>,
    fastinter: Option<Spanned<HumanDuration>>,
    downinter: Option<Spanned<HumanDuration>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    timeout: Option<Spanned<HumanDuration>>,
}

/// Without `[listen.check]` there is no check (like an HAProxy server without `check`);
/// with it, the type defaults to `smtp`. Other settings get their defaults either way so
/// that turning a check on at runtime needs no second set of defaults.
fn check(raw: Option<RawCheck>) -> Validated<Check> {
    let (raw, default_kind) = match raw {
        Some(raw) => (raw, CheckType::Smtp),
        None => (RawCheck::default(), CheckType::None),
    };
    let inter = nonzero(raw.inter, DEFAULT_INTER, "inter")?;
    Ok(Check {
        kind: raw.kind.unwrap_or(default_kind),
        verb: raw.verb.unwrap_or_default(),
        domain: helo_domain(raw.domain)?,
        inter,
        fastinter: nonzero(raw.fastinter, inter, "fastinter")?,
        downinter: nonzero(raw.downinter, inter, "downinter")?,
        rise: bounded(raw.rise, DEFAULT_RISE, 1..=u32::MAX, "rise")?,
        fall: bounded(raw.fall, DEFAULT_FALL, 1..=u32::MAX, "fall")?,
        timeout: nonzero(raw.timeout, inter, "timeout")?,
    })
}

/// The HELO/EHLO argument goes into an SMTP command line: one visible-ASCII word.
fn helo_domain(raw: Option<Spanned<String>>) -> Validated<String> {
    match raw {
        None => Ok(default_domain()),
        Some(domain) => visible_ascii(domain, "domain", "leave the key out for the host name"),
    }
}

/// The machine's host name, or `localhost` if it cannot be read.
fn default_domain() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| is_visible_ascii(name))
        .unwrap_or_else(|| "localhost".to_owned())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    addr: SocketAddress,
    send_proxy: Option<SendProxy>,
    weight: Option<Spanned<u32>>,
    backup: Option<bool>,
    check: Option<bool>,
    maxconn: Option<u32>,
}

impl RawServer {
    fn validate(self) -> Validated<Server> {
        Ok(Server {
            name: url_safe_name(self.name, "server")?,
            addr: self.addr.0,
            send_proxy: self.send_proxy.unwrap_or_default(),
            weight: bounded(self.weight, DEFAULT_WEIGHT, 0..=MAX_WEIGHT, "weight")?,
            backup: self.backup.unwrap_or(false),
            check: self.check.unwrap_or(true),
            maxconn: self.maxconn.unwrap_or(0),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Small checks shared by the sections.

/// Listener and server names appear in URLs (`/api/servers/{listen}/{server}/state`) and
/// metric labels, so they are restricted to characters that need no escaping.
fn url_safe_name(name: Spanned<String>, what: &str) -> Validated<String> {
    let text = name.get_ref();
    let valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        return Ok(name.into_inner());
    }
    let message =
        format!("invalid {what} name {text:?}: use only letters, digits, '_', '.' and '-'");
    invalid(name.span(), message)
}

/// `accept_proxy_from`: only with `accept_proxy`, never empty (that would refuse every
/// connection: leaving the key out is how to trust any peer), each entry an address or a
/// CIDR block.
fn trusted_upstreams(
    entries: Option<Spanned<Vec<Spanned<String>>>>,
    accept_proxy: bool,
) -> Validated<Option<TrustedUpstreams>> {
    let Some(entries) = entries else {
        return Ok(None);
    };
    if !accept_proxy {
        return invalid(
            entries.span(),
            "accept_proxy_from needs accept_proxy = true (it names who may send PROXY headers)",
        );
    }
    if entries.get_ref().is_empty() {
        return invalid(
            entries.span(),
            "accept_proxy_from = [] would refuse every connection; list the upstream \
             balancers' addresses, or leave the key out to accept headers from any peer",
        );
    }
    let spans: Vec<_> = entries.get_ref().iter().map(Spanned::span).collect();
    let texts = entries.get_ref().iter().map(|e| e.get_ref().as_str());
    match TrustedUpstreams::parse(texts) {
        Ok(trusted) => Ok(Some(trusted)),
        Err(error) => invalid(spans[error.index].clone(), error.message),
    }
}

fn bounded(
    value: Option<Spanned<u32>>,
    default: u32,
    range: RangeInclusive<u32>,
    what: &str,
) -> Validated<u32> {
    let Some(value) = value else {
        return Ok(default);
    };
    let number = *value.get_ref();
    match (range.contains(&number), *range.end()) {
        (true, _) => Ok(number),
        (false, u32::MAX) => invalid(
            value.span(),
            format!("{what} must be at least {}, not {number}", range.start()),
        ),
        (false, end) => invalid(
            value.span(),
            format!(
                "{what} must be between {} and {end}, not {number}",
                range.start()
            ),
        ),
    }
}

/// A prefix length for grouping sources: 1 to `bits` (an address family's length). 0 would
/// make the whole address family a single source.
fn prefix(value: Option<Spanned<u32>>, default: u8, bits: u8, family: &str) -> Validated<u8> {
    let what = format!("source_prefix_{family}");
    let length = bounded(value, u32::from(default), 1..=u32::from(bits), &what)?;
    // In range, so it fits; the fallback is never taken.
    Ok(u8::try_from(length).unwrap_or(bits))
}

/// A size with a lower bound, such as a buffer budget that must hold at least one buffer.
/// A size that is either 0 (the feature is off) or at least `minimum`.
fn zero_or_at_least(
    value: Option<Spanned<HumanSize>>,
    default: u64,
    minimum: u64,
    what: &str,
) -> Validated<u64> {
    match value {
        None => Ok(default),
        Some(value) if value.get_ref().0 != 0 && value.get_ref().0 < minimum => invalid(
            value.span(),
            format!(
                "{what} must be 0 (off) or at least {}, not {} bytes",
                HumanSize::display(minimum),
                value.get_ref().0
            ),
        ),
        Some(value) => Ok(value.into_inner().0),
    }
}

/// A duration that must not be zero: intervals and timeouts of zero would spin or fail
/// every attempt at once.
fn nonzero(
    value: Option<Spanned<HumanDuration>>,
    default: Duration,
    what: &str,
) -> Validated<Duration> {
    match value {
        None => Ok(default),
        Some(value) if value.get_ref().0.is_zero() => {
            invalid(value.span(), format!("{what} must be longer than zero"))
        }
        Some(value) => Ok(value.into_inner().0),
    }
}

/// `global.upgrade_socket`: an absolute path (the daemon and `mxlb upgrade` may start in
/// different directories) that fits a unix socket address (107 bytes on Linux).
fn socket_path(path: Spanned<PathBuf>) -> Validated<PathBuf> {
    const SUN_PATH_MAX: usize = 107;
    let span = path.span();
    let path = path.into_inner();
    if !path.is_absolute() || path.file_name().is_none() {
        return invalid(span, "upgrade_socket must be an absolute path to a file");
    }
    if path.as_os_str().len() > SUN_PATH_MAX {
        return invalid(
            span,
            format!(
                "upgrade_socket is longer than the {SUN_PATH_MAX} bytes of a unix socket address"
            ),
        );
    }
    Ok(path)
}

fn is_visible_ascii(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic())
}

/// A value that must be one word of visible ASCII (it goes into a protocol line). An error
/// names the first character that is not, and where it is, without repeating the value
/// (it may be a secret); `if_empty` says what to do instead of an empty value.
fn visible_ascii(value: Spanned<String>, key: &str, if_empty: &str) -> Validated<String> {
    let text = value.get_ref();
    if text.is_empty() {
        return invalid(value.span(), format!("{key} is empty: {if_empty}"));
    }
    let Some((number, (index, found))) = text
        .char_indices()
        .enumerate()
        .find(|(_, (_, c))| !c.is_ascii_graphic())
    else {
        return Ok(value.into_inner());
    };
    let span = value.span();
    // Point at the character itself when the value is written without escapes (its
    // quotes around exactly its bytes), else at the value.
    let at = if span.len() == text.len() + 2 {
        span.start + 1 + index
    } else {
        span.start
    };
    let message = format!(
        "{key}: character {} is {}; use visible ASCII only (letters, digits, punctuation; \
         no spaces, tabs or non-ASCII)",
        number + 1,
        describe_char(found)
    );
    invalid(at..at + found.len_utf8(), message)
}

/// "a space", "a tab", "'é' (U+00E9)".
fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        '\t' => "a tab".to_owned(),
        c if c.is_control() => format!("a control character (U+{:04X})", u32::from(c)),
        c if c.is_whitespace() => format!("a non-ASCII space (U+{:04X})", u32::from(c)),
        c => format!("{c:?} (U+{:04X})", u32::from(c)),
    }
}

// ---------------------------------------------------------------------------------------
// Value types converted inside `Deserialize`, so toml reports errors at the value.

/// A duration written as a string with a unit, such as `"2s"` or `"10m"` (humantime
/// syntax). Bare numbers are refused: `timeout = 5` could mean seconds or milliseconds.
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(HumanDurationVisitor)
    }
}

struct HumanDurationVisitor;

impl Visitor<'_> for HumanDurationVisitor {
    type Value = HumanDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string with a unit, such as \"2s\", \"500ms\" or \"10m\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
        // humantime takes a bare "0"; we want a unit everywhere.
        if !text.chars().any(char::is_alphabetic) {
            return Err(E::custom(format!(
                "invalid duration {text:?}: a unit is needed, such as \"{text}s\" or \"{text}ms\""
            )));
        }
        humantime::parse_duration(text)
            .map(HumanDuration)
            .map_err(|error| E::custom(format!("invalid duration {text:?}: {error}")))
    }
}

/// A size in bytes: a TOML integer (bytes), or a string with a binary unit such as
/// `"512KiB"`, `"4 MiB"` or `"1GiB"` (`"65536B"` for bytes). Decimal units (`"4MB"`) are
/// refused rather than guessed: 4 MB and 4 MiB differ by almost 5 %.
struct HumanSize(u64);

impl HumanSize {
    /// The largest whole unit that divides `bytes`: `64 KiB`, `4 MiB`, `1000 bytes`.
    fn display(bytes: u64) -> String {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        UNITS
            .iter()
            .find(|(size, _)| bytes != 0 && bytes.is_multiple_of(*size))
            .map_or_else(
                || format!("{bytes} bytes"),
                |(size, unit)| format!("{} {unit}", bytes / size),
            )
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(HumanSizeVisitor)
    }
}

struct HumanSizeVisitor;

impl Visitor<'_> for HumanSizeVisitor {
    type Value = HumanSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a size: bytes as an integer, or a string such as \"512KiB\", \"4MiB\" or \"1GiB\"",
        )
    }

    fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<HumanSize, E> {
        Ok(HumanSize(bytes))
    }

    fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<HumanSize, E> {
        u64::try_from(bytes)
            .map(HumanSize)
            .map_err(|_| E::custom(format!("invalid size {bytes}: a size cannot be negative")))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanSize, E> {
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let multiplier: u64 = match unit.trim_start() {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => {
                return Err(E::custom(format!(
                    "invalid size {text:?}: expected a whole number and a unit B, KiB, MiB or GiB, such as \"4MiB\""
                )));
            }
        };
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .map(HumanSize)
            .ok_or_else(|| {
                E::custom(format!(
                    "invalid size {text:?}: not a whole number of bytes up to 2^64"
                ))
            })
    }
}

const ADDRESS_EXAMPLES: &str = r#""192.0.2.10:25" or "[2001:db8::10]:25""#;

/// An `IP:port` address; IPv6 in brackets. Port 0 is refused: it would bind a random port
/// or connect nowhere.
struct SocketAddress(SocketAddr);

impl<'de> Deserialize<'de> for SocketAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(SocketAddressVisitor)
    }
}

struct SocketAddressVisitor;

impl Visitor<'_> for SocketAddressVisitor {
    type Value = SocketAddress;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an address string such as {ADDRESS_EXAMPLES}")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<SocketAddress, E> {
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                Err(E::custom(format!("invalid address {text:?}: port 0")))
            }
            Ok(addr) => Ok(SocketAddress(addr)),
            Err(_) => Err(E::custom(format!(
                "invalid address {text:?}: expected IP:port, such as {ADDRESS_EXAMPLES}"
            ))),
        }
    }
}

/// `bind`: one address string or an array of them.
struct BindList(Vec<SocketAddr>);

impl<'de> Deserialize<'de> for BindList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BindListVisitor)
    }
}

struct BindListVisitor;

impl<'de> Visitor<'de> for BindListVisitor {
    type Value = BindList;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address string or an array of them, such as [\"0.0.0.0:25\", \"[::]:25\"]")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<BindList, E> {
        SocketAddressVisitor
            .visit_str(text)
            .map(|addr| BindList(vec![addr.0]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BindList, A::Error> {
        let mut addrs = Vec::new();
        while let Some(addr) = seq.next_element::<SocketAddress>()? {
            addrs.push(addr.0);
        }
        Ok(BindList(addrs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the user-facing contract, verbatim apart from the token.
    const CONTRACT_EXAMPLE: &str = r#"[global]
pin_path = "/sys/fs/bpf/mxlb"   # maps and programs pinned here for bpftool
relay = "auto"                  # auto | sockmap | userspace
maxconn = 20000
grace = "30s"
log_format = "text"             # text | json

[stats]
bind = "127.0.0.1:8404"
admin_token = "s3cret"          # admin endpoints refused (401) without it; absent = admin off

[[listen]]
name = "smtp"
bind = ["0.0.0.0:25", "[::]:25"]
balance = "roundrobin"          # roundrobin (weighted) | leastconn | source | first
accept_proxy = false            # parse a PROXY header from an upstream balancer
retries = 3                     # connect attempts before giving up on the client
redispatch = true               # a retry goes to another server
timeout_connect = "5s"
timeout_idle = "10m"            # RFC 5321 timeouts are 5-10 minutes

[listen.check]
type = "smtp"                   # smtp | tcp | none
verb = "EHLO"                   # HELO | EHLO
domain = "lb.example.com"
inter = "2s"
fastinter = "1s"                # while a state change is pending
downinter = "5s"                # while down
rise = 2
fall = 3
timeout = "2s"

[[listen.server]]
name = "mail1"
addr = "192.0.2.10:25"          # IPv4 or [IPv6]:port
send_proxy = "v1"               # none | v1 | v2 ; health checks carry it too (v2: LOCAL)
weight = 1
backup = false
check = true
"#;

    const MINIMAL: &str = r#"[[listen]]
name = "smtp"
bind = "127.0.0.1:2525"

[[listen.server]]
name = "mail1"
addr = "127.0.0.1:10025"
"#;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "mxlb.toml")
    }

    /// Parses `text`, expecting an error, and returns its message.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn assert_error(text: &str, prefix: &str, contains: &str) {
        let message = error(text);
        assert!(
            message.starts_with(prefix),
            "{message:?} should start with {prefix:?}"
        );
        assert!(
            message.contains(contains),
            "{message:?} should contain {contains:?}"
        );
        assert_eq!(message.lines().count(), 1, "{message:?}");
    }

    /// The minimal config with `extra` appended to the listener (before its server).
    fn with_listener_keys(extra: &str) -> String {
        MINIMAL.replace(
            "bind = \"127.0.0.1:2525\"\n",
            &format!("bind = \"127.0.0.1:2525\"\n{extra}"),
        )
    }

    #[test]
    fn contract_example() {
        let config = parse(CONTRACT_EXAMPLE).expect("contract example parses");
        let expected = Config {
            global: Global {
                pin_path: PathBuf::from("/sys/fs/bpf/mxlb"),
                relay: RelayMode::Auto,
                maxconn: 20000,
                grace: Duration::from_secs(30),
                log_format: LogFormat::Text,
                max_inflight: 4 << 20,
                kernel_relay_after: 32 << 10,
                threads: 0,
                user: None,
                upgrade_socket: None,
                log_target: LogTarget::Stderr,
                hostname: None,
            },
            stats: Some(Stats {
                bind: addr("127.0.0.1:8404"),
                admin_token: Some("s3cret".to_owned()),
                maxconn: 64,
                timeout: Duration::from_secs(5),
            }),
            listeners: vec![Listener {
                name: "smtp".to_owned(),
                bind: vec![addr("0.0.0.0:25"), addr("[::]:25")],
                balance: Balance::RoundRobin,
                accept_proxy: false,
                accept_proxy_from: None,
                retries: 3,
                redispatch: true,
                timeout_connect: Duration::from_secs(5),
                timeout_idle: Duration::from_secs(600),
                maxconn: 20000,
                source_limits: SourceLimits::default(),
                check: Check {
                    kind: CheckType::Smtp,
                    verb: SmtpVerb::Ehlo,
                    domain: "lb.example.com".to_owned(),
                    inter: Duration::from_secs(2),
                    fastinter: Duration::from_secs(1),
                    downinter: Duration::from_secs(5),
                    rise: 2,
                    fall: 3,
                    timeout: Duration::from_secs(2),
                },
                servers: vec![Server {
                    name: "mail1".to_owned(),
                    addr: addr("192.0.2.10:25"),
                    send_proxy: SendProxy::V1,
                    weight: 1,
                    backup: false,
                    check: true,
                    maxconn: 0,
                }],
                hostname: default_domain(),
            }],
        };
        assert_eq!(config, expected);
        assert_eq!(
            config.listeners[0].servers[0].send_proxy.version(),
            Some(ProxyVersion::V1)
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("minimal config parses");
        assert_eq!(config.global, Global::default());
        assert_eq!(config.global.pin_path, PathBuf::from("/sys/fs/bpf/mxlb"));
        assert_eq!(config.global.maxconn, 20000);
        assert_eq!(config.global.grace, Duration::from_secs(30));
        assert_eq!(config.stats, None);
        let listener = &config.listeners[0];
        assert_eq!(listener.bind, vec![addr("127.0.0.1:2525")]);
        assert_eq!(listener.balance, Balance::RoundRobin);
        assert!(!listener.accept_proxy);
        assert_eq!(listener.retries, 3);
        assert!(listener.redispatch);
        assert_eq!(listener.timeout_connect, Duration::from_secs(5));
        assert_eq!(listener.timeout_idle, Duration::from_secs(600));
        assert_eq!(listener.maxconn, 20000);
        assert_eq!(
            listener.source_limits,
            SourceLimits {
                max_conn: 0,
                max_rate: 0,
                rate_window: Duration::from_secs(10),
                prefix_v4: 32,
                prefix_v6: 64,
            }
        );
        assert!(!listener.source_limits.any());
        assert_eq!(config.global.max_inflight, 4 << 20, "4 MiB by default");
        assert_eq!(
            listener.check,
            Check {
                kind: CheckType::None,
                verb: SmtpVerb::Helo,
                domain: default_domain(),
                inter: Duration::from_secs(2),
                fastinter: Duration::from_secs(2),
                downinter: Duration::from_secs(2),
                rise: 2,
                fall: 3,
                timeout: Duration::from_secs(2),
            }
        );
        let server = &listener.servers[0];
        assert_eq!(server.send_proxy, SendProxy::None);
        assert_eq!(server.send_proxy.version(), None);
        assert_eq!(server.weight, 1);
        assert!(!server.backup);
        assert!(server.check);
        assert_eq!(server.maxconn, 0);
    }

    #[test]
    fn limits() {
        let text = with_listener_keys(
            "maxconn = 500\nmax_conn_per_source = 3\nmax_rate_per_source = 20\n\
             rate_window = \"1m\"\nsource_prefix_v4 = 24\nsource_prefix_v6 = 48\n",
        ) + "maxconn = 7\n[global]\nmaxconn = 1000\n";
        let config = parse(&text).expect("parses");
        assert_eq!(config.global.maxconn, 1000);
        let listener = &config.listeners[0];
        assert_eq!(listener.maxconn, 500);
        assert_eq!(
            listener.source_limits,
            SourceLimits {
                max_conn: 3,
                max_rate: 20,
                rate_window: Duration::from_secs(60),
                prefix_v4: 24,
                prefix_v6: 48,
            }
        );
        assert!(listener.source_limits.any());
        assert_eq!(listener.servers[0].maxconn, 7);

        // A listener without its own maxconn inherits the global one, wherever [global] is.
        let config = parse(&format!("[global]\nmaxconn = 64\n{MINIMAL}")).expect("parses");
        assert_eq!(config.listeners[0].maxconn, 64);

        assert_error(
            &with_listener_keys("maxconn = 0\n"),
            "mxlb.toml:4:11:",
            "maxconn must be at least 1, not 0",
        );
        assert_error(
            &with_listener_keys("source_prefix_v4 = 33\n"),
            "mxlb.toml:4:20:",
            "source_prefix_v4 must be between 1 and 32, not 33",
        );
        assert_error(
            &with_listener_keys("source_prefix_v6 = 0\n"),
            "mxlb.toml:4:20:",
            "source_prefix_v6 must be between 1 and 128, not 0",
        );
        assert_error(
            &with_listener_keys("rate_window = \"0s\"\n"),
            "mxlb.toml:4:15:",
            "rate_window must be longer than zero",
        );
        assert_error(
            &with_listener_keys("max_conn_per_source = -1\n"),
            "mxlb.toml:4:23:",
            "invalid value",
        );
        assert_error(
            &format!("{MINIMAL}maxconn = \"10\"\n"),
            "mxlb.toml:8:11:",
            "invalid type",
        );
    }

    #[test]
    fn sizes() {
        let inflight = |value: &str| {
            parse(&format!("[global]\nmax_inflight = {value}\n{MINIMAL}"))
                .map(|config| config.global.max_inflight)
        };
        for (value, bytes) in [
            ("\"4MiB\"", 4 << 20),
            ("\"512KiB\"", 512 << 10),
            ("\"1GiB\"", 1 << 30),
            ("\"2 GiB\"", 2 << 30),
            ("\"65536B\"", 65536),
            ("65536", 65536),
            ("\"64KiB\"", 64 << 10),
            ("0", 0),
        ] {
            assert_eq!(inflight(value).expect(value), bytes, "{value}");
        }
        assert_error(
            "[global]\nmax_inflight = \"4MB\"\n",
            "mxlb.toml:2:16:",
            "invalid size \"4MB\"",
        );
        assert_error(
            "[global]\nmax_inflight = \"4\"\n",
            "mxlb.toml:2:16:",
            "invalid size",
        );
        assert_error(
            "[global]\nmax_inflight = \"MiB\"\n",
            "mxlb.toml:2:16:",
            "not a whole number",
        );
        assert_error(
            "[global]\nmax_inflight = \"1.5MiB\"\n",
            "mxlb.toml:2:16:",
            "invalid size",
        );
        assert_error(
            "[global]\nmax_inflight = \"99999999999GiB\"\n",
            "mxlb.toml:2:16:",
            "up to 2^64",
        );
        assert_error(
            "[global]\nmax_inflight = -1\n",
            "mxlb.toml:2:16:",
            "cannot be negative",
        );
        assert_error(
            "[global]\nmax_inflight = 1.5\n",
            "mxlb.toml:2:16:",
            "invalid type",
        );
        assert_error(
            &format!("[global]\nmax_inflight = \"32KiB\"\n{MINIMAL}"),
            "mxlb.toml:2:16:",
            "max_inflight must be 0 (off) or at least 64 KiB, not 32768 bytes",
        );
        assert_eq!(HumanSize::display(4 << 20), "4 MiB");
        assert_eq!(HumanSize::display(1000), "1000 bytes");
        assert_eq!(HumanSize::display(0), "0 bytes");
    }

    #[test]
    fn upgrade_socket_is_an_absolute_path_that_fits_a_socket_address() {
        let config = parse(&format!(
            "[global]\nupgrade_socket = \"/run/mxlb/upgrade.sock\"\n{MINIMAL}"
        ))
        .expect("parses");
        assert_eq!(
            config.global.upgrade_socket,
            Some(PathBuf::from("/run/mxlb/upgrade.sock"))
        );
        assert_eq!(parse(MINIMAL).expect("parses").global.upgrade_socket, None);
        assert_error(
            &format!("[global]\nupgrade_socket = \"upgrade.sock\"\n{MINIMAL}"),
            "mxlb.toml:2:18:",
            "upgrade_socket must be an absolute path",
        );
        let long = format!("/run/{}/upgrade.sock", "x".repeat(100));
        assert_error(
            &format!("[global]\nupgrade_socket = \"{long}\"\n{MINIMAL}"),
            "mxlb.toml:2:18:",
            "longer than the 107 bytes",
        );
    }

    #[test]
    fn syslog_output_and_hostname() {
        let stderr = parse(MINIMAL).expect("parses");
        assert_eq!(stderr.global.log_target, LogTarget::Stderr);
        assert_eq!(stderr.global.hostname, None);
        let config = parse(&format!(
            "[global]\nlog_target = \"syslog\"\nhostname = \"mx1.example.com\"\n{MINIMAL}"
        ))
        .expect("parses");
        assert_eq!(
            config.global.log_target,
            LogTarget::Syslog(Syslog {
                socket: PathBuf::from("/dev/log"),
                facility: Facility::Mail,
                format: SyslogFormat::Rfc3164,
            })
        );
        assert_eq!(config.listeners[0].hostname, "mx1.example.com");
        let config = parse(&format!(
            "[global]\nlog_target = \"syslog\"\nsyslog_socket = \"/run/log.sock\"\n\
             syslog_facility = \"local3\"\nsyslog_format = \"rfc5424\"\n{MINIMAL}"
        ))
        .expect("parses");
        let LogTarget::Syslog(syslog) = config.global.log_target else {
            panic!("syslog");
        };
        assert_eq!(
            (syslog.socket, syslog.facility.code(), syslog.format),
            (PathBuf::from("/run/log.sock"), 19, SyslogFormat::Rfc5424)
        );
        assert_error(
            &format!("[global]\nsyslog_facility = \"mail\"\n{MINIMAL}"),
            "mxlb.toml:2:19:",
            "syslog_* keys need log_target = \"syslog\"",
        );
        assert_error(
            &format!("[global]\nlog_target = \"syslog\"\nsyslog_facility = \"mial\"\n{MINIMAL}"),
            "mxlb.toml:3:19:",
            "unknown variant `mial`",
        );
        assert_error(
            &format!("[global]\nlog_target = \"journal\"\n{MINIMAL}"),
            "mxlb.toml:2:14:",
            "unknown variant `journal`",
        );
        assert_error(
            &format!("[global]\nlog_target = \"syslog\"\nsyslog_socket = \"log\"\n{MINIMAL}"),
            "mxlb.toml:3:17:",
            "syslog_socket must be an absolute path",
        );
        assert_error(
            &format!("[global]\nhostname = \"mx 1\"\n{MINIMAL}"),
            "mxlb.toml:2:12:",
            "hostname must be one word of visible ASCII",
        );
    }

    #[test]
    fn check_section_defaults() {
        let config =
            parse(&format!("{MINIMAL}\n[listen.check]\ninter = \"3s\"\n")).expect("parses");
        let check = &config.listeners[0].check;
        assert_eq!(check.kind, CheckType::Smtp);
        assert_eq!(check.verb, SmtpVerb::Helo);
        assert_eq!(check.fastinter, Duration::from_secs(3));
        assert_eq!(check.downinter, Duration::from_secs(3));
        assert_eq!(check.timeout, Duration::from_secs(3));
        assert!(!check.domain.is_empty());
        assert!(!check.domain.contains(char::is_whitespace));
    }

    #[test]
    fn bind_as_string_or_array_and_ipv6() {
        let config =
            parse(&MINIMAL.replace("\"127.0.0.1:2525\"", "[\"[::1]:25\", \"127.0.0.1:25\"]"))
                .expect("parses");
        assert_eq!(
            config.listeners[0].bind,
            vec![addr("[::1]:25"), addr("127.0.0.1:25")]
        );
        let config =
            parse(&MINIMAL.replace("\"127.0.0.1:10025\"", "\"[::1]:25\"")).expect("parses");
        assert_eq!(config.listeners[0].servers[0].addr, addr("[::1]:25"));
        let config = parse(&MINIMAL.replace("\"127.0.0.1:2525\"", "\"[2001:db8::1]:2525\""))
            .expect("parses");
        assert_eq!(config.listeners[0].bind, vec![addr("[2001:db8::1]:2525")]);
    }

    #[test]
    fn enum_words() {
        let text = with_listener_keys("balance = \"leastconn\"\n").replace(
            "addr = \"127.0.0.1:10025\"",
            "addr = \"127.0.0.1:10025\"\nsend_proxy = \"v2\"",
        ) + "[global]\nrelay = \"userspace\"\nlog_format = \"json\"\n";
        let config = parse(&text).expect("parses");
        assert_eq!(config.global.relay, RelayMode::Userspace);
        assert_eq!(config.global.log_format, LogFormat::Json);
        assert_eq!(config.listeners[0].balance, Balance::LeastConn);
        assert_eq!(
            config.listeners[0].servers[0].send_proxy.version(),
            Some(ProxyVersion::V2)
        );
        for (word, balance) in [("source", Balance::Source), ("first", Balance::First)] {
            let config =
                parse(&with_listener_keys(&format!("balance = \"{word}\"\n"))).expect("parses");
            assert_eq!(config.listeners[0].balance, balance);
        }
    }

    #[test]
    fn durations_need_units() {
        let config = parse(&with_listener_keys(
            "timeout_connect = \"1500ms\"\ntimeout_idle = \"1h\"\n",
        ))
        .expect("parses");
        assert_eq!(
            config.listeners[0].timeout_connect,
            Duration::from_millis(1500)
        );
        assert_eq!(config.listeners[0].timeout_idle, Duration::from_secs(3600));
        assert_error(
            &with_listener_keys("timeout_connect = 5\n"),
            "mxlb.toml:4:19:",
            "expected a duration string",
        );
        assert_error(
            &with_listener_keys("timeout_connect = \"5\"\n"),
            "mxlb.toml:4:19:",
            "a unit is needed",
        );
        assert_error(
            &with_listener_keys("timeout_connect = \"0\"\n"),
            "mxlb.toml:4:19:",
            "a unit is needed",
        );
        assert_error(
            &with_listener_keys("timeout_connect = \"5 parsecs\"\n"),
            "mxlb.toml:4:19:",
            "invalid duration",
        );
        assert_error(
            &with_listener_keys("timeout_connect = \"0s\"\n"),
            "mxlb.toml:4:19:",
            "longer than zero",
        );
    }

    #[test]
    fn syntax_error_position() {
        assert_error("[global]\nmaxconn = = 3\n", "mxlb.toml:2:11: ", "expected");
        assert_error("[[listen]\n", "mxlb.toml:1:10: ", "unclosed array table");
        assert_error(
            "[global]\nmaxconn = 1\nmaxconn = 2\n",
            "mxlb.toml:3:1: ",
            "duplicate key",
        );
    }

    #[test]
    fn misbracketed_headers_say_how_to_write_them() {
        let once = MINIMAL.replace("[[listen.server]]", "[listen.server]");
        let twice =
            format!("{once}\n[listen.server]\nname = \"mail2\"\naddr = \"127.0.0.1:10026\"\n");
        for text in [&once, &twice] {
            assert_error(
                text,
                "mxlb.toml:5:1: [listen.server] with single brackets: servers are an array \
                 of tables, write [[listen.server]]",
                "",
            );
        }
        assert_error(
            &format!("{MINIMAL}\n[[listen.check]]\ninter = \"2s\"\n"),
            "mxlb.toml:9:1: [[listen.check]] with double brackets",
            "write [listen.check]",
        );
    }

    #[test]
    fn unknown_keys() {
        assert_error(
            "colour = \"blue\"\n",
            "mxlb.toml:1:1:",
            "unknown field `colour`",
        );
        assert_error(
            &with_listener_keys("balanse = \"first\"\n"),
            "mxlb.toml:4:1:",
            "unknown field `balanse`",
        );
        let nested = format!("{MINIMAL}weigth = 2\n");
        assert_error(&nested, "mxlb.toml:8:1:", "unknown field `weigth`");
        let check = format!("{MINIMAL}\n[listen.check]\nintervall = \"2s\"\n");
        assert_error(&check, "mxlb.toml:10:1:", "unknown field `intervall`");
        assert_error(
            "[global]\nmaxcon = 1\n",
            "mxlb.toml:2:1:",
            "unknown field `maxcon`",
        );
    }

    #[test]
    fn accept_proxy_from_names_trusted_upstreams() {
        let text = with_listener_keys(
            "accept_proxy = true\naccept_proxy_from = [\"10.0.0.0/8\", \"192.0.2.7\"]\n",
        );
        let listener = &Config::parse(&text, "mxlb.toml").unwrap().listeners[0];
        let trusted = listener.accept_proxy_from.as_ref().expect("a trust list");
        assert!(trusted.allows("10.3.2.1".parse().unwrap()));
        assert!(trusted.allows("192.0.2.7".parse().unwrap()));
        assert!(!trusted.allows("192.0.2.8".parse().unwrap()));

        let any = with_listener_keys("accept_proxy = true\n");
        assert_eq!(
            Config::parse(&any, "mxlb.toml").unwrap().listeners[0].accept_proxy_from,
            None
        );
    }

    #[test]
    fn accept_proxy_from_errors_point_at_the_entry() {
        assert_error(
            &with_listener_keys(
                "accept_proxy = true\naccept_proxy_from = [\"10.0.0.0/8\", \"mx.example\"]\n",
            ),
            "mxlb.toml:5:36:",
            "\"mx.example\" is not an IP address or a CIDR block",
        );
        assert_error(
            &with_listener_keys("accept_proxy_from = [\"10.0.0.0/8\"]\n"),
            "mxlb.toml:4:21:",
            "accept_proxy_from needs accept_proxy = true",
        );
        assert_error(
            &with_listener_keys("accept_proxy = true\naccept_proxy_from = []\n"),
            "mxlb.toml:5:21:",
            "would refuse every connection",
        );
    }

    #[test]
    fn wrong_types_and_values() {
        assert_error(
            &with_listener_keys("retries = \"3\"\n"),
            "mxlb.toml:4:11:",
            "invalid type",
        );
        assert_error(
            &with_listener_keys("balance = \"random\"\n"),
            "mxlb.toml:4:11:",
            "unknown variant `random`",
        );
        assert_error(
            &with_listener_keys("accept_proxy = 1\n"),
            "mxlb.toml:4:16:",
            "invalid type",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:10025\"", "\"mail.example.com:25\""),
            "mxlb.toml:7:8:",
            "invalid address",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:10025\"", "\"::1:25\""),
            "mxlb.toml:7:8:",
            "invalid address",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:10025\"", "\"127.0.0.1:0\""),
            "mxlb.toml:7:8:",
            "port 0",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:2525\"", "[\"127.0.0.1:25\", \"nope\"]"),
            "mxlb.toml:3:25:",
            "invalid address \"nope\"",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:2525\"", "25"),
            "mxlb.toml:3:8:",
            "an address string or an array",
        );
        assert_error(
            &format!("{MINIMAL}\n[listen.check]\nverb = \"HELLO\"\n"),
            "mxlb.toml:10:8:",
            "unknown variant `HELLO`",
        );
        assert_error(
            &format!("{MINIMAL}send_proxy = \"v3\"\n"),
            "mxlb.toml:8:14:",
            "unknown variant `v3`",
        );
        assert_error(
            &format!("{MINIMAL}weight = -1\n"),
            "mxlb.toml:8:10:",
            "invalid value",
        );
    }

    #[test]
    fn missing_required_keys() {
        let message = error(&MINIMAL.replace("addr = \"127.0.0.1:10025\"\n", ""));
        assert!(message.starts_with("mxlb.toml:"), "{message}");
        assert!(message.contains("missing field `addr`"), "{message}");
        let message = error(&MINIMAL.replace("name = \"smtp\"\n", ""));
        assert!(message.contains("missing field `name`"), "{message}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        assert_error(
            "[global]\nmaxconn = 10\n",
            "mxlb.toml:1:1:",
            "no [[listen]]",
        );
        assert_error(
            "listen = []\n",
            "mxlb.toml:1:10:",
            "at least one [[listen]]",
        );
        assert_error(
            "[[listen]]\nname = \"smtp\"\nbind = \"127.0.0.1:25\"\n",
            "mxlb.toml:2:8:",
            "has no [[listen.server]]",
        );
        assert_error(
            &MINIMAL.replace("\"127.0.0.1:2525\"", "[]"),
            "mxlb.toml:3:8:",
            "at least one address",
        );
        assert_error(
            &format!("{MINIMAL}weight = 257\n"),
            "mxlb.toml:8:10:",
            "weight must be between 0 and 256, not 257",
        );
        assert_error(
            &with_listener_keys("retries = 101\n"),
            "mxlb.toml:4:11:",
            "retries must be between 0 and 100",
        );
        assert_error(
            &format!("{MINIMAL}\n[listen.check]\nrise = 0\n"),
            "mxlb.toml:10:8:",
            "rise must be at least 1",
        );
        assert_error(
            &format!("{MINIMAL}\n[listen.check]\nfall = 0\n"),
            "mxlb.toml:10:8:",
            "fall must be at least 1",
        );
        // Errors in words of visible ASCII point at the first character that is not one.
        assert_error(
            &format!("{MINIMAL}\n[listen.check]\ndomain = \"a b\"\n"),
            "mxlb.toml:10:12:",
            "domain: character 2 is a space;",
        );
        assert_error(
            &format!("[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = \"op secret\"\n{MINIMAL}"),
            "mxlb.toml:3:18: admin_token: character 3 is a space; use visible ASCII only",
            "no spaces",
        );
        assert_error(
            &format!(
                "[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = \"op\\tsécret\"\n{MINIMAL}"
            ),
            // An escape before it: the column is the value's.
            "mxlb.toml:3:15: admin_token: character 3 is a tab;",
            "",
        );
        assert_error(
            &format!("[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = 'sécret'\n{MINIMAL}"),
            "mxlb.toml:3:17: admin_token: character 2 is 'é' (U+00E9);",
            "",
        );
        assert_error(
            "[global]\nmaxconn = 0\n",
            "mxlb.toml:2:11:",
            "maxconn must be at least 1",
        );
        assert_error(
            &format!("[stats]\nbind = \"127.0.0.1:8404\"\nadmin_token = \"\"\n{MINIMAL}"),
            "mxlb.toml:3:15: admin_token is empty: leave the key out",
            "",
        );
    }

    #[test]
    fn stats_limits() {
        let stats = |keys: &str| format!("[stats]\nbind = \"127.0.0.1:8404\"\n{keys}{MINIMAL}");
        let config = parse(&stats("maxconn = 8\ntimeout = \"1500ms\"\n")).unwrap();
        let limits = config.stats.unwrap();
        assert_eq!(
            (limits.maxconn, limits.timeout),
            (8, Duration::from_millis(1500))
        );
        let defaults = parse(&stats("")).unwrap().stats.unwrap();
        assert_eq!(
            (defaults.maxconn, defaults.timeout),
            (64, Duration::from_secs(5))
        );
        assert_error(
            &stats("maxconn = 0\n"),
            "mxlb.toml:3:11:",
            "stats.maxconn must be between 1 and 128, not 0",
        );
        assert_error(&stats("maxconn = 129\n"), "mxlb.toml:3:11:", "128");
        assert_error(
            &stats("timeout = \"0s\"\n"),
            "mxlb.toml:3:11:",
            "stats.timeout must be longer than zero",
        );
    }

    #[test]
    fn name_rules() {
        assert_error(
            &MINIMAL.replace("\"smtp\"", "\"smtp in\""),
            "mxlb.toml:2:8:",
            "invalid listener name \"smtp in\"",
        );
        assert_error(
            &MINIMAL.replace("\"mail1\"", "\"mail/1\""),
            "mxlb.toml:6:8:",
            "invalid server name",
        );
        assert_error(
            &MINIMAL.replace("\"mail1\"", "\"\""),
            "mxlb.toml:6:8:",
            "invalid server name",
        );
        let ok = parse(&MINIMAL.replace("\"mail1\"", "\"Mail_1.a-b\"")).expect("parses");
        assert_eq!(ok.listeners[0].servers[0].name, "Mail_1.a-b");
    }

    #[test]
    fn duplicates() {
        let second_server =
            format!("{MINIMAL}\n[[listen.server]]\nname = \"mail1\"\naddr = \"127.0.0.1:10026\"\n");
        assert_error(
            &second_server,
            "mxlb.toml:10:8:",
            "duplicate server name \"mail1\"",
        );

        let second_listener = MINIMAL.replace("2525", "2526");
        assert_error(
            &format!("{MINIMAL}\n{second_listener}"),
            "mxlb.toml:10:8:",
            "duplicate listener name \"smtp\"",
        );

        let same_bind = MINIMAL.replace("\"smtp\"", "\"other\"");
        assert_error(
            &format!("{MINIMAL}\n{same_bind}"),
            "mxlb.toml:11:8:",
            "127.0.0.1:2525 is already bound by listener \"smtp\"",
        );

        // Same server name in two listeners is fine.
        let other = MINIMAL
            .replace("\"smtp\"", "\"other\"")
            .replace("2525", "2526");
        let config = parse(&format!("{MINIMAL}\n{other}")).expect("parses");
        assert_eq!(config.listeners.len(), 2);
    }

    #[test]
    fn columns_count_characters() {
        // "é" is two bytes but one column.
        let text = "# é\n[global]\n  grace = \"é\"\n";
        assert_error(text, "mxlb.toml:3:11:", "invalid duration");
        assert_eq!(line_col("aé\nb", 3), (1, 3));
        assert_eq!(line_col("aé\nb", 2), (1, 2)); // inside "é": rounded down
        assert_eq!(line_col("a\n", 99), (2, 1));
    }

    #[test]
    fn io_errors_name_the_path() {
        let error = Config::load(Path::new("/nonexistent/mxlb.toml")).expect_err("missing file");
        let message = error.to_string();
        assert!(message.starts_with("/nonexistent/mxlb.toml: "), "{message}");
        assert!(!message.contains(":1:1:"), "{message}");
        assert_eq!(error.exit_code(), 2);
        assert_eq!(parse("x = ").expect_err("bad").exit_code(), 2);
    }

    #[test]
    fn load_reads_the_file() {
        let path =
            std::env::temp_dir().join(format!("mxlb-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, "[[listen]]\nname = \"x\"\nbind = \"127.0.0.1:1\"\n")
            .expect("write temp file");
        let message = Config::load(&path).expect_err("no servers").to_string();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            message,
            format!(
                "{}:2:8: listener \"x\" has no [[listen.server]]",
                path.display()
            )
        );
    }
}
