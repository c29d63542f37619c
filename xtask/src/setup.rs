//! `cargo xtask setup`: make the machine ready to build and test mxlb.
//!
//! Each step checks first and acts only when something is missing, so a second run is a
//! handful of quick queries. Steps that change the system (apt, mount, stopping postfix)
//! need root; a check that passes never does.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the build and the tests use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22, the same major version as nightly's LLVM.
    "llvm-22-dev",
    "libpolly-22-dev",
    // Integration tests: real MTAs, a real SMTP client, a reference balancer.
    "postfix",
    "swaks",
    "haproxy",
    // The stats page test loads the page in headless Chromium.
    "chromium",
    // Inspecting pinned maps and programs.
    "bpftool",
    // Network namespaces of the tests' own (`ip netns`), and packet loss in one of them.
    "iproute2",
    "nftables",
    // Two balancers sharing a virtual IP (VRRP), the health script asks mxlb with curl.
    "keepalived",
    "curl",
];

/// Answer to postfix's install question: install it, configure nothing, start nothing.
const POSTFIX_DEBCONF: &str = "postfix postfix/main_mailer_type select No configuration\n";

/// apt lists older than this are refreshed before an install.
const APT_LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_MAJOR: &str = "22";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    let start = Instant::now();
    println!("setup: checking what mxlb's build and tests need");
    apt_packages()?;
    system_postfix()?;
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_tool(&CARGO_DENY)?;
    bpffs()?;
    println!("✓ setup complete ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    // Effective uid from /proc, to stay dependency-free: "Uid:\treal\teffective\t…".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn require_root(step: &str, by_hand: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "setup step `{step}` needs root to act: run `cargo xtask setup` as root, \
             or run by hand as root: {by_hand}"
        );
    }
    Ok(())
}

/// Wraps a failed step's error with the step's name and what to run by hand.
fn step_failed(step: &str, by_hand: &str) -> impl FnOnce(anyhow::Error) -> anyhow::Error {
    let msg = format!("setup step `{step}` failed; to do it by hand run: {by_hand}");
    move |err| err.context(msg)
}

// --- 1. apt packages -----------------------------------------------------------------------

/// The packages of `packages` that dpkg does not list as installed.
pub(crate) fn missing_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    let out = cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package}\t${Status}\n"])
            .args(packages),
    )
    .context("setup step `apt packages`: dpkg-query is needed (this is a Debian machine?)")?;
    // dpkg-query exits 1 when some package is unknown; the lines it did print still count.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(pkg, _)| pkg.split(':').next().unwrap_or(pkg))
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// True when the apt package lists are missing or older than a day.
fn apt_lists_stale() -> bool {
    let newest = fs::read_dir("/var/lib/apt/lists")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.contains("Release") || name.contains("Packages")
        })
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    match newest {
        Some(t) => SystemTime::now()
            .duration_since(t)
            .is_ok_and(|age| age > APT_LISTS_MAX_AGE),
        None => true,
    }
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    c
}

fn apt_update() -> Result<()> {
    cmd::run(apt_get().arg("update").arg("-q"))
}

fn apt_packages() -> Result<()> {
    install_missing("apt packages", APT_PACKAGES)
}

/// Installs whichever of `packages` are missing (as root), the way `setup` does.
pub(crate) fn install_missing(step: &str, packages: &[&'static str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        println!("✓ {step}: {}", packages.join(" "));
        return Ok(());
    }
    let by_hand = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
        missing.join(" ")
    );
    require_root(step, &by_hand)?;
    println!("→ installing {step}: {} …", missing.join(" "));
    (|| -> Result<()> {
        if missing.contains(&"postfix") {
            // Without this, postfix's install asks what kind of mail server to configure.
            println!(
                "$ echo '{}' | debconf-set-selections",
                POSTFIX_DEBCONF.trim_end()
            );
            let mut child = Command::new("debconf-set-selections")
                .stdin(Stdio::piped())
                .spawn()
                .context("could not start debconf-set-selections")?;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(POSTFIX_DEBCONF.as_bytes())?;
            let status = child.wait()?;
            if !status.success() {
                bail!("debconf-set-selections failed ({status})");
            }
        }
        let mut updated = false;
        if apt_lists_stale() {
            apt_update()?;
            updated = true;
        }
        let install = || cmd::run(apt_get().args(["install", "-y", "-q"]).args(&missing));
        if let Err(err) = install() {
            if updated {
                return Err(err);
            }
            // Most often: the lists are too old to hold the versions the mirror serves.
            println!("  install failed ({err:#}); refreshing the package lists and retrying");
            apt_update()?;
            install()?;
        }
        let still = missing_packages(packages)?;
        if !still.is_empty() {
            bail!("still not installed after apt-get: {}", still.join(" "));
        }
        Ok(())
    })()
    .map_err(step_failed(step, &by_hand))?;
    println!("✓ {step}: {}", packages.join(" "));
    Ok(())
}

