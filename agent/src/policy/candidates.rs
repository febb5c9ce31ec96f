//! What the kernel must hold and ask about: the policy compiled into the
//! candidate maps. Always an over-approximation: a candidate that no rule
//! decides is resumed at once by the daemon; an action that is not a
//! candidate is never seen by the rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use airlock_common::{FILE_CAND_DIR, FILE_CAND_NAME};
use ipnet::IpNet;

use super::{
    Policy,
    matchers::is_literal,
    model::{ActionKind, Cond, Decision, Leaf, NetScope},
};

/// Most network prefixes written into the kernel's trie; past it every
/// address is a candidate.
pub const MAX_NET_PREFIXES: usize = 4000;

/// The kernel's share of a policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    /// Every exec of a watched session is a candidate.
    pub exec_all: bool,
    /// Exact executable paths.
    pub exec_paths: BTreeSet<String>,
    /// Executable file names.
    pub exec_names: BTreeSet<String>,
    /// Set-user-ID / set-group-ID executables.
    pub exec_setuid: bool,
    /// Of `exec_paths` and `exec_names`: those a deny rule that names only
    /// executables decides before any other rule could, so the kernel
    /// refuses them itself, daemon or not.
    pub exec_deny_paths: BTreeSet<String>,
    pub exec_deny_names: BTreeSet<String>,
    /// Destination prefixes, IPv6 with IPv4 mapped into ::ffff:0:0/96:
    /// (prefix length, address).
    pub net: Vec<(u32, [u8; 16])>,
    /// File and directory names (FILE_CAND_* bits).
    pub files: BTreeMap<String, u32>,
    /// The path globs of file rules (`~/` expanded), for the daemon to
    /// find the files they name on this host by device and inode.
    pub file_paths: BTreeSet<String>,
    /// Unix sockets: see [`UnixSet`].
    pub unix: UnixSet,
    /// Why every exec (or connect) is a candidate, for `policy check`.
    pub notes: Vec<String>,
}

/// Unix socket connects a condition could match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSet {
    /// Every Unix socket connect of a watched session.
    pub all: bool,
    /// Connects to a server outside the acting session.
    pub outside: bool,
    /// Socket files by exact path (the daemon looks them up by device and
    /// inode, so every other name of each is covered too).
    pub paths: BTreeSet<String>,
    /// Abstract addresses, exactly (`@name`).
    pub abstracts: BTreeSet<String>,
    /// Path globs without `**` (`/run/user/*/bus`): the daemon finds the
    /// sockets they name on this host, as it does `paths`.
    pub globs: BTreeSet<String>,
}

impl UnixSet {
    fn any() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    fn union(&mut self, o: Self) {
        self.all |= o.all;
        self.outside |= o.outside;
        self.paths.extend(o.paths);
        self.abstracts.extend(o.abstracts);
        self.globs.extend(o.globs);
    }

    /// Smaller is narrower: named sockets, then outside, then all.
    fn width(&self) -> (u8, usize) {
        let rank = if self.all { 2 } else { u8::from(self.outside) };
        (
            rank,
            self.paths.len() + self.abstracts.len() + self.globs.len(),
        )
    }
}

/// The Unix socket connects `c` may hold for (an over-approximation).
fn unix_set(c: &Cond) -> UnixSet {
    match c {
        Cond::Leaf(Leaf::Socket(pats)) => {
            let mut s = UnixSet::default();
            for g in pats.iter().flat_map(|p| &p.0.globs) {
                // `@` past the first stands for a NUL as well as for
                // itself (as `ss` shows addresses): no one key for it.
                let is_abstract = g.pattern.starts_with('@');
                if !g.is_literal() && !is_abstract && !g.pattern.contains("**") {
                    s.globs.insert(g.pattern.clone());
                } else if !g.is_literal()
                    || (is_abstract && g.pattern.get(1..).is_some_and(|r| r.contains('@')))
                {
                    s.all = true;
                } else if is_abstract {
                    s.abstracts.insert(g.pattern.clone());
                } else {
                    s.paths.insert(g.pattern.clone());
                }
            }
            s
        }
        Cond::Leaf(Leaf::OutsideSession(true)) => UnixSet {
            outside: true,
            ..UnixSet::default()
        },
        Cond::Leaf(_) | Cond::Not(_) => UnixSet::any(),
        Cond::All(parts) => parts
            .iter()
            .map(unix_set)
            .min_by_key(UnixSet::width)
            .unwrap_or_else(UnixSet::any),
        Cond::Any(parts) => {
            let mut s = UnixSet::default();
            for p in parts {
                s.union(unix_set(p));
            }
            s
        }
    }
}

