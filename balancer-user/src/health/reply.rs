//! SMTP replies (RFC 5321 section 4.2), parsed from bytes a server sent.
//!
//! A reply is one or more lines `NNN-text` ending with a line `NNN text` (or a bare
//! `NNN`), all with the same three-digit code. The parser is what HAProxy's `smtpchk`
//! expect rules (`^[0-9]{3}[ \r]`, `^(2xx-…\r\n)*2xx[ \r]`) amount to, made strict enough
//! that a health check can tell a mail server from anything else on the port:
//!
//! - Lines end with CRLF; a bare LF is accepted too, as most clients do.
//! - The code's first digit is 2 to 5 and all three are digits: SMTP has no 1yz replies,
//!   and anything else means the peer does not speak SMTP.
//! - Every line of a reply carries the same code.
//! - Limits keep a hostile server from growing our buffers: a line (line ending included)
//!   is at most [`MAX_LINE_LEN`] bytes, a reply at most [`MAX_LINES`] lines and
//!   [`MAX_REPLY_LEN`] bytes. RFC 5321 allows 512 bytes per line; real servers stay far
//!   below these limits.
//!
//! Violations are reported as soon as the bytes that prove them arrive, so a peer that
//! sends garbage fails the check at once instead of at the timeout. Nothing here panics,
//! whatever the input.

use std::fmt;

/// Longest accepted reply line, line ending included.
pub const MAX_LINE_LEN: usize = 2048;

/// Most lines in one reply (EHLO replies have about a dozen).
pub const MAX_LINES: usize = 64;

/// Most bytes in one reply.
pub const MAX_REPLY_LEN: usize = 64 * 1024;

/// How much of a reply line [`Reply::summary`] keeps, for log lines.
const SUMMARY_LEN: usize = 200;

/// How much of an offending line error messages quote.
const QUOTE_LEN: usize = 32;

/// One complete SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 200 to 599.
    pub code: u16,
    /// The text of each line after the code and its separator, without the line ending
    /// (`"mx.example.com ESMTP"` for `220 mx.example.com ESMTP\r\n`). Invalid UTF-8 is
    /// replaced, since the text is only shown to people.
    pub lines: Vec<String>,
}

impl Reply {
    /// A 2xx reply: the only kind a health check accepts.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The code and the first line, safe for a log line: `421 4.3.2 Service shutting
    /// down`. Control characters are replaced and long text is cut, because the text
    /// comes from the network.
    pub fn summary(&self) -> String {
        let text = self.lines.first().map_or("", |line| line.trim());
        let mut summary = self.code.to_string();
        if !text.is_empty() {
            summary.push(' ');
            summary.extend(
                text.chars()
                    .take(SUMMARY_LEN)
                    .map(|c| if c.is_control() { '?' } else { c }),
            );
        }
        summary
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// What the bytes received so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyParse {
    /// A valid beginning: read more.
    Incomplete,
    /// A whole reply; it took the first `consumed` bytes of the buffer.
    Complete { reply: Reply, consumed: usize },
    /// Not an SMTP reply, whatever follows; the reason is meant for logs.
    Invalid(String),
}

/// Parses the reply at the start of `buf`.
pub fn parse_reply(buf: &[u8]) -> ReplyParse {
    ReplyParser::default().parse(buf)
}

/// [`parse_reply`] for a buffer that grows as bytes arrive: each call resumes after the
/// lines already parsed instead of starting over, so a server that trickles a big reply
/// byte by byte costs linear time, not quadratic.
///
/// Call [`ReplyParser::parse`] with the same buffer, only ever extended, until it answers
/// something other than [`ReplyParse::Incomplete`]; then start a new parser for the next
/// reply.
#[derive(Debug, Default)]
pub struct ReplyParser {
    /// The code of the first line, once it is known.
    code: Option<[u8; 3]>,
    /// Texts of the lines parsed so far.
    lines: Vec<String>,
    /// Where the next line starts in the buffer.
    line_start: usize,
}

impl ReplyParser {
    pub fn new() -> ReplyParser {
        ReplyParser::default()
    }

    /// Parses as far as `buf` allows; see [`ReplyParser`] for how to call it.
    pub fn parse(&mut self, buf: &[u8]) -> ReplyParse {
        loop {
            if self.lines.len() >= MAX_LINES {
                return invalid(format!("reply has more than {MAX_LINES} lines"));
            }
            let rest = buf.get(self.line_start..).unwrap_or_default();
            let line = match next_line(rest) {
                Ok(line) => line,
                Err(why) => return invalid(why),
            };
            let at_least = line.len() + usize::from(!ends_line(line));
            if self.line_start + at_least > MAX_REPLY_LEN {
                return invalid(format!("reply longer than {MAX_REPLY_LEN} bytes"));
            }
            let parsed = match parse_line(line, self.code) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return ReplyParse::Incomplete,
                Err(why) => return invalid(why),
            };
            self.code = Some(parsed.code);
            self.lines
                .push(String::from_utf8_lossy(parsed.text).into_owned());
            self.line_start += line.len();
            if parsed.last {
                return ReplyParse::Complete {
                    reply: Reply {
                        code: code_number(parsed.code),
                        lines: std::mem::take(&mut self.lines),
                    },
                    consumed: self.line_start,
                };
            }
        }
    }
}

