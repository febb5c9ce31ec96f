//! Policy files as written: the YAML model, checked while it is read so
//! every error names its line and column.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, de::Error as _};

use super::matchers::{
    ExePattern, Exes, Globs, GroupId, Net, OneOrMany, PathPattern, Ports, Re, Regexes,
    SocketPattern, TextGlob, UserId, parse_duration,
};
use crate::model::OnTimeout;
pub use crate::model::{ActionKind, Decision};

/// Whether a rule decides or only records what it would have decided.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
}

/// One policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileModel {
    pub pack: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub mode: Mode,
    pub rules: Vec<RuleModel>,
    #[serde(default)]
    pub examples: Vec<Example>,
}

/// One rule, checked as a whole once read.
#[derive(Debug, Clone)]
pub struct RuleModel {
    pub name: String,
    pub description: String,
    pub on: ActionKind,
    pub when: Cond,
    pub decision: Decision,
    pub priority: i64,
    pub mode: Option<Mode>,
    pub hold: HoldModel,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRaw {
    name: String,
    #[serde(default)]
    description: String,
    on: ActionKind,
    when: Cond,
    decision: Decision,
    #[serde(default)]
    priority: i64,
    mode: Option<Mode>,
    hold: Option<HoldModel>,
}

impl<'de> Deserialize<'de> for RuleModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RuleRaw::deserialize(d)?;
        let name = &raw.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(D::Error::custom(format!(
                "rule name {name:?}: use letters, digits, `-` and `_`"
            )));
        }
        let mut wrong = Vec::new();
        raw.when.keys_not_for(raw.on, &mut wrong);
        if let Some(k) = wrong.first() {
            return Err(D::Error::custom(format!(
                "rule {name}: `{k}` does not apply to {} rules (see policies/README.md)",
                raw.on.name()
            )));
        }
        if let Err((inet, unix)) = raw.when.net_scope() {
            return Err(D::Error::custom(format!(
                "rule {name}: `{inet}` is about IP connects and `{unix}` about Unix sockets: write two rules"
            )));
        }
        if raw.hold.is_some() && raw.decision != Decision::Hold {
            return Err(D::Error::custom(format!(
                "rule {name}: `hold` settings need `decision: hold`"
            )));
        }
        Ok(Self {
            name: raw.name,
            description: raw.description,
            on: raw.on,
            when: raw.when,
            decision: raw.decision,
            priority: raw.priority,
            mode: raw.mode,
            hold: raw.hold.unwrap_or_default(),
        })
    }
}

/// How a hold is decided.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldModel {
    pub approvers: Vec<String>,
    pub groups: Vec<String>,
    pub approvals: u32,
    pub timeout_s: u64,
    pub on_timeout: OnTimeout,
    pub message: Option<String>,
}

impl Default for HoldModel {
    fn default() -> Self {
        Self {
            approvers: Vec::new(),
            groups: Vec::new(),
            approvals: 1,
            timeout_s: 300,
            on_timeout: OnTimeout::Deny,
            message: None,
        }
    }
}

impl<'de> Deserialize<'de> for HoldModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            approvers: Vec<String>,
            #[serde(default)]
            groups: Vec<String>,
            approvals: Option<u32>,
            timeout: Option<serde_yaml_ng::Value>,
            #[serde(default)]
            on_timeout: OnTimeout,
            message: Option<String>,
        }
        let raw = Raw::deserialize(d)?;
        let timeout_s = match raw.timeout {
            None => 300,
            Some(serde_yaml_ng::Value::Number(n)) => n
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| D::Error::custom("timeout must be a positive number of seconds"))?,
            Some(serde_yaml_ng::Value::String(s)) => {
                parse_duration(&s).map_err(D::Error::custom)?
            }
            Some(_) => return Err(D::Error::custom("timeout: expected 90s, 5m, 1h or seconds")),
        };
        let approvals = raw.approvals.unwrap_or(1);
        if approvals == 0 {
            return Err(D::Error::custom("approvals must be at least 1"));
        }
        if !raw.approvers.is_empty()
            && (approvals as usize) > raw.approvers.len()
            && raw.groups.is_empty()
        {
            return Err(D::Error::custom(format!(
                "approvals: {approvals} needs at least that many approvers, {} listed",
                raw.approvers.len()
            )));
        }
        Ok(Self {
            approvers: raw.approvers,
            groups: raw.groups,
            approvals,
            timeout_s,
            on_timeout: raw.on_timeout,
            message: raw.message,
        })
    }
}

/// A condition: combinators and field matchers.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    Leaf(Leaf),
}

/// One field matcher.
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    Labels(Vec<(String, Globs)>),
    User(Vec<u32>),
    Group(Vec<u32>),
    Exe(Exes),
    ParentExe(Exes),
    Setuid(bool),
    Cmdline(Globs),
    CmdlineRegex(Regexes),
    Args(Globs),
    ArgsRegex(Regexes),
    OutsideWorkdir(bool),
    /// Environment variables: each set, with a value one of its globs
    /// matches.
    Env(Vec<(String, Globs)>),
    /// The working directory.
    Cwd(Vec<PathPattern>),
    Dest(Vec<Net>),
    Port(Vec<Ports>),
    Protocol(Protocol),
    Path(Vec<PathPattern>),
    Access(Access),
    Socket(Vec<SocketPattern>),
    OutsideSession(bool),
}

