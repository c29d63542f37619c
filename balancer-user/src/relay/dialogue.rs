//! Where an SMTP dialogue stands, as far as the bytes the daemon relayed tell: whether the
//! client is at a command boundary, so that the idle timeout may tell it `421` before
//! closing, as Postfix's smtpd does ("421 4.4.2 host Error: timeout exceeded").
//!
//! mxlb relays opaque bytes and must never put a byte of its own into the middle of a
//! reply, or into a message. So the `421` goes out only when every sign says the client
//! waits at a boundary:
//!
//! - the server spoke last: the last bytes the client was given end a *final* reply line
//!   (`250 ok\r\n`, not a `250-` continuation, not half a line), and the client has sent
//!   nothing since. A client that sent a command (the end of a message, a BDAT chunk) waits
//!   for its reply, which the server may still give: a `421` in its place would have the
//!   client retry a message the server accepted;
//! - the client is not inside DATA: no `354` reply without the `\r\n.\r\n` that ends the
//!   message after it;
//! - the stream is plain SMTP: the server's first line was a `220` greeting (not TLS from
//!   the first byte, as on port 465), and no `STARTTLS` was accepted (after it the bytes
//!   are TLS records, not lines).
//!
//! It sees only what the daemon relayed itself: a connection the kernel relayed any byte
//! of is never told (the caller checks that), nor one with bytes still unread on either
//! socket (the caller checks that too).

/// The dialogue, fed with every byte the daemon relayed, in order, each way.
#[derive(Debug, Default)]
pub struct Dialogue {
    /// The first bytes of the server's current reply line (code and separator).
    reply_start: [u8; 4],
    /// How many of `reply_start` the current line filled (at most 4).
    reply_len: usize,
    /// The server's bytes so far end a final reply line.
    reply_done: bool,
    /// The client sent bytes after the server's last final reply line.
    client_spoke_last: bool,
    /// The client's bytes end in the middle of a line (a reply in between does not change
    /// that: the client is still typing its command).
    client_mid_line: bool,
    /// A `354` was the last final reply and the client has not ended its message yet.
    in_data: bool,
    /// The client's last bytes: the end of a message (`\r\n.\r\n`), a `STARTTLS`.
    client_tail: [u8; 10],
    /// The server has ended a line before (its first one must be the greeting).
    greeted: bool,
    /// No longer plain SMTP lines: TLS from the start, or after an accepted `STARTTLS`.
    opaque: bool,
}

const END_OF_DATA: &[u8; 5] = b"\r\n.\r\n";
const STARTTLS: &[u8; 10] = b"STARTTLS\r\n";

impl Dialogue {
    /// Bytes the daemon passed from the server to the client. Only the last line that
    /// ends in them can matter (and the start of the one after it), so a chunk is looked
    /// at from its end: a bulk transfer costs one scan for a newline, not a step per byte.
    pub fn server_said(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        if !self.greeted {
            // The first line decides whether this is SMTP at all: look at it whole.
            let Some(first_newline) = bytes.iter().position(|&b| b == b'\n') else {
                self.continue_line(bytes);
                return;
            };
            self.continue_line(&bytes[..first_newline]);
            self.line_ended();
            bytes = &bytes[first_newline + 1..];
            if bytes.is_empty() {
                return;
            }
        }
        let Some(last_newline) = bytes.iter().rposition(|&b| b == b'\n') else {
            self.continue_line(bytes);
            return;
        };
        let (line, after) = (&bytes[..last_newline], &bytes[last_newline + 1..]);
        match line.iter().rposition(|&b| b == b'\n') {
            // The line began in this chunk.
            Some(previous) => {
                self.reply_start = [0; 4];
                self.reply_len = 0;
                self.continue_line(&line[previous + 1..]);
            }
            // It began in an earlier one.
            None => self.continue_line(line),
        }
        self.reply_done = false;
        self.line_ended();
        self.continue_line(after);
    }

