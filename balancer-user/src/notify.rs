//! systemd's readiness protocol (sd_notify(3)), for `Type=notify` units: `READY=1` once
//! every listener is bound, `RELOADING=1` … `READY=1` around a SIGHUP reload (what
//! `Type=notify-reload` waits for), `STOPPING=1` at SIGTERM. Without `NOTIFY_SOCKET` in
//! the environment (not started by systemd) every call does nothing.
//!
//! The protocol is one datagram per state change to the socket named by `NOTIFY_SOCKET`
//! (a path, or `@name` for the abstract namespace): a dozen lines, not worth a crate.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::debug;

/// Where systemd listens, if it started us.
pub struct Notifier {
    target: Option<SocketAddr>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; an unusable value is logged and ignored.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|value| {
            let text = value.to_string_lossy().into_owned();
            let address = match text.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&text),
            };
            address
                .inspect_err(|error| debug!(%error, "NOTIFY_SOCKET={text} is unusable"))
                .ok()
        });
        Notifier { target }
    }

    /// Listeners bound, serving (also the end of a reload).
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// A reload starts; `ready` ends it.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// Stopping: no new clients, relays finishing.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound()
            .and_then(|socket| socket.send_to_addr(message.as_bytes(), target));
        if let Err(error) = sent {
            // systemd may be restarting; the daemon's work does not depend on it.
            debug!(%error, "sd_notify failed");
        }
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants it with `RELOADING=1`.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 0;
    }
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn sends_each_state_as_one_datagram() -> io::Result<()> {
        // An abstract address, as systemd itself uses: nothing to clean up.
        let name = format!("mxlb-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes())?;
        let systemd = UnixDatagram::bind_addr(&address)?;
        let notifier = Notifier {
            target: Some(address),
        };
        notifier.ready("serving");
        notifier.reloading();
        notifier.stopping();
        let mut buffer = [0u8; 256];
        let mut next = || -> io::Result<String> {
            let n = systemd.recv(&mut buffer)?;
            Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
        };
        let ready = next()?;
        assert!(
            ready.starts_with("READY=1\nSTATUS=serving\nMAINPID="),
            "{ready}"
        );
        let reloading = next()?;
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        assert!(monotonic_usec() > 0);
        assert_eq!(next()?, "STOPPING=1");
        Ok(())
    }

    #[test]
    fn without_systemd_nothing_is_sent() {
        Notifier { target: None }.ready("serving");
    }
}