impl Leaf {
    /// The key as written.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Labels(_) => "labels",
            Self::User(_) => "user",
            Self::Group(_) => "group",
            Self::Exe(_) => "exe",
            Self::ParentExe(_) => "parent_exe",
            Self::Setuid(_) => "setuid",
            Self::Cmdline(_) => "cmdline",
            Self::CmdlineRegex(_) => "cmdline_regex",
            Self::Args(_) => "args",
            Self::ArgsRegex(_) => "args_regex",
            Self::OutsideWorkdir(_) => "outside_workdir",
            Self::Env(_) => "env",
            Self::Cwd(_) => "cwd",
            Self::Dest(_) => "dest",
            Self::Port(_) => "port",
            Self::Protocol(_) => "protocol",
            Self::Path(_) => "path",
            Self::Access(_) => "access",
            Self::Socket(_) => "socket",
            Self::OutsideSession(_) => "outside_session",
        }
    }

    /// The action kind the key belongs to; None for any kind.
    fn kind(&self) -> Option<ActionKind> {
        match self {
            Self::Labels(_) | Self::User(_) | Self::Group(_) => None,
            Self::Exe(_)
            | Self::ParentExe(_)
            | Self::Setuid(_)
            | Self::Cmdline(_)
            | Self::CmdlineRegex(_)
            | Self::Args(_)
            | Self::ArgsRegex(_)
            | Self::OutsideWorkdir(_)
            | Self::Env(_)
            | Self::Cwd(_) => Some(ActionKind::Exec),
            Self::Dest(_)
            | Self::Port(_)
            | Self::Protocol(_)
            | Self::Socket(_)
            | Self::OutsideSession(_) => Some(ActionKind::Connect),
            Self::Path(_) | Self::Access(_) => Some(ActionKind::File),
        }
    }
}

/// Which connects a connect rule can match: one that names addresses
/// (`dest`, `port`, `protocol`) only IP connects, one that names Unix
/// sockets (`socket`, `outside_session`) only Unix socket connects, one
/// that names neither both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetScope {
    Both,
    Inet,
    Unix,
}

impl Cond {
    /// The connects this condition can be about, or the two keys that
    /// mix the kinds (an error).
    pub fn net_scope(&self) -> Result<NetScope, (&'static str, &'static str)> {
        let mut inet = None;
        let mut unix = None;
        self.visit(&mut |l| match l {
            Leaf::Dest(_) | Leaf::Port(_) | Leaf::Protocol(_) => {
                inet.get_or_insert(l.key());
            }
            Leaf::Socket(_) | Leaf::OutsideSession(_) => {
                unix.get_or_insert(l.key());
            }
            _ => {}
        });
        match (inet, unix) {
            (Some(a), Some(b)) => Err((a, b)),
            (Some(_), None) => Ok(NetScope::Inet),
            (None, Some(_)) => Ok(NetScope::Unix),
            (None, None) => Ok(NetScope::Both),
        }
    }

