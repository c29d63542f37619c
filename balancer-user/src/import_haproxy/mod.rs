//! `mxlb import-haproxy`: an HAProxy `mode tcp` configuration into mxlb's TOML, and the
//! list of every line that could not be mapped, with why.
//!
//! The steps, each its own room:
//!
//! - [`lexer`]: lines into words (comments, quotes, escapes), as HAProxy splits them.
//! - [`reader`]: the words into sections: `global`, `defaults` (inherited), `listen`,
//!   `frontend`, `backend`; [`directives`] handles one directive of a proxy, [`server`]
//!   the options of `server` and `default-server`, [`units`] HAProxy's times and
//!   addresses. What mxlb has a key for is kept in the [`model`], with its line.
//! - [`plan`]: which proxies become listeners (a `listen`, or a `frontend` with one
//!   backend), and which cannot.
//! - [`emit`]: the TOML, each key commented with the line it came from.
//!
//! docs/operations.md ("Importing an HAProxy configuration") has the mapping table.

mod directives;
mod emit;
mod lexer;
mod model;
mod plan;
mod reader;
mod server;
mod units;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// The result of a conversion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// The mxlb configuration.
    pub toml: String,
    /// Every line not (fully) mapped, in line order.
    pub unmapped: Vec<Unmapped>,
    /// How many `[[listen]]` sections the TOML holds; 0: nothing to balance.
    pub listeners: usize,
}

/// A line of the HAProxy file that mxlb's configuration does not (fully) carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmapped {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// The line as written, trimmed.
    pub text: String,
    pub reason: String,
}

impl fmt::Display for Unmapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.line, self.text, self.reason
        )
    }
}

/// Converts the text of an HAProxy configuration; `file_name` names it in the report and
/// the comments of the output.
pub fn convert(text: &str, file_name: &str) -> Conversion {
    let mut document = reader::read(text);
    let listeners = plan::listeners(&document.proxies, &mut document.reports);
    let toml = emit::toml(
        file_name,
        &document.global,
        &listeners,
        &mut document.reports,
    );
    let unmapped = document
        .reports
        .into_lines()
        .into_iter()
        .map(|(line, text, reason)| Unmapped {
            file: file_name.to_owned(),
            line,
            text,
            reason,
        })
        .collect();
    Conversion {
        toml,
        unmapped,
        listeners: listeners.len(),
    }
}

/// Why `mxlb import-haproxy` failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No listener: the report of the lines says why each section was not converted.
    #[error(
        "{file}: nothing mxlb can balance: no listen, or frontend with one backend, \
         with a bind and a server"
    )]
    NothingMappable {
        file: String,
        unmapped: Vec<Unmapped>,
    },
    /// The output failed mxlb's own validation: a bug of the converter.
    #[error("the converted configuration is not valid (a bug of import-haproxy): {0}")]
    Invalid(ConfigError),
}

impl ImportError {
    /// 2 for bad input, 1 for a failure of mxlb itself (the contract's exit codes).
    pub fn exit_code(&self) -> u8 {
        match self {
            ImportError::Read { .. } | ImportError::NothingMappable { .. } => 2,
            ImportError::Invalid(_) => 1,
        }
    }

    /// The lines that were not mapped, when the file could be read.
    pub fn unmapped(&self) -> &[Unmapped] {
        match self {
            ImportError::NothingMappable { unmapped, .. } => unmapped,
            ImportError::Read { .. } | ImportError::Invalid(_) => &[],
        }
    }
}

/// Reads and converts `path`, and checks the result as `mxlb check-config` would.
pub fn import_file(path: &Path) -> Result<Conversion, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = path.display().to_string();
    let conversion = convert(&text, &file);
    if conversion.listeners == 0 {
        let unmapped = conversion.unmapped;
        return Err(ImportError::NothingMappable { file, unmapped });
    }
    Config::parse(&conversion.toml, "<converted>").map_err(ImportError::Invalid)?;
    Ok(conversion)
}

#[cfg(test)]
mod tests;
