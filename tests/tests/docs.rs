//! The documentation against the binary: what the docs name must exist, and say what the
//! binary says. Everything is read from the docs themselves (their reference tables,
//! examples and inline code), so a key, metric or command added to both passes, and one
//! renamed in either fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mxlb_tests::mxlb::{Mxlb, RelayKind, ServerEntry, binary, config, pin_path, with_stats};
use mxlb_tests::{CommandOutput, free_addr, run_command};

// ---------------------------------------------------------------------------------------
// Reading the docs.

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read_doc(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// README.md and every docs/*.md.
fn all_docs() -> Vec<(String, String)> {
    let mut names = vec!["README.md".to_owned()];
    let mut pages: Vec<String> = std::fs::read_dir(repo_file("docs"))
        .expect("docs/")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    pages.sort();
    names.extend(pages);
    names
        .into_iter()
        .map(|name| {
            let text = read_doc(&name);
            (name, text)
        })
        .collect()
}

/// The text between backticks, in order.
fn inline_code(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// The cells of a Markdown table row (`\|` inside a cell is a literal bar).
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(
        inner
            .replace("\\|", "\u{0}")
            .split('|')
            .map(|cell| cell.trim().replace('\u{0}', "|"))
            .collect(),
    )
}

/// Every table of a page: its header cells and rows, and the `##` heading above it.
fn tables(page: &str) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
    let mut found = Vec::new();
    let mut heading = String::new();
    let mut lines = page.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("## ") {
            heading = title.to_owned();
        }
        let Some(header) = cells(line) else { continue };
        if !lines.peek().is_some_and(|next| next.starts_with("|---")) {
            continue;
        }
        lines.next();
        let mut rows = Vec::new();
        while let Some(row) = lines.peek().and_then(|line| cells(line)) {
            rows.push(row);
            lines.next();
        }
        found.push((heading.clone(), header, rows));
    }
    found
}

/// The bodies of the fenced blocks of a page written in `language` (the word after ```).
fn fenced(page: &str, language: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(tag)) if tag.trim() == language => current = Some(String::new()),
            (None, Some(_)) => current = Some("\u{0}".to_owned()),
            (Some(_), Some(_)) => {
                let block = current.take().unwrap_or_default();
                if !block.starts_with('\u{0}') {
                    blocks.push(block);
                }
            }
            (Some(block), None) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

// ---------------------------------------------------------------------------------------
// The configuration reference.

/// A section of the file, as a heading of configuration.md names it (`` ## `[[listen]]` ``).
#[derive(Clone)]
struct Section {
    /// Its dotted name: `listen.server`.
    name: String,
    /// Written `[[…]]`: one per entry. The parser needs one of each (a listener with a
    /// server), so every file the tests write has them.
    array: bool,
}

/// The sections whose keys configuration.md's reference tables list, in its order (the
/// order a file has them).
fn documented_sections() -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    for (heading, header, _) in tables(&read_doc("docs/configuration.md")) {
        let Some(code) = inline_code(&heading).next() else {
            continue;
        };
        let name = code.trim_matches(['[', ']']).to_owned();
        if header.first().map(String::as_str) == Some("key")
            && !sections.iter().any(|section| section.name == name)
        {
            sections.push(Section {
                name,
                array: code.starts_with("[["),
            });
        }
    }
    sections
}

/// One row of a reference table.
#[derive(Clone)]
struct KeyRow {
    table: String,
    key: String,
    /// The other cells (type, default, allowed, meaning).
    text: String,
}

impl KeyRow {
    fn required(&self) -> bool {
        self.text.contains("**required**")
    }
}