fn invalid(why: String) -> ReplyParse {
    ReplyParse::Invalid(why)
}

/// The first line of `rest`, line ending included, or all of `rest` if no line ending
/// has arrived yet. Only the first [`MAX_LINE_LEN`] bytes are looked at.
fn next_line(rest: &[u8]) -> Result<&[u8], String> {
    let window = rest.get(..MAX_LINE_LEN).unwrap_or(rest);
    match window.iter().position(|&byte| byte == b'\n') {
        Some(newline) => Ok(window.get(..=newline).unwrap_or(window)),
        // A line without its LF within the limit can only end beyond it.
        None if rest.len() >= MAX_LINE_LEN => {
            Err(format!("reply line longer than {MAX_LINE_LEN} bytes"))
        }
        None => Ok(rest),
    }
}

fn ends_line(line: &[u8]) -> bool {
    line.last() == Some(&b'\n')
}

/// A reply line that has been checked.
struct Line<'a> {
    code: [u8; 3],
    /// `NNN ` or `NNN\r\n` rather than `NNN-`.
    last: bool,
    /// After the separator, without the line ending.
    text: &'a [u8],
}

/// Checks one line (`line` is complete when it ends with LF). `Ok(None)` means the bytes
/// so far are a valid beginning. `expected` is the code of the reply's first line.
fn parse_line(line: &[u8], expected: Option<[u8; 3]>) -> Result<Option<Line<'_>>, String> {
    let Some(code) = parse_code(line, expected)? else {
        return Ok(None);
    };
    let last = match (line.get(3), line.get(4)) {
        (None, _) => return Ok(None),
        (Some(b' ' | b'\n'), _) | (Some(b'\r'), Some(b'\n')) => true,
        (Some(b'-'), _) => false,
        (Some(b'\r'), None) => return Ok(None),
        (Some(b'\r'), Some(_)) => {
            return Err(format!("CR not followed by LF in {}", quote(line)));
        }
        (Some(_), _) => {
            return Err(format!(
                "expected a space or '-' after the reply code in {}",
                quote(line)
            ));
        }
    };
    if !ends_line(line) {
        return Ok(None);
    }
    let text = line.get(4..).unwrap_or_default();
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    Ok(Some(Line { code, last, text }))
}

/// The three code digits at the start of `line`, checked as far as they have arrived.
fn parse_code(line: &[u8], expected: Option<[u8; 3]>) -> Result<Option<[u8; 3]>, String> {
    let mut code = [0u8; 3];
    for (index, digit) in code.iter_mut().enumerate() {
        let Some(&byte) = line.get(index) else {
            return Ok(None);
        };
        let valid = match index {
            0 => (b'2'..=b'5').contains(&byte),
            _ => byte.is_ascii_digit(),
        };
        if !valid {
            return Err(format!(
                "expected a reply code from 200 to 599 in {}",
                quote(line)
            ));
        }
        if let Some(expected) = expected
            && expected.get(index) != Some(&byte)
        {
            return Err(format!(
                "reply lines carry different codes: {} then {}",
                code_number(expected),
                quote(line)
            ));
        }
        *digit = byte;
    }
    Ok(Some(code))
}

fn code_number(digits: [u8; 3]) -> u16 {
    digits
        .iter()
        .fold(0, |number, digit| number * 10 + u16::from(digit - b'0'))
}

