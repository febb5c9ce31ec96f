//! Evaluating a condition against one action.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Component, Path, PathBuf},
};

use super::{
    Rule,
    model::{Access, ActionKind, Cond, Decision, Leaf, Protocol},
};

/// Who acts: the session's labels and the process's ids.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub uid: u32,
    pub gid: u32,
}

/// An exec, with what matching needs prepared once.
#[derive(Debug, Clone)]
pub struct ExecAction {
    /// The executable's path on this host (what ran, not what the caller
    /// wrote).
    pub path: String,
    /// Other paths of what runs, each matched as `path` is: the names the
    /// policy knows the same file by (a hard link's other names), a
    /// script's interpreter, a dynamic loader that runs the program.
    pub aliases: Vec<String>,
    pub argv: Vec<String>,
    pub parent_exe: Option<String>,
    /// The executable has the set-user-ID or set-group-ID bit.
    pub setuid: bool,
    /// The process's working directory, when known.
    pub cwd: Option<String>,
    /// The environment the program gets, when read.
    pub env: Option<ExecEnv>,
    cmdline: String,
}

/// An exec's environment as read: its NUL-terminated `NAME=value`
/// strings (at most [`airlock_common::ENV_MAX`] bytes of them), whether
/// they were cut there, and the variables they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecEnv {
    pub raw: Vec<u8>,
    pub cut: bool,
    pub vars: Vec<(String, String)>,
}

impl ExecEnv {
    /// Parses NUL-terminated `NAME=value` strings (as in `/proc/PID/environ`).
    pub fn parse(raw: Vec<u8>, cut: bool) -> Self {
        let vars = raw
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let s = String::from_utf8_lossy(s);
                match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (s.to_string(), String::new()),
                }
            })
            .collect();
        Self { raw, cut, vars }
    }

    /// Every value `name` has (a variable can be set more than once).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.vars
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl ExecAction {
    pub fn new(path: String, argv: Vec<String>) -> Self {
        let cmdline = if argv.is_empty() {
            path.clone()
        } else {
            argv.join(" ")
        };
        Self {
            path,
            aliases: Vec::new(),
            argv,
            parent_exe: None,
            setuid: false,
            cwd: None,
            env: None,
            cmdline,
        }
    }

    /// The executable's file name.
    pub fn name(&self) -> &str {
        file_name(&self.path)
    }

    /// `path` and then every alias.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.path.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// The file name of each of [`Self::paths`].
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.paths().map(file_name)
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    fn args(&self) -> &[String] {
        self.argv.get(1..).unwrap_or(&[])
    }
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// A connect (or datagram flow) to a Unix-domain socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAction {
    /// The socket's address as its server bound it (`@name` for an
    /// abstract one).
    pub socket: String,
    /// The paths the policy knows the same socket file by (a symlink's
    /// target, a hard link's other names): each is matched as `socket`.
    pub aliases: Vec<String>,
    /// The process serving it is not in the acting session (or unknown).
    pub outside: bool,
    pub datagram: bool,
}

impl UnixAction {
    /// `socket` and then every alias.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.socket.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// An action to decide.
#[derive(Debug, Clone)]
pub enum Action {
    Exec(ExecAction),
    Connect {
        addr: IpAddr,
        port: u16,
        protocol: Option<Protocol>,
    },
    /// A connect to a Unix socket: a `connect` action too.
    Unix(UnixAction),
    File {
        path: String,
        /// Other paths the policy knows the same file by (a hard link's
        /// other names, its path before a directory was renamed): each is
        /// matched as `path`.
        aliases: Vec<String>,
        write: bool,
    },
}

impl Action {
    pub fn kind(&self) -> ActionKind {
        match self {
            Self::Exec(_) => ActionKind::Exec,
            Self::Connect { .. } | Self::Unix(_) => ActionKind::Connect,
            Self::File { .. } => ActionKind::File,
        }
    }

