//! The upgrade conversation, four messages over a unix stream socket:
//!
//! 1. new → old: [`HELLO`].
//! 2. old → new: one `sendmsg` carrying the sockets as SCM_RIGHTS and, as its bytes, one
//!    line per socket in the same order (`listen ADDR`, `stats ADDR`, or `upgrade` for the
//!    upgrade socket itself) and `end`.
//! 3. new → old: [`READY`], once everything that can fail in the new daemon's start has
//!    succeeded (it has not accepted a client yet).
//! 4. old → new: [`OVER`]; the old daemon stops accepting, and only now does the new one
//!    start. A new daemon that does not get it exits without having served anybody; an
//!    old daemon that cannot send it serves on.
//!
//! A closed connection at any step means the upgrade failed and the old daemon goes on.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use anyhow::{Context, bail, ensure};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// What the new daemon says first; the version lets a later protocol refuse cleanly.
pub const HELLO: &[u8] = b"mxlb-upgrade 1\n";
/// What the new daemon says once it can serve.
pub const READY: &[u8] = b"ready\n";
/// What the old daemon answers: it stops accepting, the new one starts.
pub const OVER: &[u8] = b"over\n";

/// The kernel passes at most this many descriptors in one message (SCM_MAX_FD).
pub const MAX_SOCKETS: usize = 253;

/// What a passed socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A client listener bound to this address.
    Listener(SocketAddr),
    /// The stats and admin port.
    Stats(SocketAddr),
    /// The upgrade socket: the path keeps leading to a listening daemon, and no file is
    /// replaced (or lost, if the new daemon fails).
    Upgrade,
}

/// The lines that describe `roles`, in order, and the end mark.
pub fn encode(roles: &[Role]) -> String {
    let mut text = String::new();
    for role in roles {
        let line = match role {
            Role::Listener(addr) => format!("listen {addr}\n"),
            Role::Stats(addr) => format!("stats {addr}\n"),
            Role::Upgrade => "upgrade\n".to_owned(),
        };
        text.push_str(&line);
    }
    text.push_str("end\n");
    text
}

/// The roles in `text`, which must be exactly what [`encode`] writes.
pub fn decode(text: &str) -> anyhow::Result<Vec<Role>> {
    let body = text
        .strip_suffix("end\n")
        .context("the socket list does not end with `end`")?;
    body.lines()
        .map(|line| {
            if line == "upgrade" {
                return Ok(Role::Upgrade);
            }
            let (kind, addr) = line
                .split_once(' ')
                .with_context(|| format!("not `KIND ADDRESS`: {line:?}"))?;
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("not an address: {line:?}"))?;
            match kind {
                "listen" => Ok(Role::Listener(addr)),
                "stats" => Ok(Role::Stats(addr)),
                other => bail!("unknown socket kind {other:?}"),
            }
        })
        .collect()
}

