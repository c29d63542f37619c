//! One health check of one server, step by step like HAProxy's `option smtpchk`.
//!
//! 1. Connect. Refused or unreachable is `L4CON` (the OS error is the detail); no
//!    connection within the timeout is `L4TOUT`.
//! 2. With `send_proxy`, write the PROXY header in one write before anything else: v1 as
//!    a real `PROXY TCP4|TCP6` line built from the check socket's own addresses (Postfix
//!    rejects `UNKNOWN`), v2 as the 16-byte LOCAL command. The header belongs to
//!    establishing the connection, so failing to send it is `L4CON` (`L4TOUT` on timeout).
//! 3. `tcp` checks stop here: `L4OK`.
//! 4. Read the banner. Not an SMTP reply: `L7RSP`; not 2xx: `L7STS` with its code.
//! 5. Send `HELO <domain>` or `EHLO <domain>`; the (possibly multi-line) reply must be 2xx.
//! 6. Send `QUIT`; its reply (usually 221) must be 2xx too.
//! 7. Close gracefully: shut down our side, then read until the server closes, so the
//!    server never sees a reset. Postfix then logs a clean
//!    `disconnect from … ehlo=1 quit=1 commands=2`.
//!
//! Rules where HAProxy leaves room, chosen so that every outcome has one name:
//! - A command is sent only after the previous reply was read: no pipelining.
//! - A reply that does not arrive before the timeout is `L7TOUT`. The server closing the
//!   connection (or resetting it) instead of replying is `L7RSP`: it answered, just not
//!   with a valid reply. Failing to send a command is `L7RSP` too.
//! - Bytes after a complete reply, before we sent anything that asks for them, are
//!   `L7RSP`: an SMTP server speaks only when spoken to.
//! - After an `L7STS` on the banner or the greeting, a `QUIT` is still sent before
//!   closing, so that the server ends the session cleanly too (RFC 5321 3.1 asks this of
//!   clients that get a 554 banner).
//! - The timeout bounds the whole check, connect included. The duration is measured from
//!   the start of the connect to the verdict; the graceful close after it is not counted.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::config::{Check, CheckType, SendProxy, Server, SmtpVerb};
use crate::proxy_header::{self, ProxyHeader, ProxyVersion};

use super::reply::{Reply, ReplyParse, ReplyParser};
use super::status::{CheckResult, CheckStatus};

/// Longest wait for the server to close after we did, once the verdict is known.
const DRAIN_TIME: Duration = Duration::from_millis(500);

/// Most bytes read while waiting for the server to close: a server that keeps talking
/// gets reset instead.
const DRAIN_BYTES: usize = 64 * 1024;

/// Size of one read from the server.
const READ_CHUNK: usize = 4096;

/// Everything one check of one server needs, taken from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckType,
    pub verb: SmtpVerb,
    /// The HELO/EHLO argument.
    pub domain: String,
    /// For the whole check, connect to QUIT.
    pub timeout: Duration,
    /// The server's PROXY setting: checks carry the header like client connections.
    pub send_proxy: SendProxy,
}

impl CheckSpec {
    /// The check of `server` under the listener's `check`, or `None` when the server is
    /// not checked (`type = "none"` or `check = false`) and is therefore always up.
    pub fn from_config(check: &Check, server: &Server) -> Option<CheckSpec> {
        if check.kind == CheckType::None || !server.check {
            return None;
        }
        Some(CheckSpec {
            kind: check.kind,
            verb: check.verb,
            domain: check.domain.clone(),
            timeout: check.timeout,
            send_proxy: server.send_proxy,
        })
    }
}

