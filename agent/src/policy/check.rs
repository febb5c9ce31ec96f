//! `airlock policy check`: warnings for rules that can never decide, and
//! the files' examples run against the whole policy.

use std::{collections::BTreeMap, net::SocketAddr};

use super::{
    Action, ExecAction, Policy, Rule, Subject,
    candidates::may,
    model::{Access, ActionKind, Cond, Decision, Example, Leaf, Mode, Protocol},
};

/// A rule that is legal but suspicious.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: std::path::PathBuf,
    pub rule: String,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: warning: rule {}: {}",
            self.file.display(),
            self.rule,
            self.message
        )
    }
}

/// Warnings about the policy: rules that never match or never decide.
/// `approvers`: names and groups from the config, when known.
pub fn warnings(p: &Policy, approvers: Option<&[(String, Vec<String>)]>) -> Vec<Warning> {
    let mut out = Vec::new();
    let warn = |r: &Rule, message: String| Warning {
        file: r.file.clone(),
        rule: r.id.clone(),
        message,
    };
    for (i, r) in p.rules.iter().enumerate() {
        if r.mode == Mode::Monitor && r.decision == Decision::Record {
            out.push(warn(
                r,
                "a monitor rule that only records has no effect".into(),
            ));
        }
        if r.kind == ActionKind::Connect && may(&r.when).is_empty() {
            out.push(warn(
                r,
                "no destination address can satisfy it: it never matches".into(),
            ));
        }
        if let Some(a) = p.rules[..i]
            .iter()
            .find(|a| a.kind == r.kind && a.mode == Mode::Enforce && covers(&a.when, &r.when))
        {
            out.push(warn(
                r,
                format!(
                    "shadowed by {} ({}), which matches everything it matches and comes first: it never decides",
                    a.id,
                    a.decision.name()
                ),
            ));
        }
        if let (Some(known), Decision::Hold) = (approvers, r.decision) {
            for name in &r.hold.approvers {
                if !known.iter().any(|(n, _)| n == name) {
                    out.push(warn(r, format!("approver {name:?} is not in the config")));
                }
            }
            for g in &r.hold.groups {
                if !known.iter().any(|(_, gs)| gs.contains(g)) {
                    out.push(warn(
                        r,
                        format!("no approver in the config is in group {g:?}"),
                    ));
                }
            }
            if known.is_empty() {
                out.push(warn(
                    r,
                    "no approvers are configured: its holds end by their timeout".into(),
                ));
            }
        }
    }
    for note in p.candidates().notes {
        out.push(Warning {
            file: std::path::PathBuf::from("(candidates)"),
            rule: String::from("-"),
            message: note,
        });
    }
    out
}

