//! Sending mail with Postfix's own test client, `smtp-source(1)`.
//!
//! `smtp-source -F file` sends a pre-formatted message (headers, empty line, body) as is:
//! it adds no header of its own, appends CRLF to every line of the file (so the file must
//! use LF line endings: a CR in it would be sent as `\r\r\n`), and dot-stuffs lines that
//! begin with `.`. One quirk, seen on the wire with Postfix 3.7: after the file's last line
//! it sends one more, empty, line before the closing dot (`last\r\n\r\n.\r\n`, whether or
//! not the file ends with a newline). The delivered body is therefore the file's body plus
//! one `\n`; [`SmtpSource::delivered_body`] says so in code.
//!
//! `smtp-source` cannot bind a source address: its connections come from the address the
//! kernel picks (127.0.0.1 or ::1 on loopback). It sets `SO_LINGER` to 0, so it ends each
//! session, after `QUIT` was answered, with a reset rather than a FIN (a balancer logs a
//! client reset). It has no timeout of its own either; the
//! whole run is bounded by [`SmtpSource::timeout`]. It exits non-zero on any reply other
//! than the expected 2xx/3xx (no `-A`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{CommandOutput, run_command};

/// Where Debian installs it (package `postfix`).
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// One `smtp-source` run: one SMTP session with one message to `server`.
#[derive(Debug, Clone)]
pub struct SmtpSource {
    pub server: SocketAddr,
    /// HELO name (`-M`).
    pub helo: String,
    /// Envelope sender (`-f`).
    pub from: String,
    /// Envelope recipient (`-t`).
    pub to: String,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
}

impl SmtpSource {
    /// A message from `sender@example.test` to `user@example.test` through `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            helo: "client.example.test".to_owned(),
            from: format!("sender@{}", crate::postfix::MAIL_DOMAIN),
            to: format!("user@{}", crate::postfix::MAIL_DOMAIN),
            timeout: Duration::from_secs(60),
        }
    }

    /// The body Postfix stores for a file whose body (after the empty line) is `body`,
    /// with LF line endings and a final newline: `body` and the empty line smtp-source
    /// adds (see the module doc).
    pub fn delivered_body(body: &[u8]) -> Vec<u8> {
        let mut delivered = Vec::with_capacity(body.len() + 1);
        delivered.extend_from_slice(body);
        delivered.push(b'\n');
        delivered
    }

    /// Sends the pre-formatted message in `file` (LF line endings) in one session;
    /// fails unless smtp-source reports success.
    pub fn send_file(&self, file: &Path) -> Result<CommandOutput> {
        // An absolute path: smtp-source may change directory before opening it (a relative
        // path failed to open with `-6`).
        let file = std::path::absolute(file)
            .with_context(|| format!("absolute path of {}", file.display()))?;
        let mut cmd = Command::new(SMTP_SOURCE);
        cmd.arg(if self.server.is_ipv4() { "-4" } else { "-6" })
            // One session, one message, one recipient.
            .args(["-s", "1", "-m", "1", "-r", "1"])
            .arg("-M")
            .arg(&self.helo)
            .arg("-f")
            .arg(&self.from)
            .arg("-t")
            .arg(&self.to)
            .arg("-F")
            .arg(&file)
            // `[::1]:port` for IPv6, `127.0.0.1:port` for IPv4: SocketAddr's own syntax.
            .arg(self.server.to_string())
            // smtp-source reads main.cf for a few defaults: keep it on the system's.
            .env_remove("MAIL_CONFIG");
        let out = run_command(&mut cmd, self.timeout)?;
        if !out.status.success() {
            bail!(
                "smtp-source to {} failed ({}):\n{}",
                self.server,
                out.status,
                out.output
            );
        }
        Ok(out)
    }
}
