//! Sending mail with the real `swaks` client.
//!
//! We build the whole message ourselves and hand it to swaks with `--data @file`, so the
//! headers are ours (including a digest of the body that the receiving side can verify, see
//! [`crate::postfix::DeliveredMessage::body_intact`]) and nothing depends on swaks's
//! defaults. swaks is told everything it would otherwise guess: server and local address as
//! IP literals, the address family (`-4`/`-6`), the HELO name and the sender, so it never
//! resolves names nor wanders to IPv6; `--config` without a file and a cleaned environment
//! keep a user's `.swaksrc` or `SWAKS_OPT_*` variables out.
//!
//! Caveat: swaks rewrites a few things anywhere in the DATA: `%DATE%`-style tokens, a
//! literal backslash followed by `n` (becomes a line break), and a last line of just `.`
//! (taken as the closing dot). Bodies whose digest is checked must avoid those.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::{run_command, sha256_hex};

/// Header carrying the SHA-256 of the body as the receiving Maildir will store it.
pub const BODY_DIGEST_HEADER: &str = "X-Mxlb-Body-Sha256";

/// Bodies larger than this are not echoed into the transcript (`--suppress-data`).
const ECHO_DATA_LIMIT: usize = 64 * 1024;

/// One swaks run: a single SMTP transaction to `server`.
#[derive(Debug, Clone)]
pub struct Swaks {
    pub server: SocketAddr,
    /// Source address (`--local-interface`); lets tests simulate distinct clients on
    /// 127.0.0.0/8. `None` lets the kernel choose.
    pub from_ip: Option<IpAddr>,
    pub helo: String,
    pub from: String,
    pub to: String,
    pub subject: String,
    /// Body with LF or CRLF line endings; normalised to LF (and a final newline).
    pub body: Vec<u8>,
    /// Extra `(name, value)` headers.
    pub headers: Vec<(String, String)>,
    /// Wall-clock limit for the whole run; swaks's own per-reply timeout is the same.
    pub timeout: Duration,
}

impl Swaks {
    /// A message to `postmaster@example.test` with a short default body.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            from_ip: None,
            helo: "client.example.test".to_owned(),
            from: "sender@example.test".to_owned(),
            to: format!("postmaster@{}", crate::postfix::MAIL_DOMAIN),
            subject: "mxlb test message".to_owned(),
            body: b"mxlb test message body\n".to_vec(),
            headers: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends one message from `from_ip` through `server` and returns what happened;
    /// an SMTP failure is an `Ok` outcome with a failing status, see
    /// [`SwaksOutcome::ensure_success`].
    pub fn send(
        server: SocketAddr,
        from_ip: IpAddr,
        to: &str,
        subject: &str,
        body: Option<&[u8]>,
    ) -> Result<SwaksOutcome> {
        let mut swaks = Self::new(server);
        swaks.from_ip = Some(from_ip);
        swaks.to = to.to_owned();
        swaks.subject = subject.to_owned();
        if let Some(body) = body {
            swaks.body = body.to_vec();
        }
        swaks.run()
    }

