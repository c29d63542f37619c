//! The few socket facts the kernel relay needs that std and socket2 do not expose.
//!
//! All the `unsafe` FFI of the daemon lives here, behind safe functions over `AsFd`.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::os::fd::{AsFd, AsRawFd};

/// A socket's cookie: the key of the socket in the kernel relay's maps.
pub fn cookie(socket: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(socket).cookie()
}

/// How many bytes a socket has taken for sending since it was created: everything the peer
/// acknowledged plus everything still in the send queue (unacknowledged or unsent).
///
/// The kernel relay compares this with what it redirected into the socket to know when every
/// byte of a direction has left the relay's own queues (then forwarding a FIN is safe).
pub fn bytes_taken_for_sending(socket: &impl AsFd) -> io::Result<u64> {
    let info = tcp_info(socket)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid for the call.
    let rc = unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            libc::TIOCOUTQ, // == SIOCOUTQ on Linux
            &mut queued as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(queued).unwrap_or(0))
}

/// Runs the socket's data-ready hook over what its receive queue holds, under the socket
/// lock.
///
/// Setting `SO_RCVLOWAT` does exactly that (TCP re-checks whether readers should wake). For
/// a socket that just got the kernel relay's verdict, the hook is the verdict: bytes that
/// arrived before the insert would otherwise wait for the next segment (pitfall 1 in the
/// sockmap notes). For a socket that just lost it, taking the lock waits out a verdict run
/// still in progress on another CPU, so afterwards no more bytes leave by the kernel path.
pub fn run_receive_path(socket: &impl AsFd) -> io::Result<()> {
    let lowat: libc::c_int = 1;
    // SAFETY: the option value is one int, valid for the call, with its size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&lowat as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn tcp_info(socket: &impl AsFd) -> io::Result<libc::tcp_info> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the zeroed struct it points to.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero is a valid value for every field, and the kernel filled in the rest.
    Ok(unsafe { info.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn cookies_differ_per_socket_and_bytes_taken_counts_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_ne!(cookie(&client).unwrap(), cookie(&server).unwrap());

        let before = bytes_taken_for_sending(&client).unwrap();
        client.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        server.read_exact(&mut got).unwrap();
        let after = bytes_taken_for_sending(&client).unwrap();
        assert_eq!(after - before, 1000);
    }
}