/// Sends `sockets` in one message (step 2).
pub fn send_sockets(stream: &UnixStream, sockets: &[(Role, BorrowedFd<'_>)]) -> anyhow::Result<()> {
    ensure!(
        sockets.len() <= MAX_SOCKETS,
        "{} sockets to pass, the kernel takes at most {MAX_SOCKETS} at once",
        sockets.len()
    );
    let roles: Vec<Role> = sockets.iter().map(|(role, _)| *role).collect();
    let text = encode(&roles);
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        if fds.is_empty() { &[] } else { &rights },
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .context("sending the sockets")?;
    // A unix stream takes a message this small whole, or fails.
    ensure!(sent == text.len(), "sent {sent} of {} bytes", text.len());
    Ok(())
}

/// Receives the message of step 2: each socket with its role. Descriptors arrive
/// close-on-exec, owned, and are closed again if the message turns out malformed.
pub fn receive_sockets(stream: &UnixStream) -> anyhow::Result<Vec<(Role, OwnedFd)>> {
    let mut text = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    while !text.ends_with(b"end\n") {
        let (bytes, received) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let message = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .context("receiving the sockets")?;
            let mut received = Vec::new();
            for control in message.cmsgs().context("reading the passed descriptors")? {
                if let ControlMessageOwned::ScmRights(raw) = control {
                    // SAFETY: SCM_RIGHTS just installed these descriptors in this
                    // process; nothing else owns them.
                    received.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            ensure!(
                !message.flags.contains(MsgFlags::MSG_CTRUNC),
                "descriptors were cut off: more than {MAX_SOCKETS} sockets"
            );
            (message.bytes, received)
        };
        fds.extend(received);
        if bytes == 0 {
            bail!("the running daemon closed the connection before sending its sockets");
        }
        text.extend_from_slice(&buffer[..bytes]);
        ensure!(text.len() <= 64 * 1024, "socket list too long");
    }
    let text = String::from_utf8(text).context("socket list is not UTF-8")?;
    let roles = decode(&text)?;
    ensure!(
        roles.len() == fds.len(),
        "{} sockets described, {} passed",
        roles.len(),
        fds.len()
    );
    Ok(roles.into_iter().zip(fds).collect())
}

/// Reads exactly `expected` from `stream`; anything else (including the end of the
/// stream) is an error naming `what`.
pub fn expect(mut stream: &UnixStream, expected: &[u8], what: &str) -> anyhow::Result<()> {
    let mut got = vec![0u8; expected.len()];
    io::Read::read_exact(&mut stream, &mut got).with_context(|| format!("waiting for {what}"))?;
    ensure!(
        got == expected,
        "expected {what}, got {:?}",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

/// Writes `message` whole.
pub fn say(mut stream: &UnixStream, message: &[u8]) -> io::Result<()> {
    io::Write::write_all(&mut stream, message)
}

/// A borrowed descriptor's use in a message: keeps the call sites short.
pub fn borrowed<T: AsFd>(role: Role, socket: &T) -> (Role, BorrowedFd<'_>) {
    (role, socket.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn roles_round_trip_and_bad_lists_are_refused() {
        let roles = vec![
            Role::Listener("0.0.0.0:25".parse().unwrap()),
            Role::Listener("[::]:25".parse().unwrap()),
            Role::Stats("127.0.0.1:8404".parse().unwrap()),
            Role::Upgrade,
        ];
        let text = encode(&roles);
        assert_eq!(
            text,
            "listen 0.0.0.0:25\nlisten [::]:25\nstats 127.0.0.1:8404\nupgrade\nend\n"
        );
        assert_eq!(decode(&text).unwrap(), roles);
        assert_eq!(decode("end\n").unwrap(), []);
        for bad in [
            "",
            "listen 0.0.0.0:25\n",
            "listen nowhere\nend\n",
            "admin 127.0.0.1:1\nend\n",
            "listen\nend\n",
            "upgrade 127.0.0.1:1\nend\n",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sockets_pass_with_their_roles() -> anyhow::Result<()> {
        let (old, new) = UnixStream::pair()?;
        let first = TcpListener::bind("127.0.0.1:0")?;
        let second = TcpListener::bind("127.0.0.1:0")?;
        let (a, b) = (first.local_addr()?, second.local_addr()?);
        send_sockets(
            &old,
            &[
                borrowed(Role::Listener(a), &first),
                borrowed(Role::Stats(b), &second),
            ],
        )?;
        let received = receive_sockets(&new)?;
        assert_eq!(received.len(), 2);
        assert_eq!(received[0].0, Role::Listener(a));
        assert_eq!(received[1].0, Role::Stats(b));
        // The same sockets, not copies of their addresses: a client of the original
        // listener is accepted through the descriptor that was passed.
        let passed = TcpListener::from(received[0].1.try_clone()?);
        assert_eq!(passed.local_addr()?, a);
        let client = std::net::TcpStream::connect(a)?;
        let (_, peer) = passed.accept()?;
        assert_eq!(peer, client.local_addr()?);
        Ok(())
    }

    #[test]
    fn a_peer_that_closes_early_is_an_error() -> anyhow::Result<()> {
        let (old, new) = UnixStream::pair()?;
        drop(old);
        assert!(receive_sockets(&new).is_err());
        assert!(expect(&new, READY, "ready").is_err());
        Ok(())
    }
}