    /// More bytes of the server's current line (no newline among them).
    fn continue_line(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        for &byte in bytes
            .iter()
            .take(self.reply_start.len().saturating_sub(self.reply_len))
        {
            self.reply_start[self.reply_len] = byte;
            self.reply_len += 1;
        }
        self.reply_done = false;
    }

    /// A reply line ended: final unless the byte after the code is `-`.
    fn line_ended(&mut self) {
        let [a, b, c, separator] = self.reply_start;
        let code = [a, b, c];
        let final_line = code.iter().all(u8::is_ascii_digit) && separator != b'-';
        if !self.greeted && code != *b"220" {
            // Not an SMTP greeting: TLS from the first byte, or not SMTP at all.
            self.opaque = true;
        }
        self.greeted = true;
        if final_line {
            if a == b'2' && self.client_tail.eq_ignore_ascii_case(STARTTLS) {
                // The client's last command was STARTTLS and the server agreed: TLS follows.
                self.opaque = true;
            }
            self.reply_done = true;
            self.client_spoke_last = false;
            self.in_data = code == *b"354";
        }
        self.reply_len = 0;
        self.reply_start = [0; 4];
    }

    /// Bytes the daemon passed from the client to the server.
    pub fn client_said(&mut self, bytes: &[u8]) {
        let Some(&last) = bytes.last() else {
            return;
        };
        self.client_spoke_last = true;
        self.client_mid_line = last != b'\n';
        let keep = bytes.len().min(self.client_tail.len());
        self.client_tail.rotate_left(keep);
        let tail_len = self.client_tail.len();
        self.client_tail[tail_len - keep..].copy_from_slice(&bytes[bytes.len() - keep..]);
        if self.in_data && self.client_tail.ends_with(END_OF_DATA) {
            self.in_data = false;
        }
    }