/// Runs one check against `target` and says how it went. Never panics, whatever the
/// server sends, and returns within `spec.timeout`: the graceful close after the verdict
/// gets what is left of it, at most [`DRAIN_TIME`].
///
/// A spec of kind [`CheckType::None`] passes at once without connecting: an unchecked
/// server is always up.
pub async fn run_check(spec: &CheckSpec, target: SocketAddr) -> CheckResult {
    let start = Instant::now();
    let deadline = start + spec.timeout;
    if spec.kind == CheckType::None {
        return Verdict::new(CheckStatus::L4Ok, None, "no check configured").result(start);
    }
    let mut stream = match connect(spec, target, deadline).await {
        Ok(stream) => stream,
        Err(verdict) => return verdict.result(start),
    };
    let verdict = match spec.kind {
        CheckType::Smtp => smtp_dialogue(&mut stream, spec, deadline).await,
        CheckType::Tcp | CheckType::None => Verdict::new(CheckStatus::L4Ok, None, ""),
    };
    let result = verdict.result(start);
    if verdict.courtesy_quit {
        // Best effort: the verdict is already known.
        let _ = timeout_at(deadline, stream.write_all(b"QUIT\r\n")).await;
    }
    close_gracefully(stream, deadline).await;
    result
}

/// A check's conclusion before its duration is known.
#[derive(Debug)]
struct Verdict {
    status: CheckStatus,
    code: Option<u16>,
    detail: String,
    /// Send QUIT before closing: the server answered properly, just not with 2xx.
    courtesy_quit: bool,
}

impl Verdict {
    fn new(status: CheckStatus, code: Option<u16>, detail: impl Into<String>) -> Verdict {
        Verdict {
            status,
            code,
            detail: detail.into(),
            courtesy_quit: false,
        }
    }

    fn result(&self, start: Instant) -> CheckResult {
        CheckResult {
            status: self.status,
            code: self.code,
            duration: start.elapsed(),
            detail: self.detail.clone(),
        }
    }
}

/// Connects and sends the PROXY header, if any.
async fn connect(
    spec: &CheckSpec,
    target: SocketAddr,
    deadline: Instant,
) -> Result<TcpStream, Verdict> {
    let mut stream = match timeout_at(deadline, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(Verdict::new(CheckStatus::L4Con, None, os_message(&error))),
        Err(_) => {
            return Err(Verdict::new(
                CheckStatus::L4Tout,
                None,
                "connection timed out",
            ));
        }
    };
    // Commands are tiny and each waits for a reply: Nagle's algorithm could only delay them.
    let _ = stream.set_nodelay(true);
    if let Some(version) = spec.send_proxy.version() {
        send_proxy_header(&mut stream, version, deadline).await?;
    }
    Ok(stream)
}