    /// Calls `f` on every leaf.
    pub fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Leaf)) {
        match self {
            Self::All(c) | Self::Any(c) => c.iter().for_each(|c| c.visit(f)),
            Self::Not(c) => c.visit(f),
            Self::Leaf(l) => f(l),
        }
    }

    fn keys_not_for(&self, kind: ActionKind, out: &mut Vec<&'static str>) {
        match self {
            Self::All(c) | Self::Any(c) => c.iter().for_each(|c| c.keys_not_for(kind, out)),
            Self::Not(c) => c.keys_not_for(kind, out),
            Self::Leaf(l) => {
                if l.kind().is_some_and(|k| k != kind) {
                    out.push(l.key());
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CondRaw {
    all: Option<Vec<Cond>>,
    any: Option<Vec<Cond>>,
    not: Option<Box<Cond>>,
    labels: Option<BTreeMap<String, OneOrMany<TextGlob>>>,
    user: Option<OneOrMany<UserId>>,
    group: Option<OneOrMany<GroupId>>,
    exe: Option<OneOrMany<ExePattern>>,
    parent_exe: Option<OneOrMany<ExePattern>>,
    setuid: Option<bool>,
    cmdline: Option<OneOrMany<TextGlob>>,
    cmdline_regex: Option<OneOrMany<Re>>,
    args: Option<OneOrMany<TextGlob>>,
    args_regex: Option<OneOrMany<Re>>,
    outside_workdir: Option<bool>,
    env: Option<BTreeMap<String, OneOrMany<TextGlob>>>,
    cwd: Option<OneOrMany<PathPattern>>,
    dest: Option<OneOrMany<Net>>,
    port: Option<OneOrMany<Ports>>,
    protocol: Option<Protocol>,
    path: Option<OneOrMany<PathPattern>>,
    access: Option<Access>,
    socket: Option<OneOrMany<SocketPattern>>,
    outside_session: Option<bool>,
}

impl<'de> Deserialize<'de> for Cond {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = CondRaw::deserialize(d)?;
        // Cheap tests first (they decide most actions), combinators last.
        let mut parts = Vec::new();
        let mut leaf = |l: Leaf| parts.push(Cond::Leaf(l));
        if let Some(v) = r.exe {
            leaf(Leaf::Exe(Exes::new(v.0)));
        }
        if let Some(v) = r.protocol {
            leaf(Leaf::Protocol(v));
        }
        if let Some(v) = r.port {
            leaf(Leaf::Port(v.0));
        }
        if let Some(v) = r.dest {
            leaf(Leaf::Dest(v.0));
        }
        if let Some(v) = r.access {
            leaf(Leaf::Access(v));
        }
        if let Some(v) = r.outside_session {
            leaf(Leaf::OutsideSession(v));
        }
        if let Some(v) = r.socket {
            leaf(Leaf::Socket(v.0));
        }
        if let Some(v) = r.setuid {
            leaf(Leaf::Setuid(v));
        }
        if let Some(v) = r.user {
            leaf(Leaf::User(v.0.into_iter().map(|u| u.0).collect()));
        }
        if let Some(v) = r.group {
            leaf(Leaf::Group(v.0.into_iter().map(|g| g.0).collect()));
        }
        if let Some(labels) = r.labels {
            if labels.is_empty() {
                return Err(D::Error::custom("`labels` needs at least one label"));
            }
            leaf(Leaf::Labels(
                labels
                    .into_iter()
                    .map(|(k, v)| (k, Globs::new(v.0)))
                    .collect(),
            ));
        }
        if let Some(v) = r.path {
            leaf(Leaf::Path(v.0));
        }
        if let Some(v) = r.cwd {
            leaf(Leaf::Cwd(v.0));
        }
        if let Some(env) = r.env {
            if env.is_empty() {
                return Err(D::Error::custom("`env` needs at least one variable"));
            }
            leaf(Leaf::Env(
                env.into_iter().map(|(k, v)| (k, Globs::new(v.0))).collect(),
            ));
        }
        if let Some(v) = r.parent_exe {
            leaf(Leaf::ParentExe(Exes::new(v.0)));
        }
        if let Some(v) = r.args {
            leaf(Leaf::Args(Globs::new(v.0)));
        }
        if let Some(v) = r.cmdline {
            leaf(Leaf::Cmdline(Globs::new(v.0)));
        }
        if let Some(v) = r.outside_workdir {
            leaf(Leaf::OutsideWorkdir(v));
        }
        if let Some(v) = r.args_regex {
            leaf(Leaf::ArgsRegex(Regexes::new(v.0)));
        }
        if let Some(v) = r.cmdline_regex {
            leaf(Leaf::CmdlineRegex(Regexes::new(v.0)));
        }
        if let Some(all) = r.all {
            if all.is_empty() {
                return Err(D::Error::custom("`all` needs at least one condition"));
            }
            parts.push(Cond::All(all));
        }
        if let Some(any) = r.any {
            if any.is_empty() {
                return Err(D::Error::custom("`any` needs at least one condition"));
            }
            parts.push(Cond::Any(any));
        }
        if let Some(not) = r.not {
            parts.push(Cond::Not(not));
        }
        match parts.len() {
            0 => Err(D::Error::custom(
                "an empty condition: give at least one key (exe, args, dest, path, labels, all, any, not, ...)",
            )),
            1 => Ok(parts.pop().unwrap_or(Cond::All(Vec::new()))),
            _ => Ok(Cond::All(parts)),
        }
    }
}

/// An example in a policy file: an action and the decision it should get.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub exec: Option<String>,
    pub exe: Option<String>,
    pub connect: Option<String>,
    pub protocol: Option<Protocol>,
    pub open: Option<String>,
    pub access: Option<Access>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub user: Option<u32>,
    pub group: Option<u32>,
    pub parent: Option<String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub setuid: bool,
    pub expect: Expect,
}

/// What an example expects.
#[derive(Debug, Clone)]
pub struct Expect {
    pub decision: Decision,
    pub rule: Option<String>,
    pub monitor: Option<String>,
}

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            decision: Decision,
            rule: Option<String>,
            monitor: Option<String>,
        }
        match serde_yaml_ng::Value::deserialize(d)? {
            serde_yaml_ng::Value::String(s) => Decision::parse(&s)
                .map(|decision| Expect {
                    decision,
                    rule: None,
                    monitor: None,
                })
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "expect: {s:?} is not a decision (allow, record, hold, deny)"
                    ))
                }),
            v => {
                let f = Full::deserialize(v).map_err(D::Error::custom)?;
                Ok(Expect {
                    decision: f.decision,
                    rule: f.rule,
                    monitor: f.monitor,
                })
            }
        }
    }
}