    /// Whether a reply of the daemon's own would reach the client between two exchanges.
    pub fn at_command_boundary(&self) -> bool {
        self.reply_done
            && !self.client_spoke_last
            && !self.client_mid_line
            && !self.in_data
            && !self.opaque
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dialogue fed with `(from_server, bytes)` in order.
    fn after(exchanges: &[(bool, &str)]) -> Dialogue {
        let mut dialogue = Dialogue::default();
        for (from_server, bytes) in exchanges {
            if *from_server {
                dialogue.server_said(bytes.as_bytes());
            } else {
                dialogue.client_said(bytes.as_bytes());
            }
        }
        dialogue
    }

    const S: bool = true;
    const C: bool = false;

    #[test]
    fn after_a_complete_reply_the_client_is_at_a_boundary() {
        assert!(after(&[(S, "220 mx ESMTP\r\n")]).at_command_boundary());
        assert!(
            after(&[
                (S, "220 mx\r\n"),
                (C, "EHLO a\r\n"),
                (S, "250-mx\r\n250 8BITMIME\r\n")
            ])
            .at_command_boundary()
        );
        // A reply in pieces, complete at last.
        assert!(after(&[(S, "2"), (S, "20 m"), (S, "x\r"), (S, "\n")]).at_command_boundary());
        assert!(after(&[(S, "220\r\n")]).at_command_boundary());
        // A whole dialogue's replies in one chunk: the last line decides.
        assert!(after(&[(S, "220 mx\r\n250-mx\r\n250 ok\r\n")]).at_command_boundary());
        assert!(!after(&[(S, "220 mx\r\n250 ok\r\n250-mx\r\n")]).at_command_boundary());
        assert!(!after(&[(S, "250 ok\r\n\n")]).at_command_boundary());
        // Bulk bytes without a newline, then the end of a line.
        let mut bulk = b"220 mx\r\n".to_vec();
        bulk.extend(vec![b'x'; 64 * 1024]);
        bulk.extend_from_slice(b"\r\n250 done\r\n");
        let mut dialogue = Dialogue::default();
        dialogue.server_said(&bulk);
        assert!(dialogue.at_command_boundary());
    }

    #[test]
    fn nothing_is_said_before_the_banner_or_inside_a_reply() {
        assert!(!after(&[]).at_command_boundary());
        assert!(!after(&[(S, "220 mx ESM")]).at_command_boundary());
        // A multi-line reply whose last line has not come yet.
        assert!(
            !after(&[(S, "220 mx\r\n"), (C, "EHLO a\r\n"), (S, "250-mx\r\n")])
                .at_command_boundary()
        );
        assert!(!after(&[(S, "250-mx\r\n250 8BIT")]).at_command_boundary());
    }

    #[test]
    fn nothing_is_said_while_the_client_is_in_the_middle_of_a_line() {
        assert!(!after(&[(S, "220 mx\r\n"), (C, "EHLO exa")]).at_command_boundary());
        assert!(!after(&[(S, "220 mx\r\n"), (C, "EHLO a\r")]).at_command_boundary());
        assert!(
            !after(&[(S, "220 mx\r\n"), (C, "EHLO a"), (S, "250 ok\r\n")]).at_command_boundary()
        );
    }

    #[test]
    fn nothing_is_said_inside_data_until_the_message_ends() {
        let data = [(S, "220 mx\r\n"), (C, "DATA\r\n"), (S, "354 go ahead\r\n")];
        assert!(!after(&data).at_command_boundary());
        // Pipelined replies ending with the 354.
        assert!(!after(&[(S, "250 ok\r\n250 ok\r\n354 go\r\n")]).at_command_boundary());
        let mut in_message = data.to_vec();
        in_message.push((C, "Subject: x\r\n\r\nline\r\n"));
        assert!(!after(&in_message).at_command_boundary());
        // The end of the message, split across reads: the client waits for the server's
        // verdict on it, which only its reply ends.
        let mut ended = in_message.clone();
        ended.extend([(C, "\r\n."), (C, "\r\n")]);
        assert!(!after(&ended).at_command_boundary());
        ended.push((S, "250 queued\r\n"));
        assert!(after(&ended).at_command_boundary());
        // An empty message: the DATA command's own CRLF starts the terminator.
        let mut empty = data.to_vec();
        empty.extend([(C, ".\r\n"), (S, "250 queued\r\n")]);
        assert!(after(&empty).at_command_boundary());
    }

    #[test]
    fn nothing_is_said_while_a_command_waits_for_its_reply() {
        // The server may still answer: a 421 in its place could turn an accepted message
        // into a retried one.
        assert!(!after(&[(S, "220 mx\r\n"), (C, "NOOP\r\n")]).at_command_boundary());
        // A BDAT chunk, whole or not: its reply has not come.
        let bdat = [(S, "220 mx\r\n"), (C, "BDAT 5 LAST\r\nhello")];
        assert!(!after(&bdat).at_command_boundary());
        // Pipelined commands, the first answered: the server spoke last.
        let pipelined = [
            (S, "220 mx\r\n"),
            (C, "MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
            (S, "250 ok\r\n"),
        ];
        assert!(after(&pipelined).at_command_boundary());
    }

    #[test]
    fn nothing_is_said_into_tls() {
        // STARTTLS accepted: what follows are TLS records, never a place for a line.
        let tls = [
            (S, "220 mx\r\n"),
            (C, "EHLO a\r\n"),
            (S, "250-mx\r\n250 STARTTLS\r\n"),
            (C, "starttls\r\n"),
            (S, "220 2.0.0 Ready to start TLS\r\n"),
        ];
        assert!(!after(&tls).at_command_boundary());
        let mut later = tls.to_vec();
        later.extend([
            (C, "\x16\x03\x01 hello\n"),
            (S, "250 looks like a line\r\n"),
        ]);
        assert!(!after(&later).at_command_boundary());
        // STARTTLS refused: still plain SMTP.
        let refused = [
            (S, "220 mx\r\n"),
            (C, "STARTTLS\r\n"),
            (S, "454 4.7.0 not now\r\n"),
        ];
        assert!(after(&refused).at_command_boundary());
        // TLS from the first byte (port 465): no 220 greeting, never plain lines.
        assert!(
            !after(&[(S, "\x16\x03\x03 server hello\r\n"), (S, "250 x\r\n")]).at_command_boundary()
        );
    }
}