/// Writes the header as one buffer in one call, before any other byte, because Postfix
/// reads it with a single `recv(MSG_PEEK)`. (A fresh socket's send buffer always takes
/// these at most 536 bytes whole.)
async fn send_proxy_header(
    stream: &mut TcpStream,
    version: ProxyVersion,
    deadline: Instant,
) -> Result<(), Verdict> {
    let failed = |error: io::Error| {
        let detail = format!("sending the PROXY header: {}", os_message(&error));
        Verdict::new(CheckStatus::L4Con, None, detail)
    };
    let header = check_header(stream, version).map_err(failed)?;
    let bytes = proxy_header::encode(version, &header);
    match timeout_at(deadline, stream.write_all(&bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(failed(error)),
        Err(_) => Err(Verdict::new(
            CheckStatus::L4Tout,
            None,
            "timed out sending the PROXY header",
        )),
    }
}

/// The header a check sends: v1 has no LOCAL command and Postfix refuses `UNKNOWN`, so it
/// carries the check socket's own endpoints, as HAProxy's checks do; v2 says LOCAL.
fn check_header(stream: &TcpStream, version: ProxyVersion) -> io::Result<ProxyHeader> {
    match version {
        ProxyVersion::V1 => Ok(ProxyHeader::Proxy {
            source: stream.local_addr()?,
            destination: stream.peer_addr()?,
        }),
        ProxyVersion::V2 => Ok(ProxyHeader::Local),
    }
}

/// Banner, greeting and QUIT; the verdict of the first step that fails, or L7OK.
async fn smtp_dialogue(stream: &mut TcpStream, spec: &CheckSpec, deadline: Instant) -> Verdict {
    let mut session = Session {
        stream,
        received: Vec::new(),
        deadline,
        timeout: spec.timeout,
    };
    match smtp_steps(&mut session, spec).await {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

async fn smtp_steps(session: &mut Session<'_>, spec: &CheckSpec) -> Result<Verdict, Verdict> {
    let banner = session.read_reply(Step::Banner).await?;
    positive(banner, Step::Banner)?;

    let greeting_step = Step::Greeting(spec.verb);
    let greeting = format!("{} {}\r\n", spec.verb.as_str(), spec.domain);
    let greeting = session.command(&greeting, greeting_step).await?;
    let greeting = positive(greeting, greeting_step)?;

    let quit = session.command("QUIT\r\n", Step::Quit).await?;
    positive(quit, Step::Quit)?;

    Ok(Verdict::new(
        CheckStatus::L7Ok,
        Some(greeting.code),
        greeting.summary(),
    ))
}

/// Accepts 2xx replies; anything else is L7STS with the code.
fn positive(reply: Reply, step: Step) -> Result<Reply, Verdict> {
    if reply.is_positive() {
        return Ok(reply);
    }
    let detail = match step {
        Step::Banner => reply.summary(),
        _ => format!("{step}: {}", reply.summary()),
    };
    Err(Verdict {
        status: CheckStatus::L7Sts,
        code: Some(reply.code),
        detail,
        // After QUIT itself there is nothing left to be polite about.
        courtesy_quit: step != Step::Quit,
    })
}

/// Which reply a step waits for; names it in details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Banner,
    Greeting(SmtpVerb),
    Quit,
}

impl Step {
    fn command(self) -> &'static str {
        match self {
            Step::Banner => "nothing",
            Step::Greeting(verb) => verb.as_str(),
            Step::Quit => "QUIT",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Banner => f.write_str("banner"),
            _ => write!(f, "reply to {}", self.command()),
        }
    }
}

/// The SMTP side of a check connection: reads replies within the deadline.
struct Session<'a> {
    stream: &'a mut TcpStream,
    /// Bytes received and not yet part of a complete reply; bounded by the reply
    /// parser's limits plus one read.
    received: Vec<u8>,
    deadline: Instant,
    /// Only for messages.
    timeout: Duration,
}

impl Session<'_> {
    /// Sends one command line, then reads its reply.
    async fn command(&mut self, line: &str, step: Step) -> Result<Reply, Verdict> {
        match timeout_at(self.deadline, self.stream.write_all(line.as_bytes())).await {
            Ok(Ok(())) => self.read_reply(step).await,
            Ok(Err(error)) => Err(Verdict::new(
                CheckStatus::L7Rsp,
                None,
                format!("sending {}: {}", step.command(), os_message(&error)),
            )),
            Err(_) => Err(self.timed_out(step)),
        }
    }

    /// Reads one complete reply; anything else ends the check.
    async fn read_reply(&mut self, step: Step) -> Result<Reply, Verdict> {
        let mut parser = ReplyParser::new();
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match parser.parse(&self.received) {
                ReplyParse::Complete { reply, consumed } if consumed == self.received.len() => {
                    self.received.clear();
                    return Ok(reply);
                }
                ReplyParse::Complete { .. } => {
                    return Err(invalid_response(format!(
                        "unexpected data after the {step}"
                    )));
                }
                ReplyParse::Invalid(why) => {
                    return Err(invalid_response(format!("invalid {step}: {why}")));
                }
                ReplyParse::Incomplete => {}
            }
            let read = match timeout_at(self.deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(read)) => read,
                Ok(Err(error)) => {
                    let detail = format!("reading the {step}: {}", os_message(&error));
                    return Err(invalid_response(detail));
                }
                Err(_) => return Err(self.timed_out(step)),
            };
            if read == 0 {
                return Err(self.closed(step));
            }
            self.received
                .extend_from_slice(chunk.get(..read).unwrap_or_default());
        }
    }

    fn timed_out(&self, step: Step) -> Verdict {
        let detail = if self.received.is_empty() {
            format!("no {step} within {:?}", self.timeout)
        } else {
            format!("incomplete {step} after {:?}", self.timeout)
        };
        Verdict::new(CheckStatus::L7Tout, None, detail)
    }

    fn closed(&self, step: Step) -> Verdict {
        let detail = if self.received.is_empty() {
            format!("connection closed by the server before the {step}")
        } else {
            format!("connection closed by the server in the middle of the {step}")
        };
        invalid_response(detail)
    }
}

