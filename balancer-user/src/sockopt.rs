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
    // As in `Counts::read`, but only an ACK can tear this reading: arriving data cannot.
    let mut before = tcp_info(socket)?.tcpi_bytes_acked;
    for _ in 0..TRIES {
        let queued = ioctl_int(socket, libc::TIOCOUTQ)?; // == SIOCOUTQ
        let after = tcp_info(socket)?.tcpi_bytes_acked;
        if before == after {
            return Ok(after + queued);
        }
        before = after;
    }
    Err(unsteady())
}

/// How many times a reading is tried before the counters are given up as too busy.
const TRIES: usize = 64;

fn unsteady() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "socket counters kept moving while read",
    )
}

/// One consistent reading of a socket's byte counters, from `TCP_INFO` and two ioctls.
///
/// The counters come from three calls, and an ACK or a segment arriving between them would
/// mix two instants (an ACK moves bytes from the send queue to "acknowledged", so
/// `acked + SIOCOUTQ` read across it comes out short by what it acknowledged). So `TCP_INFO`
/// is read before and after the ioctls, and the reading is kept only when both agree;
/// everything that moves those counters changes one of the fields compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Sequence space the socket received in order (`tcpi_bytes_received`): data, plus one
    /// for the peer's FIN once it arrived.
    pub received: u64,
    /// Bytes received and not yet read (`SIOCINQ`, which leaves the FIN out). Only
    /// meaningful for a socket in no sockmap: there it counts the psock's queue instead.
    pub unread: u64,
    /// Bytes taken for sending: acknowledged plus still queued (`tcpi_bytes_acked +
    /// SIOCOUTQ`), plus one for our own FIN once it was queued.
    pub taken: u64,
    /// The peer's FIN has arrived (the TCP state says so).
    pub fin_received: bool,
    /// Our FIN has been queued (the TCP state says so).
    pub fin_sent: bool,
}

impl Counts {
    /// Reads until two `TCP_INFO` readings around the ioctls agree (a busy socket may need a
    /// few tries); after many tries, the last reading with `Err(Unsteady)`.
    pub fn read(socket: &impl AsFd) -> io::Result<Counts> {
        let mut before = tcp_info(socket)?;
        for _ in 0..TRIES {
            let unread = ioctl_int(socket, libc::FIONREAD)?; // == SIOCINQ
            let queued = ioctl_int(socket, libc::TIOCOUTQ)?; // == SIOCOUTQ
            let after = tcp_info(socket)?;
            let steady = before.tcpi_bytes_received == after.tcpi_bytes_received
                && before.tcpi_bytes_acked == after.tcpi_bytes_acked
                && before.tcpi_state == after.tcpi_state;
            if steady {
                return Ok(Counts {
                    received: after.tcpi_bytes_received,
                    unread,
                    taken: after.tcpi_bytes_acked + queued,
                    fin_received: fin_received(after.tcpi_state),
                    fin_sent: fin_sent(after.tcpi_state),
                });
            }
            before = after;
        }
        Err(unsteady())
    }
}

// TCP states (include/net/tcp_states.h) as `tcpi_state` reports them.
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Whether a socket in this TCP state has received its peer's FIN. `CLOSE` is counted too:
/// a relayed socket reaches it after `LAST_ACK` or `TIME_WAIT` (both FINs) or after a
/// reset, which the ledger then balances knowing so (`Ledger::balance_after_reset`).
fn fin_received(state: u8) -> bool {
    matches!(
        state,
        TCP_TIME_WAIT | TCP_CLOSE | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING
    )
}

/// Whether a socket in this TCP state has queued its own FIN (`CLOSE` as above; a socket
/// that reaches `TIME_WAIT` hands it to a timewait socket and reports `CLOSE` itself).
fn fin_sent(state: u8) -> bool {
    matches!(
        state,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSE | TCP_LAST_ACK | TCP_CLOSING
    )
}

/// Bytes queued for reading (`SIOCINQ`) on a socket in no sockmap.
pub fn unread(socket: &impl AsFd) -> io::Result<u64> {
    ioctl_int(socket, libc::FIONREAD)
}

/// Bytes in the send queue, not yet acknowledged by the peer (`SIOCOUTQ`).
pub fn unacknowledged(socket: &impl AsFd) -> io::Result<u64> {
    ioctl_int(socket, libc::TIOCOUTQ)
}

/// Whether the next byte to read is the urgent mark (`SIOCATMARK`): a read stops short
/// there, in the middle of a segment.
pub fn at_urgent_mark(socket: &impl AsFd) -> io::Result<bool> {
    /// `SIOCATMARK` from <linux/sockios.h>; libc does not export it.
    const SIOCATMARK: libc::Ioctl = 0x8905;
    Ok(ioctl_int(socket, SIOCATMARK)? != 0)
}

/// Keeps urgent (out-of-band) bytes in the stream (`SO_OOBINLINE`), as the kernel relay
/// does: without it, a user-space read silently skips the urgent byte.
pub fn keep_urgent_inline(socket: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(socket).set_out_of_band_inline(true)
}

/// Makes the next close send a reset instead of a FIN (`SO_LINGER` with a zero timeout):
/// for a connection whose data can no longer be trusted.
pub fn reset_on_close(socket: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO))
}

fn ioctl_int(socket: &impl AsFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int through the pointer, valid for the call.
    let rc = unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            request,
            &mut value as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
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