/// Executables a condition could match, or None for any.
#[derive(Debug, Clone, Default)]
struct ExecSet {
    paths: BTreeSet<String>,
    names: BTreeSet<String>,
    setuid: bool,
}

impl ExecSet {
    fn len(&self) -> usize {
        self.paths.len() + self.names.len() + usize::from(self.setuid)
    }
}

fn exec_set(c: &Cond) -> Option<ExecSet> {
    match c {
        Cond::Leaf(Leaf::Exe(pats)) => {
            let mut s = ExecSet::default();
            for p in pats.iter() {
                let pat = &p.glob.pattern;
                let last = pat.rsplit('/').next().unwrap_or(pat);
                if p.whole_path && p.glob.is_literal() {
                    s.paths.insert(pat.clone());
                } else if is_literal(last) && !last.is_empty() {
                    s.names.insert(last.to_string());
                } else {
                    return None;
                }
            }
            Some(s)
        }
        Cond::Leaf(Leaf::Setuid(true)) => Some(ExecSet {
            setuid: true,
            ..Default::default()
        }),
        Cond::Leaf(_) | Cond::Not(_) => None,
        Cond::All(parts) => parts.iter().filter_map(exec_set).min_by_key(ExecSet::len),
        Cond::Any(parts) => {
            let mut s = ExecSet::default();
            for p in parts {
                let e = exec_set(p)?;
                s.paths.extend(e.paths);
                s.names.extend(e.names);
                s.setuid |= e.setuid;
            }
            Some(s)
        }
    }
}

/// The file names an executable must have for `c` to hold, or None when
/// any executable could do (the evaluation index and the kernel's name map
/// rest on the same reading of `exe`).
pub fn exec_names(c: &Cond) -> Option<BTreeSet<String>> {
    let set = exec_set(c).filter(|s| !s.setuid)?;
    let mut names = set.names;
    names.extend(
        set.paths
            .iter()
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_string()),
    );
    Some(names)
}

/// File candidates of a condition: (name, FILE_CAND_* bit), or None when
/// some path names nothing literally.
pub fn file_names(c: &Cond) -> Option<Vec<(String, u32)>> {
    match c {
        Cond::Leaf(Leaf::Path(pats)) => {
            let mut out = Vec::new();
            for p in pats {
                for g in &p.globs {
                    let mut parts = g.pattern.rsplit('/');
                    let last = parts.next().unwrap_or("");
                    let dir = parts.next().unwrap_or("");
                    if is_literal(last) && !last.is_empty() {
                        out.push((last.to_string(), FILE_CAND_NAME));
                    } else if is_literal(dir) && !dir.is_empty() {
                        out.push((dir.to_string(), FILE_CAND_DIR));
                    } else {
                        return None;
                    }
                }
            }
            Some(out)
        }
        Cond::Leaf(_) | Cond::Not(_) => None,
        Cond::All(parts) => parts.iter().filter_map(file_names).min_by_key(Vec::len),
        Cond::Any(parts) => {
            let mut out = Vec::new();
            for p in parts {
                out.extend(file_names(p)?);
            }
            Some(out)
        }
    }
}

/// The path globs a condition names outside any `not`.
fn path_globs(c: &Cond, out: &mut BTreeSet<String>) {
    match c {
        Cond::Leaf(Leaf::Path(pats)) => {
            out.extend(
                pats.iter()
                    .flat_map(|p| p.globs.iter().map(|g| g.pattern.clone())),
            );
        }
        Cond::Leaf(_) | Cond::Not(_) => {}
        Cond::All(parts) | Cond::Any(parts) => parts.iter().for_each(|p| path_globs(p, out)),
    }
}

/// Inclusive ranges over the IPv6 space (IPv4 mapped), sorted, disjoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AddrSet(Vec<(u128, u128)>);

impl AddrSet {
    pub fn all() -> Self {
        Self(vec![(0, u128::MAX)])
    }

