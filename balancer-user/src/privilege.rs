//! Least privilege: once the kernel relay is loaded and pinned and every socket of the
//! start is bound, the daemon becomes `[global] user` and keeps only the capabilities it
//! still uses.
//!
//! What it still uses was measured on Linux 6.18 (notes in docs/operations.md,
//! "Privileges"): the relay's map updates, lookups and deletes work on the descriptors the
//! daemon already holds without any capability (since Linux 6.5 the bpf() permission checks
//! sit at map creation and program load); only a reload that binds a port below
//! `net.ipv4.ip_unprivileged_port_start` needs `CAP_NET_BIND_SERVICE`. On an older kernel
//! the map commands themselves need `CAP_BPF`: the daemon does not guess that from the
//! version, it tries a map update with no capability in effect and keeps `CAP_BPF` only if
//! the kernel refuses it.
//!
//! Credentials are per thread in Linux. glibc's `setgroups`/`setresgid`/`setresuid` change
//! every thread of the process, and the other threads lose every capability in the switch
//! (they do not have `PR_SET_KEEPCAPS`); the capability sets, the bounding set and
//! `no_new_privs` are set on the calling thread, which is the one that runs the daemon's
//! main task (listeners, reloads) and creates later threads. [`drop_privileges`] checks
//! every thread of the process afterwards.

use std::collections::HashSet;
use std::fmt;

use anyhow::{Context, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Group, Uid, User};
use tracing::{info, warn};

use crate::relay::Relay;

/// The user and group the daemon runs as after its start (`[global] user`, `group`),
/// looked up when the configuration is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

/// Why `[global] user` or `group` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("{key} must be a name, not empty")]
    Empty { key: &'static str },
    #[error("unknown {key} {name:?}: not in the system's {database} database")]
    Unknown {
        key: &'static str,
        name: String,
        database: &'static str,
    },
    #[error(
        "{key} {name:?} is {id_kind} 0 (root): that drops nothing; leave `user` out to run as root"
    )]
    Root {
        key: &'static str,
        name: String,
        id_kind: &'static str,
    },
    #[error("looking up {key} {name:?}: {error}")]
    Failed {
        key: &'static str,
        name: String,
        error: String,
    },
}

impl LookupError {
    /// `user` or `group`: which key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            LookupError::Empty { key }
            | LookupError::Unknown { key, .. }
            | LookupError::Root { key, .. }
            | LookupError::Failed { key, .. } => key,
        }
    }
}

impl RunAs {
    /// Looks `user` up in the password database and `group` (default: the user's primary
    /// group) in the group database. Root, as user or group, is refused: the point of the
    /// key is to stop being root.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<RunAs, LookupError> {
        if user.is_empty() {
            return Err(LookupError::Empty { key: "user" });
        }
        let found = User::from_name(user).map_err(|error| LookupError::Failed {
            key: "user",
            name: user.to_owned(),
            error: error.desc().to_owned(),
        })?;
        let found = found.ok_or_else(|| LookupError::Unknown {
            key: "user",
            name: user.to_owned(),
            database: "password",
        })?;
        if found.uid.is_root() {
            return Err(LookupError::Root {
                key: "user",
                name: user.to_owned(),
                id_kind: "uid",
            });
        }
        let group = match group {
            Some("") => return Err(LookupError::Empty { key: "group" }),
            Some(name) => Group::from_name(name)
                .map_err(|error| LookupError::Failed {
                    key: "group",
                    name: name.to_owned(),
                    error: error.desc().to_owned(),
                })?
                .ok_or_else(|| LookupError::Unknown {
                    key: "group",
                    name: name.to_owned(),
                    database: "group",
                })?,
            None => Group::from_gid(found.gid)
                .ok()
                .flatten()
                // A primary gid without a name in /etc/group is legal; keep the number.
                .unwrap_or_else(|| Group {
                    name: found.gid.to_string(),
                    passwd: Default::default(),
                    gid: found.gid,
                    mem: Vec::new(),
                }),
        };
        if group.gid.as_raw() == 0 {
            return Err(LookupError::Root {
                key: "group",
                name: group.name,
                id_kind: "gid",
            });
        }
        Ok(RunAs {
            user: found.name,
            uid: found.uid.as_raw(),
            group: group.name,
            gid: group.gid.as_raw(),
        })
    }
}