/// The rows of configuration.md's reference tables: tables whose first column is `key`,
/// under a heading that names a section (`` ## `[[listen.server]]` ``).
fn documented_keys() -> Vec<KeyRow> {
    let page = read_doc("docs/configuration.md");
    let mut rows = Vec::new();
    for (heading, header, body) in tables(&page) {
        if header.first().map(String::as_str) != Some("key") {
            continue;
        }
        let table = inline_code(&heading)
            .next()
            .map(|code| code.trim_matches(['[', ']']).to_owned())
            .unwrap_or_default();
        assert!(
            heading.contains("`["),
            "a key table under {heading:?}, which names no section"
        );
        for row in body {
            let key = inline_code(&row[0]).next().unwrap_or_default().to_owned();
            assert!(!key.is_empty(), "a row of [{table}] without a key: {row:?}");
            rows.push(KeyRow {
                table: table.clone(),
                key,
                text: row[1..].join(" | "),
            });
        }
    }
    rows
}

/// `key = value` lines of configuration.md's TOML examples, by section.
fn example_values() -> Vec<(String, String, String)> {
    let mut values = Vec::new();
    for block in fenced(&read_doc("docs/configuration.md"), "toml") {
        let mut table = String::new();
        for line in block.lines().map(without_comment) {
            if line.starts_with('[') {
                table = line.trim_matches(['[', ']']).to_owned();
            } else if let Some((key, value)) = line.split_once(" = ") {
                values.push((
                    table.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            }
        }
    }
    values
}

/// A TOML line without its comment (a `#` outside a string).
fn without_comment(line: &str) -> &str {
    let mut quoted = false;
    for (index, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return line[..index].trim(),
            _ => {}
        }
    }
    line.trim()
}

/// A file with `lines` in their sections; the array sections (a listener and a server)
/// always, the others only when given lines.
fn config_file(sections: &[Section], lines: &BTreeMap<String, Vec<String>>) -> String {
    let mut text = String::new();
    for section in sections {
        let body = lines.get(&section.name);
        if body.is_none() && !section.array {
            continue;
        }
        let header = match section.array {
            true => format!("[[{}]]", section.name),
            false => format!("[{}]", section.name),
        };
        text.push_str(&format!("{header}\n"));
        for line in body.into_iter().flatten() {
            text.push_str(&format!("{line}\n"));
        }
        text.push('\n');
    }
    text
}

/// Runs `mxlb check-config` on `text`.
fn check_config(text: &str) -> Result<CommandOutput> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mxlb.toml");
    std::fs::write(&path, text)?;
    mxlb(&["check-config", &path.display().to_string()])
}

fn mxlb(args: &[&str]) -> Result<CommandOutput> {
    run_command(Command::new(binary()).args(args), Duration::from_secs(20))
}

/// Finds, for each documented key, a documented value the binary accepts.
struct KeyValues {
    sections: Vec<Section>,
    rows: Vec<KeyRow>,
    examples: Vec<(String, String, String)>,
    found: BTreeMap<(String, String), String>,
}

impl KeyValues {
    fn new() -> KeyValues {
        KeyValues {
            sections: documented_sections(),
            rows: documented_keys(),
            examples: example_values(),
            found: BTreeMap::new(),
        }
    }

    fn row(&self, table: &str, key: &str) -> Option<KeyRow> {
        self.rows
            .iter()
            .find(|row| row.table == table && row.key == key)
            .cloned()
    }

    /// The values the docs give for a key: in the examples first, then each inline code of
    /// its row, as written and as a string.
    fn candidates(&self, row: &KeyRow) -> Vec<String> {
        let mut candidates: Vec<String> = self
            .examples
            .iter()
            .filter(|(table, key, _)| *table == row.table && *key == row.key)
            .map(|(_, _, value)| value.clone())
            .collect();
        for code in inline_code(&row.text) {
            candidates.push(code.to_owned());
            if !code.starts_with(['"', '[', '\'']) {
                candidates.push(format!("{code:?}"));
            }
        }
        let mut seen = BTreeSet::new();
        candidates.retain(|value| seen.insert(value.clone()));
        candidates
    }