    pub fn empty() -> Self {
        Self(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn of_nets(nets: &[super::matchers::Net]) -> Self {
        let mut v: Vec<(u128, u128)> = nets
            .iter()
            .map(|n| {
                let (len, addr) = trie_key(&n.0);
                let start = u128::from_be_bytes(addr);
                let host = if len >= 128 { 0 } else { u128::MAX >> len };
                (start, start | host)
            })
            .collect();
        v.sort();
        Self(merge(v))
    }

    fn union(&self, o: &Self) -> Self {
        let mut v: Vec<_> = self.0.iter().chain(o.0.iter()).copied().collect();
        v.sort();
        Self(merge(v))
    }

    fn complement(&self) -> Self {
        let mut out = Vec::new();
        let mut next: Option<u128> = Some(0);
        for &(a, b) in &self.0 {
            if let Some(n) = next
                && a > n
            {
                out.push((n, a - 1));
            }
            next = b.checked_add(1);
        }
        if let Some(n) = next {
            out.push((n, u128::MAX));
        }
        Self(out)
    }

    fn minus(&self, o: &Self) -> Self {
        self.intersect(&o.complement())
    }

    fn intersect(&self, o: &Self) -> Self {
        self.complement().union(&o.complement()).complement()
    }

    /// The smallest set of prefixes covering exactly these ranges.
    pub fn prefixes(&self) -> Vec<(u32, [u8; 16])> {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            let mut start = a;
            loop {
                // Largest aligned block at `start` that stays within b.
                let mut len = 128 - start.trailing_zeros().min(128);
                loop {
                    let host = if len >= 128 { 0 } else { u128::MAX >> len };
                    if start.checked_add(host).is_some_and(|end| end <= b) {
                        break;
                    }
                    len += 1;
                }
                out.push((len, start.to_be_bytes()));
                let host = if len >= 128 { 0 } else { u128::MAX >> len };
                match (start | host).checked_add(1) {
                    Some(n) if n <= b => start = n,
                    _ => break,
                }
            }
        }
        out
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let v = match addr {
            IpAddr::V4(a) => u128::from_be_bytes(a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => u128::from_be_bytes(a.octets()),
        };
        self.0.iter().any(|&(a, b)| a <= v && v <= b)
    }
}

fn merge(sorted: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (a, b) in sorted {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Addresses where `c` may hold (whatever the other attributes).
pub fn may(c: &Cond) -> AddrSet {
    match c {
        Cond::Leaf(Leaf::Dest(nets)) => AddrSet::of_nets(nets),
        Cond::Leaf(_) => AddrSet::all(),
        Cond::All(p) => p
            .iter()
            .fold(AddrSet::all(), |acc, c| acc.intersect(&may(c))),
        Cond::Any(p) => p.iter().fold(AddrSet::empty(), |acc, c| acc.union(&may(c))),
        Cond::Not(inner) => must(inner).complement(),
    }
}

/// Addresses where `c` holds whatever the other attributes are.
fn must(c: &Cond) -> AddrSet {
    match c {
        Cond::Leaf(Leaf::Dest(nets)) => AddrSet::of_nets(nets),
        Cond::Leaf(_) => AddrSet::empty(),
        Cond::All(p) => p
            .iter()
            .fold(AddrSet::all(), |acc, c| acc.intersect(&must(c))),
        Cond::Any(p) => p
            .iter()
            .fold(AddrSet::empty(), |acc, c| acc.union(&must(c))),
        Cond::Not(inner) => may(inner).complement(),
    }
}

impl Candidates {
    /// Whether the kernel would hold `action` and ask the daemon, in words.
    pub fn explain(&self, action: &super::Action) -> String {
        let why = match action {
            super::Action::Exec(e)
                if self.exec_deny_paths.contains(&e.path)
                    || (!self.exec_paths.contains(&e.path)
                        && self.exec_deny_names.contains(e.name())) =>
            {
                return "refused by the kernel itself, daemon or not (a deny rule names only this executable and no earlier rule can match it)".into();
            }
            super::Action::Exec(e) => {
                if self.exec_paths.contains(&e.path) {
                    Some(format!("its path {} is named by a rule", e.path))
                } else if self.exec_all {
                    Some("every exec is a candidate under this policy".into())
                } else if self.exec_names.contains(e.name()) {
                    Some(format!("its file name {} is named by a rule", e.name()))
                } else if self.exec_setuid && e.setuid {
                    Some("set-user-ID executables are candidates".into())
                } else {
                    None
                }
            }
            super::Action::Connect { addr, .. } => {
                let v = match addr {
                    IpAddr::V4(a) => u128::from_be_bytes(a.to_ipv6_mapped().octets()),
                    IpAddr::V6(a) => u128::from_be_bytes(a.octets()),
                };
                self.net
                    .iter()
                    .find(|(len, data)| {
                        let start = u128::from_be_bytes(*data);
                        let host = if *len >= 128 { 0 } else { u128::MAX >> len };
                        start <= v && v <= (start | host)
                    })
                    .map(|(len, data)| {
                        format!(
                            "its address is in the candidate prefix {}/{len}",
                            std::net::Ipv6Addr::from(*data)
                        )
                    })
            }
            super::Action::Unix(u) => {
                if self.unix.all {
                    Some("every Unix socket connect is a candidate under this policy".into())
                } else if let Some(p) = u
                    .names()
                    .find(|n| self.unix.paths.contains(*n) || self.unix.abstracts.contains(*n))
                {
                    Some(format!("the socket {p} is named by a rule"))
                } else if let Some(g) = self.unix.globs.iter().find(|g| {
                    globset::Glob::new(g)
                        .map(|g| g.compile_matcher())
                        .is_ok_and(|m| u.names().any(|n| m.is_match(n)))
                }) {
                    Some(format!(
                        "the socket matches {g}, which the daemon looks up on this host every 5 s"
                    ))
                } else if self.unix.outside && u.outside {
                    Some("connects to a server outside the session are candidates".into())
                } else {
                    None
                }
            }
            super::Action::File { path, .. } => {
                let mut parts = path.rsplit('/');
                let name = parts.next().unwrap_or("");
                let dir = parts.next().unwrap_or("");
                if self
                    .files
                    .get(name)
                    .is_some_and(|b| b & FILE_CAND_NAME != 0)
                {
                    Some(format!("files named {name} are candidates"))
                } else if self.files.get(dir).is_some_and(|b| b & FILE_CAND_DIR != 0) {
                    Some(format!("files in directories named {dir} are candidates"))
                } else {
                    None
                }
            }
        };
        match why {
            Some(w) => format!("a candidate ({w}): held until the daemon decides"),
            None => {
                "not a candidate: the kernel lets it through without asking (recorded as usual)"
                    .into()
            }
        }
    }
}

impl Policy {
    /// Deny rules that say nothing but `exe` (literal paths or names), for
    /// the executables no earlier rule in the order could match: the kernel
    /// refuses those at once, even while no daemon runs.
    fn kernel_denies(&self, c: &mut Candidates) {
        let mut paths = BTreeSet::new();
        let mut names = BTreeSet::new();
        for r in self.rules.iter().filter(|r| r.kind == ActionKind::Exec) {
            let Some(set) = exec_set(&r.when) else {
                // An earlier rule could match anything: nothing after it.
                return;
            };
            if set.setuid {
                return;
            }
            let pure = matches!(r.when, Cond::Leaf(Leaf::Exe(_)));
            if pure && r.decision == Decision::Deny && r.mode == super::Mode::Enforce {
                for p in &set.paths {
                    let name = p.rsplit('/').next().unwrap_or(p);
                    if !paths.contains(p) && !names.contains(name) {
                        c.exec_deny_paths.insert(p.clone());
                    }
                }
                for n in &set.names {
                    let shadowed = names.contains(n)
                        || paths
                            .iter()
                            .any(|p: &String| p.rsplit('/').next() == Some(n.as_str()));
                    if !shadowed {
                        c.exec_deny_names.insert(n.clone());
                    }
                }
            }
            paths.extend(set.paths);
            names.extend(set.names);
        }
    }

    /// The kernel's candidate maps for this policy. Rules that only record
    /// add nothing; monitor rules do (their would-be decision is recorded).
    pub fn candidates(&self) -> Candidates {
        let mut c = Candidates::default();
        let mut net = AddrSet::empty();
        // Addresses an earlier rule certainly decides (enforcing rules), or
        // certainly is the first monitor rule for: later rules never act
        // there, so they add no candidates there.
        let mut decided = AddrSet::empty();
        let mut monitored = AddrSet::empty();
        for r in self
            .rules
            .iter()
            .filter(|r| r.kind == ActionKind::Connect && r.scope != NetScope::Unix)
        {
            let acts = matches!(r.decision, Decision::Hold | Decision::Deny);
            let sure = must(&r.when);
            match r.mode {
                super::Mode::Enforce => {
                    if acts {
                        net = net.union(&may(&r.when).minus(&decided));
                    }
                    decided = decided.union(&sure);
                    monitored = monitored.union(&sure);
                }
                super::Mode::Monitor => {
                    if acts {
                        net = net.union(&may(&r.when).minus(&monitored));
                    }
                    monitored = monitored.union(&sure);
                }
            }
        }
        self.kernel_denies(&mut c);
        // Only hold and deny rules need the daemon: an action no such rule
        // can match goes through whatever an allow rule says.
        for r in self
            .rules
            .iter()
            .filter(|r| matches!(r.decision, Decision::Hold | Decision::Deny))
        {
            match r.kind {
                ActionKind::Exec => match exec_set(&r.when) {
                    Some(s) => {
                        c.exec_paths.extend(s.paths);
                        c.exec_names.extend(s.names);
                        c.exec_setuid |= s.setuid;
                    }
                    None => {
                        c.exec_all = true;
                        c.notes.push(format!(
                            "rule {} names no executable by exact path or file name: every exec of a watched session is a candidate (held for a moment while the daemon decides)",
                            r.id
                        ));
                    }
                },
                ActionKind::Connect if r.scope != NetScope::Inet => {
                    let u = unix_set(&r.when);
                    if u.all && !c.unix.all {
                        c.notes.push(format!(
                            "rule {} names a Unix socket by a `**` or abstract glob (or names none): every Unix socket connect of a watched session is a candidate",
                            r.id
                        ));
                    }
                    c.unix.union(u);
                }
                ActionKind::Connect => {}
                ActionKind::File => {
                    for (name, bit) in file_names(&r.when).unwrap_or_default() {
                        *c.files.entry(name).or_default() |= bit;
                    }
                    path_globs(&r.when, &mut c.file_paths);
                }
            }
        }
        let mut prefixes = net.prefixes();
        if prefixes.len() > MAX_NET_PREFIXES {
            c.notes.push(format!(
                "the connect rules need {} address prefixes, more than the kernel map's {MAX_NET_PREFIXES}: every connect is a candidate",
                prefixes.len()
            ));
            prefixes = AddrSet::all().prefixes();
        }
        c.net = prefixes;
        c
    }
}

/// IPv6 as is; IPv4 mapped into ::ffff:0:0/96, as the kernel side looks up.
pub fn trie_key(n: &IpNet) -> (u32, [u8; 16]) {
    match n.trunc() {
        IpNet::V4(v4) => (
            96 + v4.prefix_len() as u32,
            v4.addr().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(v6) => (v6.prefix_len() as u32, v6.addr().octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_networks_are_mapped() {
        let (len, data) = trie_key(&"10.1.2.3/8".parse().unwrap());
        assert_eq!(len, 104);
        assert_eq!(
            data,
            "::ffff:10.0.0.0"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        let (len, data) = trie_key(&"::1/128".parse().unwrap());
        assert_eq!((len, data[15]), (128, 1));
    }

    fn set(nets: &[&str]) -> AddrSet {
        let nets: Vec<_> = nets
            .iter()
            .map(|n| super::super::matchers::Net(n.parse().unwrap()))
            .collect();
        AddrSet::of_nets(&nets)
    }

    #[test]
    fn complement_and_prefixes_round_trip() {
        let s = set(&["10.0.0.0/8"]);
        assert_eq!(s.prefixes().len(), 1);
        assert_eq!(s.prefixes()[0].0, 104);
        let c = s.complement();
        assert!(!c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::1".parse().unwrap()));
        // The complement of one prefix is one prefix per bit of it.
        assert_eq!(c.prefixes().len(), 104);
        assert_eq!(c.complement(), s);
        assert_eq!(AddrSet::all().prefixes(), vec![(0, [0; 16])]);
        assert!(
            set(&["10.0.0.0/8"])
                .intersect(&set(&["192.168.0.0/16"]))
                .is_empty()
        );
    }
}
