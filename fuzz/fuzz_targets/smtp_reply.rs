//! SMTP replies, as a health check reads them from a server (or whatever listens on its
//! port).
//!
//! The incremental [`ReplyParser`] is fed the same bytes in three chunkings (one byte at
//! a time, chunk sizes taken from the data itself, all at once) and must agree with
//! [`parse_reply`] on the bytes it had when it stopped asking for more. Agreeing means the
//! same reply and length, or both invalid: an error message quotes the offending line as
//! far as it has arrived, so its text depends on the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxlb::health::reply::{MAX_LINES, ReplyParse, ReplyParser, parse_reply};

fuzz_target!(|data: &[u8]| {
    let whole = parse_reply(data);
    check(&whole, data.len());

    let byte_by_byte = std::iter::repeat_n(1, data.len());
    let data_driven = data.iter().map(|&b| 1 + usize::from(b % 13));
    agree(&incremental(data, byte_by_byte), &whole, "byte by byte");
    agree(
        &incremental(data, data_driven),
        &whole,
        "data-driven chunks",
    );
    agree(&incremental(data, [data.len()]), &whole, "one chunk");
});

/// Feeds `data` to one parser in chunks of the given sizes, checking each answer other
/// than "incomplete" against `parse_reply` of the same prefix. Returns what `parse_reply`
/// of the whole buffer must also say: a reply or an error found early holds whatever
/// follows.
fn incremental(data: &[u8], chunks: impl IntoIterator<Item = usize>) -> ReplyParse {
    let mut parser = ReplyParser::new();
    let mut end = 0;
    for size in chunks {
        end = (end + size).min(data.len());
        let answer = parser.parse(&data[..end]);
        if answer != ReplyParse::Incomplete {
            agree(&answer, &parse_reply(&data[..end]), "same prefix");
            return answer;
        }
        if end == data.len() {
            break;
        }
    }
    ReplyParse::Incomplete
}

fn agree(a: &ReplyParse, b: &ReplyParse, how: &str) {
    match (a, b) {
        (ReplyParse::Invalid(_), ReplyParse::Invalid(_)) => {}
        _ => assert_eq!(a, b, "{how}"),
    }
}

fn check(answer: &ReplyParse, len: usize) {
    if let ReplyParse::Complete { reply, consumed } = answer {
        assert!(*consumed <= len, "consumed {consumed} of {len}");
        assert!((200..600).contains(&reply.code), "code {}", reply.code);
        assert!((1..=MAX_LINES).contains(&reply.lines.len()));
        assert!(!reply.summary().contains(['\r', '\n']));
    }
}