    /// Runs swaks once.
    pub fn run(&self) -> Result<SwaksOutcome> {
        let body = normalize_body(&self.body);
        let body_sha256 = sha256_hex(&body);
        let message_id = unique_message_id();
        let mut data = format!(
            "Date: %DATE%\nFrom: <{}>\nTo: <{}>\nSubject: {}\nMessage-Id: {message_id}\n\
             {BODY_DIGEST_HEADER}: {body_sha256}\n",
            self.from, self.to, self.subject
        );
        for (name, value) in &self.headers {
            data.push_str(&format!("{name}: {value}\n"));
        }
        data.push('\n');
        let mut data = data.into_bytes();
        data.extend_from_slice(&body);
        // swaks appends "\r\n." itself: a final newline of ours would become an extra
        // empty line in the body.
        data.pop_if(|b| *b == b'\n');

        let mut file = tempfile::NamedTempFile::new().context("creating swaks data file")?;
        std::io::Write::write_all(&mut file, &data).context("writing swaks data file")?;

        let mut cmd = Command::new("swaks");
        // `--config` without a file: ignore ~/.swaksrc. It must be followed by an option,
        // or swaks would take the next word as the file name.
        cmd.arg("--config");
        cmd.arg(if self.server.is_ipv4() { "-4" } else { "-6" })
            .arg("--server")
            .arg(self.server.ip().to_string())
            .arg("--port")
            .arg(self.server.port().to_string());
        if let Some(ip) = self.from_ip {
            cmd.arg("--local-interface").arg(ip.to_string());
        }
        cmd.arg("--helo")
            .arg(&self.helo)
            .arg("--from")
            .arg(&self.from)
            .arg("--to")
            .arg(&self.to)
            .arg("--data")
            .arg(format!("@{}", file.path().display()))
            .arg("--timeout")
            .arg(format!("{}s", self.timeout.as_secs().max(1)));
        if body.len() > ECHO_DATA_LIMIT {
            cmd.arg("--suppress-data");
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SWAKS_") {
                cmd.env_remove(key);
            }
        }
        // swaks's own timeout covers each reply; this one covers a hung process.
        let out = run_command(&mut cmd, self.timeout + Duration::from_secs(10))?;
        if out.status.code() == Some(1) {
            bail!("swaks rejected its command line:\n{}", out.output);
        }
        Ok(SwaksOutcome {
            banner: parse_banner(&out.output),
            transcript: out.output,
            status: out.status,
            body_sha256,
            message_id,
        })
    }
}

/// What one swaks run did.
#[derive(Debug, Clone)]
pub struct SwaksOutcome {
    /// swaks's stdout and stderr, interleaved: `->` lines sent, `<-` lines received,
    /// `<**`/`***` errors.
    pub transcript: String,
    /// 0 on success; swaks documents the others (2: connect failed, 21-29: which SMTP
    /// step was refused).
    pub status: ExitStatus,
    /// The server's first reply line without swaks's prefix, e.g.
    /// `220 mail1.test ESMTP Postfix`; `None` if the connection produced no reply.
    pub banner: Option<String>,
    /// SHA-256 of the body as sent (and as it should be delivered).
    pub body_sha256: String,
    /// The `Message-Id` header value, unique per run.
    pub message_id: String,
}

impl SwaksOutcome {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// `Ok(self)` if the message was accepted, else an error with the transcript.
    pub fn ensure_success(&self) -> Result<&Self> {
        if !self.success() {
            bail!("swaks failed ({}):\n{}", self.status, self.transcript);
        }
        Ok(self)
    }

    /// The queue id from Postfix's `250 2.0.0 Ok: queued as <id>`.
    pub fn queued_as(&self) -> Option<&str> {
        self.transcript
            .lines()
            .find_map(|line| line.split_once("queued as ").map(|(_, id)| id.trim()))
    }
}

impl fmt::Display for SwaksOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "swaks {}:\n{}", self.status, self.transcript)
    }
}

/// LF line endings with a final newline: the form a Maildir stores, so digests match.
fn normalize_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(body[i]);
        i += 1;
    }
    if out.last().is_some_and(|&b| b != b'\n') {
        out.push(b'\n');
    }
    out
}

/// swaks's server lines start with `<-` (or `<~` under TLS, `<**`/`<~*` when unexpected).
fn parse_banner(transcript: &str) -> Option<String> {
    transcript.lines().find_map(|line| {
        let rest = line.strip_prefix('<')?;
        let text = rest.trim_start_matches(['-', '~', '*']);
        (text.len() < rest.len()).then(|| text.trim().to_owned())
    })
}

fn unique_message_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "<mxlb-{}-{}-{nanos}@{}>",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        crate::postfix::MAIL_DOMAIN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_is_first_server_line() {
        let t = "=== Trying 127.0.0.1:25...\n=== Connected to 127.0.0.1.\n\
                 <-  220 mail1.test ESMTP Postfix\n -> EHLO x\n<-  250 ok\n";
        assert_eq!(
            parse_banner(t).as_deref(),
            Some("220 mail1.test ESMTP Postfix")
        );
        assert_eq!(parse_banner("<** 421 busy\n").as_deref(), Some("421 busy"));
        assert_eq!(parse_banner("*** Error connecting\n"), None);
    }

    #[test]
    fn normalizes_line_endings() {
        assert_eq!(normalize_body(b"a\r\nb"), b"a\nb\n");
        assert_eq!(normalize_body(b"a\n"), b"a\n");
        assert_eq!(normalize_body(b""), b"");
    }
}