    /// The lines a file needs besides `row`'s own: the required keys of its table and of a
    /// listener and a server, and what the row says it is "only with".
    fn companions(&mut self, row: &KeyRow) -> Result<BTreeMap<String, Vec<String>>> {
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let tables: Vec<&str> = self
            .sections
            .iter()
            .filter(|section| section.array || section.name == row.table)
            .map(|section| section.name.as_str())
            .collect();
        let required: Vec<KeyRow> = self
            .rows
            .iter()
            .filter(|other| tables.contains(&other.table.as_str()) && other.required())
            .filter(|other| other.key != row.key || other.table != row.table)
            .cloned()
            .collect();
        for other in required {
            // A required key's value comes from the examples: it cannot be tried alone.
            let value = self
                .candidates(&other)
                .into_iter()
                .next()
                .with_context(|| format!("[{}] {}: no value documented", other.table, other.key))?;
            lines
                .entry(other.table.clone())
                .or_default()
                .push(format!("{} = {value}", other.key));
        }
        let lower = row.text.to_lowercase();
        for (at, _) in lower.match_indices("only with `") {
            let code = row.text[at + "only with `".len()..]
                .split('`')
                .next()
                .unwrap_or_default();
            let line = match code.split_once(" = ") {
                Some(_) => code.to_owned(),
                None => {
                    let other = self.row(&row.table, code).with_context(|| {
                        format!("{}: only with an undocumented {code}", row.key)
                    })?;
                    format!("{code} = {}", self.value(&other)?)
                }
            };
            lines.entry(row.table.clone()).or_default().push(line);
        }
        Ok(lines)
    }

    /// The first documented value of `row` that `mxlb check-config` accepts.
    fn value(&mut self, row: &KeyRow) -> Result<String> {
        let id = (row.table.clone(), row.key.clone());
        if let Some(value) = self.found.get(&id) {
            return Ok(value.clone());
        }
        let companions = self.companions(row)?;
        let mut refusals = Vec::new();
        for candidate in self.candidates(row) {
            let mut lines = companions.clone();
            lines
                .entry(row.table.clone())
                .or_default()
                .push(format!("{} = {candidate}", row.key));
            let text = config_file(&self.sections, &lines);
            let output = check_config(&text)?;
            if output.status.success() {
                self.found.insert(id, candidate.clone());
                return Ok(candidate);
            }
            refusals.push(format!("{candidate}: {}", output.output.trim()));
        }
        bail!(
            "[{}] {}: check-config accepts none of the documented values:\n  {}",
            row.table,
            row.key,
            refusals.join("\n  ")
        )
    }
}

