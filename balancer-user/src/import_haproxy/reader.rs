//! The whole file, section by section: `global`, `defaults` (inherited by the proxies
//! after it, or by name with `from`), `listen`, `frontend`, `backend`; anything else is
//! reported line by line.
//!
//! Lines before any section header are read as the body of a `listen smtp` section, so that
//! the snippet most guides show (`mode tcp`, `balance`, `server …`) converts as it is.

use super::directives::{self, Place};
use super::lexer::{self, Line};
use super::model::{At, Global, Kind, Proxy, Reports, Settings};
use super::server::ServerOptions;
use super::units::{parse_endpoint, parse_time};

/// The name of the implicit section of lines before any header.
pub(super) const IMPLICIT_NAME: &str = "smtp";

/// Sections HAProxy knows that have nothing mxlb could take.
const FOREIGN_SECTIONS: &[&str] = &[
    "resolvers",
    "peers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "log-forward",
    "crt-store",
    "traces",
    "acme",
    "fcgi-app",
];

/// What was read: the settings mxlb can take and the lines it cannot.
#[derive(Debug, Default)]
pub(super) struct Document {
    pub global: Global,
    pub proxies: Vec<Proxy>,
    pub reports: Reports,
}

enum Section {
    /// Before any header, before any line.
    Start,
    Global,
    Defaults(usize),
    Proxy(usize),
    Foreign(String),
}

struct Reader {
    document: Document,
    /// Every `defaults` section so far, with its name if it has one.
    defaults: Vec<(Option<String>, Settings)>,
    section: Section,
}

pub(super) fn read(text: &str) -> Document {
    let mut reader = Reader {
        document: Document::default(),
        defaults: Vec::new(),
        section: Section::Start,
    };
    for line in lexer::lines(text) {
        reader.document.reports.know(line.number, &line.text);
        match &line.words {
            Ok(words) => reader.line(&line, words),
            Err(error) => {
                reader.note_line(line.number);
                reader.document.reports.add(line.number, error.reason());
            }
        }
    }
    reader.document
}

impl Reader {
    fn reports(&mut self) -> &mut Reports {
        &mut self.document.reports
    }

    fn line(&mut self, line: &Line, words: &[String]) {
        let keyword = words[0].as_str();
        let number = line.number;
        match keyword {
            "global" => self.section = Section::Global,
            "defaults" => self.start_defaults(words, number),
            "listen" => self.start_proxy(Kind::Listen, words, number),
            "frontend" => self.start_proxy(Kind::Frontend, words, number),
            "backend" => self.start_proxy(Kind::Backend, words, number),
            _ if FOREIGN_SECTIONS.contains(&keyword) => {
                self.section = Section::Foreign(keyword.to_owned());
                self.reports().add(
                    number,
                    format!(
                        "a {keyword} section: mxlb has no equivalent (servers are IP literals)"
                    ),
                );
            }
            _ => self.directive(words, number),
        }
    }

    fn directive(&mut self, words: &[String], number: usize) {
        if matches!(self.section, Section::Start) {
            let settings = self.inherited(None, number);
            let proxy = Proxy::new(Kind::Listen, IMPLICIT_NAME.to_owned(), 0, settings);
            self.document.proxies.push(proxy);
            self.section = Section::Proxy(self.document.proxies.len() - 1);
        }
        match &self.section {
            Section::Start => {}
            Section::Global => self.global(words, number),
            Section::Defaults(index) => {
                let index = *index;
                let reports = &mut self.document.reports;
                let settings = &mut self.defaults[index].1;
                if !directives::setting(settings, None, words, number, reports) {
                    let reason = directives::unmapped_reason(&words[0], None);
                    reports.add(number, reason);
                }
            }
            Section::Proxy(index) => {
                let index = *index;
                self.proxy(index, words, number);
            }
            Section::Foreign(name) => {
                let reason = format!("in a {name} section: mxlb has no equivalent");
                self.reports().add(number, reason);
            }
        }
    }

    /// Records that a line belongs to the current proxy, if any (for the reports of a
    /// proxy that is not converted).
    fn note_line(&mut self, number: usize) {
        if let Section::Proxy(index) = self.section {
            self.document.proxies[index].lines.push(number);
        }
    }

    /// `defaults [NAME] [from NAME]`: a fresh set, from built-in defaults or the one named.
    fn start_defaults(&mut self, words: &[String], number: usize) {
        let name = words.get(1).filter(|word| *word != "from").cloned();
        // Unlike a proxy, a defaults section without `from` starts from HAProxy's own.
        let base = match from_clause(words) {
            Some(from) => self.inherited(Some(from), number),
            None => Settings::default(),
        };
        self.defaults.push((name, base));
        self.section = Section::Defaults(self.defaults.len() - 1);
    }

