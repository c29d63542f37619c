//! The mxlb TOML for what was read, each key commented with the haproxy.cfg line it came
//! from. Values are quoted by the `toml` crate, so any name or domain stays valid TOML.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use super::model::{At, CheckOption, Global, Reports, Server};
use super::plan::{Listener, unique_name};
use super::server::ServerOptions;
use super::units::format_duration;

/// The text builder: keys with their origin comments.
struct Writer<'a> {
    out: String,
    file: &'a str,
    reports: &'a Reports,
}

impl Writer<'_> {
    /// `key = value`, commented with the line it came from (0: no line).
    fn key(&mut self, key: &str, value: impl Into<toml::Value>, line: usize) {
        let value: toml::Value = value.into();
        let _ = write!(self.out, "{key} = {value}");
        self.origin(line);
    }

    fn duration(&mut self, key: &str, value: &Option<At<Duration>>) {
        if let Some(At { value, line }) = value {
            self.key(key, format_duration(*value), *line);
        }
    }

    /// `  # file:12: text` and the end of the line.
    fn origin(&mut self, line: usize) {
        if line != 0 {
            let _ = write!(
                self.out,
                "  # {}:{line}: {}",
                self.file,
                self.reports.text(line)
            );
        }
        self.out.push('\n');
    }

    fn line(&mut self, text: &str) {
        self.out.push_str(text);
        self.out.push('\n');
    }
}

pub(super) fn toml(
    file: &str,
    global: &Global,
    listeners: &[Listener<'_>],
    reports: &mut Reports,
) -> String {
    let mut pending = Vec::new();
    // Comments name the file without its directory: `haproxy.cfg:12` is enough to find it.
    let name = std::path::Path::new(file)
        .file_name()
        .map_or(file.to_owned(), |name| name.to_string_lossy().into_owned());
    let mut writer = Writer {
        out: String::new(),
        file: &name,
        reports,
    };
    writer.line(&format!(
        "# Converted from {file} by `mxlb import-haproxy`.\n\
         # The lines it could not map were listed on stderr. Check with `mxlb check-config`."
    ));
    write_global(&mut writer, global);
    for listener in listeners {
        write_listener(&mut writer, listener, &mut pending);
    }
    let out = writer.out;
    for (line, why) in pending {
        reports.add(line, why);
    }
    out
}

fn write_global(writer: &mut Writer<'_>, global: &Global) {
    if global.maxconn.is_none()
        && global.grace.is_none()
        && global.user.is_none()
        && global.group.is_none()
    {
        return;
    }
    writer.line("\n[global]");
    if let Some(maxconn) = &global.maxconn {
        writer.key("maxconn", i64::from(maxconn.value), maxconn.line);
    }
    writer.duration("grace", &global.grace);
    for (key, value) in [("user", &global.user), ("group", &global.group)] {
        if let Some(At { value, line }) = value {
            let _ = write!(
                writer.out,
                "# {key} = {}",
                toml::Value::from(value.as_str())
            );
            writer.origin(*line);
        }
    }
}

fn write_listener(
    writer: &mut Writer<'_>,
    listener: &Listener<'_>,
    pending: &mut Vec<(usize, String)>,
) {
    let (front, back) = (listener.front, listener.back);
    writer.line("");
    if std::ptr::eq(front, back) {
        writer.key_header("[[listen]]", front.header);
    } else {
        let _ = write!(
            writer.out,
            "[[listen]]  # {}:{}: {} (servers from backend {}, line {})",
            writer.file,
            front.header,
            writer.reports.text(front.header),
            back.name,
            back.header
        );
        writer.out.push('\n');
    }
    writer.key("name", listener.name.as_str(), 0);
    writer.line("bind = [");
    for (addr, line) in &listener.binds {
        let _ = write!(writer.out, "    {},", toml::Value::from(addr.to_string()));
        if *line == 0 {
            writer.line("  # no bind in the file: SMTP's port on every IPv4 address (add \"[::]:25\" for IPv6)");
        } else {
            writer.origin(*line);
        }
    }
    writer.line("]");
    let settings = &back.settings;
    if let Some(balance) = &settings.balance {
        writer.key("balance", balance.value, balance.line);
    }
    if let Some(line) = listener.accept_proxy {
        writer.key("accept_proxy", true, line);
    }
    if let Some(retries) = &settings.retries {
        writer.key("retries", i64::from(retries.value), retries.line);
    }
    match &settings.redispatch {
        Some(redispatch) => writer.key("redispatch", redispatch.value, redispatch.line),
        None => writer.line(
            "redispatch = false  # HAProxy's default (no `option redispatch`); mxlb's own is true",
        ),
    }
    writer.duration("timeout_connect", &settings.timeout_connect);
    write_idle(writer, listener, pending);
    if let Some(maxconn) = &front.settings.maxconn {
        writer.key("maxconn", i64::from(maxconn.value), maxconn.line);
    }
    let checked = write_check(writer, listener, pending);
    let mut names = HashSet::new();
    for server in &back.servers {
        write_server(writer, server, checked, &mut names, pending);
    }
}

impl Writer<'_> {
    fn key_header(&mut self, header: &str, line: usize) {
        self.out.push_str(header);
        self.origin(line);
    }
}