/// The capabilities the daemon keeps after the switch. `unprivileged_port_start` is
/// `net.ipv4.ip_unprivileged_port_start`: below it, a bind needs `CAP_NET_BIND_SERVICE`,
/// which a reload adding a listener on port 25 does. `maps_need_bpf`: whether the kernel
/// refused a map update without `CAP_BPF` (kernels before 6.5).
pub fn kept_capabilities(unprivileged_port_start: u32, maps_need_bpf: bool) -> CapsHashSet {
    let mut kept = HashSet::new();
    // Port 0 asks the kernel for a free port and needs nothing; any other port below the
    // start does.
    if unprivileged_port_start > 1 {
        kept.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    if maps_need_bpf {
        kept.insert(Capability::CAP_BPF);
    }
    kept
}

/// `cap_a,cap_b` in capability-number order, or `none`: for the log and error messages.
pub fn describe(set: &CapsHashSet) -> String {
    let mut caps: Vec<Capability> = set.iter().copied().collect();
    caps.sort_by_key(|cap| cap.index());
    if caps.is_empty() {
        return "none".to_owned();
    }
    caps.iter()
        .map(|cap| cap.to_string().to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// The bit mask of a capability set, as /proc/PID/status prints it (`CapEff` and so on).
pub fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |mask, cap| mask | cap.bitmask())
}

/// What the switch did, for the log line.
pub struct Dropped {
    pub kept: CapsHashSet,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.kept))
    }
}

/// Becomes `run_as` for good: hands the pin directory to it, drops the supplementary
/// groups, then the gid, then the uid, keeps [`kept_capabilities`] and nothing else
/// (effective = permitted, inheritable and ambient empty, bounding set cut to the same),
/// sets `no_new_privs`, then checks every thread. Must run on the thread that runs the
/// daemon's main task, while the process is root. An error means the process may still be
/// privileged: the caller must exit.
pub fn drop_privileges(run_as: &RunAs, relay: &Relay) -> anyhow::Result<Dropped> {
    if !Uid::effective().is_root() {
        bail!(
            "global.user = {:?} needs the daemon to start as root (it runs as uid {})",
            run_as.user,
            Uid::effective()
        );
    }
    let uid = Uid::from_raw(run_as.uid);
    let gid = Gid::from_raw(run_as.gid);
    if let Relay::Kernel(kernel) = relay {
        // The daemon removes its pins at exit, as the new user: it needs write access to
        // the directory (the pins themselves stay root's, mode 0600).
        kernel
            .give_pin_dir_to(uid, gid)
            .context("handing the pin directory to global.user")?;
    }
    let port_start = unprivileged_port_start().context("reading the unprivileged port start")?;
    // What the daemon was given (a unit's CapabilityBoundingSet may have left some out).
    let had = caps::read(None, CapSet::Permitted).context("reading the permitted set")?;

    let switched = switch_ids(uid, gid);
    if switched.is_err()
        && let Relay::Kernel(kernel) = relay
    {
        // Still root: take the directory back so that this root can remove the pins at
        // exit even without CAP_DAC_OVERRIDE.
        let _ = kernel.give_pin_dir_to(Uid::from_raw(0), Gid::from_raw(0));
    }
    switched?;

    // Now uid != 0: the effective set is empty, the permitted set still root's. Try the
    // maps as the daemon will use them from now on.
    let maps_need_bpf = match relay {
        Relay::Kernel(kernel) => match kernel.probe_map_access() {
            Ok(()) => false,
            Err(error) if error.raw_os_error() == Some(libc::EPERM) => true,
            Err(error) => return Err(error).context("probing the relay's maps"),
        },
        Relay::UserSpace => false,
    };
    let wanted = kept_capabilities(port_start, maps_need_bpf);
    let kept: CapsHashSet = wanted.intersection(&had).copied().collect();
    let missing: CapsHashSet = wanted.difference(&had).copied().collect();
    if missing.contains(&Capability::CAP_BPF) {
        bail!(
            "the kernel refuses map updates without CAP_BPF, which the daemon was not given: \
             it could not relay"
        );
    }
    if !missing.is_empty() {
        warn!(
            "keeping no {}: the daemon was not given it; a reload cannot bind ports below \
             {port_start}",
            describe(&missing)
        );
    }

    // Cutting the bounding set needs CAP_SETPCAP in effect, for this last step only.
    let setpcap: CapsHashSet = [Capability::CAP_SETPCAP].into();
    caps::set(None, CapSet::Effective, &setpcap).context("raising CAP_SETPCAP")?;
    drop_bounding_except(&kept)?;
    caps::set(None, CapSet::Effective, &kept).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting the permitted capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    nix::sys::prctl::set_keepcaps(false).context("PR_SET_KEEPCAPS off")?;
    // No exec can ever gain privileges again (set-uid binaries, file capabilities).
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;

    verify(run_as, &kept)?;
    info!(
        user = %run_as.user,
        uid = run_as.uid,
        group = %run_as.group,
        gid = run_as.gid,
        capabilities = %describe(&kept),
        "privileges dropped"
    );
    Ok(Dropped { kept })
}

