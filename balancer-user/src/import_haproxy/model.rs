//! What the reader keeps of a haproxy.cfg: the settings mxlb has a key for, each with the
//! line it came from (for the comments of the output), and the lines it could not map.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use super::server::ServerOptions;

/// A value and the 1-based line that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct At<T> {
    pub value: T,
    pub line: usize,
}

impl<T> At<T> {
    pub fn new(value: T, line: usize) -> Self {
        At { value, line }
    }
}

/// The health check a proxy asks for with `option smtpchk` or `option tcp-check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CheckOption {
    Smtp {
        /// `HELO`/`EHLO` and the domain, when both were given.
        greeting: Option<(String, String)>,
    },
    Tcp,
}

/// Settings a proxy inherits from the `defaults` section before it.
#[derive(Clone, Debug, Default)]
pub(super) struct Settings {
    /// A mode other than `tcp` (`http`, `log`, ...): such a proxy is not converted.
    pub foreign_mode: Option<At<String>>,
    pub balance: Option<At<&'static str>>,
    pub check: Option<At<CheckOption>>,
    pub timeout_connect: Option<At<Duration>>,
    pub timeout_client: Option<At<Duration>>,
    pub timeout_server: Option<At<Duration>>,
    pub timeout_check: Option<At<Duration>>,
    pub retries: Option<At<u32>>,
    pub redispatch: Option<At<bool>>,
    pub maxconn: Option<At<u32>>,
    /// What `default-server` lines said; each `server` line starts from it.
    pub default_server: ServerOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Listen,
    Frontend,
    Backend,
}

impl Kind {
    pub fn keyword(self) -> &'static str {
        match self {
            Kind::Listen => "listen",
            Kind::Frontend => "frontend",
            Kind::Backend => "backend",
        }
    }

    /// Whether clients connect to it (it may `bind`).
    pub fn has_clients(self) -> bool {
        self != Kind::Backend
    }

    /// Whether it holds servers.
    pub fn has_servers(self) -> bool {
        self != Kind::Frontend
    }
}

/// One `bind` line that mxlb can listen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Bind {
    pub addrs: Vec<SocketAddr>,
    pub accept_proxy: bool,
    pub line: usize,
}

/// One `server` line mxlb can connect to, with its `default-server` options merged in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub options: ServerOptions,
    pub line: usize,
}

/// A `listen`, `frontend` or `backend` section.
#[derive(Clone, Debug)]
pub(super) struct Proxy {
    pub kind: Kind,
    pub name: String,
    /// The section's header line; 0 for the implicit section of lines before any header.
    pub header: usize,
    pub settings: Settings,
    pub binds: Vec<Bind>,
    pub servers: Vec<Server>,
    pub default_backend: Option<At<String>>,
    /// Lines that route by condition (`use_backend … if …`): such a frontend is not
    /// converted.
    pub routing: Vec<usize>,
    /// The `disabled` line, if the section is switched off.
    pub disabled: Option<usize>,
    /// Every line of the section, header included.
    pub lines: Vec<usize>,
}

impl Proxy {
    pub fn new(kind: Kind, name: String, header: usize, settings: Settings) -> Self {
        Proxy {
            kind,
            name,
            header,
            settings,
            binds: Vec::new(),
            servers: Vec::new(),
            default_backend: None,
            routing: Vec::new(),
            disabled: None,
            lines: Vec::new(),
        }
    }

    /// Why the section cannot be converted whatever its peers are, if it cannot.
    pub fn unconvertible(&self) -> Option<String> {
        if let Some(line) = self.disabled {
            return Some(format!("the section is disabled (line {line})"));
        }
        if let Some(mode) = &self.settings.foreign_mode {
            return Some(format!(
                "mode {} (line {}): mxlb balances TCP only",
                mode.value, mode.line
            ));
        }
        None
    }
}

/// `global` settings mxlb has a key for.
#[derive(Clone, Debug, Default)]
pub(super) struct Global {
    pub maxconn: Option<At<u32>>,
    pub grace: Option<At<Duration>>,
    /// Written commented out: see the mapping in docs/operations.md.
    pub user: Option<At<String>>,
    pub group: Option<At<String>>,
}

/// The lines that were not (fully) mapped, with every reason found for each.
#[derive(Debug, Default)]
pub(super) struct Reports {
    texts: HashMap<usize, String>,
    reasons: BTreeMap<usize, Vec<String>>,
}

impl Reports {
    /// Remembers a line's text, for reports about it made later.
    pub fn know(&mut self, line: usize, text: &str) {
        self.texts.insert(line, text.to_owned());
    }

    /// The text of a line read, as written (trimmed).
    pub fn text(&self, line: usize) -> &str {
        self.texts.get(&line).map_or("", String::as_str)
    }

    pub fn add(&mut self, line: usize, reason: impl Into<String>) {
        self.reasons.entry(line).or_default().push(reason.into());
    }

    pub fn contains(&self, line: usize) -> bool {
        self.reasons.contains_key(&line)
    }

    /// `(line, text, reasons)` in line order.
    pub fn into_lines(self) -> Vec<(usize, String, String)> {
        let texts = self.texts;
        self.reasons
            .into_iter()
            .map(|(line, reasons)| {
                let text = texts.get(&line).cloned().unwrap_or_default();
                (line, text, reasons.join("; "))
            })
            .collect()
    }
}
