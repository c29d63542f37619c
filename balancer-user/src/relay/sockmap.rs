//! Loading the kernel relay: the embedded eBPF object, its maps, pins and log forwarding.
//!
//! [`KernelRelay::load`] loads `mxlb_verdict`, attaches it to the `mxlb_socks` SOCKHASH in
//! verdict-only mode (`mxlb_peers` stays program-free), pins the program and the maps under
//! `global.pin_path` (so operators can inspect them with bpftool) and removes the pins again
//! when dropped.
//!
//! Modes: the pin directory is the daemon's own, mode 0700 (root's, or `global.user`'s once
//! the daemon dropped its privileges, so that it can still remove its pins at exit); the pins
//! are root's, mode 0600. Opening a pin gives full access to the map or program, so no other
//! local user may reach them; root (bpftool) can. The daemon keeps a descriptor of the
//! directory and removes its pins through it, so it needs no access to the directories
//! above (systemd mounts /sys/fs/bpf with mode 0700).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use aya::maps::{HashMap, MapData, MapError, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use balancer_common::{
    CONTROL_MAP, COPIED_SEQ_OFFSET_GLOBAL, Control, EVENT_STEP_GLOBAL, EVENTS_MAP, PEERS_MAP,
    SOCKS_MAP, TRAFFIC_MAP, Traffic, VERDICT_PROGRAM,
};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use tracing::{debug, info, warn};

use super::tcp_sock;
use super::watch::Watcher;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(env!("MXLB_EBPF_OBJECT"));

/// The tracing target under which the eBPF program's own diagnostics appear.
pub const EBPF_LOG_TARGET: &str = "mxlb::ebpf";

/// The loaded kernel relay: program attached, maps open, pins in place.
pub struct KernelRelay {
    /// Sockets whose receive path runs the verdict.
    pub(super) socks: Mutex<SockHash<MapData, u64>>,
    /// Redirect targets: cookie -> peer socket.
    pub(super) peers: Mutex<SockHash<MapData, u64>>,
    pub(super) traffic: Mutex<HashMap<MapData, u64, Traffic>>,
    /// Per socket: whether the verdict holds its bytes for the daemon.
    pub(super) control: Mutex<HashMap<MapData, u64, Control>>,
    pub(super) watcher: Arc<Watcher>,
    /// Pause a direction once its peer is this many bytes behind (3/4 of `max_inflight`: one
    /// event step of margin for bytes redirected before the pause takes effect).
    pub(super) pause_at: u64,
    /// Bytes a connection relays in user space before its sockets are paired; a reload
    /// may change it (connections already past their user-space phase are not affected).
    pub(super) relay_after: std::sync::atomic::AtomicU64,
    /// Fault injection for tests: a pause between registering the peers and attaching the
    /// verdict, so bytes pile up unread before the pairing (`MXLB_FAULT_PAIRING_DELAY_MS`).
    pub(super) fault_pairing_delay: Option<std::time::Duration>,
    pins: Vec<Pin>,
    pin_dir: PathBuf,
    /// The pin directory, opened at load: pins are removed through it.
    pin_dir_fd: OwnedFd,
    /// Keeps the program loaded and attached: dropping `Ebpf` detaches it.
    _ebpf: Ebpf,
}

/// The verdict reads the socket's TCP sequence state (`bpf_skc_to_tcp_sock`,
/// `bpf_probe_read_kernel`), which needs `CAP_PERFMON` (or `CAP_SYS_ADMIN`); without it the
/// verifier also checks speculative paths and gives up on the program's branches ("The
/// sequence of 8193 jumps is too complex"). Said plainly before the verifier says that.
fn require_perfmon() -> anyhow::Result<()> {
    use caps::{CapSet, Capability};
    let has = |cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    if has(Capability::CAP_PERFMON) || has(Capability::CAP_SYS_ADMIN) {
        return Ok(());
    }
    bail!(
        "the kernel relay needs CAP_PERFMON (its program reads TCP sequence state); add it \
         to the unit's CapabilityBoundingSet= (docs/operations.md, \"Privileges\")"
    )
}

