//! The configuration file: whatever an operator (or a template gone wrong) writes, the
//! daemon must refuse it with a positioned error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxlb::config::{Config, ConfigError};

const ORIGIN: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, ORIGIN) {
        Ok(_) => {}
        Err(ConfigError::At {
            origin,
            line,
            col,
            message,
        }) => {
            assert_eq!(origin, ORIGIN);
            // Lines and columns are 1-based and inside the text (one past its end at most).
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of {lines}");
            let line_chars = text
                .split('\n')
                .nth(line - 1)
                .map_or(0, |l| l.chars().count());
            assert!(
                (1..=line_chars + 1).contains(&col),
                "col {col} of {line_chars}"
            );
            // One line per error, as the contract wants.
            assert!(!message.contains('\n'), "{message:?}");
        }
        Err(other) => panic!("parsing text gave a non-positional error: {other}"),
    }
});