// --- 1b. the system postfix must not run: tests start private instances --------------------

fn system_postfix() -> Result<()> {
    // `postfix status` exits 0 only when the default instance's master is running. With the
    // "No configuration" install there is no main.cf, so no system instance can run, and
    // `postfix status` would only sleep a second before failing: skip it then.
    let running = Path::new("/etc/postfix/main.cf").exists()
        && cmd::output(Command::new("postfix").arg("status"))
            .map(|o| o.status.success())
            .unwrap_or(false);
    if running {
        require_root("stop the system postfix", "postfix stop")?;
        println!("→ stopping the system postfix (tests run their own instances) …");
        cmd::run(Command::new("postfix").arg("stop").stdin(Stdio::null()))
            .map_err(step_failed("stop the system postfix", "postfix stop"))?;
    }
    println!("✓ system postfix not running");
    let port25: SocketAddr = ([127, 0, 0, 1], 25).into();
    if TcpStream::connect_timeout(&port25, Duration::from_millis(200)).is_ok() {
        println!(
            "  warning: something still listens on 127.0.0.1:25 (`ss -ltnp sport = :25` shows what)"
        );
    }
    Ok(())
}

// --- 2. nightly toolchain with rust-src (build-std needs the library source) ---------------

/// Nightly components the eBPF build (rust-src) and `cargo xtask test` (clippy) use.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