fn invalid_response(detail: String) -> Verdict {
    Verdict::new(CheckStatus::L7Rsp, None, detail)
}

/// Ends the connection without a reset: shut down our side, then read until the server
/// closes too. Closing with unread bytes would make the kernel send RST, which servers
/// log as "lost connection". Bounded by the check's deadline and [`DRAIN_TIME`]; bytes
/// already received are read even when the deadline has passed.
async fn close_gracefully(mut stream: TcpStream, deadline: Instant) {
    let until = deadline.min(Instant::now() + DRAIN_TIME);
    let _ = timeout_at(until, stream.shutdown()).await;
    let _ = timeout_at(until, drain(&mut stream)).await;
}

/// Reads and discards until end of stream, an error, or [`DRAIN_BYTES`].
async fn drain(stream: &mut TcpStream) {
    let mut chunk = [0u8; READ_CHUNK];
    let mut total = 0;
    while total <= DRAIN_BYTES {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => total += read,
        }
    }
}

/// The OS error text without Rust's " (os error N)" suffix: "Connection refused".
fn os_message(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(suffix) => text.get(..suffix).unwrap_or(&text).to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::net::{TcpListener, TcpSocket};
    use tokio::task::JoinHandle;
    use tokio::time::sleep;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);
    /// Long enough for a client that pipelines to have sent its next bytes.
    const SETTLE: Duration = Duration::from_millis(30);

    fn spec(kind: CheckType, verb: SmtpVerb, send_proxy: SendProxy) -> CheckSpec {
        CheckSpec {
            kind,
            verb,
            domain: "d.example".to_owned(),
            timeout: TIMEOUT,
            send_proxy,
        }
    }

    fn smtp(send_proxy: SendProxy) -> CheckSpec {
        spec(CheckType::Smtp, SmtpVerb::Ehlo, send_proxy)
    }

    /// Accepts one connection on a fresh port and hands it to `handler`.
    async fn serve_once<F, Fut, T>(handler: F) -> (SocketAddr, JoinHandle<T>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            handler(stream).await
        });
        (addr, task)
    }

    /// Reads until a line ending, after giving a pipelining client time to send more, so
    /// the answer holds everything that was sent before the server replied.
    async fn read_command(stream: &mut TcpStream) -> Vec<u8> {
        sleep(SETTLE).await;
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 1024];
        while !bytes.ends_with(b"\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            }
        }
        bytes
    }

    /// What arrived without waiting.
    fn pending(stream: &TcpStream) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 1024];
        while let Ok(read @ 1..) = stream.try_read(&mut chunk) {
            bytes.extend_from_slice(&chunk[..read]);
        }
        bytes
    }

    /// Reads to the end; `Ok` for a clean FIN, the error kind for a reset.
    async fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Result<(), io::ErrorKind>) {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return (bytes, Ok(())),
                Ok(read) => bytes.extend_from_slice(&chunk[..read]),
                Err(error) => return (bytes, Err(error.kind())),
            }
        }
    }

    /// What a test server saw of a check.
    #[derive(Debug)]
    struct Transcript {
        /// The check socket as the server sees it.
        client: SocketAddr,
        server: SocketAddr,
        header: Vec<u8>,
        /// Anything sent after the header but before the banner.
        early: Vec<u8>,
        commands: Vec<Vec<u8>>,
        /// After the last command, until the end of the connection.
        trailing: Vec<u8>,
        end: Result<(), io::ErrorKind>,
    }

    impl Transcript {
        fn new(stream: &TcpStream) -> Transcript {
            Transcript {
                client: stream.peer_addr().expect("peer addr"),
                server: stream.local_addr().expect("local addr"),
                header: Vec::new(),
                early: Vec::new(),
                commands: Vec::new(),
                trailing: Vec::new(),
                end: Ok(()),
            }
        }
    }

    async fn read_header(stream: &mut TcpStream, proxy: SendProxy) -> Vec<u8> {
        match proxy {
            SendProxy::None => Vec::new(),
            SendProxy::V1 => {
                let mut line = Vec::new();
                while !line.ends_with(b"\r\n") {
                    let byte = stream.read_u8().await.expect("header byte");
                    line.push(byte);
                }
                line
            }
            SendProxy::V2 => {
                let mut header = vec![0u8; 16];
                stream.read_exact(&mut header).await.expect("v2 header");
                header
            }
        }
    }

    /// A well-behaved ESMTP server: multi-line banner sent in two pieces, multi-line EHLO
    /// reply, 221 to QUIT, then waits for the client to close.
    async fn good_server(mut stream: TcpStream, proxy: SendProxy) -> Transcript {
        let mut seen = Transcript::new(&stream);
        seen.header = read_header(&mut stream, proxy).await;
        sleep(SETTLE).await;
        seen.early = pending(&stream);
        let _ = stream.write_all(b"220-mx.test ESMTP\r\n").await;
        sleep(Duration::from_millis(10)).await;
        let _ = stream.write_all(b"220 ready\r\n").await;
        seen.commands.push(read_command(&mut stream).await);
        let ehlo = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n";
        let _ = stream.write_all(ehlo).await;
        seen.commands.push(read_command(&mut stream).await);
        let _ = stream.write_all(b"221 2.0.0 Bye\r\n").await;
        (seen.trailing, seen.end) = read_to_end(&mut stream).await;
        seen
    }

    /// Sends `banner`, answers the first command with `reply`, then reads to the end.
    async fn scripted_server(mut stream: TcpStream, banner: &[u8], reply: &[u8]) -> Transcript {
        let mut seen = Transcript::new(&stream);
        let _ = stream.write_all(banner).await;
        seen.commands.push(read_command(&mut stream).await);
        let _ = stream.write_all(reply).await;
        (seen.trailing, seen.end) = read_to_end(&mut stream).await;
        seen
    }

    fn assert_clean_ehlo_session(seen: &Transcript) {
        assert_eq!(seen.early, b"", "bytes before the banner");
        assert_eq!(
            seen.commands,
            [b"EHLO d.example\r\n".to_vec(), b"QUIT\r\n".to_vec()]
        );
        assert_eq!(seen.trailing, b"");
        assert_eq!(seen.end, Ok(()), "the check reset the connection");
    }

    #[tokio::test]
    async fn good_server_passes_with_a_clean_session() {
        let (addr, server) = serve_once(|s| good_server(s, SendProxy::None)).await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        let seen = server.await.expect("server");
        assert_eq!(result.status, CheckStatus::L7Ok, "{}", result.describe());
        assert_eq!(result.code, Some(250));
        assert_eq!(result.detail, "250 mx.test");
        assert!(result.passed());
        assert!(result.duration < TIMEOUT);
        assert_eq!(seen.header, b"");
        assert_clean_ehlo_session(&seen);
    }

    #[tokio::test]
    async fn v1_header_carries_the_check_sockets_addresses() {
        let (addr, server) = serve_once(|s| good_server(s, SendProxy::V1)).await;
        let result = run_check(&smtp(SendProxy::V1), addr).await;
        let seen = server.await.expect("server");
        assert_eq!(result.status, CheckStatus::L7Ok, "{}", result.describe());
        let expected = proxy_header::encode(
            ProxyVersion::V1,
            &ProxyHeader::Proxy {
                source: seen.client,
                destination: seen.server,
            },
        );
        assert_eq!(seen.header, expected);
        assert!(seen.header.starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 "));
        assert_clean_ehlo_session(&seen);
    }

    #[tokio::test]
    async fn v2_header_is_local() {
        let (addr, server) = serve_once(|s| good_server(s, SendProxy::V2)).await;
        let result = run_check(&smtp(SendProxy::V2), addr).await;
        let seen = server.await.expect("server");
        assert_eq!(result.status, CheckStatus::L7Ok, "{}", result.describe());
        assert_eq!(
            seen.header,
            [
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00,
                0x00, 0x00
            ]
        );
        assert_clean_ehlo_session(&seen);
    }

    #[tokio::test]
    async fn helo_verb_is_sent_as_configured() {
        let (addr, server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220 mx\r\n").await;
            let helo = read_command(&mut stream).await;
            let _ = stream.write_all(b"250 mx\r\n").await;
            let quit = read_command(&mut stream).await;
            let _ = stream.write_all(b"221 bye\r\n").await;
            let _ = read_to_end(&mut stream).await;
            (helo, quit)
        })
        .await;
        let helo = spec(CheckType::Smtp, SmtpVerb::Helo, SendProxy::None);
        let result = run_check(&helo, addr).await;
        assert_eq!(result.to_string().split(' ').next(), Some("L7OK/250"));
        let (helo, quit) = server.await.expect("server");
        assert_eq!(helo, b"HELO d.example\r\n");
        assert_eq!(quit, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn banner_421_is_a_wrong_status() {
        let (addr, server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream
                .write_all(b"421 4.3.2 Service shutting down\r\n")
                .await;
            read_to_end(&mut stream).await
        })
        .await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        assert_eq!(result.status, CheckStatus::L7Sts);
        assert_eq!(result.code, Some(421));
        assert_eq!(result.detail, "421 4.3.2 Service shutting down");
        assert!(result.to_string().starts_with("L7STS/421 in "));
        // The check still says goodbye properly.
        let (bytes, end) = server.await.expect("server");
        assert_eq!(bytes, b"QUIT\r\n");
        assert_eq!(end, Ok(()));
    }

    #[tokio::test]
    async fn ehlo_550_is_a_wrong_status() {
        let (addr, server) =
            serve_once(|s| scripted_server(s, b"220 mx ESMTP\r\n", b"550 5.7.1 Go away\r\n")).await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        assert_eq!(result.status, CheckStatus::L7Sts);
        assert_eq!(result.code, Some(550));
        assert_eq!(result.detail, "reply to EHLO: 550 5.7.1 Go away");
        let seen = server.await.expect("server");
        assert_eq!(seen.commands, [b"EHLO d.example\r\n".to_vec()]);
        assert_eq!(seen.trailing, b"QUIT\r\n");
        assert_eq!(seen.end, Ok(()));
    }

    #[tokio::test]
    async fn quit_refused_is_a_wrong_status() {
        let (addr, server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220 mx\r\n").await;
            let _ = read_command(&mut stream).await;
            let _ = stream.write_all(b"250 mx\r\n").await;
            let _ = read_command(&mut stream).await;
            let _ = stream.write_all(b"500 5.5.2 What?\r\n").await;
            read_to_end(&mut stream).await
        })
        .await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        assert_eq!(result.status, CheckStatus::L7Sts);
        assert_eq!(result.code, Some(500));
        assert_eq!(result.detail, "reply to QUIT: 500 5.5.2 What?");
        // No second QUIT.
        assert_eq!(server.await.expect("server"), (Vec::new(), Ok(())));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let (addr, server) =
            serve_once(|mut stream: TcpStream| async move { read_to_end(&mut stream).await }).await;
        let short = CheckSpec {
            timeout: Duration::from_millis(200),
            ..smtp(SendProxy::V2)
        };
        let result = run_check(&short, addr).await;
        assert_eq!(result.status, CheckStatus::L7Tout, "{}", result.describe());
        assert_eq!(result.code, None);
        assert_eq!(result.detail, "no banner within 200ms");
        assert!(result.duration >= Duration::from_millis(200), "{result}");
        assert!(result.duration < Duration::from_millis(400), "{result}");
        let (bytes, end) = server.await.expect("server");
        assert_eq!(bytes.len(), 16, "only the PROXY header");
        assert_eq!(end, Ok(()));
    }

    #[tokio::test]
    async fn trickling_server_is_bounded_by_the_timeout() {
        let (addr, _server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220-").await;
            loop {
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
                sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let short = CheckSpec {
            timeout: Duration::from_millis(200),
            ..smtp(SendProxy::None)
        };
        let started = Instant::now();
        let result = run_check(&short, addr).await;
        assert_eq!(result.status, CheckStatus::L7Tout, "{}", result.describe());
        assert_eq!(result.detail, "incomplete banner after 200ms");
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test]
    async fn refused_port_is_a_connection_problem() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        for kind in [CheckType::Smtp, CheckType::Tcp] {
            let result = run_check(&spec(kind, SmtpVerb::Ehlo, SendProxy::V1), addr).await;
            assert_eq!(result.status, CheckStatus::L4Con);
            assert_eq!(result.code, None);
            assert_eq!(result.detail, "Connection refused");
            assert!(result.describe().starts_with("L4CON in "));
            assert!(result.describe().ends_with("ms: Connection refused"));
        }
    }

    /// A listener whose accept queue is full drops new SYNs, so connecting hangs.
    #[tokio::test]
    async fn unanswered_connect_times_out_at_layer_4() {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..3 {
            let attempt = tokio::time::timeout(SETTLE, TcpStream::connect(addr)).await;
            if let Ok(Ok(stream)) = attempt {
                fillers.push(stream);
            }
        }
        let short = CheckSpec {
            timeout: Duration::from_millis(200),
            ..smtp(SendProxy::None)
        };
        let result = run_check(&short, addr).await;
        assert_eq!(result.status, CheckStatus::L4Tout, "{}", result.describe());
        assert_eq!(result.detail, "connection timed out");
        assert!(result.duration >= Duration::from_millis(200));
        drop(listener);
    }

    #[tokio::test]
    async fn close_right_after_accept_is_an_invalid_response() {
        let (addr, server) = serve_once(|stream: TcpStream| async move { drop(stream) }).await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        server.await.expect("server");
        assert_eq!(result.status, CheckStatus::L7Rsp, "{}", result.describe());
        assert_eq!(
            result.detail,
            "connection closed by the server before the banner"
        );
    }

    #[tokio::test]
    async fn close_in_the_middle_of_a_reply_is_an_invalid_response() {
        let (addr, _server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220-mx\r\n").await;
        })
        .await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        assert_eq!(result.status, CheckStatus::L7Rsp, "{}", result.describe());
        assert_eq!(
            result.detail,
            "connection closed by the server in the middle of the banner"
        );
    }

    #[tokio::test]
    async fn close_instead_of_ehlo_reply_is_an_invalid_response() {
        let (addr, _server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220 mx\r\n").await;
            let _ = read_command(&mut stream).await;
        })
        .await;
        let result = run_check(&smtp(SendProxy::None), addr).await;
        assert_eq!(result.status, CheckStatus::L7Rsp, "{}", result.describe());
        assert_eq!(
            result.detail,
            "connection closed by the server before the reply to EHLO"
        );
    }

    async fn check_against(bytes: &'static [u8]) -> CheckResult {
        let (addr, _server) = serve_once(move |mut stream: TcpStream| async move {
            let _ = stream.write_all(bytes).await;
            let _ = read_to_end(&mut stream).await;
        })
        .await;
        run_check(&smtp(SendProxy::None), addr).await
    }

    #[tokio::test]
    async fn garbage_is_an_invalid_response() {
        let result = check_against(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        assert_eq!(result.status, CheckStatus::L7Rsp);
        assert_eq!(result.code, None);
        assert!(
            result
                .detail
                .starts_with("invalid banner: expected a reply code"),
            "{}",
            result.detail
        );
        assert!(result.duration < Duration::from_millis(100), "{result}");
    }

    #[tokio::test]
    async fn hostile_replies_are_invalid_responses() {
        static ENDLESS_LINE: [u8; 100_000] = [b'2'; 100_000];
        let many_lines: &'static [u8] = b"220-x\r\n".repeat(1000).leak();
        for bytes in [&ENDLESS_LINE[..], many_lines, b"220 hi\r\n250 unasked\r\n"] {
            let result = check_against(bytes).await;
            assert_eq!(result.status, CheckStatus::L7Rsp, "{}", result.describe());
        }
    }

    #[tokio::test]
    async fn tcp_check_passes_after_connect_and_header() {
        let (addr, server) = serve_once(|mut stream: TcpStream| async move {
            let _ = stream.write_all(b"220 mx ESMTP\r\n").await;
            let (bytes, end) = read_to_end(&mut stream).await;
            // Had the check closed with the banner unread, its kernel would have answered
            // with a reset by now, and this write would fail.
            sleep(SETTLE).await;
            let late = stream
                .write_all(b"421 late\r\n")
                .await
                .map_err(|e| e.kind());
            (bytes, end, late)
        })
        .await;
        let tcp = spec(CheckType::Tcp, SmtpVerb::Ehlo, SendProxy::V2);
        let result = run_check(&tcp, addr).await;
        assert_eq!(result.status, CheckStatus::L4Ok);
        assert_eq!(result.code, None);
        assert_eq!(result.describe(), result.to_string());
        let (bytes, end, late) = server.await.expect("server");
        assert_eq!(
            bytes,
            proxy_header::encode(ProxyVersion::V2, &ProxyHeader::Local)
        );
        assert_eq!(end, Ok(()));
        assert_eq!(late, Ok(()), "the check reset the connection");
    }

    #[tokio::test]
    async fn none_kind_passes_without_connecting() {
        let none = spec(CheckType::None, SmtpVerb::Ehlo, SendProxy::None);
        let nowhere = "127.0.0.1:9".parse().expect("addr");
        assert!(run_check(&none, nowhere).await.passed());
    }

    #[test]
    fn spec_from_config() {
        let check = Check {
            kind: CheckType::Smtp,
            verb: SmtpVerb::Ehlo,
            domain: "lb.example.com".to_owned(),
            inter: Duration::from_secs(2),
            fastinter: Duration::from_secs(1),
            downinter: Duration::from_secs(5),
            rise: 2,
            fall: 3,
            timeout: Duration::from_millis(1500),
        };
        let server = Server {
            name: "mail1".to_owned(),
            addr: "192.0.2.10:25".parse().expect("addr"),
            send_proxy: SendProxy::V1,
            weight: 1,
            backup: false,
            check: true,
            maxconn: 0,
        };
        assert_eq!(
            CheckSpec::from_config(&check, &server),
            Some(CheckSpec {
                kind: CheckType::Smtp,
                verb: SmtpVerb::Ehlo,
                domain: "lb.example.com".to_owned(),
                timeout: Duration::from_millis(1500),
                send_proxy: SendProxy::V1,
            })
        );
        let unchecked = Server {
            check: false,
            ..server.clone()
        };
        assert_eq!(CheckSpec::from_config(&check, &unchecked), None);
        let no_check = Check {
            kind: CheckType::None,
            ..check
        };
        assert_eq!(CheckSpec::from_config(&no_check, &server), None);
    }

    #[test]
    fn os_messages_lose_the_error_number() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(os_message(&refused), "connection refused");
        let raw = io::Error::from_raw_os_error(111);
        assert_eq!(os_message(&raw), "Connection refused");
    }
}
