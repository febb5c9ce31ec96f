//! The leaf values of conditions: globs, regexes, ids, networks, ports.
//! Each checks itself while the YAML is read, so a bad one is reported at
//! its line and column.

use std::{fmt, net::IpAddr};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use std::marker::PhantomData;

use serde::{
    Deserialize, Deserializer,
    de::{Error as _, IntoDeserializer, MapAccess, SeqAccess, Visitor},
};

/// One value or a list of them (`exe: curl` or `exe: [curl, wget]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = d.deserialize_any(OneOrManyVisitor(PhantomData))?;
        if list.is_empty() {
            return Err(D::Error::custom("an empty list matches nothing"));
        }
        Ok(Self(list))
    }
}

/// Reads list items one by one, so a bad item is reported at its own line.
struct OneOrManyVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrManyVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value or a list of values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<T>, E> {
        T::deserialize(v.into_deserializer()).map(|x| vec![x])
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Vec<T>, E> {
        T::deserialize(v.into_deserializer()).map(|x| vec![x])
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Vec<T>, E> {
        T::deserialize(v.into_deserializer()).map(|x| vec![x])
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Vec<T>, E> {
        T::deserialize(v.into_deserializer()).map(|x| vec![x])
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Vec<T>, E> {
        T::deserialize(v.into_deserializer()).map(|x| vec![x])
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|x| vec![x])
    }
}

/// A glob; `*` crosses `/` (for arguments, command lines, labels).
#[derive(Clone)]
pub struct TextGlob {
    pub pattern: String,
    pub glob: Glob,
    pub matcher: GlobMatcher,
}

impl TextGlob {
    pub fn new(pattern: &str, literal_separator: bool) -> Result<Self, String> {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(literal_separator)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("bad glob {pattern:?}: {}", e.kind()))?;
        Ok(Self {
            pattern: pattern.to_string(),
            matcher: glob.compile_matcher(),
            glob,
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }

    /// True when the pattern has no glob characters: it matches itself only.
    pub fn is_literal(&self) -> bool {
        is_literal(&self.pattern)
    }
}

/// No glob metacharacters in `p`.
pub fn is_literal(p: &str) -> bool {
    !p.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

impl fmt::Debug for TextGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.pattern)
    }
}

impl PartialEq for TextGlob {
    fn eq(&self, o: &Self) -> bool {
        self.pattern == o.pattern
    }
}

impl<'de> Deserialize<'de> for TextGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        TextGlob::new(&s, false).map_err(D::Error::custom)
    }
}

/// An executable pattern: with a `/` a glob over the path (`*` stays in one
/// directory), without one a glob over the file name.
#[derive(Debug, Clone, PartialEq)]
pub struct ExePattern {
    pub glob: TextGlob,
    pub whole_path: bool,
}

impl<'de> Deserialize<'de> for ExePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        if s.is_empty() {
            return Err(D::Error::custom("an empty executable pattern"));
        }
        let whole_path = s.contains('/');
        if whole_path && !s.starts_with('/') && !s.starts_with('*') {
            return Err(D::Error::custom(format!(
                "executable path {s:?} must be absolute (or a file name without `/`)"
            )));
        }
        Ok(Self {
            glob: TextGlob::new(&s, true).map_err(D::Error::custom)?,
            whole_path,
        })
    }
}

/// A file path pattern; `~/` stands for every home directory.
#[derive(Debug, Clone, PartialEq)]
pub struct PathPattern {
    pub pattern: String,
    /// The globs it expands to (two for `~/`).
    pub globs: Vec<TextGlob>,
}

impl<'de> Deserialize<'de> for PathPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        let expanded = match s.strip_prefix("~/") {
            Some(rest) => vec![format!("/root/{rest}"), format!("/home/*/{rest}")],
            None if s.starts_with('/') || s.starts_with("**/") => vec![s.clone()],
            None => {
                return Err(D::Error::custom(format!(
                    "path pattern {s:?} must start with `/`, `~/` or `**/`"
                )));
            }
        };
        let globs = expanded
            .iter()
            .map(|p| TextGlob::new(p, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(D::Error::custom)?;
        Ok(Self { pattern: s, globs })
    }
}