    fn start_proxy(&mut self, kind: Kind, words: &[String], number: usize) {
        let Some(name) = words.get(1) else {
            self.reports()
                .add(number, format!("{} without a name", kind.keyword()));
            self.section = Section::Foreign(kind.keyword().to_owned());
            return;
        };
        let settings = self.inherited(from_clause(words), number);
        let mut proxy = Proxy::new(kind, name.clone(), number, settings);
        proxy.lines.push(number);
        self.document.proxies.push(proxy);
        self.section = Section::Proxy(self.document.proxies.len() - 1);
    }

    /// The settings a new section starts from: the `defaults` named by `from`, else the
    /// last one, else HAProxy's built-in defaults.
    fn inherited(&mut self, from: Option<&str>, number: usize) -> Settings {
        let found = match from {
            Some(name) => self
                .defaults
                .iter()
                .rev()
                .find(|(own, _)| own.as_deref() == Some(name)),
            None => self.defaults.last(),
        };
        match (found, from) {
            (Some((_, settings)), _) => settings.clone(),
            (None, Some(name)) => {
                self.reports()
                    .add(number, format!("no defaults section named {name}"));
                Settings::default()
            }
            (None, None) => Settings::default(),
        }
    }

    fn proxy(&mut self, index: usize, words: &[String], number: usize) {
        let document = &mut self.document;
        let proxy = &mut document.proxies[index];
        proxy.lines.push(number);
        let kind = proxy.kind;
        let place: Place = Some(kind);
        let args = &words[1..];
        let reports = &mut document.reports;
        match words[0].as_str() {
            "bind" if kind.has_clients() => {
                if let Some(bind) = directives::bind(args, number, reports) {
                    proxy.binds.push(bind);
                }
            }
            "server" if kind.has_servers() => {
                if let Some(server) = server(&proxy.settings.default_server, args, number, reports)
                {
                    proxy.servers.push(server);
                }
            }
            "default_backend" if kind == Kind::Frontend => match args.first() {
                Some(backend) => proxy.default_backend = Some(At::new(backend.clone(), number)),
                None => reports.add(number, "default_backend without a name"),
            },
            "use_backend" if kind == Kind::Frontend => {
                if args.len() == 1 {
                    // Unconditional: it is where every client goes.
                    proxy.default_backend = Some(At::new(args[0].clone(), number));
                } else {
                    proxy.routing.push(number);
                    reports.add(
                        number,
                        "routing by condition has no mxlb equivalent: one listener, one set \
                         of servers",
                    );
                }
            }
            "disabled" => {
                proxy.disabled = Some(number);
                reports.add(number, "a disabled section is not converted");
            }
            "enabled" | "description" => {}
            keyword => {
                if !directives::setting(&mut proxy.settings, place, words, number, reports) {
                    reports.add(number, directives::unmapped_reason(keyword, place));
                }
            }
        }
    }

    fn global(&mut self, words: &[String], number: usize) {
        let arg = words.get(1).map_or("", String::as_str);
        let global = &mut self.document.global;
        let reports = &mut self.document.reports;
        match words[0].as_str() {
            "maxconn" => match arg.parse::<u32>() {
                Ok(maxconn) if maxconn > 0 => global.maxconn = Some(At::new(maxconn, number)),
                _ => reports.add(number, "maxconn must be a whole number of at least 1"),
            },
            "hard-stop-after" => match parse_time(arg) {
                Ok(grace) => global.grace = Some(At::new(grace, number)),
                Err(why) => reports.add(number, why),
            },
            which @ ("user" | "group") => {
                let value = At::new(arg.to_owned(), number);
                if which == "user" {
                    global.user = Some(value);
                } else {
                    global.group = Some(value);
                }
                reports.add(
                    number,
                    format!(
                        "written commented out in [global]: give mxlb a {which} of its own \
                         (docs/operations.md, Privileges); check-config wants it to exist"
                    ),
                );
            }
            keyword => reports.add(number, global_reason(keyword)),
        }
    }
}

/// `… from NAME` at the end of a section header.
fn from_clause(words: &[String]) -> Option<&str> {
    let at = words.iter().position(|word| word == "from")?;
    words.get(at + 1).map(String::as_str)
}

/// A `server NAME ADDRESS [OPTIONS]` line, or `None` (reported) if it cannot be used.
fn server(
    defaults: &ServerOptions,
    args: &[String],
    number: usize,
    reports: &mut Reports,
) -> Option<super::model::Server> {
    let (Some(name), Some(address)) = (args.first(), args.get(1)) else {
        reports.add(number, "server needs a name and an address");
        return None;
    };
    let mut options = defaults.clone();
    let parsed = options.apply(&args[2..]);
    for lost in parsed.lost {
        reports.add(number, lost);
    }
    if let Some(fatal) = parsed.fatal {
        reports.add(number, format!("server not converted: {fatal}"));
        return None;
    }
    match parse_endpoint(address).and_then(|endpoint| endpoint.server_addr()) {
        Ok(addr) => Some(super::model::Server {
            name: name.clone(),
            addr,
            options,
            line: number,
        }),
        Err(why) => {
            reports.add(number, format!("server not converted: {address}: {why}"));
            None
        }
    }
}

