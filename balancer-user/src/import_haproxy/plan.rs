//! Which proxies become mxlb listeners: a `listen` with binds, or a `frontend` whose
//! clients all go to one backend (`default_backend`, or an unconditional `use_backend`).
//! Every other section is reported, header first, then each of its lines.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::model::{Kind, Proxy, Reports};

/// The port an implicit section (lines before any header) listens on: SMTP's.
const IMPLICIT_PORT: u16 = 25;

/// One listener to write: where clients come in (`front`) and where they go (`back`),
/// the same section for a `listen`.
pub(super) struct Listener<'a> {
    /// The name in mxlb's spelling (letters, digits, `_ . -`), unique.
    pub name: String,
    pub front: &'a Proxy,
    pub back: &'a Proxy,
    /// Each address once, with the line that bound it (0: the implicit default).
    pub binds: Vec<(SocketAddr, usize)>,
    /// The line of the first bind, whose `accept-proxy` the listener takes.
    pub accept_proxy: Option<usize>,
}

/// The listeners, in file order; what cannot be converted is added to `reports`.
pub(super) fn listeners<'a>(proxies: &'a [Proxy], reports: &mut Reports) -> Vec<Listener<'a>> {
    let mut listeners = Vec::new();
    let mut skipped: Vec<(&Proxy, String)> = Vec::new();
    let mut used_backends = HashSet::new();
    let mut bound: HashMap<SocketAddr, String> = HashMap::new();
    let mut names = HashSet::new();
    let by_name: HashMap<&str, &Proxy> = proxies
        .iter()
        .filter(|proxy| proxy.kind.has_servers())
        .map(|proxy| (proxy.name.as_str(), proxy))
        .collect();
    for proxy in proxies {
        let back = match pair(proxy, &by_name) {
            Pairing::Backend => continue,
            Pairing::Skip(why) => {
                skipped.push((proxy, why));
                continue;
            }
            Pairing::With(back) => back,
        };
        if proxy.binds.is_empty() && proxy.header != 0 {
            // A listen without binds may serve as some frontend's backend.
            if proxy.kind == Kind::Frontend {
                skipped.push((proxy, "no bind mxlb can listen on".to_owned()));
            }
            continue;
        }
        if back.servers.is_empty() {
            let why = format!(
                "{} {} has no server mxlb can connect to",
                back.kind.keyword(),
                back.name
            );
            skipped.push((proxy, why));
            continue;
        }
        let binds = unique_binds(proxy, &mut bound, reports);
        if binds.is_empty() {
            skipped.push((
                proxy,
                "every address it binds is bound by an earlier listener".to_owned(),
            ));
            continue;
        }
        let name = unique_name(&proxy.name, &mut names);
        for (addr, _) in &binds {
            bound.insert(*addr, name.clone());
        }
        used_backends.insert(back.name.as_str());
        listeners.push(Listener {
            name,
            front: proxy,
            back,
            binds,
            accept_proxy: accept_proxy(proxy, reports),
        });
    }
    for proxy in proxies {
        let used = used_backends.contains(proxy.name.as_str());
        let converted = listeners
            .iter()
            .any(|listener| std::ptr::eq(listener.front, proxy));
        let already = skipped.iter().any(|(skip, _)| std::ptr::eq(*skip, proxy));
        if proxy.kind.has_servers() && !used && !converted && !already {
            let why = match proxy.unconvertible() {
                Some(why) => why,
                None if proxy.kind == Kind::Listen => "no bind mxlb can listen on".to_owned(),
                None => "no frontend mxlb can convert uses it".to_owned(),
            };
            skipped.push((proxy, why));
        }
    }
    for (proxy, why) in skipped {
        report_skipped(proxy, &why, reports);
    }
    listeners
}

enum Pairing<'a> {
    /// A backend: converted through the frontends that use it.
    Backend,
    Skip(String),
    With(&'a Proxy),
}