/// The top-level conjunction of a condition, when it is one of leaves.
fn conjuncts(c: &Cond) -> Option<Vec<&Leaf>> {
    match c {
        Cond::Leaf(l) => Some(vec![l]),
        Cond::All(parts) => parts
            .iter()
            .map(|p| match p {
                Cond::Leaf(l) => Some(l),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// True when `a` holds wherever `b` does (checked on the written leaves:
/// every leaf of `a` has a narrower or equal leaf of the same key in `b`).
fn covers(a: &Cond, b: &Cond) -> bool {
    let (Some(la), Some(lb)) = (conjuncts(a), conjuncts(b)) else {
        return a == b;
    };
    la.iter().all(|x| lb.iter().any(|y| leaf_covers(x, y)))
}

fn subset<T: PartialEq>(narrow: &[T], wide: &[T]) -> bool {
    narrow.iter().all(|n| wide.contains(n))
}

fn leaf_covers(a: &Leaf, b: &Leaf) -> bool {
    match (a, b) {
        (Leaf::Exe(x), Leaf::Exe(y)) | (Leaf::ParentExe(x), Leaf::ParentExe(y)) => subset(y, x),
        (Leaf::Args(x), Leaf::Args(y)) | (Leaf::Cmdline(x), Leaf::Cmdline(y)) => subset(y, x),
        (Leaf::ArgsRegex(x), Leaf::ArgsRegex(y))
        | (Leaf::CmdlineRegex(x), Leaf::CmdlineRegex(y)) => subset(y, x),
        (Leaf::Dest(x), Leaf::Dest(y)) => y.iter().all(|n| x.iter().any(|w| w.0.contains(&n.0))),
        (Leaf::Port(x), Leaf::Port(y)) => {
            y.iter().all(|n| x.iter().any(|w| w.0 <= n.0 && n.1 <= w.1))
        }
        (Leaf::Path(x), Leaf::Path(y)) => subset(y, x),
        (Leaf::User(x), Leaf::User(y)) | (Leaf::Group(x), Leaf::Group(y)) => subset(y, x),
        (Leaf::Labels(x), Leaf::Labels(y)) => x
            .iter()
            .all(|(k, gx)| y.iter().any(|(k2, gy)| k == k2 && subset(gy, gx))),
        _ => a == b,
    }
}

/// An example that did not decide as its file says.
#[derive(Debug, Clone)]
pub struct ExampleFailure {
    pub file: std::path::PathBuf,
    pub index: usize,
    pub action: String,
    pub message: String,
}

impl std::fmt::Display for ExampleFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: example {} ({}): {}",
            self.file.display(),
            self.index + 1,
            self.action,
            self.message
        )
    }
}

/// The action an example describes, or why it cannot be read.
pub fn example_action(e: &Example) -> Result<Action, String> {
    let given = [e.exec.is_some(), e.connect.is_some(), e.open.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err("give exactly one of `exec`, `connect`, `open`".into());
    }
    if let Some(cmd) = &e.exec {
        return exec_action(
            cmd,
            e.exe.as_deref(),
            e.parent.clone(),
            e.setuid,
            e.cwd.clone(),
        );
    }
    if let Some(dest) = &e.connect {
        return connect_action(dest, e.protocol.unwrap_or(Protocol::Tcp));
    }
    let path = e.open.clone().unwrap_or_default();
    Ok(Action::File {
        path,
        aliases: Vec::new(),
        write: e.access == Some(Access::Write),
    })
}

/// A connect to `dest` (ADDR:PORT, [v6]:PORT), or to a Unix socket (a
/// path, or `@` and an abstract address; its server taken to be outside
/// the session, a datagram socket for `udp`).
pub fn connect_action(dest: &str, protocol: Protocol) -> Result<Action, String> {
    if dest.starts_with('/') || dest.starts_with('@') {
        return Ok(Action::Unix(super::UnixAction {
            socket: dest.to_string(),
            aliases: Vec::new(),
            outside: true,
            datagram: protocol == Protocol::Udp,
        }));
    }
    let sa: SocketAddr = dest.parse().map_err(|_| {
        format!(
            "connect: {dest:?} is not ADDR:PORT ([v6]:port for IPv6), a socket path or @abstract"
        )
    })?;
    Ok(Action::Connect {
        addr: sa.ip(),
        port: sa.port(),
        protocol: Some(protocol),
    })
}

/// An exec from a command line: split like a shell; a bare program name is
/// /usr/bin/NAME unless `exe` says otherwise.
pub fn exec_action(
    cmd: &str,
    exe: Option<&str>,
    parent: Option<String>,
    setuid: bool,
    cwd: Option<String>,
) -> Result<Action, String> {
    let argv = shlex::split(cmd).ok_or_else(|| format!("cannot split {cmd:?} like a shell"))?;
    let Some(first) = argv.first() else {
        return Err("an empty command".into());
    };
    let path = match exe {
        Some(p) => p.to_string(),
        None if first.contains('/') => first.clone(),
        None => format!("/usr/bin/{first}"),
    };
    let mut a = ExecAction::new(path, argv);
    a.parent_exe = parent;
    a.setuid = setuid;
    a.cwd = cwd;
    Ok(Action::Exec(a))
}

/// Runs every example of every pack against the whole policy.
pub fn examples(p: &Policy) -> (usize, Vec<ExampleFailure>) {
    let mut failures = Vec::new();
    let mut count = 0;
    for pack in &p.packs {
        for (i, e) in pack.examples.iter().enumerate() {
            count += 1;
            let fail = |action: String, message: String| ExampleFailure {
                file: pack.file.clone(),
                index: i,
                action,
                message,
            };
            let action = match example_action(e) {
                Ok(a) => a,
                Err(m) => {
                    failures.push(fail("?".into(), m));
                    continue;
                }
            };
            let mut labels: BTreeMap<String, String> = e.labels.clone();
            if let (Some(cwd), false) = (&e.cwd, labels.contains_key("workdir")) {
                // An example's cwd stands for the session's workdir too
                // unless a label says otherwise.
                labels.insert("workdir".into(), cwd.clone());
            }
            let subject = Subject {
                labels: &labels,
                uid: e.user.unwrap_or(1000),
                gid: e.group.unwrap_or(1000),
            };
            let out = p.evaluate(&action, &subject);
            let got_rule = out.rule.map(|r| r.id.as_str());
            let got_monitor = out.monitor.map(|r| r.id.as_str());
            let mut problems = Vec::new();
            if out.decision != e.expect.decision {
                problems.push(format!(
                    "expected {}, got {}",
                    e.expect.decision.name(),
                    out.decision.name()
                ));
            }
            if let Some(want) = &e.expect.rule
                && !same_rule(want, got_rule, &pack.name)
            {
                problems.push(format!("expected rule {want}"));
            }
            if let Some(want) = &e.expect.monitor
                && !same_rule(want, got_monitor, &pack.name)
            {
                problems.push(format!("expected monitor rule {want}"));
            }
            if !problems.is_empty() {
                problems.push(format!(
                    "decided by {}{}",
                    got_rule.unwrap_or("no rule"),
                    got_monitor
                        .map(|m| format!(", monitor {m}"))
                        .unwrap_or_default()
                ));
                failures.push(fail(action.summary(), problems.join("; ")));
            }
        }
    }
    (count, failures)
}

fn same_rule(want: &str, got: Option<&str>, pack: &str) -> bool {
    match got {
        Some(g) => g == want || g == format!("{pack}/{want}"),
        None => false,
    }
}