    /// One line for logs, messages and `explain`.
    pub fn summary(&self) -> String {
        match self {
            Self::Exec(e) => e.cmdline.clone(),
            Self::Connect { addr, port, .. } => match addr {
                IpAddr::V6(a) => format!("[{a}]:{port}"),
                IpAddr::V4(a) => format!("{a}:{port}"),
            },
            Self::File { path, write, .. } => {
                format!("{path} ({})", if *write { "write" } else { "read" })
            }
            Self::Unix(u) => format!(
                "unix{} {}",
                if u.datagram { " datagram" } else { "" },
                u.socket
            ),
        }
    }
}

/// What the policy decided for one action.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'p> {
    pub decision: Decision,
    /// The deciding rule; None when nothing matched (record).
    pub rule: Option<&'p Rule>,
    /// The first monitor rule that matched before the deciding one.
    pub monitor: Option<&'p Rule>,
}

/// Whether `c` holds for `action`; `why` collects the conditions that held.
pub fn matches(c: &Cond, action: &Action, s: &Subject, mut why: Option<&mut Vec<String>>) -> bool {
    match c {
        Cond::All(parts) => parts
            .iter()
            .all(|p| matches(p, action, s, why.as_deref_mut())),
        Cond::Any(parts) => parts
            .iter()
            .any(|p| matches(p, action, s, why.as_deref_mut())),
        Cond::Not(inner) => {
            let held = !matches(inner, action, s, None);
            if held && let Some(w) = why {
                w.push("the `not` condition holds".into());
            }
            held
        }
        Cond::Leaf(l) => {
            let r = leaf(l, action, s, why.is_some());
            if let (Some(w), Some(reason)) = (why, r.as_ref()) {
                w.push(reason.clone());
            }
            r.is_some()
        }
    }
}

