//! The `mxlb` command: thin wrappers over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxlb::config::Config;

/// mxlb: a load balancer for inbound SMTP that relays mail in the kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file.
        #[arg(long, default_value = "/etc/mxlb/mxlb.toml")]
        config: PathBuf,
    },
    /// Run the built-in demo: two PROXY-speaking backends behind 127.0.0.1:2525.
    Demo,
    /// Validate a configuration file: exit 0, or 2 with `file:line:col: message`.
    CheckConfig {
        /// Configuration file.
        path: PathBuf,
    },
}

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
                println!(
                    "{}: ok ({} listener(s), {} server(s))",
                    path.display(),
                    config.listeners.len(),
                    config
                        .listeners
                        .iter()
                        .map(|l| l.servers.len())
                        .sum::<usize>()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => match Config::load(&config) {
            Ok(config) => run_daemon(config, false),
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Demo => match mxlb::demo::config() {
            Ok(config) => run_daemon(config, true),
            Err(error) => {
                eprintln!("{error:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

fn run_daemon(config: Config, demo: bool) -> ExitCode {
    mxlb::logging::init(config.global.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mxlb: starting the runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(async {
        if demo {
            mxlb::demo::start_backends(&config).await?;
            if let Some(addr) = mxlb::demo::listen_addr(&config) {
                tracing::info!(
                    "demo ready: try `swaks --server {addr} --to you@example.test` a few times"
                );
            }
        }
        mxlb::daemon::run(config).await
    });
    // Dropping the runtime ends the remaining sessions and unpins the kernel relay.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("mxlb: {error:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