/// `timeout client` and `timeout server` become one idle timeout: the larger, so that mxlb
/// never closes a connection HAProxy would have kept (mxlb's connection is idle only when
/// neither side moved).
fn write_idle(
    writer: &mut Writer<'_>,
    listener: &Listener<'_>,
    pending: &mut Vec<(usize, String)>,
) {
    let client = &listener.front.settings.timeout_client;
    let server = &listener.back.settings.timeout_server;
    let idle = match (client, server) {
        (Some(client), Some(server)) => {
            let (larger, smaller) = if client.value >= server.value {
                (client, server)
            } else {
                (server, client)
            };
            if smaller.value != larger.value {
                pending.push((
                    smaller.line,
                    format!(
                        "mxlb has one idle timeout for both sides: timeout_idle takes the larger \
                         ({}, line {})",
                        format_duration(larger.value),
                        larger.line
                    ),
                ));
            }
            Some(larger)
        }
        (one, other) => one.as_ref().or(other.as_ref()),
    };
    if let Some(idle) = idle {
        writer.key("timeout_idle", format_duration(idle.value), idle.line);
    }
}

/// `[listen.check]` when any server has `check`; its timing comes from the first checked
/// server (mxlb has one check setting per listener), and servers that differ are reported.
/// Returns whether checks are on.
fn write_check(
    writer: &mut Writer<'_>,
    listener: &Listener<'_>,
    pending: &mut Vec<(usize, String)>,
) -> bool {
    let settings = &listener.back.settings;
    let mut checked = listener.back.servers.iter().filter(|server| {
        server.options.check == Some(true) && server.options.disabled != Some(true)
    });
    let Some(first) = checked.next() else {
        return false;
    };
    let timing = |options: &ServerOptions| {
        (
            options.inter,
            options.fastinter,
            options.downinter,
            options.rise,
            options.fall,
        )
    };
    for other in checked {
        if timing(&other.options) != timing(&first.options) {
            pending.push((
                other.line,
                format!(
                    "check timing differs from server {} (line {}), which the listener's \
                     [listen.check] follows: mxlb has one per listener",
                    first.name, first.line
                ),
            ));
        }
    }
    writer.line("\n[listen.check]");
    match &settings.check {
        Some(At {
            value: CheckOption::Smtp { greeting },
            line,
        }) => {
            writer.key("type", "smtp", *line);
            if let Some((verb, domain)) = greeting {
                writer.key("verb", verb.as_str(), *line);
                writer.key("domain", domain.as_str(), *line);
            }
        }
        Some(At {
            value: CheckOption::Tcp,
            line,
        }) => writer.key("type", "tcp", *line),
        None => writer.line("type = \"tcp\"  # `check` without a check option: a connect only"),
    }
    let options = &first.options;
    let durations = [
        ("inter", options.inter),
        ("fastinter", options.fastinter),
        ("downinter", options.downinter),
    ];
    for (key, value) in durations {
        if let Some(value) = value {
            writer.key(key, format_duration(value), first.line);
        }
    }
    for (key, value) in [("rise", options.rise), ("fall", options.fall)] {
        if let Some(value) = value {
            writer.key(key, i64::from(value), first.line);
        }
    }
    writer.duration("timeout", &settings.timeout_check);
    true
}

fn write_server(
    writer: &mut Writer<'_>,
    server: &Server,
    checks: bool,
    names: &mut HashSet<String>,
    pending: &mut Vec<(usize, String)>,
) {
    let options = &server.options;
    writer.line("");
    writer.key_header("[[listen.server]]", server.line);
    writer.key("name", unique_name(&server.name, names), 0);
    writer.key("addr", server.addr.to_string(), 0);
    if let Some(send_proxy) = options.send_proxy.filter(|version| *version != "none") {
        writer.key("send_proxy", send_proxy, 0);
    }
    let disabled = options.disabled == Some(true);
    if disabled {
        writer.line("weight = 0  # `disabled`: no clients until its weight is raised");
        pending.push((
            server.line,
            "disabled: written as weight = 0 (mxlb's file has no maintenance state; \
             `mxlb server set-state` is the runtime one)"
                .to_owned(),
        ));
    } else if let Some(weight) = options.weight {
        writer.key("weight", i64::from(weight), 0);
    }
    if options.backup == Some(true) {
        writer.key("backup", true, 0);
    }
    if let Some(maxconn) = options.maxconn.filter(|maxconn| *maxconn > 0) {
        writer.key("maxconn", i64::from(maxconn), 0);
    }
    if checks && (options.check != Some(true) || disabled) {
        writer.line("check = false  # no `check` on this server");
    }
}
