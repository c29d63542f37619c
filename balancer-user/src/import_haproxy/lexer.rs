//! haproxy.cfg lines into words, the way HAProxy's own line parser splits them: blanks
//! separate words, `#` starts a comment, backslash escapes a character, double quotes keep
//! blanks (with escapes), single quotes keep everything literally.

/// One meaningful line of the file: its words, and where and what it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Line {
    /// 1-based, as editors and the unmapped report count.
    pub number: usize,
    /// The line as written, trimmed: what the report quotes.
    pub text: String,
    /// The words, or why the line cannot be split into any.
    pub words: Result<Vec<String>, LexError>,
}

/// Why a line cannot be read at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum LexError {
    UnterminatedQuote,
    /// `${NAME}` or `$NAME`: the value lives in HAProxy's environment, not in the file.
    EnvironmentVariable,
}

impl LexError {
    pub fn reason(&self) -> &'static str {
        match self {
            LexError::UnterminatedQuote => "unterminated quote",
            LexError::EnvironmentVariable => {
                "uses an environment variable: its value is only known to HAProxy's process; \
                 write the value itself"
            }
        }
    }
}

/// Every line that holds at least one word; blank and comment-only lines are skipped.
pub(super) fn lines(text: &str) -> Vec<Line> {
    text.lines()
        .enumerate()
        .filter_map(|(index, raw)| {
            let words = words(raw);
            match &words {
                Ok(found) if found.is_empty() => None,
                _ => Some(Line {
                    number: index + 1,
                    text: raw.trim().to_owned(),
                    words,
                }),
            }
        })
        .collect()
}

/// The words of one line.
pub(super) fn words(line: &str) -> Result<Vec<String>, LexError> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word may be empty yet present (`""`), so presence is tracked apart from content.
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' => break,
            '\\' => {
                in_word = true;
                if let Some(escaped) = chars.next() {
                    word.push(unescape(escaped));
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(inner) => word.push(inner),
                        None => return Err(LexError::UnterminatedQuote),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            let escaped = chars.next().ok_or(LexError::UnterminatedQuote)?;
                            word.push(unescape(escaped));
                        }
                        Some('$') if starts_variable(chars.peek()) => {
                            return Err(LexError::EnvironmentVariable);
                        }
                        Some(inner) => word.push(inner),
                        None => return Err(LexError::UnterminatedQuote),
                    }
                }
            }
            '$' if starts_variable(chars.peek()) => return Err(LexError::EnvironmentVariable),
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `\r`, `\n` and `\t` are control characters; any other escaped character is itself
/// (`\ `, `\#`, `\\`, `\"`, `\'`).
fn unescape(c: char) -> char {
    match c {
        'r' => '\r',
        'n' => '\n',
        't' => '\t',
        other => other,
    }
}

fn starts_variable(next: Option<&char>) -> bool {
    next.is_some_and(|c| *c == '{' || c.is_ascii_alphabetic() || *c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(line: &str) -> Vec<String> {
        words(line).expect("lexes")
    }

    #[test]
    fn blanks_separate_words_and_hash_starts_a_comment() {
        assert_eq!(
            split("  server mail1\t192.0.2.10:25  check # the first\r"),
            ["server", "mail1", "192.0.2.10:25", "check"]
        );
        assert!(split("# only a comment").is_empty());
        assert!(split("   ").is_empty());
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(
            split(r#"log-format "%ci %s" x"#),
            ["log-format", "%ci %s", "x"]
        );
        assert_eq!(split(r"a\ b c\#d"), ["a b", "c#d"]);
        assert_eq!(
            split(r#"'$HOME # not a comment' "a\"b""#),
            ["$HOME # not a comment", "a\"b"]
        );
        assert_eq!(split(r#"x "" y"#), ["x", "", "y"]);
        assert_eq!(split(r#"ab"cd"'ef'"#), ["abcdef"]);
    }

    #[test]
    fn errors() {
        assert_eq!(words("option 'smtpchk"), Err(LexError::UnterminatedQuote));
        assert_eq!(words(r#"bind ":25"#), Err(LexError::UnterminatedQuote));
        assert_eq!(words("bind ${ADDR}:25"), Err(LexError::EnvironmentVariable));
        assert_eq!(
            words(r#"bind "$ADDR:25""#),
            Err(LexError::EnvironmentVariable)
        );
        // A lone dollar is just a character.
        assert_eq!(split("a $ b$"), ["a", "$", "b$"]);
    }

    #[test]
    fn lines_keep_their_numbers() {
        let found = lines("global\n\n  # c\n  maxconn 10\n");
        let numbers: Vec<usize> = found.iter().map(|line| line.number).collect();
        assert_eq!(numbers, [1, 4]);
        assert_eq!(found[1].text, "maxconn 10");
    }
}