fn pair<'a>(proxy: &'a Proxy, by_name: &HashMap<&str, &'a Proxy>) -> Pairing<'a> {
    if let Some(why) = proxy.unconvertible() {
        return match proxy.kind {
            Kind::Backend => Pairing::Backend,
            _ => Pairing::Skip(why),
        };
    }
    match proxy.kind {
        Kind::Backend => Pairing::Backend,
        Kind::Listen => Pairing::With(proxy),
        Kind::Frontend if !proxy.routing.is_empty() => Pairing::Skip(format!(
            "it routes by condition (line {}): an mxlb listener has one set of servers",
            proxy.routing[0]
        )),
        Kind::Frontend => {
            let Some(target) = &proxy.default_backend else {
                return Pairing::Skip("no default_backend".to_owned());
            };
            match by_name.get(target.value.as_str()) {
                None => Pairing::Skip(format!("no backend named {}", target.value)),
                Some(back) => match back.unconvertible() {
                    Some(why) => Pairing::Skip(format!("its backend {}: {why}", back.name)),
                    None => Pairing::With(back),
                },
            }
        }
    }
}

/// The proxy's addresses, each once and not bound by an earlier listener; the implicit
/// section listens on port 25 of every IPv4 address.
fn unique_binds(
    proxy: &Proxy,
    bound: &mut HashMap<SocketAddr, String>,
    reports: &mut Reports,
) -> Vec<(SocketAddr, usize)> {
    if proxy.header == 0 && proxy.binds.is_empty() {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IMPLICIT_PORT);
        return match bound.get(&any) {
            Some(_) => Vec::new(),
            None => vec![(any, 0)],
        };
    }
    let mut binds: Vec<(SocketAddr, usize)> = Vec::new();
    for bind in &proxy.binds {
        for addr in &bind.addrs {
            if let Some(other) = bound.get(addr) {
                reports.add(
                    bind.line,
                    format!("{addr} is bound by listener {other} already"),
                );
            } else if !binds.iter().any(|(seen, _)| seen == addr) {
                binds.push((*addr, bind.line));
            }
        }
    }
    binds
}

/// mxlb reads PROXY headers per listener: the first bind decides, and binds that say
/// otherwise are reported.
fn accept_proxy(proxy: &Proxy, reports: &mut Reports) -> Option<usize> {
    let first = proxy.binds.first()?;
    for bind in &proxy.binds[1..] {
        if bind.accept_proxy != first.accept_proxy {
            reports.add(
                bind.line,
                format!(
                    "accept-proxy differs from the first bind (line {}), which the listener \
                     follows: mxlb's accept_proxy is per listener",
                    first.line
                ),
            );
        }
    }
    first.accept_proxy.then_some(first.line)
}

/// `name` in mxlb's name characters, made unique with a numeric suffix.
pub(super) fn unique_name(name: &str, taken: &mut HashSet<String>) -> String {
    let base = mxlb_name(name);
    let mut candidate = base.clone();
    let mut suffix = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{base}-{suffix}");
        suffix += 1;
    }
    candidate
}

/// Names appear in mxlb's URLs and metric labels: letters, digits, `_ . -` only.
pub(super) fn mxlb_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '.' | '-' => c,
            _ => '_',
        })
        .collect();
    if cleaned.is_empty() {
        "_".to_owned()
    } else {
        cleaned
    }
}