/// Every key of configuration.md's reference tables, with a value the docs give for it
/// (its example, default or an allowed value), passes `mxlb check-config`.
#[test]
fn every_documented_config_key_is_accepted() -> Result<()> {
    let mut values = KeyValues::new();
    ensure!(
        values.rows.len() > 30,
        "only {} documented keys found: the tables' format changed?",
        values.rows.len()
    );
    let mut failures = Vec::new();
    for row in values.rows.clone() {
        if let Err(error) = values.value(&row) {
            failures.push(format!("{error:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The keys `mxlb check-config` lists after an unknown one ("expected one of …").
fn accepted_keys(text: &str) -> Result<BTreeSet<String>> {
    let output = check_config(text)?;
    let (_, list) = output
        .output
        .split_once("expected one of ")
        .with_context(|| format!("no list of expected keys in {:?}", output.output))?;
    Ok(inline_code(list.lines().next().unwrap_or_default())
        .map(str::to_owned)
        .collect())
}

/// And the other way round: every key the binary accepts has a row in the reference.
#[test]
fn every_config_key_of_the_binary_is_documented() -> Result<()> {
    let mut values = KeyValues::new();
    let sections = values.sections.clone();
    let rows = values.rows.clone();
    // A table's keys: its rows, and the sections under it (`[[listen]]` has `check`).
    let documented = |table: &str| -> BTreeSet<String> {
        let below = sections
            .iter()
            .filter_map(|other| other.name.strip_prefix(&format!("{table}.")))
            .map(str::to_owned);
        rows.iter()
            .filter(|row| row.table == table)
            .map(|row| row.key.clone())
            .chain(below)
            .collect()
    };
    let with_unknown_key = |values: &mut KeyValues, table: &str| -> Result<String> {
        let mut lines = values.companions(&KeyRow {
            table: table.to_owned(),
            key: String::new(),
            text: String::new(),
        })?;
        let unknown = "undocumented_key = 1".to_owned();
        if table.is_empty() {
            return Ok(format!("{unknown}\n{}", config_file(&sections, &lines)));
        }
        lines.entry(table.to_owned()).or_default().push(unknown);
        Ok(config_file(&sections, &lines))
    };
    let mut failures = Vec::new();
    let top = accepted_keys(&with_unknown_key(&mut values, "")?)?;
    let named: BTreeSet<String> = sections
        .iter()
        .map(|section| {
            section
                .name
                .split('.')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    if top != named {
        failures.push(format!("top level: binary {top:?}, docs {named:?}"));
    }
    for section in &sections {
        let binary = accepted_keys(&with_unknown_key(&mut values, &section.name)?)?;
        let docs = documented(&section.name);
        if binary != docs {
            failures.push(format!(
                "[{}]: only the binary has {:?}, only the docs have {:?}",
                section.name,
                binary.difference(&docs).collect::<Vec<_>>(),
                docs.difference(&binary).collect::<Vec<_>>()
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The error messages configuration.md shows ("Checking a file") are the binary's own, for
/// the broken files below (each a variant of one file, at the line and column shown).
#[test]
fn documented_config_errors_are_what_the_binary_prints() -> Result<()> {
    const FILE: &str = "[[listen]]\nname = \"smtp\"\nbind = \"0.0.0.0:25\"\n\
                        timeout_connect = \"5s\"\n\n[[listen.server]]\nname = \"mail1\"\n\
                        addr = \"192.0.2.10:25\"\nweight = 1\n\n[stats]\n\
                        bind = \"127.0.0.1:8404\"\nadmin_token = \"change-me-7f3a9c1e\"\n";
    let broken: [(usize, &str); 6] = [
        (9, "weigth = 1"),
        (4, "timeout_connect = \"5\""),
        (8, "addr = \"mail1.example.com:25\""),
        (9, "weight = 300"),
        (6, "[listen.server]"),
        (13, "admin_token = \"op secret\""),
    ];
    let page = read_doc("docs/configuration.md");
    let section = page
        .split("## Checking a file")
        .nth(1)
        .context("no 'Checking a file' section")?;
    let block = fenced(section, "text")
        .into_iter()
        .next()
        .context("no error examples")?;
    let documented: BTreeSet<&str> = block.lines().filter(|l| !l.is_empty()).collect();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mxlb.toml");
    let as_documented = |output: &str| {
        output
            .trim()
            .replace(&dir.path().display().to_string(), "/etc/mxlb")
    };
    ensure!(
        check_config(FILE)?.status.success(),
        "the unbroken file fails"
    );
    let mut printed = BTreeSet::new();
    for (line, replacement) in broken {
        let mut lines: Vec<&str> = FILE.lines().collect();
        lines[line - 1] = replacement;
        std::fs::write(&path, lines.join("\n") + "\n")?;
        let output = mxlb(&["check-config", &path.display().to_string()])?;
        ensure!(output.status.code() == Some(2), "{replacement}: {output:?}");
        printed.insert(as_documented(&output.output));
    }
    let printed: BTreeSet<&str> = printed.iter().map(String::as_str).collect();
    ensure!(
        printed == documented,
        "docs/configuration.md shows:\n{}\nthe binary prints:\n{}",
        documented.iter().copied().collect::<Vec<_>>().join("\n"),
        printed.iter().copied().collect::<Vec<_>>().join("\n")
    );

    // And the file that cannot be read, shown inline.
    let missing = mxlb(&[
        "check-config",
        &path.with_file_name("none.toml").display().to_string(),
    ])?;
    let message = as_documented(&missing.output).replace("none.toml", "mxlb.toml");
    ensure!(missing.status.code() == Some(2), "{missing:?}");
    ensure!(
        section.replace('\n', " ").contains(&format!("`{message}`")),
        "the docs do not show {message:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Metrics.

/// `mxlb_…` names in the docs' inline code, less the pinned kernel objects (the rows of a
/// "pinned object" table); `mxlb_listener_*` stands for a prefix.
fn documented_metrics() -> BTreeSet<String> {
    let docs = all_docs();
    let mut kernel_objects = BTreeSet::new();
    for (_, page) in &docs {
        for (_, header, rows) in tables(page) {
            if header.first().map(String::as_str) == Some("pinned object") {
                kernel_objects.extend(
                    rows.iter()
                        .filter_map(|row| inline_code(&row[0]).next().map(str::to_owned)),
                );
            }
        }
    }
    let mut names = BTreeSet::new();
    for (_, page) in &docs {
        for code in inline_code(page) {
            let name: String = code
                .chars()
                .take_while(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '*')
                })
                .collect();
            if name.starts_with("mxlb_") && !kernel_objects.contains(&name) {
                names.insert(name);
            }
        }
    }
    names
}

/// The metric names of an OpenMetrics text (samples, not the `# TYPE` families).
fn served_metrics(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Whether a documented name (`mxlb_listener_*` for a prefix) covers a served one.
fn covers(documented: &str, served: &str) -> bool {
    match documented.strip_suffix('*') {
        Some(prefix) => served.starts_with(prefix),
        None => documented == served,
    }
}

/// Every metric the docs name is in a live daemon's `/metrics`, and every metric there is
/// named in the docs.
#[test]
fn documented_metrics_are_the_served_ones() -> Result<()> {
    let listen = free_addr();
    let stats = free_addr();
    let server = ServerEntry {
        name: "mail1",
        addr: free_addr(),
        send_proxy: "none",
    };
    let pins = pin_path("docs-metrics");
    let text = with_stats(
        &config(RelayKind::UserSpace, &pins, listen, &[server]),
        stats,
        None,
    );
    let mxlb = Mxlb::start(&text, listen, &pins)?;
    let (status, body) = mxlb_tests::mxlb::http::get(&format!("http://{stats}/metrics"))?;
    mxlb.stop()?;
    ensure!(status == 200, "/metrics: {status} {body}");
    let served = served_metrics(&body);
    let documented = documented_metrics();
    ensure!(
        served.len() > 20 && documented.len() > 10,
        "served {served:?}, documented {documented:?}"
    );
    let not_served: Vec<&String> = documented
        .iter()
        .filter(|name| !served.iter().any(|served| covers(name, served)))
        .collect();
    let not_documented: Vec<&String> = served
        .iter()
        .filter(|served| !documented.iter().any(|name| covers(name, served)))
        .collect();
    ensure!(
        not_served.is_empty() && not_documented.is_empty(),
        "documented but not in /metrics: {not_served:?}; in /metrics but not documented: \
         {not_documented:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Commands.

/// Every `mxlb …` command line of the docs: inline code that starts with it, and lines of
/// fenced blocks that do (after a `$ ` prompt, if any).
fn documented_command_lines() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (name, page) in all_docs() {
        let fenced_lines = page
            .split("```")
            .skip(1)
            .step_by(2)
            .flat_map(|block| block.lines().skip(1))
            .map(|line| {
                line.trim()
                    .trim_start_matches("$ ")
                    .trim_start_matches("sudo ")
            })
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let inline = inline_code(&page).map(str::to_owned).collect::<Vec<_>>();
        for line in fenced_lines.into_iter().chain(inline) {
            // A command or an option follows: not `mxlb 0.1.0`, the status table's title.
            let next = line
                .strip_prefix("mxlb ")
                .and_then(|rest| rest.chars().next());
            if next.is_some_and(|c| c.is_ascii_lowercase() || c == '-') {
                found.push((name.clone(), line));
            }
        }
    }
    found
}

/// The subcommands a `--help` text lists under "Commands:".
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every command and option the docs show exists: each word of `mxlb A B` in the
/// `--help` of what comes before it, each `--option` in the `--help` of its command.
#[test]
fn documented_commands_and_options_exist() -> Result<()> {
    let lines = documented_command_lines();
    ensure!(
        lines.len() > 10,
        "only {} command lines found: {lines:?}",
        lines.len()
    );
    let mut helps: BTreeMap<Vec<String>, String> = BTreeMap::new();
    let mut help = |path: &[String]| -> Result<String> {
        if let Some(text) = helps.get(path) {
            return Ok(text.clone());
        }
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = mxlb(&args)?;
        ensure!(output.status.success(), "mxlb {args:?}: {output:?}");
        helps.insert(path.to_vec(), output.output.clone());
        Ok(output.output)
    };
    let mut failures = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (page, line) in lines {
        let mut path: Vec<String> = Vec::new();
        for word in line.split_whitespace().skip(1) {
            let text = help(&path)?;
            if let Some(option) = word.strip_prefix("--") {
                let option = format!("--{}", option.split('=').next().unwrap_or_default());
                if !text
                    .split_whitespace()
                    .any(|w| w.trim_end_matches(',') == option)
                {
                    failures.insert(format!(
                        "{page}: `{line}`: mxlb {} has no {option}",
                        path.join(" ")
                    ));
                }
                continue;
            }
            let commands = subcommands(&text);
            if commands.is_empty() || word.starts_with('-') {
                continue;
            }
            if !commands.contains(word) {
                failures.insert(format!(
                    "{page}: `{line}`: mxlb {} has no command {word:?}",
                    path.join(" ")
                ));
                break;
            }
            path.push(word.to_owned());
            seen.insert(path.join(" "));
        }
    }
    ensure!(
        failures.is_empty(),
        "{}",
        failures.into_iter().collect::<Vec<_>>().join("\n")
    );
    // The check must have looked at real commands.
    ensure!(
        seen.contains("run") && seen.contains("check-config"),
        "{seen:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Logs.

/// configuration.md, "Log lines" of the health checks: at the default level only state
/// changes are logged; the `RUST_LOG` it gives for the results on the way there shows
/// them, as its example line has them.
#[test]
fn health_check_results_are_logged_at_the_documented_levels() -> Result<()> {
    let page = read_doc("docs/configuration.md");
    let section = page
        .split("### Log lines")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .context("no 'Log lines' section")?;
    let verbose = inline_code(section)
        .find(|code| code.starts_with("RUST_LOG=") && code.ends_with("=debug"))
        .context("no RUST_LOG=…=debug in 'Log lines'")?
        .trim_start_matches("RUST_LOG=");
    let example = fenced(section, "text")
        .into_iter()
        .find_map(|block| {
            block
                .lines()
                .find(|l| l.starts_with("health check for"))
                .map(str::to_owned)
        })
        .context("no example of a check result")?;

    let log_at = |level: &str| -> Result<Vec<String>> {
        let listen = free_addr();
        let pins = pin_path("docs-health-log");
        let server = ServerEntry {
            // Nothing listens there: every check is refused.
            name: "mail2",
            addr: free_addr(),
            send_proxy: "none",
        };
        let text = mxlb_tests::mxlb::config_with_listener_keys(
            RelayKind::UserSpace,
            &pins,
            listen,
            &[server],
            "[listen.check]\ntype = \"tcp\"\ninter = \"100ms\"\nfall = 3\n",
        );
        let mxlb = Mxlb::start_with_env(&text, listen, &pins, &[("RUST_LOG", level)])?;
        mxlb.wait_for_log_count("server smtp/mail2 is DOWN", 1, Duration::from_secs(20))?;
        let results = mxlb.log_lines("health check for");
        mxlb.stop()?;
        Ok(results)
    };
    let quiet = log_at("info")?;
    ensure!(quiet.is_empty(), "at info: {quiet:?}");
    let results = log_at(verbose)?;
    // The example as the daemon writes it, the check's duration aside.
    let shown = |line: &str| {
        let (before, after) = line.split_once(" in ").unwrap_or((line, ""));
        let after = after.split_once("ms").map_or(after, |(_, rest)| rest);
        format!("{before} in 0ms{after}")
    };
    ensure!(
        results.iter().any(|line| shown(line).contains(&example)),
        "RUST_LOG={verbose}: no line like {example:?} in {results:?}"
    );
    Ok(())
}