impl PathPattern {
    pub fn is_match(&self, path: &str) -> bool {
        self.globs.iter().any(|g| g.is_match(path))
    }
}

/// A Unix socket pattern: a path pattern (as [`PathPattern`]), or `@`
/// and a glob over an abstract address as `ss` shows it (`@/tmp/.X11-unix/X0`).
#[derive(Debug, Clone, PartialEq)]
pub struct SocketPattern(pub PathPattern);

impl<'de> Deserialize<'de> for SocketPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        if s.starts_with('@') {
            let glob = TextGlob::new(&s, true).map_err(D::Error::custom)?;
            return Ok(Self(PathPattern {
                pattern: s,
                globs: vec![glob],
            }));
        }
        let p = PathPattern::deserialize(serde_yaml_ng::Value::String(s.clone()))
            .map_err(|_| {
                D::Error::custom(format!(
                    "socket pattern {s:?} must start with `/`, `~/`, `**/` or `@` (an abstract address)"
                ))
            })?;
        Ok(Self(p))
    }
}

/// A list of patterns compiled into one matcher: it reads, prints and
/// compares as its patterns.
macro_rules! compiled_list {
    ($list:ident, $item:ty) => {
        impl std::ops::Deref for $list {
            type Target = [$item];
            fn deref(&self) -> &[$item] {
                &self.items
            }
        }

        impl fmt::Debug for $list {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.items.fmt(f)
            }
        }

        impl PartialEq for $list {
            fn eq(&self, o: &Self) -> bool {
                self.items == o.items
            }
        }
    };
}

/// Several globs matched at once (one automaton; literals by hash).
#[derive(Clone)]
pub struct Globs {
    pub items: Vec<TextGlob>,
    set: GlobSet,
}

impl Globs {
    pub fn new(items: Vec<TextGlob>) -> Self {
        let mut b = GlobSetBuilder::new();
        for g in &items {
            b.add(g.glob.clone());
        }
        // Every glob compiled alone already; a set of them builds too.
        let set = b.build().unwrap_or_else(|_| GlobSet::empty());
        Self { items, set }
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.set.is_match(s)
    }

    /// Whether a pattern matches `s`: the first that does when `explain`
    /// (slower), else an empty name.
    pub fn first(&self, s: &str, explain: bool) -> Option<&str> {
        if !explain {
            return self.set.is_match(s).then_some("");
        }
        self.set
            .matches(s)
            .first()
            .map(|&i| self.items[i].pattern.as_str())
    }
}

compiled_list!(Globs, TextGlob);

/// Executable patterns, split into file-name and whole-path sets.
#[derive(Clone)]
pub struct Exes {
    pub items: Vec<ExePattern>,
    names: Globs,
    paths: Globs,
}

impl Exes {
    pub fn new(items: Vec<ExePattern>) -> Self {
        let (paths, names): (Vec<_>, Vec<_>) = items.iter().partition(|p| p.whole_path);
        Self {
            names: Globs::new(names.into_iter().map(|p| p.glob.clone()).collect()),
            paths: Globs::new(paths.into_iter().map(|p| p.glob.clone()).collect()),
            items,
        }
    }

    /// Whether a pattern matches the executable `path` (which one, when
    /// `explain`).
    pub fn first(&self, path: &str, explain: bool) -> Option<&str> {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.names
            .first(name, explain)
            .or_else(|| self.paths.first(path, explain))
    }
}

compiled_list!(Exes, ExePattern);

/// Several regexes searched for at once.
#[derive(Clone)]
pub struct Regexes {
    pub items: Vec<Re>,
    set: regex::RegexSet,
}

impl Regexes {
    pub fn new(items: Vec<Re>) -> Self {
        let set = regex::RegexSet::new(items.iter().map(|r| r.0.as_str()))
            .unwrap_or_else(|_| regex::RegexSet::empty());
        Self { items, set }
    }

    /// Whether a regex is found in `s` (the first one, when `explain`).
    pub fn first(&self, s: &str, explain: bool) -> Option<&str> {
        if !self.set.is_match(s) {
            return None;
        }
        if !explain {
            return Some("");
        }
        self.set
            .matches(s)
            .iter()
            .next()
            .map(|i| self.items[i].0.as_str())
    }
}

