//! The floors of `lib.rs`, checked: every path in the sources that names a
//! module of this crate (`crate::…`, `super::…`, `self::…`, a child module
//! by name, in `use` trees, code, macro bodies and attribute strings) is
//! resolved to the module it names, and an import that points up a floor
//! (or sideways where a floor forbids it) fails the test. So does a cycle
//! among modules (the daemon's submodules counted apart), and so does an
//! alias of `crate`, which would hide imports from this reader.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// The floor of each top-level module: 0 pure data, 1 engines, 2 the
/// daemon and the CLI beside it.
fn floor(module: &str) -> Option<u8> {
    Some(match module {
        "model" => 0,
        "config" | "policy" | "bpf" | "store" | "procfs" | "features" | "ctl" | "exefile" => 1,
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

/// Collects the crate paths one file names.
struct Reader {
    /// The module the reader is in: the file's, plus inline modules.
    module: Vec<String>,
    /// Child modules declared in each module (`mod x;` or `mod x { }`).
    children: BTreeMap<Vec<String>, BTreeSet<String>>,
    found: Vec<Vec<String>>,
    aliases: Vec<String>,
}

impl Reader {
    /// A path's segments, resolved from the crate root when it names a
    /// module of this crate.
    fn resolve(&mut self, segs: &[String]) {
        let Some(first) = segs.first() else { return };
        let mut at: Vec<String>;
        let mut rest = segs;
        match first.as_str() {
            "crate" => {
                at = Vec::new();
                rest = &segs[1..];
            }
            "super" | "self" => {
                at = self.module.clone();
                while let Some(s) = rest.first() {
                    match s.as_str() {
                        "super" => {
                            at.pop();
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            name if self
                .children
                .get(&self.module)
                .is_some_and(|c| c.contains(name)) =>
            {
                at = self.module.clone();
            }
            _ => return,
        }
        at.extend(rest.iter().cloned());
        if at.first().is_some_and(|s| !s.is_empty() && s != "*") {
            self.found.push(at);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.resolve(&full);
            }
            syn::UseTree::Rename(r) => {
                if r.ident == "crate" {
                    self.aliases.push(format!("use crate as {}", r.rename));
                }
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.resolve(&full);
            }
            syn::UseTree::Glob(_) => self.resolve(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// Paths written as tokens (macro bodies, attribute arguments): each
    /// `crate`, `super` or `self` followed by `::` and names.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let flat: Vec<String> = flatten(tokens);
        for (i, t) in flat.iter().enumerate() {
            if matches!(t.as_str(), "crate" | "super" | "self")
                && flat.get(i + 1).map(String::as_str) == Some("::")
                && (i == 0 || flat[i - 1] != "::")
            {
                let mut segs = vec![t.clone()];
                let mut j = i + 1;
                while flat.get(j).map(String::as_str) == Some("::") {
                    match flat.get(j + 1) {
                        Some(n) if n.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                            segs.push(n.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                self.resolve(&segs);
            }
        }
    }
}

/// A token stream as identifiers, `::` and the paths inside string
/// literals (`#[serde(with = "crate::x")]`), in order.
fn flatten(tokens: proc_macro2::TokenStream) -> Vec<String> {
    let mut out = Vec::new();
    let mut colon = false;
    for t in tokens {
        match t {
            proc_macro2::TokenTree::Group(g) => {
                out.extend(flatten(g.stream()));
                colon = false;
            }
            proc_macro2::TokenTree::Ident(i) => {
                out.push(i.to_string());
                colon = false;
            }
            proc_macro2::TokenTree::Punct(p) if p.as_char() == ':' => {
                if colon {
                    out.push("::".into());
                    colon = false;
                } else {
                    colon = true;
                }
            }
            proc_macro2::TokenTree::Literal(l) => {
                let text = l.to_string();
                if let Ok(lit) = syn::parse_str::<syn::LitStr>(&text)
                    && let Ok(inner) = lit.value().parse::<proc_macro2::TokenStream>()
                {
                    out.extend(flatten(inner));
                }
                colon = false;
            }
            proc_macro2::TokenTree::Punct(_) => colon = false,
        }
    }
    out
}

impl<'ast> Visit<'ast> for Reader {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        for a in &m.attrs {
            self.visit_attribute(a);
        }
        if let Some((_, items)) = &m.content {
            self.module.push(m.ident.to_string());
            for i in items {
                self.visit_item(i);
            }
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_item_extern_crate(&mut self, e: &'ast syn::ItemExternCrate) {
        if e.ident == "self" {
            self.aliases.push("extern crate self".into());
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segs);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        self.tokens(quote::ToTokens::to_token_stream(&a.meta));
    }
}

/// The child modules each module of `file` declares (inline ones too).
fn declared(
    module: &[String],
    items: &[syn::Item],
    out: &mut BTreeMap<Vec<String>, BTreeSet<String>>,
) {
    for i in items {
        if let syn::Item::Mod(m) = i {
            out.entry(module.to_vec())
                .or_default()
                .insert(m.ident.to_string());
            if let Some((_, inner)) = &m.content {
                let mut sub = module.to_vec();
                sub.push(m.ident.to_string());
                declared(&sub, inner, out);
            }
        }
    }
}

/// Every crate path the source `text` of module `module` names.
fn imports(module: &[String], text: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let file = syn::parse_file(text).expect("the source parses");
    let mut children = BTreeMap::new();
    declared(module, &file.items, &mut children);
    let mut r = Reader {
        module: module.to_vec(),
        children,
        found: Vec::new(),
        aliases: Vec::new(),
    };
    r.visit_file(&file);
    (r.found, r.aliases)
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
        let text = std::fs::read_to_string(file).expect("read source");
        let (found, aliases) = imports(&module, &text);
        let shown = file
            .strip_prefix(&src)
            .unwrap_or(file)
            .display()
            .to_string();
        for a in aliases {
            bad.push(format!(
                "{shown}: {a}: an alias of the crate hides its imports"
            ));
        }
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs, main.rs
        };
        if top == "floors" {
            continue;
        }
        let from = unit(&module, &daemon_parts);
        for path in found {
            if let Some(why) = forbidden(&top, &path) {
                bad.push(format!("{shown}: crate::{}: {why}", path.join("::")));
            }
            let to = unit(&path, &daemon_parts);
            // The daemon's own mod.rs assembles its submodules: it is the
            // top of the daemon and counts as no unit of the cycle check.
            if to != from && from != "daemon" && floor(path[0].as_str()).is_some() {
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
        edges.contains_key("daemon::broker"),
        "the reader found the daemon's imports"
    );
}

#[test]
fn the_reader_resolves_every_way_of_naming_a_module() {
    let m = |s: &str| s.split("::").map(str::to_string).collect::<Vec<_>>();
    let (found, aliases) = imports(
        &m("daemon::broker::apply"),
        r#"
use crate::{model::{A, B}, policy::x};
use super::Broker;
// crate::cli in a comment
/* crate::cli in a block comment */
fn f() {
    let s = "crate::cli";
    let _ = self::super::super::handles::H;
    crate::daemon::run();
    tracing::info!("{}", crate::store::Store::x());
}
#[serde(with = "crate::config::Config")]
struct S;
mod inner {
    use super::super::decide::D;
}
mod child;
use child::C;
"#,
    );
    let found: BTreeSet<Vec<String>> = found.into_iter().collect();
    assert_eq!(
        found,
        BTreeSet::from([
            m("model::A"),
            m("model::B"),
            m("policy::x"),
            m("daemon::broker::Broker"),
            m("daemon::broker::decide::D"),
            m("daemon::broker::apply::child::C"),
            m("daemon::handles::H"),
            m("daemon::run"),
            m("store::Store::x"),
            m("config::Config"),
        ])
    );
    assert!(aliases.is_empty());
    let (_, aliases) = imports(&m("cli"), "use crate as c;\nextern crate self as me;\n");
    assert_eq!(aliases.len(), 2, "{aliases:?}");
    assert!(forbidden("store", &m("policy::Policy")).is_some());
    assert!(forbidden("cli", &m("daemon::broker")).is_some());
    assert!(forbidden("cli", &m("daemon::run")).is_none());
    assert!(forbidden("bpf", &m("daemon::x")).is_some());
    assert!(forbidden("bpf", &m("policy::candidates")).is_none());
    assert!(forbidden("model", &m("config::Config")).is_some());
}
