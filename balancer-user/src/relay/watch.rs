//! Wakes kernel-relayed connections only for what needs the daemon: FIN, reset, a peer that
//! drains while its direction is paused, and the verdict's step events.
//!
//! The kernel wakes a paired socket's readers after *every* chunk the verdict redirects.
//! Registered the usual way (tokio's readable interest is `EPOLLIN | EPOLLRDHUP`), the daemon
//! would wake for every chunk of a mail it never touches. So kernel-relayed sockets leave
//! tokio's reactor and join this one epoll instance, with `EPOLLRDHUP` (FIN) and the always
//! reported `EPOLLERR | EPOLLHUP`; `EPOLLOUT` is added only while a paused direction waits
//! for this socket to drain, `EPOLLIN` only while the verdict holds this socket's bytes for
//! the daemon to relay. One task reads the epoll instance and notifies the connection
//! the event belongs to, by socket cookie.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// Events read per `epoll_wait`.
const EVENT_BATCH: usize = 256;

/// What a connection wants to hear about one of its sockets, beyond FIN and errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// Bytes to read (`EPOLLIN`): the verdict holds this socket's bytes for the daemon.
    pub input: bool,
    /// Room in the send buffer (`EPOLLOUT`): the socket is draining.
    pub output: bool,
}

impl Wants {
    fn flags(self) -> EpollFlags {
        let mut flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        if self.input {
            flags |= EpollFlags::EPOLLIN;
        }
        if self.output {
            flags |= EpollFlags::EPOLLOUT;
        }
        flags
    }
}

/// The epoll instance shared by all kernel-relayed sockets.
pub struct Watcher {
    epoll: AsyncFd<EpollFd>,
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
}

/// `Epoll` with the `AsRawFd` that `AsyncFd` needs.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

impl Watcher {
    /// Creates the epoll instance and the tasks that dispatch its events and the verdict's
    /// `events` ring. Needs a tokio runtime.
    pub fn start(events: RingBuf<MapData>) -> io::Result<Arc<Watcher>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // SAFETY: EpollFd owns the epoll fd, and the AsyncFd owns the EpollFd for its whole
        // life, so the fd stays open and unchanged while registered.
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let watcher = Arc::new(Watcher {
            epoll,
            waiters: Mutex::new(HashMap::new()),
        });
        tokio::spawn(dispatch(watcher.clone()));
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd for its life.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        tokio::spawn(dispatch_kernel_events(watcher.clone(), events));
        Ok(watcher)
    }

    /// Starts watching `socket`; events for it notify the returned `Notify`.
    pub fn watch(&self, socket: impl AsFd, cookie: u64, wants: Wants) -> io::Result<Arc<Notify>> {
        let notify = Arc::new(Notify::new());
        self.lock().insert(cookie, notify.clone());
        if let Err(error) = self
            .epoll
            .get_ref()
            .0
            .add(socket, EpollEvent::new(wants.flags(), cookie))
        {
            self.lock().remove(&cookie);
            return Err(error.into());
        }
        Ok(notify)
    }

    /// Changes what wakes the connection for `socket`. With edge-triggered epoll, a
    /// condition already true when it is added (bytes queued, room to write) is reported
    /// at once.
    pub fn change(&self, socket: impl AsFd, cookie: u64, wants: Wants) -> io::Result<()> {
        let mut event = EpollEvent::new(wants.flags(), cookie);
        Ok(self.epoll.get_ref().0.modify(socket, &mut event)?)
    }

    /// Stops watching `socket` (closing it would too; this also drops the waiter).
    pub fn unwatch(&self, socket: impl AsFd, cookie: u64) {
        let _ = self.epoll.get_ref().0.delete(socket);
        self.lock().remove(&cookie);
    }

    /// Wakes the connection that owns the socket with this cookie, if any.
    fn notify(&self, cookie: u64) {
        if let Some(notify) = self.lock().get(&cookie) {
            // Stores a permit if the connection is not waiting right now.
            notify.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads events and notifies their connections, for the life of the runtime.
async fn dispatch(watcher: Arc<Watcher>) {
    let mut events = vec![EpollEvent::empty(); EVENT_BATCH];
    loop {
        let Ok(mut guard) = watcher.epoll.readable().await else {
            return;
        };
        loop {
            let n = match watcher
                .epoll
                .get_ref()
                .0
                .wait(&mut events, EpollTimeout::ZERO)
            {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            for event in &events[..n] {
                tracing::trace!(cookie = event.data(), flags = ?event.events(), "epoll event");
                watcher.notify(event.data());
            }
        }
        guard.clear_ready();
    }
}

/// Reads the verdict's step events ("this socket redirected another step of bytes") and
/// wakes the connection, which then checks how far behind the peer is.
async fn dispatch_kernel_events(watcher: Arc<Watcher>, mut ring: AsyncFd<RingBuf<MapData>>) {
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(record) = ring.next() {
            if let Some(bytes) = record.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                watcher.notify(u64::from_ne_bytes(bytes));
            }
        }
        guard.clear_ready();
    }
}