/// Reports a proxy that is not converted: its header with the reason, and every other
/// line of it that was not reported for a reason of its own.
fn report_skipped(proxy: &Proxy, why: &str, reports: &mut Reports) {
    let what = match proxy.header {
        0 => "the lines before any section header".to_owned(),
        _ => format!("{} {}", proxy.kind.keyword(), proxy.name),
    };
    if proxy.header != 0 {
        reports.add(proxy.header, format!("{what} is not converted: {why}"));
    }
    for &line in &proxy.lines {
        if line != proxy.header && !reports.contains(line) {
            reports.add(line, format!("in {what}, which is not converted: {why}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::read;
    use super::*;

    /// (listener name, backend name, binds) of each listener.
    type Found = Vec<(String, String, Vec<String>)>;

    fn plan(text: &str) -> (Found, Vec<(usize, String)>) {
        let mut document = read(text);
        let found: Found = listeners(&document.proxies, &mut document.reports)
            .iter()
            .map(|listener| {
                (
                    listener.name.clone(),
                    listener.back.name.clone(),
                    listener
                        .binds
                        .iter()
                        .map(|(addr, _)| addr.to_string())
                        .collect(),
                )
            })
            .collect();
        let reported = document
            .reports
            .into_lines()
            .into_iter()
            .map(|(line, _, why)| (line, why))
            .collect();
        (found, reported)
    }

    #[test]
    fn frontend_with_default_backend() {
        let (found, reported) = plan(
            "frontend smtp_in\n bind 127.0.0.1:2525\n default_backend smtp_servers\n\
             backend smtp_servers\n server a 192.0.2.1:25\n",
        );
        assert_eq!(
            found,
            [(
                "smtp_in".to_owned(),
                "smtp_servers".to_owned(),
                vec!["127.0.0.1:2525".to_owned()]
            )]
        );
        assert!(reported.is_empty(), "{reported:?}");
    }

    #[test]
    fn conditional_routing_is_not_converted() {
        let (found, reported) = plan(
            "frontend f\n bind :25\n acl a src 10.0.0.0/8\n use_backend b1 if a\n default_backend b2\n\
             backend b1\n server a 192.0.2.1:25\nbackend b2\n server b 192.0.2.2:25\n",
        );
        assert!(found.is_empty());
        let lines: Vec<usize> = reported.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(
            reported[0].1.contains("routes by condition (line 4)"),
            "{reported:?}"
        );
        assert!(
            reported[5]
                .1
                .contains("no frontend mxlb can convert uses it")
        );
    }

    #[test]
    fn unconditional_use_backend_and_a_listen_as_backend() {
        let (found, _) =
            plan("frontend f\n bind :25\n use_backend l\nlisten l\n server a 192.0.2.1:25\n");
        assert_eq!(found[0].1, "l");
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn implicit_section_binds_port_25() {
        let (found, reported) = plan("mode tcp\nserver a 192.0.2.1:25\n");
        assert_eq!(found[0].2, ["0.0.0.0:25"]);
        assert!(reported.is_empty());
        let (found, reported) = plan("maxconn 10\nglobal\n");
        assert!(found.is_empty());
        assert!(
            reported[0].1.contains("before any section header"),
            "{reported:?}"
        );
    }

    #[test]
    fn binds_are_unique_across_listeners() {
        let (found, reported) = plan(
            "listen a\n bind :25\n server s 192.0.2.1:25\nlisten b\n bind :25,:26\n server s 192.0.2.2:25\n\
             listen c\n bind :26\n server s 192.0.2.3:25\n",
        );
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].2, ["0.0.0.0:26"]);
        assert_eq!(reported[0].0, 5);
        assert_eq!(reported[1].0, 7);
        assert!(reported[1].1.contains("earlier listener"));
    }

    #[test]
    fn accept_proxy_follows_the_first_bind() {
        let mut document =
            read("listen a\n bind :25 accept-proxy\n bind :26\n server s 192.0.2.1:25\n");
        let found = listeners(&document.proxies, &mut document.reports);
        assert_eq!(found[0].accept_proxy, Some(2));
        assert!(document.reports.contains(3));
    }

    #[test]
    fn names() {
        let mut taken = HashSet::new();
        assert_eq!(unique_name("smtp:in", &mut taken), "smtp_in");
        assert_eq!(unique_name("smtp_in", &mut taken), "smtp_in-2");
        assert_eq!(mxlb_name(""), "_");
    }
}