/// Why a `global` directive is not mapped.
fn global_reason(keyword: &str) -> String {
    let why = match keyword {
        "daemon" | "master-worker" => "mxlb runs in the foreground under systemd",
        "pidfile" => "systemd tracks mxlb's process",
        "chroot" => "mxlb drops root for [global] user instead",
        "uid" | "gid" => "give [global] user (and group) by name",
        "log" | "log-send-hostname" | "log-tag" => "mxlb logs on stderr (journald)",
        "stats" => "mxlb's stats and admin are the [stats] section: bind and admin_token",
        "nbthread" | "nbproc" | "cpu-map" => {
            "mxlb picks one thread per CPU but one; [global] threads overrides it"
        }
        _ => "no mxlb equivalent",
    };
    format!("{keyword} (in global): {why}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reported(document: Document) -> Vec<usize> {
        document
            .reports
            .into_lines()
            .into_iter()
            .map(|(line, _, _)| line)
            .collect()
    }

    #[test]
    fn sections_and_inheritance() {
        let document = read(
            "global\n  maxconn 100\n  hard-stop-after 30s\n  daemon\n\
             defaults\n  mode tcp\n  timeout connect 3s\n  default-server inter 1s\n\
             frontend in\n  bind :25\n  default_backend out\n\
             backend out\n  default-server fall 5\n  server a 192.0.2.1:25 check\n\
             defaults\n  timeout connect 9s\n\
             listen other\n  bind :2525\n  server b 192.0.2.2:25\n",
        );
        assert_eq!(document.global.maxconn, Some(At::new(100, 2)));
        assert_eq!(
            document.global.grace.as_ref().unwrap().value,
            Duration::from_secs(30)
        );
        let [front, back, other] = &document.proxies[..] else {
            panic!("three proxies: {:?}", document.proxies);
        };
        assert_eq!(
            (front.kind, front.name.as_str(), front.header),
            (Kind::Frontend, "in", 9)
        );
        assert_eq!(front.default_backend, Some(At::new("out".to_owned(), 11)));
        assert_eq!(
            back.settings.timeout_connect.as_ref().unwrap().value,
            Duration::from_secs(3)
        );
        let server = &back.servers[0].options;
        assert_eq!(server.inter, Some(Duration::from_secs(1)));
        assert_eq!(server.fall, Some(5));
        assert_eq!(server.check, Some(true));
        // A new defaults section starts afresh.
        assert_eq!(
            other.settings.timeout_connect.as_ref().unwrap().value,
            Duration::from_secs(9)
        );
        assert_eq!(other.servers[0].options, ServerOptions::default());
        assert_eq!(back.lines, [12, 13, 14]);
        assert_eq!(reported(document), [4]);
    }

    #[test]
    fn default_server_applies_to_later_servers_only() {
        let document = read(
            "backend b\n  server a 192.0.2.1:25\n  default-server send-proxy check\n\
             server c 192.0.2.3:25 no-check\n",
        );
        let servers = &document.proxies[0].servers;
        assert_eq!(servers[0].options, ServerOptions::default());
        assert_eq!(servers[1].options.send_proxy, Some("v1"));
        assert_eq!(servers[1].options.check, Some(false));
    }

    #[test]
    fn lines_before_a_header_are_an_implicit_listen() {
        let document =
            read("mode tcp\nbalance roundrobin\nserver mail1 192.0.2.10:25 send-proxy check\n");
        let proxy = &document.proxies[0];
        assert_eq!(
            (proxy.kind, proxy.name.as_str(), proxy.header),
            (Kind::Listen, IMPLICIT_NAME, 0)
        );
        assert_eq!(proxy.servers.len(), 1);
        assert_eq!(proxy.lines, [1, 2, 3]);
    }

    #[test]
    fn named_defaults() {
        let document = read(
            "defaults tcp_d\n  timeout connect 2s\ndefaults http_d\n  mode http\n\
             listen a from tcp_d\n  bind :25\nlisten b\n  bind :26\nlisten c from nope\n",
        );
        let proxies = &document.proxies;
        assert!(proxies[0].unconvertible().is_none());
        assert!(proxies[1].unconvertible().unwrap().contains("mode http"));
        assert!(proxies[2].unconvertible().is_none());
        assert_eq!(reported(document), [4, 9]);
    }

    #[test]
    fn unmapped_lines_of_every_kind() {
        let text = "\
global
    user haproxy
    stats socket /run/haproxy.sock mode 600 level admin
resolvers dns
    nameserver ns1 192.0.2.53:53
frontend f
    bind :25
    acl bad src 192.0.2.66
    tcp-request connection reject if bad
    use_backend b if { src 192.0.2.0/24 }
    server x 192.0.2.1:25
backend b
    bind :26
    stick-table type ip size 1m
    server-template mail 3 mail.example.com:25
    server s1 mail1.example.com:25
    server s2 192.0.2.2:25 ssl verify none
    server s3 192.0.2.3:25 'unclosed
";
        let document = read(text);
        assert_eq!(
            reported(document),
            [2, 3, 4, 5, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18]
        );
    }
}
