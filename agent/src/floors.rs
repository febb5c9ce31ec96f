//! The floors of `lib.rs`, checked: every `crate::` and `super::` path in
//! the sources is resolved to the module it names, and an import that
//! points up a floor (or sideways where a floor forbids it) fails the test.
//! So does a cycle among modules (the daemon's submodules counted apart).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The floor of each top-level module: 0 pure data, 1 engines, 2 the
/// daemon and the CLI beside it.
fn floor(module: &str) -> Option<u8> {
    Some(match module {
        "model" => 0,
        "config" | "policy" | "bpf" | "store" | "procfs" | "features" | "ctl" => 1,
        "daemon" | "cli" => 2,
        _ => return None,
    })
}

/// Why `from` (a top-level module) may not import `path` (resolved, from
/// the crate root), if it may not.
fn forbidden(from: &str, path: &[String]) -> Option<String> {
    let to = path.first()?.as_str();
    if to == from {
        return None;
    }
    let (Some(f), Some(t)) = (floor(from), floor(to)) else {
        return Some(format!(
            "{to} is not a module on any floor (add it to floors.rs)"
        ));
    };
    if from == "model" {
        return Some("model is pure data: it imports nothing of the crate".into());
    }
    if from == "store" && to != "model" {
        return Some("store imports model only".into());
    }
    if from == "policy" && to != "model" {
        return Some("policy is pure: it imports model only".into());
    }
    if from == "cli" && to == "daemon" {
        return (path.get(1).map(String::as_str) != Some("run"))
            .then(|| "cli uses only daemon::run; it talks to a daemon through its clients".into());
    }
    if t > f || (t == f && f == 2) {
        return Some(format!(
            "{from} (floor {f}) may not import {to} (floor {t})"
        ));
    }
    None
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src").flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file: `daemon/broker/mod.rs` is
/// `daemon::broker`, `bpf/decode.rs` is `bpf::decode`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// Comments and string literals blanked out, so only code is read.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
                out.push(' ');
            } else {
                out.push(if in_str { ' ' } else { c });
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The paths a `crate::` or `super::` prefix at `at` leads to: one, or
/// one per item of a `{...}` group (nested groups flattened).
fn paths_at(code: &str, at: usize) -> Vec<String> {
    let rest = &code[at..];
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 1;
        let mut end = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = i;
                break;
            }
        }
        let inner = &group[..end];
        let mut items = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&inner[start..]);
        return items
            .into_iter()
            .map(|s| s.split_whitespace().collect::<String>())
            .filter(|s| !s.is_empty())
            .flat_map(|item| match item.find("::{") {
                Some(i) => paths_at(&item, i + 2)
                    .into_iter()
                    .map(|p| format!("{}::{p}", &item[..i]))
                    .collect(),
                None => vec![item],
            })
            .collect();
    }
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '*'))
        .unwrap_or(rest.len());
    vec![rest[..end].trim_end_matches(':').to_string()]
}

/// Inline modules (`mod tests { ... }`): where each starts and ends, and
/// its name.
fn inline_mods(code: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("mod ") {
        let at = from + i;
        from = at + 4;
        let before = code[..at].chars().last().unwrap_or(' ');
        if before.is_alphanumeric() || before == '_' {
            continue;
        }
        let rest = &code[from..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = rest[name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = from + name.len() + (rest[name.len()..].len() - after.len());
        let mut depth = 0;
        for (j, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                out.push((open, open + j, name));
                break;
            }
        }
    }
    out
}

/// Every crate path `file` (module `module`) refers to, from the root.
fn imports(module: &[String], text: &str) -> Vec<Vec<String>> {
    let code = code_only(text);
    let inline = inline_mods(&code);
    let mut out = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(prefix) {
            let at = from + i;
            from = at + prefix.len();
            let before = code[..at].chars().last().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' || (prefix == "super::" && before == ':') {
                continue;
            }
            // `super` inside an inline module starts from that module.
            let base: Vec<String> = if prefix == "crate::" {
                Vec::new()
            } else {
                let mut b = module.to_vec();
                b.extend(
                    inline
                        .iter()
                        .filter(|(start, end, _)| *start < at && at < *end)
                        .map(|(_, _, name)| name.clone()),
                );
                b
            };
            for p in paths_at(&code, from) {
                let mut segs: Vec<String> = base.clone();
                let mut parts = p.split("::").peekable();
                if prefix == "super::" {
                    segs.pop();
                    while parts.peek() == Some(&"super") {
                        parts.next();
                        segs.pop();
                    }
                }
                segs.extend(parts.map(str::to_string));
                if segs
                    .first()
                    .is_some_and(|s| !s.is_empty() && s != "*" && s != "self")
                {
                    out.push(segs);
                }
            }
        }
    }
    out
}

/// A module as counted for cycles: its top-level module, or for the
/// daemon, its submodule.
fn unit(path: &[String], daemon_parts: &BTreeSet<String>) -> String {
    match (path.first().map(String::as_str), path.get(1)) {
        (Some("daemon"), Some(sub)) if daemon_parts.contains(sub) => format!("daemon::{sub}"),
        (Some(top), _) => top.to_string(),
        (None, _) => String::new(),
    }
}

#[test]
fn floors_hold() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let daemon_parts: BTreeSet<String> = std::fs::read_dir(src.join("daemon"))
        .expect("daemon/")
        .flatten()
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.trim_end_matches(".rs").to_string()
        })
        .filter(|n| n != "mod")
        .collect();
    let mut bad = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs, main.rs
        };
        if top == "floors" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        let from = unit(&module, &daemon_parts);
        for path in imports(&module, &text) {
            if let Some(why) = forbidden(&top, &path) {
                bad.push(format!(
                    "{}: crate::{}: {why}",
                    file.strip_prefix(&src).unwrap_or(file).display(),
                    path.join("::")
                ));
            }
            let to = unit(&path, &daemon_parts);
            if to != from && floor(path[0].as_str()).is_some() {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that break the floors:\n{}",
        bad.join("\n")
    );
    // A cycle: a module that reaches itself.
    for start in edges.keys() {
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, trail)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    panic!("import cycle: {} -> {start}", trail.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    assert!(
        edges.contains_key("daemon"),
        "the reader found the daemon's imports"
    );
}

#[test]
fn the_reader_resolves_groups_and_super() {
    let m = |s: &str| s.split("::").map(str::to_string).collect::<Vec<_>>();
    let found = imports(
        &m("daemon::broker::apply"),
        "use crate::{model::{A, B}, policy::x};\nuse super::Broker;\n// crate::cli in a comment\nlet s = \"crate::cli\";\nuse super::super::handles::H;\n",
    );
    assert_eq!(
        found,
        vec![
            m("model::A"),
            m("model::B"),
            m("policy::x"),
            m("daemon::broker::Broker"),
            m("daemon::handles::H"),
        ]
    );
    assert!(forbidden("store", &m("policy::Policy")).is_some());
    assert!(forbidden("cli", &m("daemon::broker")).is_some());
    assert!(forbidden("cli", &m("daemon::run")).is_none());
    assert!(forbidden("bpf", &m("daemon::x")).is_some());
    assert!(forbidden("bpf", &m("policy::candidates")).is_none());
    assert!(forbidden("model", &m("config::Config")).is_some());
}