/// Supplementary groups, then the gid, then the uid, keeping the permitted capabilities
/// through the switch (without PR_SET_KEEPCAPS the kernel clears them).
fn switch_ids(uid: Uid, gid: Gid) -> anyhow::Result<()> {
    nix::sys::prctl::set_keepcaps(true).context("PR_SET_KEEPCAPS")?;
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    nix::unistd::setgroups(&[]).context("dropping the supplementary groups")?;
    nix::unistd::setresgid(gid, gid, gid).with_context(|| format!("setresgid({gid})"))?;
    nix::unistd::setresuid(uid, uid, uid).with_context(|| format!("setresuid({uid})"))
}

/// Drops every capability the kernel knows from the bounding set but `kept`.
fn drop_bounding_except(kept: &CapsHashSet) -> anyhow::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?;
    let last: u32 = last
        .trim()
        .parse()
        .context("parsing /proc/sys/kernel/cap_last_cap")?;
    let kept = mask(kept);
    for index in 0..=last {
        if index < 64 && kept & (1 << index) != 0 {
            continue;
        }
        // By number, so that capabilities newer than the caps crate go too.
        // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(index), 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("dropping capability {index} from the bounding set"));
        }
    }
    Ok(())
}

/// `net.ipv4.ip_unprivileged_port_start` of the daemon's network namespace.
fn unprivileged_port_start() -> anyhow::Result<u32> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing {PATH}: {text:?}"))
}

/// Checks what the kernel now says, and fails if root is still held anywhere: the ids of
/// this thread, its capability sets, and the ids and capabilities of every other thread.
fn verify(run_as: &RunAs, kept: &CapsHashSet) -> anyhow::Result<()> {
    let uids = nix::unistd::getresuid().context("getresuid")?;
    let gids = nix::unistd::getresgid().context("getresgid")?;
    for (what, id) in [
        ("real uid", uids.real.as_raw()),
        ("effective uid", uids.effective.as_raw()),
        ("saved uid", uids.saved.as_raw()),
    ] {
        if id != run_as.uid {
            bail!("{what} is {id} after the switch, not {}", run_as.uid);
        }
    }
    for (what, id) in [
        ("real gid", gids.real.as_raw()),
        ("effective gid", gids.effective.as_raw()),
        ("saved gid", gids.saved.as_raw()),
    ] {
        if id != run_as.gid {
            bail!("{what} is {id} after the switch, not {}", run_as.gid);
        }
    }
    let groups = nix::unistd::getgroups().context("getgroups")?;
    if !groups.is_empty() {
        bail!("supplementary groups left after the switch: {groups:?}");
    }
    for set in [CapSet::Effective, CapSet::Permitted] {
        let now = caps::read(None, set).with_context(|| format!("reading {set:?}"))?;
        if &now != kept {
            bail!(
                "{set:?} capabilities are {} after the switch, not {}",
                describe(&now),
                describe(kept)
            );
        }
    }
    for set in [CapSet::Inheritable, CapSet::Ambient] {
        let now = caps::read(None, set).with_context(|| format!("reading {set:?}"))?;
        if !now.is_empty() {
            bail!("{set:?} capabilities left: {}", describe(&now));
        }
    }
    // The ultimate check: getting root back must fail.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("setuid(0) succeeded after the switch");
    }
    verify_threads(run_as.uid, mask(kept))
}

/// Every thread of the process: all uids are `uid`, and no capability beyond `kept` is
/// effective or permitted.
fn verify_threads(uid: u32, kept: u64) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")?;
    for task in tasks {
        let task = task.context("listing /proc/self/task")?;
        let path = task.path().join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(status) => status,
            // A thread that ended since the listing.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", path.display()));
            }
        };
        let creds =
            ThreadCreds::parse(&status).with_context(|| format!("parsing {}", path.display()))?;
        if creds.uids.iter().any(|&id| id != uid) {
            bail!("thread {:?} has uids {:?}", task.file_name(), creds.uids);
        }
        if creds.effective & !kept != 0 || creds.permitted & !kept != 0 {
            bail!(
                "thread {:?} holds capabilities {:#x} (effective), {:#x} (permitted)",
                task.file_name(),
                creds.effective,
                creds.permitted
            );
        }
    }
    Ok(())
}

/// The credential lines of a /proc status file.
#[derive(Debug, PartialEq, Eq)]
pub struct ThreadCreds {
    /// Real, effective, saved and filesystem uid.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
}

