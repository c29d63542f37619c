//! Log lines as syslog datagrams on a unix socket (`log_target = "syslog"`), one per
//! event, in the RFC 3164 or RFC 5424 format, the level mapped to the severity.
//!
//! A tracing-subscriber `MakeWriter`: the formatter writes each event's line into a
//! [`Datagram`], which sends it when dropped. The socket never blocks the daemon: a
//! message the socket cannot take at once (the syslog daemon is gone, or behind) goes to
//! stderr instead, after one attempt to reconnect (a restarted syslog daemon has a new
//! socket at the same path).

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{Syslog, SyslogFormat};

/// What every message's header says of the sender.
const APP_NAME: &str = "mxlb";

/// The syslog socket and the header fields that do not change.
pub struct SyslogWriter {
    path: PathBuf,
    socket: Mutex<UnixDatagram>,
    facility: u8,
    format: SyslogFormat,
    hostname: String,
    pid: u32,
}

impl SyslogWriter {
    /// Connects to the socket `syslog` names (an error if there is none).
    pub fn connect(syslog: &Syslog, hostname: String) -> io::Result<Arc<SyslogWriter>> {
        Ok(Arc::new(SyslogWriter {
            socket: Mutex::new(open(&syslog.socket)?),
            path: syslog.socket.clone(),
            facility: syslog.facility.code(),
            format: syslog.format,
            hostname,
            pid: std::process::id(),
        }))
    }

    /// Sends one message; on failure reconnects once, then falls back to stderr.
    fn send(&self, severity: u8, text: &[u8]) {
        let header = header(
            self.format,
            self.facility * 8 + severity,
            SystemTime::now(),
            &self.hostname,
            self.pid,
        );
        let mut message = header.into_bytes();
        message.extend_from_slice(trim_line(text));
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if socket.send(&message).is_ok() {
            return;
        }
        if let Ok(fresh) = open(&self.path) {
            *socket = fresh;
            if socket.send(&message).is_ok() {
                return;
            }
        }
        drop(socket);
        let _ = io::stderr().write_all(text);
    }
}

fn open(path: &Path) -> io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    socket.connect(path)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// RFC 5424's severities (6.2.1) for tracing's levels.
fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The line without its newline, nor the padding before a short level name (` INFO`).
fn trim_line(text: &[u8]) -> &[u8] {
    text.strip_suffix(b"\n").unwrap_or(text).trim_ascii_start()
}

/// The header before the message: `<PRI>` and the format's fields, in UTC.
fn header(format: SyslogFormat, pri: u8, now: SystemTime, hostname: &str, pid: u32) -> String {
    match format {
        // RFC 3164, 4.1.2: "Mmm dd hh:mm:ss", the day padded with a space.
        SyslogFormat::Rfc3164 => {
            let stamp = humantime::format_rfc3339_seconds(now).to_string();
            let month = stamp
                .get(5..7)
                .and_then(|m| m.parse::<usize>().ok())
                .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
                .unwrap_or(&"Jan");
            let day = stamp.get(8..10).unwrap_or("01").trim_start_matches('0');
            let time = stamp.get(11..19).unwrap_or("00:00:00");
            format!("<{pri}>{month} {day:>2} {time} {hostname} {APP_NAME}[{pid}]: ")
        }
        // RFC 5424, 6: VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA.
        SyslogFormat::Rfc5424 => {
            let stamp = humantime::format_rfc3339_micros(now);
            format!("<{pri}>1 {stamp} {hostname} {APP_NAME} {pid} - - ")
        }
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The `MakeWriter` the formatter is given.
#[derive(Clone)]
pub struct MakeSyslog(pub Arc<SyslogWriter>);

impl<'a> MakeWriter<'a> for MakeSyslog {
    type Writer = Datagram;

    fn make_writer(&'a self) -> Datagram {
        Datagram::new(self.0.clone(), severity(&Level::INFO))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Datagram {
        Datagram::new(self.0.clone(), severity(meta.level()))
    }
}

/// One event's line, sent as one message when dropped.
pub struct Datagram {
    writer: Arc<SyslogWriter>,
    severity: u8,
    text: Vec<u8>,
}

impl Datagram {
    fn new(writer: Arc<SyslogWriter>, severity: u8) -> Datagram {
        Datagram {
            writer,
            severity,
            text: Vec::new(),
        }
    }
}

impl Write for Datagram {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Datagram {
    fn drop(&mut self) {
        if !self.text.is_empty() {
            self.writer.send(self.severity, &self.text);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 2026-12-02T05:03:09.250001Z.
    fn instant() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_187_789_250_001)
    }

    #[test]
    fn rfc3164_header() {
        assert_eq!(
            header(SyslogFormat::Rfc3164, 22, instant(), "mx1", 42),
            "<22>Dec  2 05:03:09 mx1 mxlb[42]: "
        );
    }

    #[test]
    fn rfc5424_header() {
        assert_eq!(
            header(SyslogFormat::Rfc5424, 158, instant(), "mx1.example.com", 42),
            "<158>1 2026-12-02T05:03:09.250001Z mx1.example.com mxlb 42 - - "
        );
    }

    #[test]
    fn levels_map_to_severities() {
        let severities: Vec<u8> = [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG]
            .iter()
            .map(severity)
            .collect();
        assert_eq!(severities, [3, 4, 6, 7]);
    }

    #[test]
    fn a_datagram_is_the_line_after_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let syslog = Syslog {
            socket: path,
            facility: crate::config::Facility::Local3,
            format: SyslogFormat::Rfc5424,
        };
        let writer = SyslogWriter::connect(&syslog, "mx1".into()).unwrap();
        let mut datagram = MakeSyslog(writer).make_writer();
        datagram
            .write_all(b"INFO mxlb::daemon: ready pid=42\n")
            .unwrap();
        drop(datagram);
        let mut buffer = [0u8; 512];
        let n = receiver.recv(&mut buffer).unwrap();
        let text = String::from_utf8_lossy(&buffer[..n]);
        assert!(text.starts_with("<158>1 "), "{text}");
        assert!(
            text.ends_with(&format!(
                " mx1 mxlb {} - - INFO mxlb::daemon: ready pid=42",
                std::process::id()
            )),
            "{text}"
        );
    }
}
