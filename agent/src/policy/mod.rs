//! The policy language and its engine: YAML files (see policies/README.md)
//! read into one ordered rule list, evaluated per action, compiled into the
//! kernel's candidate maps.

pub mod candidates;
pub mod check;
mod eval;
pub mod matchers;
pub mod model;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

pub use eval::{Action, ExecAction, ExecEnv, Outcome, Subject, UnixAction};
pub use model::{Access, ActionKind, Decision, Example, HoldModel, Mode, NetScope, Protocol};
use model::{Cond, FileModel, Leaf};

/// A rule in force, with where it came from.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `pack/name`.
    pub id: String,
    pub pack: String,
    pub name: String,
    pub description: String,
    pub kind: ActionKind,
    pub when: Cond,
    pub decision: Decision,
    pub priority: i64,
    pub mode: Mode,
    pub hold: HoldModel,
    /// For a connect rule, which connects it can match.
    pub scope: NetScope,
    pub file: PathBuf,
    /// Position in load order (directory, file name, place in the file).
    pub load_order: usize,
}

impl Rule {
    /// Whether the rule can be about `action` at all: a connect rule that
    /// names addresses is never about a Unix socket, nor one that names
    /// sockets about an IP connect (so `not: {dest: ...}` says nothing of
    /// Unix sockets).
    pub fn applies_to(&self, action: &Action) -> bool {
        match action {
            Action::Connect { .. } => self.scope != NetScope::Unix,
            Action::Unix(_) => self.scope != NetScope::Inet,
            _ => true,
        }
    }
}

/// A file's pack and what it carries besides rules.
#[derive(Debug, Clone)]
pub struct Pack {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    pub examples: Vec<Example>,
}

/// An error in a policy file, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All errors of one load, each on its own line.
#[derive(Debug, Clone)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// The whole policy in force: every rule of every file in one order.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Sorted: priority (high first), severity, load order.
    pub rules: Vec<Rule>,
    pub packs: Vec<Pack>,
    /// Files read, in load order.
    pub files: Vec<PathBuf>,
    /// Per kind, the rules of that kind (indexes into `rules`, in order).
    by_kind: HashMap<ActionKind, Vec<u32>>,
    /// Exec rules that name their executables literally, by file name.
    exec_by_name: HashMap<String, Vec<u32>>,
    /// Exec rules that could match any executable.
    exec_any: Vec<u32>,
    /// Some rule looks at an exec's environment.
    uses_env: bool,
}

impl Policy {
    /// Whether some rule looks at an exec's environment: then an exec whose
    /// environment was not read whole is decided fail closed.
    pub fn uses_env(&self) -> bool {
        self.uses_env
    }

    /// One line on the policy: how many rules of which kind, from how many
    /// files.
    pub fn describe(&self) -> String {
        let count = |k: ActionKind| self.rules.iter().filter(|r| r.kind == k).count();
        let monitor = self
            .rules
            .iter()
            .filter(|r| r.mode == Mode::Monitor)
            .count();
        format!(
            "{} rules ({} exec, {} connect, {} file; {monitor} in monitor mode) from {} files",
            self.rules.len(),
            count(ActionKind::Exec),
            count(ActionKind::Connect),
            count(ActionKind::File),
            self.files.len()
        )
    }