impl ThreadCreds {
    /// Reads `Uid:`, `Gid:`, `CapEff:`, `CapPrm:` and `CapBnd:` of a /proc status file.
    pub fn parse(status: &str) -> anyhow::Result<ThreadCreds> {
        let field = |name: &str| -> anyhow::Result<&str> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("no {name} line"))
        };
        let ids = |name: &str| -> anyhow::Result<Vec<u32>> {
            field(name)?
                .split_whitespace()
                .map(|id| id.parse().with_context(|| format!("{name}: {id:?}")))
                .collect()
        };
        let caps = |name: &str| -> anyhow::Result<u64> {
            let text = field(name)?;
            u64::from_str_radix(text, 16).with_context(|| format!("{name}: {text:?}"))
        };
        Ok(ThreadCreds {
            uids: ids("Uid")?,
            gids: ids("Gid")?,
            effective: caps("CapEff")?,
            permitted: caps("CapPrm")?,
            bounding: caps("CapBnd")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_capabilities_follow_the_port_start_and_the_probe() {
        // The usual kernel default: ports below 1024 need the capability.
        assert_eq!(
            kept_capabilities(1024, false),
            [Capability::CAP_NET_BIND_SERVICE].into()
        );
        // Every port is unprivileged (port 0 never needs anything).
        assert!(kept_capabilities(0, false).is_empty());
        assert!(kept_capabilities(1, false).is_empty());
        assert_eq!(
            kept_capabilities(2, false),
            [Capability::CAP_NET_BIND_SERVICE].into()
        );
        // A kernel that refuses map commands without CAP_BPF.
        assert_eq!(kept_capabilities(0, true), [Capability::CAP_BPF].into());
        assert_eq!(
            kept_capabilities(1024, true),
            [Capability::CAP_NET_BIND_SERVICE, Capability::CAP_BPF].into()
        );
    }

    #[test]
    fn capability_sets_read_like_proc() {
        let set: CapsHashSet = [Capability::CAP_BPF, Capability::CAP_NET_BIND_SERVICE].into();
        assert_eq!(describe(&set), "cap_net_bind_service,cap_bpf");
        assert_eq!(describe(&HashSet::new()), "none");
        // CAP_NET_BIND_SERVICE is bit 10, CAP_BPF bit 39.
        assert_eq!(mask(&set), (1 << 10) | (1 << 39));
    }

    #[test]
    fn lookup_errors_name_the_key_and_the_value() {
        assert_eq!(
            RunAs::lookup("", None).unwrap_err().to_string(),
            "user must be a name, not empty"
        );
        let unknown = RunAs::lookup("mxlb-no-such-user-7c1", None).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown user \"mxlb-no-such-user-7c1\": not in the system's password database"
        );
        let root = RunAs::lookup("root", None).unwrap_err();
        assert!(
            root.to_string()
                .starts_with("user \"root\" is uid 0 (root): that drops nothing"),
            "{root}"
        );
    }

    /// Uses `nobody`/`nogroup`, which every Debian system has (uid and gid 65534).
    #[test]
    fn lookup_finds_the_user_and_its_group() {
        let nobody = RunAs::lookup("nobody", None).expect("nobody exists");
        assert_eq!(nobody.user, "nobody");
        assert_eq!(nobody.uid, 65534);
        assert_eq!(nobody.gid, 65534);
        assert_eq!(nobody.group, "nogroup");
        let unknown = RunAs::lookup("nobody", Some("mxlb-no-such-group-7c1")).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown group \"mxlb-no-such-group-7c1\": not in the system's group database"
        );
        let root_group = RunAs::lookup("nobody", Some("root")).unwrap_err();
        assert!(
            root_group
                .to_string()
                .starts_with("group \"root\" is gid 0"),
            "{root_group}"
        );
        assert_eq!(
            RunAs::lookup("nobody", Some("")).unwrap_err(),
            LookupError::Empty { key: "group" }
        );
    }

    #[test]
    fn proc_status_credentials_parse() {
        let status = "Name:\tmxlb\nUid:\t65534\t65534\t65534\t65534\n\
                      Gid:\t65534\t65534\t65534\t65534\nCapInh:\t0000000000000000\n\
                      CapPrm:\t0000000000000400\nCapEff:\t0000000000000400\n\
                      CapBnd:\t0000000000000400\nCapAmb:\t0000000000000000\n";
        assert_eq!(
            ThreadCreds::parse(status).expect("parses"),
            ThreadCreds {
                uids: vec![65534; 4],
                gids: vec![65534; 4],
                effective: 0x400,
                permitted: 0x400,
                bounding: 0x400,
            }
        );
        assert!(ThreadCreds::parse("Name:\tmxlb\n").is_err());
    }
}
