//! Table headers written with the wrong brackets: `[listen.server]` for a server, or
//! `[[listen.check]]` for a check.
//!
//! toml and serde see such a file as a map where a list belongs (or the other way round)
//! and say `duplicate key` or `invalid type: map, expected a sequence`, which names neither
//! the header nor the fix. When a file fails to parse, its headers are looked at first, and
//! the first one written with the wrong brackets is reported instead, with how to write it.

/// Tables that are lists (one `[[…]]` per entry) and tables that appear once (`[…]`).
const ARRAYS: &[(&str, &str)] = &[("listen", "listeners"), ("listen.server", "servers")];
const SINGLE: &[(&str, &str)] = &[
    ("global", "the global settings"),
    ("stats", "the stats settings"),
    ("listen.check", "a listener's check settings"),
];

/// The first table header of `text` written with the wrong brackets: its byte offset and
/// a message that says how to write it.
pub(super) fn misbracketed(text: &str) -> Option<(usize, String)> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let indent = line.len() - line.trim_start().len();
        let Some((name, array)) = header(line.trim()) else {
            continue;
        };
        let known = |tables: &[(&str, &'static str)]| {
            tables
                .iter()
                .find(|(table, _)| *table == name)
                .map(|(_, what)| *what)
        };
        let message = match (array, known(ARRAYS), known(SINGLE)) {
            (false, Some(what), _) => format!(
                "[{name}] with single brackets: {what} are an array of tables, \
                 write [[{name}]] (one per entry)"
            ),
            (true, _, Some(what)) => {
                format!("[[{name}]] with double brackets: {what} are one table, write [{name}]")
            }
            _ => continue,
        };
        return Some((start + indent, message));
    }
    None
}

/// The dotted name of a table header line (spaces around the dots dropped) and whether it
/// is an array header (`[[…]]`); `None` for any other line.
fn header(line: &str) -> Option<(String, bool)> {
    let (inner, array) = match line.strip_prefix("[[") {
        Some(rest) => (rest.split_once("]]")?.0, true),
        None => (line.strip_prefix('[')?.split_once(']')?.0, false),
    };
    let name: Vec<&str> = inner.split('.').map(str::trim).collect();
    Some((name.join("."), array))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_brackets_for_a_list() {
        let text = "[[listen]]\nname = \"smtp\"\n  [ listen . server ] # mail1\nname = \"a\"\n";
        let (offset, message) = misbracketed(text).expect("found");
        assert_eq!(&text[offset..offset + 3], "[ l");
        assert_eq!(
            message,
            "[listen.server] with single brackets: servers are an array of tables, \
             write [[listen.server]] (one per entry)"
        );
        let (offset, message) = misbracketed("[global]\n[listen]\n").expect("found");
        assert_eq!(offset, 9);
        assert!(message.contains("write [[listen]]"), "{message}");
    }

    #[test]
    fn double_brackets_for_one_table() {
        let (offset, message) =
            misbracketed("[[listen]]\n[[listen.check]]\ninter = \"2s\"\n").expect("found");
        assert_eq!(offset, 11);
        assert_eq!(
            message,
            "[[listen.check]] with double brackets: a listener's check settings are one \
             table, write [listen.check]"
        );
        assert!(misbracketed("[[stats]]\n").is_some());
    }

    #[test]
    fn right_brackets_and_other_lines_pass() {
        let text = "[global]\n[stats]\n[[listen]]\nbind = [\"127.0.0.1:25\"]\n\
                    [listen.check]\n[[listen.server]]\n[[colour]]\n[shape]\n";
        assert_eq!(misbracketed(text), None);
    }
}
