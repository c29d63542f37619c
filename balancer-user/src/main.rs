//! The `mxlb` command: thin wrappers over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxlb::config::{Config, MAX_WEIGHT};
use mxlb::control::{Target, stats_url};
use mxlb::stats::AdminState;

/// mxlb: a load balancer for inbound SMTP that relays mail in the kernel.
#[derive(Parser)]
// `name`: the command is `mxlb` (`--version`, usage lines), not the package's name.
#[command(name = "mxlb", version, about, after_long_help = MANUAL)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    ///
    /// Starts as root: loads the kernel relay (global.relay = sockmap or auto) and pins it
    /// under global.pin_path, binds every listener and the stats port, then becomes
    /// global.user if set. Logs to stderr; "ready" (and sd_notify READY=1) once it serves.
    /// SIGHUP reloads the file in place, SIGTERM or SIGINT stop accepting and let
    /// sessions finish within global.grace.
    Run {
        /// Configuration file.
        #[arg(long, default_value = "/etc/mxlb/mxlb.toml")]
        config: PathBuf,
    },
    /// Replace the running daemon without refusing a connection.
    ///
    /// Starts a new daemon (this binary, this configuration) on the listening sockets of
    /// the one serving at global.upgrade_socket, which then stops accepting and exits once
    /// its sessions have finished (within global.grace). Run as root, like `mxlb run`;
    /// this process becomes the daemon. Exit 1 if no daemon serves there (nothing is
    /// bound), 2 if the configuration is invalid or sets no upgrade_socket.
    Upgrade {
        /// Configuration file.
        #[arg(long, default_value = "/etc/mxlb/mxlb.toml")]
        config: PathBuf,
    },
    /// Run the built-in demo: two PROXY-speaking backends behind 127.0.0.1:2525.
    ///
    /// Stats on 127.0.0.1:8404 (admin token `demo`). --port and --stats move it beside a
    /// running mxlb (or another demo): with --port the backends take free ports and the
    /// kernel relay pins under /sys/fs/bpf/mxlb-demo-PORT.
    Demo {
        /// The port the demo listens on, on 127.0.0.1 (default 2525).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// The stats page's address, IP:port (default 127.0.0.1:8404).
        #[arg(long, value_name = "ADDR")]
        stats: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration file: exit 0, or 2 with `file:line:col: message`.
    CheckConfig {
        /// Configuration file.
        path: PathBuf,
    },
    /// Print the stats table of a running daemon.
    Status {
        /// The daemon's stats address: `[stats] bind` (ADDR:PORT) or http://ADDR:PORT.
        #[arg(long, default_value = mxlb::control::DEFAULT_STATS_URL, value_parser = stats_url)]
        stats: String,
    },
    /// Print the configuration a running daemon is using, as TOML (`GET /api/config`):
    /// every key with the value in force; the admin token is not shown.
    ShowConfig {
        /// The daemon's stats address: `[stats] bind` (ADDR:PORT) or http://ADDR:PORT.
        #[arg(long, default_value = mxlb::control::DEFAULT_STATS_URL, value_parser = stats_url)]
        stats: String,
        /// The `[stats] admin_token`; defaults to the environment variable MXLB_ADMIN_TOKEN.
        #[arg(long, env = "MXLB_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Administer servers of a running daemon.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Convert an HAProxy `mode tcp` configuration: mxlb TOML on stdout, the lines it
    /// could not map on stderr (`file:line: text: why`).
    ImportHaproxy {
        /// The haproxy.cfg to convert.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Set a server to ready, drain (no new clients) or maint (no clients, no checks).
    SetState {
        /// LISTEN/SERVER, as named in the configuration (and in `mxlb status`).
        target: Target,
        /// ready | drain | maint
        #[arg(value_parser = parse_admin_state)]
        state: AdminState,
        /// The daemon's stats address: `[stats] bind` (ADDR:PORT) or http://ADDR:PORT.
        #[arg(long, default_value = mxlb::control::DEFAULT_STATS_URL, value_parser = stats_url)]
        stats: String,
        /// The `[stats] admin_token`; defaults to the environment variable MXLB_ADMIN_TOKEN.
        #[arg(long, env = "MXLB_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Set a server's weight, like HAProxy's `set weight`: in force for the next client,
    /// kept across reloads unless the file's weight for that server changes; a restart
    /// goes back to the file.
    SetWeight {
        /// LISTEN/SERVER, as named in the configuration (and in `mxlb status`).
        target: Target,
        /// 0 (no new clients) to 256, as `weight` in the configuration.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WEIGHT)))]
        weight: u32,
        /// The daemon's stats address: `[stats] bind` (ADDR:PORT) or http://ADDR:PORT.
        #[arg(long, default_value = mxlb::control::DEFAULT_STATS_URL, value_parser = stats_url)]
        stats: String,
        /// The `[stats] admin_token`; defaults to the environment variable MXLB_ADMIN_TOKEN.
        #[arg(long, env = "MXLB_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
}

fn parse_admin_state(text: &str) -> Result<AdminState, String> {
    match text {
        "ready" => Ok(AdminState::Ready),
        "drain" => Ok(AdminState::Drain),
        "maint" => Ok(AdminState::Maint),
        _ => Err(format!("{text:?} is not one of ready, drain, maint")),
    }
}

/// The rest of the manual page, after the commands (`mxlb --help`).
const MANUAL: &str = "\
FILES:
  /etc/mxlb/mxlb.toml     the configuration (TOML); every key in configuration.md
  /sys/fs/bpf/mxlb/       the kernel relay's program and maps (global.pin_path), for bpftool
  /run/mxlb/upgrade.sock  where `mxlb upgrade` finds the daemon (global.upgrade_socket, if set)

SIGNALS (mxlb run):
  SIGHUP           reload the configuration in place; open connections carry on
  SIGTERM, SIGINT  stop accepting, let open sessions finish within global.grace, exit 0

EXIT STATUS:
  0  success (a clean stop, or a daemon that handed over to `mxlb upgrade`)
  1  runtime failure (a bind, the kernel relay with relay = \"sockmap\", an unreachable daemon)
  2  bad configuration or arguments, reported as file:line:col: message

ENVIRONMENT:
  RUST_LOG          log level and filters (default info), e.g. RUST_LOG=debug
  MXLB_ADMIN_TOKEN  the admin token for `mxlb server set-state`, `set-weight`, `show-config`
  NOTIFY_SOCKET     set by systemd (Type=notify): READY=1, RELOADING=1, STOPPING=1

SEE ALSO:
  /usr/share/doc/mxlb/ (README, operations.md, configuration.md, security.md),
  bpftool(8), haproxy(1)";

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(config) => {
                if let Some(warning) = mxlb::secret_file::token_exposure(&path, &config) {
                    eprintln!("warning: {warning}");
                }
                let servers = config.listeners.iter().map(|l| l.servers.len()).sum();
                println!(
                    "{}: ok ({}, {})",
                    path.display(),
                    counted(config.listeners.len(), "listener"),
                    counted(servers, "server")
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => start_daemon(config, Start::Run),
        Command::Upgrade { config } => start_daemon(config, Start::Upgrade),
        Command::Status { stats } => report(mxlb::control::fetch(&stats), |snapshot| {
            print!("{}", mxlb::control::render_table(&snapshot));
        }),
        Command::ShowConfig { stats, token } => {
            report(mxlb::control::running_config(&stats, &token), |text| {
                print!("{text}");
            })
        }
        Command::Server(ServerCommand::SetState {
            target,
            state,
            stats,
            token,
        }) => report(
            mxlb::control::set_state(&stats, &target, state, &token),
            |server| {
                println!(
                    "{target}: {} (admin state {})",
                    server.status, server.admin_state
                );
            },
        ),
        Command::Server(ServerCommand::SetWeight {
            target,
            weight,
            stats,
            token,
        }) => report(
            mxlb::control::set_weight(&stats, &target, weight, &token),
            |server| {
                println!(
                    "{target}: weight {} (the configuration says {})",
                    server.weight, server.config_weight
                );
            },
        ),
        Command::ImportHaproxy { path } => import_haproxy(&path),
        Command::Demo { port, stats } => {
            match mxlb::demo::config(mxlb::demo::Options { port, stats }) {
                Ok(config) => run_daemon(config, None, None, Start::Demo),
                Err(error) => {
                    eprintln!("{error:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// "1 listener", "2 listeners".
fn counted(count: usize, noun: &str) -> String {
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} {noun}{plural}")
}

/// A command that asked the daemon: `show` its answer and exit 0, or say why not and
/// exit 1.
fn report<T>(answer: anyhow::Result<T>, show: impl FnOnce(T)) -> ExitCode {
    match answer {
        Ok(answer) => {
            show(answer);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mxlb: {error:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Prints the converted configuration and the unmapped lines; exit 0 even with unmapped
/// lines, 2 when the file cannot be read or nothing in it can be balanced.
fn import_haproxy(path: &std::path::Path) -> ExitCode {
    match mxlb::import_haproxy::import_file(path) {
        Ok(conversion) => {
            for unmapped in &conversion.unmapped {
                eprintln!("{unmapped}");
            }
            print!("{}", conversion.toml);
            ExitCode::SUCCESS
        }
        Err(error) => {
            for unmapped in error.unmapped() {
                eprintln!("{unmapped}");
            }
            eprintln!("mxlb: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// How a daemon starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `mxlb run`: binds its sockets.
    Run,
    /// `mxlb upgrade`: takes the running daemon's sockets over.
    Upgrade,
    /// `mxlb demo`: binds its sockets and starts its own backends first.
    Demo,
}

/// Loads `config` and runs the daemon on it; exit 2 when the configuration is invalid.
fn start_daemon(config: PathBuf, start: Start) -> ExitCode {
    match Config::load(&config) {
        Ok(loaded) => {
            if start == Start::Upgrade && loaded.global.upgrade_socket.is_none() {
                eprintln!(
                    "{}: global.upgrade_socket is not set: there is no running daemon to \
                     take over from (set it, then restart once with `mxlb run`)",
                    config.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let exposure = mxlb::secret_file::token_exposure(&config, &loaded);
            run_daemon(loaded, Some(config), exposure, start)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Runs the daemon; SIGHUP reloads `config_path` (`None` for the demo's built-in one).
/// `warning` is logged once logging is set up.
fn run_daemon(
    config: Config,
    config_path: Option<PathBuf>,
    warning: Option<String>,
    start: Start,
) -> ExitCode {
    let mut config = config;
    // Nothing is logged yet: a log target that cannot be opened is said on stderr.
    if let Err(error) = mxlb::logging::init(&config.global) {
        eprintln!("mxlb: {error:#}");
        return ExitCode::from(EXIT_RUNTIME);
    }
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    // From here on failures are reported once, as a log line: in the configured format
    // (a JSON log stays JSON) and with the level the journal files it under.
    let runtime = match runtime(config.global.daemon_threads()) {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("starting the runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let backends = match start {
        Start::Demo => match mxlb::demo::bind_backends(&mut config) {
            Ok(backends) => Some(backends),
            Err(error) => {
                tracing::error!("{error:#}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
        Start::Run | Start::Upgrade => None,
    };
    let result = runtime.block_on(async {
        if let Some(backends) = backends {
            backends.serve()?;
            if let Some(addr) = mxlb::demo::listen_addr(&config) {
                tracing::info!(
                    "demo ready: try `swaks --server {addr} --to you@example.test` a few times"
                );
            }
        }
        mxlb::daemon::run(config, config_path, start == Start::Upgrade).await
    });
    // Dropping the runtime ends the remaining sessions and unpins the kernel relay.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The daemon's runtime: one thread runs everything without cross-thread wake-ups (what
/// won on 2 CPUs); more threads share the connections through tokio's scheduler.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
