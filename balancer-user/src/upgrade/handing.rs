//! The running daemon's side: the upgrade socket it listens on, and handing its sockets
//! to the daemon that asks for them.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::STEP_TIMEOUT;
use super::wire::{self, Role};

/// The unix socket a running daemon hands its sockets over on (`[global] upgrade_socket`).
pub struct UpgradeSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode: a daemon started with `mxlb run` while this one drains
    /// binds its own over the path, and this daemon must then leave that one alone.
    inode: u64,
    /// Whether the file is this daemon's to remove at exit: not while it is only taken
    /// over (the old daemon may still serve on it), nor once handed over.
    owned: bool,
}

/// The daemon that took over, once it serves.
#[derive(Debug)]
pub struct Successor {
    pub pid: Option<i32>,
}

impl UpgradeSocket {
    /// Binds `path` (as root, before the daemon drops its privileges): root's, mode 0600,
    /// first under a temporary name in the same directory, then renamed over whatever is at
    /// the path (a predecessor's socket, or a stale file): the path always leads somewhere.
    pub fn bind(path: &Path) -> anyhow::Result<UpgradeSocket> {
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        ensure_only_root_writes(dir)?;
        let name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?;
        let temporary = dir.join(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // Left by a crash of a daemon with this pid: nobody listens there.
        let _ = std::fs::remove_file(&temporary);
        let listener = std::os::unix::net::UnixListener::bind(&temporary)
            .with_context(|| format!("binding {}", temporary.display()))?;
        let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(error) = placed {
            let _ = std::fs::remove_file(&temporary);
            return Err(error).with_context(|| format!("placing {}", path.display()));
        }
        let inode = std::fs::symlink_metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        listener.set_nonblocking(true)?;
        info!(path = %path.display(), "upgrade socket listening");
        Ok(UpgradeSocket {
            listener: UnixListener::from_std(listener)?,
            path: path.to_owned(),
            inode,
            owned: true,
        })
    }

    /// The upgrade socket the running daemon passed on, listening at `path`. It becomes
    /// this daemon's to remove at exit once the old one has handed over ([`Self::own`]).
    pub fn taken_over(
        socket: std::os::unix::net::UnixListener,
        path: &Path,
    ) -> anyhow::Result<UpgradeSocket> {
        let inode = std::fs::symlink_metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        socket.set_nonblocking(true)?;
        Ok(UpgradeSocket {
            listener: UnixListener::from_std(socket)?,
            path: path.to_owned(),
            inode,
            owned: false,
        })
    }

    /// The old daemon has handed over: the socket file is this daemon's now.
    pub fn own(&mut self) {
        self.owned = true;
    }

    /// This daemon handed over: the socket file is the successor's.
    pub fn disown(&mut self) {
        self.owned = false;
    }

    /// A copy of the listening socket, for a successor.
    pub fn copy(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.listener.as_fd().try_clone_to_owned()
    }

    /// The next connection from root (the only one that may ask for the sockets); others
    /// are logged and closed.
    pub async fn next_request(&self) -> UnixStream {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "upgrade socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 => return stream,
                Ok(cred) => warn!(
                    uid = cred.uid(),
                    pid = ?cred.pid(),
                    "upgrade socket: refused a connection that is not root's"
                ),
                Err(error) => warn!(%error, "upgrade socket: no peer credentials; refused"),
            }
        }
    }
}

impl Drop for UpgradeSocket {
    fn drop(&mut self) {
        if !self.owned {
            debug!(path = %self.path.display(), "upgrade socket handed over; left alone");
            return;
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|now| now.ino() == self.inode);
        if !ours {
            debug!(path = %self.path.display(), "upgrade socket taken by a successor; left alone");
            return;
        }
        // Without root the directory (root's) may not let us: the next daemon renames
        // over the file anyway.
        if let Err(error) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), %error, "upgrade socket file left");
        }
    }
}

/// Refuses a directory for the upgrade socket that anyone but root could write to: whoever
/// can replace the socket file there could hand `mxlb upgrade` sockets of their own.
fn ensure_only_root_writes(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    anyhow::ensure!(
        meta.uid() == 0 && meta.mode() & 0o022 == 0,
        "{} is not root's alone (owner uid {}, mode {:o}): another user could put a socket \
         of theirs at the upgrade socket's path; use a directory such as /run/mxlb",
        dir.display(),
        meta.uid(),
        meta.mode() & 0o7777
    );
    Ok(())
}

/// Hands `sockets` (copies of the daemon's own descriptors) to the daemon on `stream` and
/// waits until it serves. An error leaves this daemon serving as before.
pub async fn hand_over(
    stream: UnixStream,
    sockets: Vec<(Role, OwnedFd)>,
) -> anyhow::Result<Successor> {
    let pid = stream.peer_cred().ok().and_then(|cred| cred.pid());
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    // Blocking steps, each bounded by the timeouts: off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        wire::expect(&stream, wire::HELLO, "the upgrade hello")?;
        info!(
            ?pid,
            sockets = sockets.len(),
            "upgrade: handing the listening sockets over"
        );
        let borrowed: Vec<_> = sockets
            .iter()
            .map(|(role, fd)| wire::borrowed(*role, fd))
            .collect();
        wire::send_sockets(&stream, &borrowed)?;
        drop(borrowed);
        // Our copies are closed here; the daemon's own stay open until it stops accepting.
        drop(sockets);
        wire::expect(&stream, wire::READY, "the new daemon to be ready")?;
        // Once this is out the new daemon starts, and this one must stop accepting: it
        // does when it gets the successor back.
        wire::say(&stream, wire::OVER).context("telling the new daemon to start")?;
        Ok(Successor { pid })
    })
    .await
    .context("the hand-over task failed")?
}