fn nightly_rust_src() -> Result<()> {
    let what = format!("nightly toolchain with {}", NIGHTLY_COMPONENTS.join(", "));
    let out = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .map_err(step_failed(
        "nightly toolchain",
        "install rustup (https://rustup.rs), then: rustup toolchain install nightly --component rust-src,clippy",
    ))?;
    if !out.status.success() {
        let components = NIGHTLY_COMPONENTS.join(",");
        let mut install = Command::new("rustup");
        install.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
        ]);
        install.arg(&components);
        let by_hand = cmd::display(&install);
        println!("→ installing the {what} …");
        cmd::run(&mut install).map_err(step_failed("nightly toolchain", &by_hand))?;
    } else {
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Components are listed as `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
        let missing: Vec<&str> = NIGHTLY_COMPONENTS
            .iter()
            .copied()
            .filter(|c| {
                !stdout
                    .lines()
                    .map(str::trim)
                    .any(|l| l == *c || l.strip_prefix(c).is_some_and(|rest| rest.starts_with('-')))
            })
            .collect();
        if !missing.is_empty() {
            let mut add = Command::new("rustup");
            add.args(["component", "add"])
                .args(&missing)
                .args(["--toolchain", "nightly"]);
            let by_hand = cmd::display(&add);
            println!(
                "→ installing {} for the nightly toolchain …",
                missing.join(", ")
            );
            cmd::run(&mut add).map_err(step_failed("nightly components", &by_hand))?;
        }
    }
    println!("✓ {what}");
    Ok(())
}

// --- 3. bpf-linker 0.13 built against LLVM 22 ----------------------------------------------

/// The bpf-linker on PATH, or else the one in $CARGO_HOME/bin, with its version line.
fn find_bpf_linker() -> Option<(std::path::PathBuf, String)> {
    let candidates = cmd::which("bpf-linker")
        .into_iter()
        .chain(Some(cmd::cargo_bin_dir().join("bpf-linker")));
    for path in candidates {
        if let Ok(out) = cmd::output(Command::new(&path).arg("--version"))
            && out.status.success()
        {
            return Some((
                path,
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    None
}

fn bpf_linker() -> Result<()> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}.");
    let found = find_bpf_linker();
    if let Some((path, version)) = &found
        && version.starts_with(&wanted)
    {
        println!("✓ {version} ({})", path.display());
        return Ok(());
    }
    let llvm_config = format!("llvm-config-{LLVM_MAJOR}");
    let features = format!("llvm-{LLVM_MAJOR}");
    let by_hand = format!(
        "LLVM_PREFIX=$({llvm_config} --prefix) cargo install bpf-linker --version '~{BPF_LINKER_VERSION}' \
         --no-default-features --features {features} --force"
    );
    match &found {
        Some((path, version)) => println!(
            "→ installing bpf-linker {BPF_LINKER_VERSION} (found {version} at {}) …",
            path.display()
        ),
        None => println!(
            "→ installing bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (takes a few minutes) …"
        ),
    }
    (|| -> Result<()> {
        let out = cmd::output(Command::new(&llvm_config).arg("--prefix"))?;
        if !out.status.success() {
            bail!("`{llvm_config} --prefix` failed: is llvm-{LLVM_MAJOR}-dev installed?");
        }
        let prefix = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut install = Command::new("cargo");
        cmd::clear_outer_cargo_env(&mut install)
            .current_dir(cmd::workspace_root())
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("~{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features", &features]);
        if found.is_some() {
            // Same version but not working (e.g. its libLLVM is gone): reinstall anyway.
            install.arg("--force");
        }
        cmd::run(&mut install)?;
        match find_bpf_linker() {
            Some((path, version)) if version.starts_with(&wanted) => {
                println!("✓ {version} ({})", path.display());
                Ok(())
            }
            Some((_, version)) => bail!("installed, but `bpf-linker --version` says {version}"),
            None => bail!("installed, but `bpf-linker --version` does not run"),
        }
    })()
    .map_err(step_failed("bpf-linker", &by_hand))
}

// --- cargo subcommands from crates.io (cargo-deny, cargo-fuzz) ------------------------------

/// A `cargo <subcommand>` installed with `cargo install`, at a pinned version.
pub struct CargoTool {
    /// The crate, which is also the binary's name (`cargo-deny`).
    pub krate: &'static str,
    /// The version installed; `cargo <subcommand> --version` must print it.
    pub version: &'static str,
}

/// License, ban and source checks of the dependency graph (deny.toml).
pub const CARGO_DENY: CargoTool = CargoTool {
    krate: "cargo-deny",
    version: "0.20.2",
};

impl CargoTool {
    fn subcommand(&self) -> &'static str {
        self.krate.trim_start_matches("cargo-")
    }

    /// What `cargo <subcommand> --version` prints, if it runs.
    fn installed_version(&self) -> Option<String> {
        let out = cmd::output(cmd::cargo_at_root().args([self.subcommand(), "--version"])).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Installs `tool` unless its pinned version is already there (`--locked`: the versions
/// its authors tested, so a new release of one of its dependencies cannot break CI).
pub fn cargo_tool(tool: &CargoTool) -> Result<()> {
    let found = tool.installed_version();
    if let Some(version) = &found
        && version.split_whitespace().any(|word| word == tool.version)
    {
        println!("✓ {version}");
        return Ok(());
    }
    let by_hand = format!(
        "cargo install {} --version {} --locked --force",
        tool.krate, tool.version
    );
    println!(
        "→ installing {} {} (found {}; takes a few minutes) …",
        tool.krate,
        tool.version,
        found.as_deref().unwrap_or("none")
    );
    let mut install = Command::new("cargo");
    cmd::clear_outer_cargo_env(&mut install)
        .current_dir(cmd::workspace_root())
        .args([
            "install",
            tool.krate,
            "--version",
            tool.version,
            "--locked",
            "--force",
        ]);
    cmd::run(&mut install).map_err(step_failed(tool.krate, &by_hand))?;
    match tool.installed_version() {
        Some(version) => {
            println!("✓ {version}");
            Ok(())
        }
        None => bail!(
            "{} installed, but `cargo {} --version` does not run",
            tool.krate,
            tool.subcommand()
        ),
    }
}

// --- 4. bpffs at /sys/fs/bpf (where the daemon pins maps and programs) ---------------------

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, fstype) = (f.next(), f.next(), f.next());
            mnt == Some(BPFFS) && fstype == Some("bpf")
        })
    })
}

fn bpffs() -> Result<()> {
    if !bpffs_mounted() {
        let by_hand = format!("mount -t bpf bpf {BPFFS}");
        require_root("bpffs", &by_hand)?;
        println!("→ mounting bpffs at {BPFFS} …");
        (|| -> Result<()> {
            if !Path::new(BPFFS).is_dir() {
                fs::create_dir_all(BPFFS).with_context(|| format!("mkdir {BPFFS}"))?;
            }
            cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
            if !bpffs_mounted() {
                bail!("mount succeeded but /proc/mounts shows no bpf filesystem at {BPFFS}");
            }
            Ok(())
        })()
        .map_err(step_failed("bpffs", &by_hand))?;
    }
    println!("✓ bpffs mounted at {BPFFS}");
    Ok(())
}