compiled_list!(Regexes, Re);

/// A regex, searched for (not anchored unless it says so).
#[derive(Clone)]
pub struct Re(pub regex::Regex);

impl fmt::Debug for Re {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl PartialEq for Re {
    fn eq(&self, o: &Self) -> bool {
        self.0.as_str() == o.0.as_str()
    }
}

impl<'de> Deserialize<'de> for Re {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        regex::Regex::new(&s).map(Re).map_err(|e| {
            D::Error::custom(format!(
                "bad regex {s:?}: {}",
                e.to_string().lines().last().unwrap_or("")
            ))
        })
    }
}

/// A user given by name or uid, resolved when the policy is loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UserId(pub u32);

/// A group given by name or gid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupId(pub u32);

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        if let Ok(n) = s.parse() {
            return Ok(Self(n));
        }
        lookup_id(&s, false)
            .map(Self)
            .ok_or_else(|| D::Error::custom(format!("no user named {s:?} on this host")))
    }
}

impl<'de> Deserialize<'de> for GroupId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        if let Ok(n) = s.parse() {
            return Ok(Self(n));
        }
        lookup_id(&s, true)
            .map(Self)
            .ok_or_else(|| D::Error::custom(format!("no group named {s:?} on this host")))
    }
}

/// getpwnam_r / getgrnam_r.
fn lookup_id(name: &str, group: bool) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: the reentrant lookups write into our struct and buffer only;
    // the result pointer is checked before use.
    unsafe {
        if group {
            let mut grp: libc::group = std::mem::zeroed();
            let mut out: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            );
            (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
        } else {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut out: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            );
            (rc == 0 && !out.is_null()).then_some(pwd.pw_uid)
        }
    }
}

/// A network: CIDR or a single address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Net(pub IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(Self(n.trunc()));
        }
        s.parse::<IpAddr>().map(|a| Self(IpNet::from(a))).map_err(|_| {
            D::Error::custom(format!(
                "{s:?} is not a network: expected CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an address"
            ))
        })
    }
}

/// A port or an inclusive range `a-b`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ports(pub u16, pub u16);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        let bad = || D::Error::custom(format!("{s:?} is not a port: expected 443 or 8000-8999"));
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.as_str(), s.as_str()),
        };
        let a: u16 = a.parse().map_err(|_| bad())?;
        let b: u16 = b.parse().map_err(|_| bad())?;
        if a > b {
            return Err(bad());
        }
        Ok(Self(a, b))
    }
}

/// Reads a YAML scalar (string, number or bool) as a string.
fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_yaml_ng::Value::deserialize(d)? {
        serde_yaml_ng::Value::String(s) => Ok(s),
        serde_yaml_ng::Value::Number(n) => Ok(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Ok(b.to_string()),
        other => Err(D::Error::custom(format!(
            "expected a string, found {}",
            kind_of(&other)
        ))),
    }
}

pub fn kind_of(v: &serde_yaml_ng::Value) -> &'static str {
    match v {
        serde_yaml_ng::Value::Null => "nothing",
        serde_yaml_ng::Value::Bool(_) => "a boolean",
        serde_yaml_ng::Value::Number(_) => "a number",
        serde_yaml_ng::Value::String(_) => "a string",
        serde_yaml_ng::Value::Sequence(_) => "a list",
        serde_yaml_ng::Value::Mapping(_) => "a mapping",
        serde_yaml_ng::Value::Tagged(_) => "a tagged value",
    }
}

/// A duration: `90s`, `5m`, `1h`, or seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| n * mult)
        .ok_or_else(|| format!("{s:?} is not a duration: expected 90s, 5m, 1h or seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("42"), Ok(42));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn globs_keep_or_cross_slashes() {
        let g = TextGlob::new("*github.com*", false).unwrap();
        assert!(g.is_match("https://github.com/x/y"));
        let g = TextGlob::new("/usr/*/curl", true).unwrap();
        assert!(g.is_match("/usr/bin/curl"));
        assert!(!g.is_match("/usr/local/bin/curl"));
        assert!(is_literal("curl") && !is_literal("pip*"));
    }
}