/// The start of an offending line, escaped for a log line.
fn quote(line: &[u8]) -> String {
    let shown = line.get(..QUOTE_LEN).unwrap_or(line);
    let ellipsis = if shown.len() < line.len() { "…" } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(code: u16, lines: &[&str], consumed: usize) -> ReplyParse {
        ReplyParse::Complete {
            reply: Reply {
                code,
                lines: lines.iter().map(|line| (*line).to_owned()).collect(),
            },
            consumed,
        }
    }

    fn is_invalid(parse: &ReplyParse) -> bool {
        matches!(parse, ReplyParse::Invalid(_))
    }

    const EHLO: &[u8] = b"250-mx.example.com Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
                          250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n";

    #[test]
    fn single_line() {
        let banner = b"220 mx.example.com ESMTP Postfix\r\n";
        assert_eq!(
            parse_reply(banner),
            complete(220, &["mx.example.com ESMTP Postfix"], banner.len())
        );
    }

    #[test]
    fn multi_line_ehlo() {
        assert_eq!(
            parse_reply(EHLO),
            complete(
                250,
                &[
                    "mx.example.com Hello",
                    "PIPELINING",
                    "SIZE 10240000",
                    "ENHANCEDSTATUSCODES",
                    "8BITMIME"
                ],
                EHLO.len()
            )
        );
    }

    #[test]
    fn bare_lf_and_bare_codes() {
        assert_eq!(
            parse_reply(b"250-a\n250 b\n"),
            complete(250, &["a", "b"], 12)
        );
        assert_eq!(parse_reply(b"221\r\n"), complete(221, &[""], 5));
        assert_eq!(parse_reply(b"221\n"), complete(221, &[""], 4));
        assert_eq!(
            parse_reply(b"250-\r\n250 \r\n"),
            complete(250, &["", ""], 12)
        );
    }

    #[test]
    fn bytes_after_the_reply_are_left_alone() {
        assert_eq!(
            parse_reply(b"220 hi\r\n250 next\r\n"),
            complete(220, &["hi"], 8)
        );
        assert_eq!(parse_reply(b"220 hi\r\n25"), complete(220, &["hi"], 8));
    }

    #[test]
    fn mixed_codes_are_invalid() {
        for bytes in [
            &b"250-a\r\n251 b\r\n"[..],
            b"250-a\r\n350 b\r\n",
            b"250-a\r\n24",
        ] {
            let parse = parse_reply(bytes);
            assert!(is_invalid(&parse), "{parse:?}");
        }
        let ReplyParse::Invalid(why) = parse_reply(b"250-a\r\n251 b\r\n") else {
            panic!("mixed codes accepted");
        };
        assert!(why.contains("different codes"), "{why}");
    }

    #[test]
    fn bad_codes_are_invalid() {
        for bytes in [
            &b"099 no\r\n"[..],
            b"199 no\r\n",
            b"600 no\r\n",
            b"2x0 no\r\n",
            b"25 no\r\n",
            b"2500 no\r\n",
            b" 250 no\r\n",
            b"\r\n",
            b"\n",
            b"HTTP/1.1 400 Bad Request\r\n",
        ] {
            let parse = parse_reply(bytes);
            assert!(
                is_invalid(&parse),
                "{:?}: {parse:?}",
                bytes.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn missing_separator_is_invalid() {
        for bytes in [
            &b"250mx\r\n"[..],
            b"250_mx\r\n",
            b"250\tmx\r\n",
            b"250\rmx\r\n",
            b"250-a\r\n250b\r\n",
        ] {
            let parse = parse_reply(bytes);
            assert!(
                is_invalid(&parse),
                "{:?}: {parse:?}",
                bytes.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn invalid_as_soon_as_it_is_certain() {
        // No line ending yet, but the bytes can no longer become a reply.
        assert!(is_invalid(&parse_reply(b"H")));
        assert!(is_invalid(&parse_reply(b"6")));
        assert!(is_invalid(&parse_reply(b"22x")));
        assert!(is_invalid(&parse_reply(b"220x")));
        assert!(is_invalid(&parse_reply(b"220\rx")));
        assert!(is_invalid(&parse_reply(b"250-a\r\n4")));
    }

    #[test]
    fn partial_reads_at_every_byte_boundary() {
        for len in 0..EHLO.len() {
            assert_eq!(parse_reply(&EHLO[..len]), ReplyParse::Incomplete, "{len}");
        }
        let mut parser = ReplyParser::new();
        for len in 0..EHLO.len() {
            assert_eq!(parser.parse(&EHLO[..len]), ReplyParse::Incomplete, "{len}");
        }
        assert_eq!(parser.parse(EHLO), parse_reply(EHLO));
        assert!(matches!(parse_reply(EHLO), ReplyParse::Complete { .. }));
        assert_eq!(parse_reply(b"221\r"), ReplyParse::Incomplete);
    }

    #[test]
    fn line_length_limit() {
        let mut line = b"250 ".to_vec();
        line.resize(MAX_LINE_LEN - 2, b'a');
        line.extend_from_slice(b"\r\n");
        assert!(matches!(parse_reply(&line), ReplyParse::Complete { .. }));

        let mut long = b"250 ".to_vec();
        long.resize(MAX_LINE_LEN - 1, b'a');
        long.extend_from_slice(b"\r\n");
        assert!(is_invalid(&parse_reply(&long)));
        // Without its line ending, a line is refused once it cannot fit any more.
        assert_eq!(
            parse_reply(&long[..MAX_LINE_LEN - 1]),
            ReplyParse::Incomplete
        );
        assert!(is_invalid(&parse_reply(&long[..MAX_LINE_LEN])));
        assert!(is_invalid(&parse_reply(&vec![b'2'; 1 << 20])));
    }

    #[test]
    fn line_count_limit() {
        let mut reply = b"250-x\r\n".repeat(MAX_LINES - 1);
        reply.extend_from_slice(b"250 x\r\n");
        assert!(matches!(parse_reply(&reply), ReplyParse::Complete { .. }));

        let too_many = b"250-x\r\n".repeat(MAX_LINES);
        assert!(is_invalid(&parse_reply(&too_many)));
    }

    #[test]
    fn reply_size_limit() {
        // 40 lines of 2000 bytes: few enough lines, but more than 64 KiB.
        let mut line = b"250-".to_vec();
        line.resize(1998, b'a');
        line.extend_from_slice(b"\r\n");
        let big = line.repeat(40);
        let ReplyParse::Invalid(why) = parse_reply(&big) else {
            panic!("oversized reply accepted");
        };
        assert!(why.contains("longer than"), "{why}");
        let fits = line.repeat(32);
        assert_eq!(parse_reply(&fits), ReplyParse::Incomplete);
    }

    #[test]
    fn summary_is_safe_for_logs() {
        let reply = Reply {
            code: 421,
            lines: vec![
                "4.3.2 Service\tshutting down\u{1b}[2J".to_owned(),
                "x".into(),
            ],
        };
        assert_eq!(reply.summary(), "421 4.3.2 Service?shutting down?[2J");
        let bare = Reply {
            code: 221,
            lines: vec![String::new()],
        };
        assert_eq!(bare.to_string(), "221");
        let long = Reply {
            code: 250,
            lines: vec!["a".repeat(5000)],
        };
        assert_eq!(long.summary().len(), 4 + SUMMARY_LEN);
        assert!(reply.summary().starts_with("421") && !reply.is_positive());
        assert!(bare.is_positive());
    }

    use crate::test_support::XorShift;

    fn mutate(bytes: &mut Vec<u8>, rng: &mut XorShift) {
        const INTERESTING: [u8; 12] = [
            b'\r', b'\n', b' ', b'-', b'0', b'1', b'2', b'5', b'6', b'9', 0x00, 0xFF,
        ];
        let at = rng.below(bytes.len() + 1);
        let byte = match rng.below(2) {
            0 => INTERESTING[rng.below(INTERESTING.len())],
            _ => (rng.next() & 0xFF) as u8,
        };
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 => {
                let end = (at + rng.below(16)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => bytes.truncate(at),
        }
    }

    /// Feeds every prefix: `Incomplete` may become anything, `Invalid` stays invalid, a
    /// complete reply stays the same, and the incremental parser agrees with
    /// `parse_reply` at every step.
    fn check_consistent(bytes: &[u8]) {
        let mut previous = ReplyParse::Incomplete;
        let mut parser = ReplyParser::new();
        let mut parser_done = false;
        for len in 0..=bytes.len() {
            let prefix = &bytes[..len];
            let result = parse_reply(prefix);
            match (&previous, &result) {
                (ReplyParse::Incomplete, _) | (ReplyParse::Invalid(_), ReplyParse::Invalid(_)) => {}
                (ReplyParse::Complete { .. }, _) => assert_eq!(previous, result, "{bytes:?}"),
                _ => panic!("{previous:?} then {result:?} for {prefix:?}"),
            }
            if let ReplyParse::Complete { consumed, reply } = &result {
                assert!(*consumed <= len && *consumed > 0, "{bytes:?}");
                assert!((200..600).contains(&reply.code), "{bytes:?}");
            }
            if !parser_done {
                let incremental = parser.parse(prefix);
                assert_eq!(incremental, result, "incremental parse of {prefix:?}");
                parser_done = incremental != ReplyParse::Incomplete;
            }
            previous = result;
        }
    }

    #[test]
    fn mutations_never_panic() {
        let seeds: [&[u8]; 5] = [
            EHLO,
            b"220 mx.example.com ESMTP\r\n",
            b"220-first\n220-second\n220 third\n",
            b"421\r\n",
            b"554 5.7.1 No SMTP service here\r\n",
        ];
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for seed in seeds {
            check_consistent(seed);
            for _ in 0..3000 {
                let mut bytes = seed.to_vec();
                for _ in 0..=rng.below(4) {
                    mutate(&mut bytes, &mut rng);
                }
                check_consistent(&bytes);
            }
        }
    }

    #[test]
    fn every_short_input_is_handled() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let _ = parse_reply(&[a, b]);
                let _ = parse_reply(&[b'2', b'5', b'0', a, b]);
                let _ = parse_reply(&[b'2', b'5', b'0', b'-', b'\n', a, b]);
            }
        }
    }
}