/// Some(reason) when the leaf holds.
fn leaf(l: &Leaf, action: &Action, s: &Subject, explain: bool) -> Option<String> {
    // The reason is only written out for `explain`: evaluation allocates nothing.
    let why = |f: &dyn Fn() -> String| if explain { f() } else { String::new() };
    match (l, action) {
        (Leaf::Labels(wanted), _) => {
            for (k, globs) in wanted {
                let v = s.labels.get(k)?;
                if !globs.is_match(v) {
                    return None;
                }
            }
            Some(why(&|| {
                format!(
                    "labels {}",
                    wanted
                        .iter()
                        .map(|(k, _)| format!("{k}={}", s.labels.get(k).map_or("", String::as_str)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }))
        }
        (Leaf::User(ids), _) => ids
            .contains(&s.uid)
            .then(|| why(&|| format!("uid {} is listed", s.uid))),
        (Leaf::Group(ids), _) => ids
            .contains(&s.gid)
            .then(|| why(&|| format!("gid {} is listed", s.gid))),
        (Leaf::Exe(pats), Action::Exec(e)) => e.paths().find_map(|path| {
            pats.first(path, explain)
                .map(|p| why(&|| format!("executable {path} matches {p:?}")))
        }),
        (Leaf::ParentExe(pats), Action::Exec(e)) => {
            let parent = e.parent_exe.as_deref()?;
            pats.first(parent, explain)
                .map(|p| why(&|| format!("parent {parent} matches {p:?}")))
        }
        (Leaf::Setuid(want), Action::Exec(e)) => (e.setuid == *want).then(|| {
            if e.setuid {
                why(&|| "the executable is set-user-ID or set-group-ID".into())
            } else {
                why(&|| "the executable is not set-user-ID".into())
            }
        }),
        (Leaf::Cmdline(globs), Action::Exec(e)) => globs
            .first(&e.cmdline, explain)
            .map(|g| why(&|| format!("command line matches {g:?}"))),
        (Leaf::CmdlineRegex(res), Action::Exec(e)) => res
            .first(&e.cmdline, explain)
            .map(|r| why(&|| format!("command line matches /{r}/"))),
        (Leaf::Args(globs), Action::Exec(e)) => e.args().iter().find_map(|a| {
            globs
                .first(a, explain)
                .map(|g| why(&|| format!("argument {a:?} matches {g:?}")))
        }),
        (Leaf::ArgsRegex(res), Action::Exec(e)) => e.args().iter().find_map(|a| {
            res.first(a, explain)
                .map(|r| why(&|| format!("argument {a:?} matches /{r}/")))
        }),
        (Leaf::Env(wanted), Action::Exec(e)) => {
            let env = e.env.as_ref()?;
            // Any of a name's values (set twice, a program may read either:
            // getenv the first, the dynamic loader the last).
            for (k, globs) in wanted {
                if !env.values(k).any(|v| globs.is_match(v)) {
                    return None;
                }
            }
            Some(why(&|| {
                format!(
                    "environment {}",
                    wanted
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }))
        }
        (Leaf::Cwd(pats), Action::Exec(e)) => {
            let cwd = e.cwd.as_deref()?;
            pats.iter()
                .find(|p| p.is_match(cwd))
                .map(|p| why(&|| format!("working directory {cwd} matches {:?}", p.pattern)))
        }
        (Leaf::OutsideWorkdir(want), Action::Exec(e)) => {
            let outside = outside_workdir(e, s.labels.get("workdir").map(String::as_str));
            (outside.is_some() == *want).then(|| match outside {
                Some(p) => why(&|| format!("argument path {p} is outside the workdir")),
                None => why(&|| "no argument path is outside the workdir".into()),
            })
        }
        (Leaf::Dest(nets), Action::Connect { addr, .. }) => {
            let addr = canonical(*addr);
            nets.iter()
                .find(|n| n.0.contains(&addr))
                .map(|n| why(&|| format!("destination {addr} is in {}", n.0)))
        }
        (Leaf::Port(ranges), Action::Connect { port, .. }) => ranges
            .iter()
            .any(|r| r.0 <= *port && *port <= r.1)
            .then(|| why(&|| format!("port {port} is listed"))),
        (Leaf::Protocol(p), Action::Connect { protocol, .. }) => {
            (*protocol == Some(*p)).then(|| why(&|| format!("protocol is {p:?}")).to_lowercase())
        }
        (Leaf::Path(pats), Action::File { path, aliases, .. }) => {
            std::iter::once(path).chain(aliases).find_map(|path| {
                pats.iter()
                    .find(|p| p.is_match(path))
                    .map(|p| why(&|| format!("path {path} matches {:?}", p.pattern)))
            })
        }
        (Leaf::Access(a), Action::File { write, .. }) => {
            let is = if *write { Access::Write } else { Access::Read };
            (is == *a).then(|| why(&|| format!("opened for {a:?}")).to_lowercase())
        }
        (Leaf::Socket(pats), Action::Unix(u)) => u.names().find_map(|name| {
            pats.iter()
                .find(|p| p.0.is_match(name))
                .map(|p| why(&|| format!("socket {name} matches {:?}", p.0.pattern)))
        }),
        (Leaf::OutsideSession(want), Action::Unix(u)) => (u.outside == *want).then(|| {
            if u.outside {
                why(&|| "the socket's server is outside the session".into())
            } else {
                why(&|| "the socket's server is in the session".into())
            }
        }),
        // A key of another kind: rejected when the file is read.
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses are matched as the IPv4 address they carry.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// The first argument (not an option) that, as a path, lies outside
/// `workdir`; with no workdir every such argument does.
fn outside_workdir(e: &ExecAction, workdir: Option<&str>) -> Option<String> {
    let cwd = Path::new(e.cwd.as_deref().or(workdir).unwrap_or("/"));
    for a in e.args() {
        if a.starts_with('-') || a.is_empty() {
            continue;
        }
        let p = normalize(&cwd.join(a));
        match workdir {
            Some(w) if p.starts_with(normalize(Path::new(w))) => {}
            _ => return Some(p.display().to_string()),
        }
    }
    None
}

/// Resolves `.` and `..` without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}