impl KernelRelay {
    /// Loads and attaches the relay, sized for `max_connections` relayed connections. Needs a
    /// tokio runtime.
    pub fn load(
        pin_dir: &Path,
        max_connections: u32,
        max_inflight: u64,
        relay_after: u64,
    ) -> anyhow::Result<KernelRelay> {
        require_perfmon()?;
        let pin_dir_fd = ensure_bpffs(pin_dir)?;
        let max_sockets = max_connections.saturating_mul(2).max(2);
        // aya-log-ebpf checks this level before formatting anything: 0 turns the program's
        // diagnostics off entirely unless the daemon logs mxlb::ebpf at debug level.
        let ebpf_log_level: u8 = if tracing::enabled!(target: EBPF_LOG_TARGET, tracing::Level::DEBUG)
        {
            4 // aya_log_common::Level::Debug
        } else {
            0
        };
        // The verdict reports every quarter of max_inflight a socket redirects, so the daemon
        // looks at the peer before it can fall a whole max_inflight behind.
        // 0 turns the bound off: no events, no pausing.
        let event_step: u64 = max_inflight / 4;
        // The first chunk after an insert is checked for a stale head against what user
        // space read, which the verdict finds through the kernel's BTF.
        let copied_seq_offset = match tcp_sock::copied_seq_offset(Path::new(tcp_sock::VMLINUX_BTF))
        {
            Ok(offset) => offset,
            Err(error) => {
                warn!(
                    "no offset of tcp_sock.copied_seq ({error:#}): the first chunk after \
                         each hand-over to the kernel is not checked for bytes delivered before"
                );
                0
            }
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(SOCKS_MAP, max_sockets)
            .map_max_entries(TRAFFIC_MAP, max_sockets)
            .map_max_entries(PEERS_MAP, max_sockets)
            .map_max_entries(CONTROL_MAP, max_sockets)
            .override_global("AYA_LOG_LEVEL", &ebpf_log_level, false)
            .override_global(EVENT_STEP_GLOBAL, &event_step, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &copied_seq_offset, true)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        if ebpf_log_level > 0 {
            forward_ebpf_logs(&mut ebpf);
        }

        let mut pins = Vec::new();
        let mut take = |name: &'static str| -> anyhow::Result<aya::maps::Map> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            let path = pin_dir.join(name);
            map.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            pins.push(Pin::taken(&pin_dir_fd, name, path)?);
            Ok(map)
        };
        let socks: SockHash<MapData, u64> = take(SOCKS_MAP)?.try_into()?;
        let traffic: HashMap<MapData, u64, Traffic> = take(TRAFFIC_MAP)?.try_into()?;
        let peers: SockHash<MapData, u64> = take(PEERS_MAP)?.try_into()?;
        let control: HashMap<MapData, u64, Control> = take(CONTROL_MAP)?.try_into()?;
        let events: RingBuf<MapData> = take(EVENTS_MAP)?.try_into()?;

        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .with_context(|| format!("program {VERDICT_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .context("loading the stream verdict program")?;
        // Attach before any socket is inserted: the kernel binds programs at insert time.
        program
            .attach(socks.fd())
            .context("attaching the stream verdict to the sockhash")?;
        let program_pin = pin_dir.join(VERDICT_PROGRAM);
        program
            .pin(&program_pin)
            .with_context(|| format!("pinning {}", program_pin.display()))?;
        pins.push(Pin::taken(&pin_dir_fd, VERDICT_PROGRAM, program_pin)?);

        info!(pin_dir = %pin_dir.display(), max_sockets, "kernel relay loaded: {VERDICT_PROGRAM} attached to {SOCKS_MAP}");
        let watcher = Watcher::start(events).context("creating the relay's epoll instance")?;
        let fault_pairing_delay = std::env::var("MXLB_FAULT_PAIRING_DELAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis);
        if let Some(delay) = fault_pairing_delay {
            warn!(
                ?delay,
                "fault injection: pausing between registering peers and attaching the verdict"
            );
        }
        Ok(KernelRelay {
            watcher,
            pause_at: if max_inflight == 0 {
                u64::MAX
            } else {
                max_inflight - event_step
            },
            relay_after: relay_after.into(),
            fault_pairing_delay,
            socks: Mutex::new(socks),
            traffic: Mutex::new(traffic),
            control: Mutex::new(control),
            peers: Mutex::new(peers),
            pins,
            pin_dir: pin_dir.to_owned(),
            pin_dir_fd,
            _ebpf: ebpf,
        })
    }

    /// Makes `uid`:`gid` the owner of the pin directory (mode 0700), so that the daemon can
    /// remove its pins at exit after it dropped root ([`crate::privilege`]). The pins stay
    /// root's, mode 0600: the new user can remove them but not open them.
    pub fn give_pin_dir_to(&self, uid: Uid, gid: Gid) -> anyhow::Result<()> {
        nix::unistd::fchown(&self.pin_dir_fd, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", self.pin_dir.display()))
    }

    /// Whether this process may still update, read and delete map entries: writes and
    /// removes a `mxlb_control` entry for cookie 0, which no socket has. The kernel error
    /// (EPERM: the map commands need `CAP_BPF` on this kernel) is passed on.
    pub fn probe_map_access(&self) -> io::Result<()> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let syscall = |error: MapError| match error {
            MapError::SyscallError(error) => error.io_error,
            other => io::Error::other(other),
        };
        control.insert(0, Control::default(), 0).map_err(syscall)?;
        control.get(&0, 0).map_err(syscall)?;
        control.remove(&0).map_err(syscall)
    }
}

/// A pin this daemon made, and which file it was: a daemon started while this one drains
/// (a restart by hand) replaces the pins with its own, and this one must then leave them.
struct Pin {
    /// The name in the pin directory.
    name: &'static str,
    /// The whole path, for messages.
    path: PathBuf,
    /// The pin's inode on bpffs.
    inode: u64,
}

impl Pin {
    /// Records the pin just made at `path` (`name` in `dir`) and makes it root's alone
    /// (0600, whatever the umask).
    fn taken(dir: &OwnedFd, name: &'static str, path: PathBuf) -> anyhow::Result<Pin> {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let inode = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("stat {}", path.display()))?
            .st_ino;
        Ok(Pin { name, path, inode })
    }

    /// Whether the file at the name is still the one this daemon pinned. A newer daemon
    /// that replaced the pins also took the directory back (root's, 0700): then this one
    /// cannot even look, and leaves it alone.
    fn still_ours(&self, dir: &OwnedFd) -> bool {
        nix::sys::stat::fstatat(dir, self.name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|now| now.st_ino == self.inode)
    }
}

impl Drop for KernelRelay {
    fn drop(&mut self) {
        for pin in &self.pins {
            if !pin.still_ours(&self.pin_dir_fd) {
                debug!(pin = %pin.path.display(), "pin replaced by a newer daemon; left alone");
                continue;
            }
            if let Err(error) =
                nix::unistd::unlinkat(&self.pin_dir_fd, pin.name, UnlinkatFlags::NoRemoveDir)
            {
                warn!(pin = %pin.path.display(), %error, "could not remove pin");
            }
        }
        // Only removes the directory when nothing else was pinned there, and only where
        // the daemon may: without root, a parent such as a 0700 /sys/fs/bpf keeps the
        // empty directory (it holds nothing; the next start reuses it).
        if let Err(error) = std::fs::remove_dir(&self.pin_dir) {
            debug!(pin_dir = %self.pin_dir.display(), %error, "pin directory left");
        }
        debug!(pin_dir = %self.pin_dir.display(), "kernel relay unpinned");
    }
}

/// Makes sure `pin_dir` exists on a mounted bpf filesystem, mounting /sys/fs/bpf if needed,
/// makes it root's with mode 0700 (whoever made it), clears pins a crashed earlier run left
/// behind, and returns it opened.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<OwnedFd> {
    const BPFFS: &str = "/sys/fs/bpf";
    if pin_dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        info!("mounting the bpf filesystem on {BPFFS}");
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs on {BPFFS}"))?;
    }
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!("{} is not on a bpf filesystem", pin_dir.display());
    }
    // Not through a symbolic link: the directory is about to be chowned and written.
    let dir = nix::fcntl::open(
        pin_dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .with_context(|| format!("opening pin directory {}", pin_dir.display()))?;
    // A directory an earlier daemon handed to its user, or one someone else made first,
    // is taken back before anything is pinned in it.
    nix::unistd::fchown(&dir, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
        .with_context(|| format!("chown root {}", pin_dir.display()))?;
    nix::sys::stat::fchmod(&dir, Mode::S_IRWXU)
        .with_context(|| format!("chmod 0700 {}", pin_dir.display()))?;
    for name in [
        VERDICT_PROGRAM,
        SOCKS_MAP,
        TRAFFIC_MAP,
        PEERS_MAP,
        CONTROL_MAP,
        EVENTS_MAP,
    ] {
        let stale = pin_dir.join(name);
        if nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
            warn!(pin = %stale.display(), "removing a pin left by an earlier run");
            nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
                .with_context(|| format!("removing stale pin {}", stale.display()))?;
        }
    }
    Ok(dir)
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Forwards the program's aya-log records into the daemon's log at debug level, under the
/// target `mxlb::ebpf`.
fn forward_ebpf_logs(ebpf: &mut Ebpf) {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, EbpfLogForwarder)
        .map_err(anyhow::Error::from)
        .and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's fd and lives inside the AsyncFd, so
            // the fd stays open and the same for the AsyncFd's whole life.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            };
            registered.map_err(|e| anyhow::Error::from(e.into_parts().1))
        });
    let mut logger = match logger {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "eBPF diagnostics unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// A `log::Log` that turns aya-log records into tracing events.
struct EbpfLogForwarder;

impl log::Log for EbpfLogForwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "mxlb::ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}