    /// Reads every `*.yaml`/`*.yml` file of `dirs`, in order; a file in a
    /// later directory replaces the one of the same name in an earlier one.
    /// A directory that does not exist adds nothing.
    pub fn load_dirs(dirs: &[PathBuf]) -> Result<Self, PolicyErrors> {
        let mut by_name: BTreeMap<(usize, String), PathBuf> = BTreeMap::new();
        let mut seen: HashMap<String, (usize, String)> = HashMap::new();
        let mut errors = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    errors.push(error(dir, None, format!("cannot read the directory: {e}")));
                    continue;
                }
            };
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && !n.starts_with('.'))
                .collect();
            names.sort();
            for n in names {
                if let Some(earlier) = seen.insert(n.clone(), (i, n.clone())) {
                    by_name.remove(&earlier);
                }
                by_name.insert((i, n.clone()), dir.join(&n));
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        let files: Vec<PathBuf> = by_name.into_values().collect();
        Self::load_files(&files)
    }

    /// Reads the given files, in the given order.
    pub fn load_files(files: &[PathBuf]) -> Result<Self, PolicyErrors> {
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            match std::fs::read_to_string(f) {
                Ok(text) => sources.push((f.clone(), text)),
                Err(e) => errors.push(error(f, None, format!("cannot read: {e}"))),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Self::from_sources(&sources)
    }

    /// Builds the policy from (file, text) pairs in load order.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Self, PolicyErrors> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut packs: Vec<Pack> = Vec::new();
        for (file, text) in sources {
            let model: FileModel = match serde_yaml_ng::from_str(text) {
                Ok(m) => m,
                Err(e) => {
                    errors.push(yaml_error(file, &e));
                    continue;
                }
            };
            let pack = match model.pack.clone() {
                Some(p) => p,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            if let Some(other) = packs.iter().find(|p| p.name == pack) {
                errors.push(error(
                    file,
                    None,
                    format!(
                        "pack {pack:?} is already defined by {}: pack names must be unique",
                        other.file.display()
                    ),
                ));
                continue;
            }
            let mut names = std::collections::HashSet::new();
            for r in model.rules {
                if !names.insert(r.name.clone()) {
                    errors.push(error(
                        file,
                        None,
                        format!("rule {:?} appears twice in pack {pack:?}", r.name),
                    ));
                    continue;
                }
                let load_order = rules.len();
                rules.push(Rule {
                    id: format!("{pack}/{}", r.name),
                    pack: pack.clone(),
                    name: r.name,
                    description: r.description,
                    kind: r.on,
                    // Checked when the rule was read.
                    scope: r.when.net_scope().unwrap_or(NetScope::Both),
                    when: r.when,
                    decision: r.decision,
                    priority: r.priority,
                    mode: r.mode.unwrap_or(model.mode),
                    hold: r.hold,
                    file: file.clone(),
                    load_order,
                });
            }
            packs.push(Pack {
                name: pack,
                file: file.clone(),
                description: model.description,
                examples: model.examples,
            });
        }
        for r in rules.iter().filter(|r| r.kind == ActionKind::File) {
            let names = candidates::file_names(&r.when);
            let too_long = names
                .iter()
                .flatten()
                .find(|(n, _)| n.len() > airlock_common::FILE_NAME_HASHED);
            if let Some((name, _)) = too_long {
                errors.push(error(
                    &r.file,
                    None,
                    format!(
                        "rule {}: the name {name:?} is longer than the {} bytes the kernel compares",
                        r.name,
                        airlock_common::FILE_NAME_HASHED
                    ),
                ));
            }
            if r.decision != Decision::Record && names.is_none() {
                errors.push(error(
                    &r.file,
                    None,
                    format!(
                        "rule {}: its `path` patterns name no file or directory literally (as in `~/.ssh/*` or `**/.env`), so the kernel could not pick out its candidates",
                        r.name
                    ),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        let files = sources.iter().map(|(f, _)| f.clone()).collect();
        Ok(Self::build(rules, packs, files))
    }

    fn build(mut rules: Vec<Rule>, packs: Vec<Pack>, files: Vec<PathBuf>) -> Self {
        rules.sort_by_key(|r| (-r.priority, r.decision.severity_rank(), r.load_order));
        let mut by_kind: HashMap<ActionKind, Vec<u32>> = HashMap::new();
        let mut exec_by_name: HashMap<String, Vec<u32>> = HashMap::new();
        let mut exec_any = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let i = i as u32;
            by_kind.entry(r.kind).or_default().push(i);
            if r.kind != ActionKind::Exec {
                continue;
            }
            match candidates::exec_names(&r.when) {
                Some(names) => {
                    for n in names {
                        let list = exec_by_name.entry(n).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
                None => exec_any.push(i),
            }
        }
        let uses_env = rules.iter().any(|r| {
            let mut uses = false;
            r.when.visit(&mut |l| uses |= matches!(l, Leaf::Env(_)));
            uses
        });
        Self {
            rules,
            packs,
            files,
            by_kind,
            exec_by_name,
            exec_any,
            uses_env,
        }
    }

    /// A rule by `pack/name`.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// The rules that could match `action`, in order.
    fn rules_for<'a>(&'a self, action: &'a Action) -> RuleIter<'a> {
        match action {
            Action::Exec(e) if !e.aliases.is_empty() => {
                let mut all: Vec<u32> = e
                    .names()
                    .filter_map(|n| self.exec_by_name.get(n))
                    .flatten()
                    .chain(&self.exec_any)
                    .copied()
                    .collect();
                all.sort_unstable();
                all.dedup();
                RuleIter::Owned(all.into_iter())
            }
            Action::Exec(e) => {
                let named = self
                    .exec_by_name
                    .get(e.name())
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                RuleIter::Merge {
                    a: named,
                    b: &self.exec_any,
                }
            }
            other => RuleIter::One(
                self.by_kind
                    .get(&other.kind())
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                    .iter(),
            ),
        }
    }

    /// Decides `action`: the first matching rule that enforces, and the
    /// first monitor rule that matched before it. A file or Unix socket
    /// known by several names (a hard link's, a renamed directory's) is
    /// decided under each name on its own, and the most severe decision
    /// stands: an exception (`not: {path: ~/.ssh/*.pub}`) applies only if
    /// it covers every name the file has.
    pub fn evaluate(&self, action: &Action, subject: &Subject) -> Outcome<'_> {
        let names: Vec<Action> = match action {
            Action::File {
                path,
                aliases,
                write,
            } if !aliases.is_empty() => std::iter::once(path)
                .chain(aliases)
                .map(|p| Action::File {
                    path: p.clone(),
                    aliases: Vec::new(),
                    write: *write,
                })
                .collect(),
            Action::Unix(u) if !u.aliases.is_empty() => u
                .names()
                .map(|n| {
                    Action::Unix(eval::UnixAction {
                        socket: n.to_string(),
                        aliases: Vec::new(),
                        ..u.clone()
                    })
                })
                .collect(),
            _ => return self.evaluate_one(action, subject),
        };
        names
            .iter()
            .map(|a| self.evaluate_one(a, subject))
            .min_by_key(|o| o.decision.severity_rank())
            .unwrap_or_else(|| self.evaluate_one(action, subject))
    }

    /// [`Self::evaluate`] for the action under its own names at once.
    fn evaluate_one(&self, action: &Action, subject: &Subject) -> Outcome<'_> {
        let mut monitor = None;
        for i in self.rules_for(action) {
            let r = &self.rules[i as usize];
            if r.decision == Decision::Record && r.mode == Mode::Monitor || !r.applies_to(action) {
                continue;
            }
            if !eval::matches(&r.when, action, subject, None) {
                continue;
            }
            if r.mode == Mode::Monitor {
                monitor.get_or_insert(r);
                continue;
            }
            return Outcome {
                decision: r.decision,
                rule: Some(r),
                monitor,
            };
        }
        Outcome {
            decision: Decision::Record,
            rule: None,
            monitor,
        }
    }

    /// Every rule of the action's kind that matches, in order, with the
    /// conditions that held: what `airlock policy explain` prints.
    pub fn explain(&self, action: &Action, subject: &Subject) -> Vec<(&Rule, Vec<String>)> {
        let mut out = Vec::new();
        for &i in self
            .by_kind
            .get(&action.kind())
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let r = &self.rules[i as usize];
            let mut why = Vec::new();
            if r.applies_to(action) && eval::matches(&r.when, action, subject, Some(&mut why)) {
                out.push((r, why));
            }
        }
        out
    }
}

/// Rule indexes in order: one list, or two sorted lists merged.
enum RuleIter<'a> {
    One(std::slice::Iter<'a, u32>),
    Merge {
        a: &'a [u32],
        b: &'a [u32],
    },
    /// An exec under several names: the rules of each, merged.
    Owned(std::vec::IntoIter<u32>),
}

impl Iterator for RuleIter<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Self::One(it) => it.next().copied(),
            Self::Owned(it) => it.next(),
            Self::Merge { a, b } => {
                let take_a = match (a.first(), b.first()) {
                    (Some(x), Some(y)) => x <= y,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => return None,
                };
                let (list, rest) = if take_a { (*a, &mut *a) } else { (*b, &mut *b) };
                let v = list[0];
                *rest = &list[1..];
                Some(v)
            }
        }
    }
}

fn error(file: &Path, pos: Option<(usize, usize)>, message: String) -> PolicyError {
    PolicyError {
        file: file.to_path_buf(),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
        message,
    }
}

/// A YAML error with its position, the position cut from the message.
fn yaml_error(file: &Path, e: &serde_yaml_ng::Error) -> PolicyError {
    let mut message = e.to_string();
    let pos = e.location().map(|l| (l.line(), l.column()));
    if let Some((line, col)) = pos {
        let suffix = format!(" at line {line} column {col}");
        if let Some(i) = message.find(&suffix) {
            message.replace_range(i..i + suffix.len(), "");
        }
    }
    error(file, pos, message)
}

#[cfg(test)]
mod tests;
