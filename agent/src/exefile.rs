//! Executables as files: the ones a policy names, found on this host by
//! device and inode (so a hard link under another name is the same file),
//! and the dynamic loaders, which run the program named by their first
//! operand.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use airlock_common::FileKey;

use crate::policy::candidates::Candidates;

/// Where a rule's executable name is looked up on this host.
pub const SEARCH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The dynamic loaders: `ld-linux-x86-64.so.2 /usr/bin/curl ...` runs curl.
pub const LOADERS: &[&str] = &[
    "ld-linux-x86-64.so.2",
    "ld-linux.so.2",
    "ld-linux-aarch64.so.1",
    "ld-musl-x86_64.so.1",
    "ld-musl-aarch64.so.1",
    "ld.so",
];

/// Multi-call binaries: one file, many programs, chosen by the name in
/// `argv[0]` (or by `argv[1]` when called by its own name). Every applet
/// link opens the same file, so the file alone does not say what runs.
pub const MULTICALL: &[&str] = &["busybox", "toybox", "coreutils"];

/// Whether an executable's own name is a multi-call binary's.
pub fn is_multicall(name: &str) -> bool {
    MULTICALL.contains(&name)
}

/// The applet a multi-call binary runs for `argv`, as far as this reader
/// can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applet {
    /// Every name the program that runs may go by.
    pub names: Vec<String>,
    /// Where its own argv starts in `argv`.
    pub argv_at: usize,
}

/// The applet a multi-call binary runs for `argv`. The word that names it
/// is `argv[0]`'s file name (a login shell's leading `-` dropped), or,
/// when that names a multi-call binary (busybox takes any name that starts
/// with `busybox` for itself), the next word's (`busybox busybox wget`);
/// GNU coreutils' `--coreutils-prog=NAME` and `--coreutils-prog-shebang=NAME`
/// name it outright. Its names: the word and each run of letters and
/// digits in it (uutils strips any prefix and extension: `x+rm.1` is
/// `rm`), and, where `falls_back` (not busybox), `argv[1]`'s file name too
/// (uutils runs `argv[1]` when it knows no `argv[0]`). None where this
/// reader cannot tell: no words left, or an option where it expects the
/// applet.
pub fn applet(argv: &[String], falls_back: bool) -> Option<Applet> {
    // The file name as a path library reads it (`rm/` and `x/rm/.` are
    // `rm`, as uutils reads them; busybox reads after the last `/`).
    let name = |a: &str| {
        let last = a.rsplit('/').next().unwrap_or(a);
        let base = if last.is_empty() || last == "." {
            Path::new(a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            last.to_string()
        };
        base.strip_prefix('-').unwrap_or(&base).to_string()
    };
    let named = |at: usize| {
        let prog = argv.get(at).and_then(|w| {
            w.strip_prefix("--coreutils-prog=")
                .or_else(|| w.strip_prefix("--coreutils-prog-shebang="))
        })?;
        Some((!prog.is_empty() && !prog.contains('/')).then(|| Applet {
            names: vec![prog.to_string()],
            argv_at: at,
        }))
    };
    let mut at = 0;
    loop {
        if let Some(outright) = named(at + 1) {
            return outright;
        }
        let word = argv.get(at)?;
        let n = name(word);
        // busybox takes any name starting `busybox` for itself; the others
        // only their own (uutils reads `coreutils-rm` as `rm`).
        if n.starts_with("busybox") || MULTICALL.contains(&n.as_str()) {
            at += 1;
            continue;
        }
        if (at > 0 && word.starts_with('-')) || n.is_empty() || n == ".." {
            return None;
        }
        let mut names = vec![n.clone()];
        names.extend(
            n.split(|c: char| !c.is_ascii_alphanumeric())
                .map(String::from),
        );
        if at == 0
            && falls_back
            && let Some(next) = argv.get(1).filter(|w| !w.starts_with('-'))
        {
            names.push(name(next));
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
        return Some(Applet { names, argv_at: at });
    }
}

/// Where the loaders live.
const LOADER_DIRS: &[&str] = &[
    "/lib64",
    "/lib",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
];

/// Whether an executable's own name is a dynamic loader's.
pub fn is_loader(name: &str) -> bool {
    LOADERS.contains(&name)
}

/// What a path glob names on this host (see [`expand`]).
struct Expanded {
    /// Every path the whole glob matches.
    paths: Vec<PathBuf>,
    /// The directories listed for the glob's last component, when it is a
    /// pattern (`~/.ssh/*`: each `.ssh`).
    listed: Vec<PathBuf>,
}

/// The paths an absolute glob names on this host, walked one component at
/// a time (a literal component is joined, a pattern lists the directory,
/// at most [`MAX_DIR_ENTRIES`] entries each). None for a glob with `**`,
/// which names paths anywhere below: those are matched by name only.
fn expand(glob: &str) -> Option<Expanded> {
    if glob.contains("**") || !glob.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = glob.split('/').filter(|c| !c.is_empty()).collect();
    let mut level = vec![PathBuf::from("/")];
    let mut listed = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let literal = crate::policy::matchers::is_literal(part);
        let matcher = if literal {
            None
        } else {
            Some(globset::Glob::new(part).ok()?.compile_matcher())
        };
        let mut next = Vec::new();
        for dir in &level {
            let Some(matcher) = &matcher else {
                next.push(dir.join(part));
                continue;
            };
            if last {
                listed.push(dir.clone());
            }
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            next.extend(
                entries
                    .take(MAX_DIR_ENTRIES)
                    .flatten()
                    .filter(|e| matcher.is_match(e.file_name()))
                    .map(|e| e.path()),
            );
        }
        level = next;
    }
    Some(Expanded {
        paths: level,
        listed,
    })
}

/// The kernel's encoding of a device number (`MKDEV`: major << 20 | minor),
/// as `inode->i_sb->s_dev` holds it, from the userspace `st_dev`.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xf_ffff)
}

/// A file's identity as the kernel reports it, if it exists.
pub fn file_key(path: &Path) -> Option<FileKey> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey {
        ino: m.ino(),
        dev: kernel_dev(m.dev()),
        _pad: 0,
    })
}

/// The executables a policy names, by file: every path each one has
/// under the names and paths the rules give, and whether the kernel may
/// refuse it on its own (only when every name it was found under is one a
/// deny rule alone decides: another rule naming it by another name must
/// get its say).
///
/// It also holds the Unix socket files the policy names by path
/// ([`Self::sockets`]): looked up by device and inode, like executables,
/// and looked up again as often (a socket appears when its server starts).
///
/// And the files and directories the file rules' path patterns name
/// ([`Self::protected`]), for the kernel to find by inode: a hard link
/// elsewhere, a renamed directory or a bind mount is the same inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExeIndex {
    files: HashMap<FileKey, Entry>,
    sockets: HashMap<FileKey, BTreeSet<String>>,
    protected: HashMap<FileKey, Protected>,
}

/// A file (or directory) a file rule's pattern names, and the paths that
/// name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Protected {
    /// FILE_CAND_* bits: the file itself, or every file in the directory.
    bits: u32,
    paths: BTreeSet<String>,
}

/// Most files and directories the file rules' patterns may name (the
/// kernel map's size): past it, the rest are matched by name only.
const MAX_PROTECTED: usize = airlock_common::FILE_INODES_MAX as usize;

/// Most entries read from one directory while expanding a pattern.
const MAX_DIR_ENTRIES: usize = 10_000;

/// What the kernel does with a file it finds by inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon decides.
    Candidate,
    /// Refused in the kernel: only deny rules that alone decide name it.
    Denied,
    /// A multi-call binary: the applet its argv names decides, unless a
    /// deny rule alone refuses the binary itself. busybox runs exactly
    /// the applet `argv[0]` names (others fall back to `argv[1]`).
    Multicall { deny: bool, busybox: bool },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    paths: BTreeSet<String>,
    deny: bool,
    multicall: bool,
    loader: bool,
}

impl ExeIndex {
    /// The executables the policy's candidates name (see [`Self::build`]).
    pub fn of(c: &Candidates) -> Self {
        let mut index = Self::build(&c.exec_paths, &c.exec_names, |n| {
            c.exec_deny_paths.contains(n) || c.exec_deny_names.contains(n)
        });
        for p in &c.unix.paths {
            index.add_socket(Path::new(p));
        }
        for g in &c.file_paths {
            index.add_protected(g);
        }
        for g in &c.unix.globs {
            let Some(found) = expand(g) else { continue };
            for p in &found.paths {
                if std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    index.add_socket(p);
                }
            }
        }
        index
    }

    /// The files a path glob names on this host, walked one component at
    /// a time (a `**` pattern names files anywhere: those are matched by
    /// name only). A pattern whose last component is a glob also names
    /// the directories it lists, for their every file.
    fn add_protected(&mut self, glob: &str) {
        let Some(found) = expand(glob) else { return };
        for dir in &found.listed {
            self.protect(dir, airlock_common::FILE_CAND_DIR);
        }
        for f in &found.paths {
            if std::fs::metadata(f).is_ok_and(|m| m.is_file()) {
                self.protect(f, airlock_common::FILE_CAND_NAME);
            }
        }
    }

    fn protect(&mut self, path: &Path, bit: u32) {
        let Some(key) = file_key(path) else { return };
        if self.protected.len() >= MAX_PROTECTED && !self.protected.contains_key(&key) {
            return;
        }
        let e = self.protected.entry(key).or_default();
        e.bits |= bit;
        e.paths.insert(path.display().to_string());
    }

    /// Keeps what `earlier` (the same policy's index) protected and this
    /// one did not find: a file or directory renamed away from every path
    /// a rule gives is still the file the rule meant, and stays protected
    /// by its inode (under the paths it had) until the policy reloads.
    pub fn keep_protected(&mut self, earlier: &Self) {
        for (k, e) in &earlier.protected {
            if self.protected.len() >= MAX_PROTECTED {
                return;
            }
            let mine = self.protected.entry(*k).or_default();
            mine.bits |= e.bits;
            mine.paths.extend(e.paths.iter().cloned());
        }
    }

    /// The files and directories the file rules name, by device and
    /// inode, with their FILE_CAND_* bits.
    pub fn protected(&self) -> impl Iterator<Item = (&FileKey, u32)> {
        self.protected.iter().map(|(k, e)| (k, e.bits))
    }

    /// The paths the file rules know the file `key` by.
    pub fn protected_paths(&self, key: &FileKey) -> impl Iterator<Item = &str> {
        self.protected
            .get(key)
            .into_iter()
            .flat_map(|e| e.paths.iter().map(String::as_str))
    }

    /// A socket file a rule names by path: found by device and inode
    /// (after symlinks), known by that path and its canonical one.
    fn add_socket(&mut self, path: &Path) {
        let Some(key) = file_key(path) else { return };
        let names = self.sockets.entry(key).or_default();
        names.insert(path.display().to_string());
        if let Ok(shown) = std::fs::canonicalize(path) {
            names.insert(shown.display().to_string());
        }
    }

    /// The socket files the policy names, by device and inode.
    pub fn sockets(&self) -> impl Iterator<Item = &FileKey> {
        self.sockets.keys()
    }

    /// Every path the policy knows a socket file by.
    pub fn socket_paths_all(&self) -> impl Iterator<Item = &str> {
        self.sockets.values().flatten().map(String::as_str)
    }

    /// The paths the policy knows the socket file `key` by.
    pub fn socket_paths(&self, key: &FileKey) -> impl Iterator<Item = &str> {
        self.sockets
            .get(key)
            .into_iter()
            .flat_map(|n| n.iter().map(String::as_str))
    }

    /// Finds the named executables on this host: `paths` as given (after
    /// symlinks), `names` in [`SEARCH_DIRS`], and, when there is any of
    /// them, the loaders in their directories. `deny` says which of the
    /// names and paths the kernel may refuse on its own.
    pub fn build<'a>(
        paths: impl IntoIterator<Item = &'a String>,
        names: impl IntoIterator<Item = &'a String>,
        deny: impl Fn(&str) -> bool,
    ) -> Self {
        let mut index = Self::default();
        let mut any = false;
        for p in paths {
            any = true;
            index.add(Path::new(p), deny(p));
        }
        for n in names {
            any = true;
            if n.contains('/') || n.is_empty() {
                continue;
            }
            for d in SEARCH_DIRS {
                index.add(&Path::new(d).join(n), deny(n));
            }
        }
        if any {
            for l in LOADERS {
                for d in LOADER_DIRS {
                    index.add_loader(&Path::new(d).join(l));
                }
            }
            // Every applet link opens one of these, whatever it is called.
            for m in MULTICALL {
                for d in SEARCH_DIRS {
                    index.add_multicall(&Path::new(d).join(m));
                }
            }
        }
        index
    }

    fn add(&mut self, path: &Path, deny: bool) {
        let Some(key) = file_key(path) else { return };
        let shown = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let fresh = !self.files.contains_key(&key);
        let entry = self.files.entry(key).or_default();
        entry.paths.insert(path.display().to_string());
        entry.paths.insert(shown.display().to_string());
        let named_multicall = |p: &Path| {
            p.file_name()
                .is_some_and(|n| is_multicall(&n.to_string_lossy()))
        };
        let multicall = named_multicall(&shown);
        // A deny rule's applet link (`/usr/bin/whoami -> busybox`) refuses
        // that applet (by name, see bpf/candidates.rs), never the binary.
        let applet_link = multicall && !named_multicall(path);
        entry.deny = (fresh || entry.deny) && deny && !applet_link;
        entry.multicall |= multicall;
    }

    /// A dynamic loader found by its name, whatever its file is called
    /// (glibc before 2.34: `ld-linux-x86-64.so.2 -> ld-2.31.so`).
    fn add_loader(&mut self, path: &Path) {
        if let Some(e) = self.add_role(path) {
            e.loader = true;
        }
    }

    /// Whether the file `key` is a dynamic loader the index found.
    pub fn loader_file(&self, key: &FileKey) -> bool {
        self.files.get(key).is_some_and(|e| e.loader)
    }

    /// A multi-call binary found by its name, whatever its file is called
    /// (a hard link, a versioned file).
    fn add_multicall(&mut self, path: &Path) {
        if let Some(e) = self.add_role(path) {
            e.multicall = true;
        }
    }

    /// The entry of the file at `path` with `path` among its names; a new
    /// one is not refused (a deny rule's entry stays one).
    fn add_role(&mut self, path: &Path) -> Option<&mut Entry> {
        let key = file_key(path)?;
        if !self.files.contains_key(&key) {
            self.add(path, false);
        }
        let entry = self.files.get_mut(&key)?;
        entry.paths.insert(path.display().to_string());
        Some(entry)
    }

    /// Every file the kernel looks for by itself, and what it does with
    /// it.
    pub fn files(&self) -> impl Iterator<Item = (FileKey, Role)> + '_ {
        self.files.iter().map(|(k, e)| {
            let role = if e.multicall {
                Role::Multicall {
                    deny: e.deny,
                    busybox: e.paths.iter().any(|p| {
                        p.rsplit('/')
                            .next()
                            .is_some_and(|n| n.starts_with("busybox"))
                    }),
                }
            } else if e.deny {
                Role::Denied
            } else {
                Role::Candidate
            };
            (*k, role)
        })
    }

    /// Whether the file `key` is a multi-call binary the index found.
    pub fn multicall_file(&self, key: &FileKey) -> bool {
        self.files.get(key).is_some_and(|e| e.multicall)
    }

    /// Whether `path` (a path a rule gives) is a multi-call binary's
    /// applet link, `/usr/bin/whoami -> busybox`: its file says nothing
    /// of which program runs, its name (as `argv[0]`) does.
    pub fn applet_link(&self, path: &str) -> bool {
        self.files
            .values()
            .any(|e| e.multicall && e.paths.contains(path))
    }

    /// The paths the policy knows the file `key` by (none when it names
    /// no such file).
    pub fn paths_of(&self, key: &FileKey) -> impl Iterator<Item = &str> {
        self.files
            .get(key)
            .into_iter()
            .flat_map(|e| e.paths.iter().map(String::as_str))
    }

    /// How many files (executables and sockets).
    pub fn len(&self) -> usize {
        self.files.len() + self.sockets.len() + self.protected.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the daemon finds what the string `said` named for the thread
/// `pid` of process `tgid`: a relative path from its working directory, an
/// absolute one from its root, and the names that mean "this process"
/// (`/dev/fd/N`, `/proc/self/...`, `/proc/thread-self/...`, which in the
/// daemon would mean the daemon) through its own /proc entries. Only
/// where to look: what is found there counts only if [`true_name`] agrees
/// it is the file the kernel ran.
pub fn said_path(tgid: u32, pid: u32, said: &str) -> PathBuf {
    let me = format!("/proc/{tgid}");
    let rewrites = [
        ("/dev/fd/", format!("{me}/fd/")),
        ("/dev/stdin", format!("{me}/fd/0")),
        ("/proc/self/", format!("{me}/")),
        ("/proc/thread-self/", format!("{me}/task/{pid}/")),
    ];
    for (from, to) in rewrites {
        if let Some(rest) = said.strip_prefix(from) {
            return PathBuf::from(format!("{to}{rest}"));
        }
    }
    match said.strip_prefix('/') {
        Some(abs) => PathBuf::from(format!("{me}/root/{abs}")),
        None => PathBuf::from(format!("{me}/cwd/{said}")),
    }
}

/// Whether `said` names a file by an open descriptor (`/dev/fd/N`, as
/// `fexecve` and `execveat(AT_EMPTY_PATH)` do, or through /proc).
pub fn is_descriptor(said: &str) -> bool {
    let fd_of = |rest: &str| rest.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty();
    if let Some(rest) = said.strip_prefix("/dev/fd/") {
        return fd_of(rest);
    }
    let Some(rest) = said.strip_prefix("/proc/") else {
        return false;
    };
    let rest = match rest.split_once('/') {
        Some(("self", r)) | Some(("thread-self", r)) => r,
        Some((pid, r)) if pid.bytes().all(|b| b.is_ascii_digit()) => r,
        _ => return false,
    };
    rest.strip_prefix("fd/").is_some_and(fd_of)
}

/// The path of `p` on this host, if `p` is the file `key` (the same device
/// and inode, so a name the caller chose cannot stand in for another
/// file): after every symlink, or what a /proc link says for a file with
/// no name left (`... (deleted)`).
pub fn true_name(p: &Path, key: FileKey) -> Option<String> {
    if file_key(p)? != key {
        return None;
    }
    if let Ok(c) = std::fs::canonicalize(p)
        && file_key(&c) == Some(key)
    {
        return Some(c.display().to_string());
    }
    let link = std::fs::read_link(p).ok()?;
    Some(link.display().to_string())
}

/// The options of glibc's `ld.so` that take a value.
const LOADER_VALUE_OPTS: &[&str] = &[
    "--library-path",
    "--inhibit-rpath",
    "--audit",
    "--preload",
    "--argv0",
    "--glibc-hwcaps-prepend",
    "--glibc-hwcaps-mask",
];

/// The options of glibc's `ld.so` without a value.
const LOADER_FLAGS: &[&str] = &["--list", "--verify", "--inhibit-cache"];

/// Where in a dynamic loader's argv the program it runs is: its first
/// operand, after the loader's own options. None when there is none, or
/// an option this reader does not know (so it cannot tell which word is
/// the program).
pub fn loader_program(argv: &[String]) -> Option<usize> {
    let mut i = 1;
    while let Some(a) = argv.get(i) {
        if LOADER_VALUE_OPTS.contains(&a.as_str()) {
            i += 2;
        } else if LOADER_FLAGS.contains(&a.as_str()) {
            i += 1;
        } else if a.starts_with('-') {
            return None;
        } else {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_patterns_name_files_and_directories_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (sub, file) in [("u1/.ssh", "id_a"), ("u2/.ssh", "id_b"), ("u2/other", "x")] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::write(d.join(sub).join(file), "k").unwrap();
        }
        std::fs::write(d.join("lone"), "k").unwrap();
        let mut c = Candidates::default();
        c.file_paths.insert(format!("{}/*/.ssh/*", d.display()));
        c.file_paths.insert(format!("{}/lone", d.display()));
        c.file_paths.insert("**/.env".into());
        let index = ExeIndex::of(&c);
        let bits = |p: &Path| {
            let k = file_key(p).unwrap();
            index
                .protected()
                .find(|(key, _)| **key == k)
                .map(|(_, b)| b)
                .unwrap_or(0)
        };
        assert_eq!(
            bits(&d.join("u1/.ssh/id_a")),
            airlock_common::FILE_CAND_NAME
        );
        assert_eq!(
            bits(&d.join("u2/.ssh/id_b")),
            airlock_common::FILE_CAND_NAME
        );
        assert_eq!(bits(&d.join("u1/.ssh")), airlock_common::FILE_CAND_DIR);
        assert_eq!(bits(&d.join("lone")), airlock_common::FILE_CAND_NAME);
        assert_eq!(bits(&d.join("u2/other/x")), 0);
        // Three files, two directories: no `**` pattern is walked.
        assert_eq!(index.protected().count(), 5);
        // A hard link is the same file, known by the rule's path.
        std::fs::hard_link(d.join("lone"), d.join("link")).unwrap();
        let k = file_key(&d.join("link")).unwrap();
        assert_eq!(
            index.protected_paths(&k).collect::<Vec<_>>(),
            [d.join("lone").display().to_string()]
        );
        // Renamed away, it stays protected once the index is built again.
        std::fs::rename(d.join("u1/.ssh"), d.join("u1/moved")).unwrap();
        let mut again = ExeIndex::of(&c);
        assert_eq!(again.protected().count(), 3);
        again.keep_protected(&index);
        assert_eq!(again, index);
    }

    #[test]
    fn a_hard_link_is_the_same_file_and_a_symlink_leads_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("tool");
        std::fs::write(&real, "#!/bin/sh\n").unwrap();
        let link = dir.path().join("other-name");
        std::fs::hard_link(&real, &link).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&real, &sym).unwrap();
        assert_eq!(file_key(&real), file_key(&link));
        assert_eq!(file_key(&real), file_key(&sym));
        let p = real.display().to_string();
        let index = ExeIndex::build([&p], [], |_| true);
        let key = file_key(&link).unwrap();
        assert!(index.paths_of(&key).any(|q| q == p), "{index:?}");
        assert!(index.files().any(|(k, r)| k == key && r == Role::Denied));
        assert!(is_loader("ld-linux-x86-64.so.2") && !is_loader("curl"));
        // Named again by a path no deny rule alone decides: held, not refused.
        let l = link.display().to_string();
        let index = ExeIndex::build([&p, &l], [], |q| q == p);
        assert!(index.files().any(|(k, r)| k == key && r == Role::Candidate));
        let index = ExeIndex::build([&l, &p], [], |q| q == p);
        assert!(index.files().any(|(k, r)| k == key && r == Role::Candidate));
    }

    #[test]
    fn names_that_mean_the_caller_are_read_through_its_proc_entries() {
        let p = |s| said_path(7, 9, s).display().to_string();
        assert_eq!(p("/dev/fd/3"), "/proc/7/fd/3");
        assert_eq!(p("/dev/fd/3/tool"), "/proc/7/fd/3/tool");
        assert_eq!(p("/proc/self/exe"), "/proc/7/exe");
        assert_eq!(p("/proc/thread-self/fd/4"), "/proc/7/task/9/fd/4");
        assert_eq!(p("/usr/bin/id"), "/proc/7/root/usr/bin/id");
        assert_eq!(p("./id"), "/proc/7/cwd/./id");
        assert!(is_descriptor("/dev/fd/3") && is_descriptor("/proc/self/fd/12"));
        assert!(is_descriptor("/proc/42/fd/0") && !is_descriptor("/dev/fd/3/tool"));
        assert!(!is_descriptor("/proc/self/exe") && !is_descriptor("/usr/bin/id"));
    }

    #[test]
    fn a_true_name_is_only_one_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let key = file_key(&a).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&a, &sym).unwrap();
        let real = std::fs::canonicalize(&a).unwrap().display().to_string();
        assert_eq!(true_name(&sym, key), Some(real));
        assert_eq!(true_name(&b, key), None);
        assert_eq!(true_name(&dir.path().join("none"), key), None);
    }

    #[test]
    fn a_loaders_program_is_its_first_operand() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(loader_program(&v("ld.so /usr/bin/curl -s x")), Some(1));
        assert_eq!(
            loader_program(&v("ld.so --library-path /l --preload p.so --list ./curl")),
            Some(6)
        );
        assert_eq!(loader_program(&v("ld.so --new-option /usr/bin/curl")), None);
        assert_eq!(loader_program(&v("ld.so --argv0")), None);
        assert_eq!(loader_program(&v("ld.so")), None);
    }

    #[test]
    fn a_multicall_binary_runs_the_applet_its_argv_names() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let a = |s: &str| applet(&v(s), true).map(|a| (a.names, a.argv_at));
        let is = |n: &str, at| Some((v(n), at));
        assert_eq!(a("/tmp/x/ls -l"), is("ls", 0));
        assert_eq!(a("-sh -c x"), is("sh", 0));
        assert_eq!(a("busybox wget x"), is("wget", 1));
        assert_eq!(a("/bin/busybox busybox /usr/bin/wget"), is("wget", 2));
        assert_eq!(a("/tmp/busyboxA busyboxB wget"), is("wget", 2));
        assert_eq!(a("busybox.static -wget"), None);
        assert_eq!(a("busybox-1.36 wget"), is("wget", 1));
        // uutils: any prefix and extension; argv[1] when argv[0] is no
        // command it knows.
        assert_eq!(a("uu-rm.x -rf /"), is("uu-rm.x uu rm x", 0));
        assert_eq!(a("x+rm"), is("x+rm x rm", 0));
        assert_eq!(a("x rm -rf"), is("x rm", 0));
        // GNU coreutils names it outright, after any argv[0].
        assert_eq!(a("coreutils --coreutils-prog=rm -rf /"), is("rm", 1));
        assert_eq!(a("x --coreutils-prog=rm -rf /"), is("rm", 1));
        assert_eq!(a("x --coreutils-prog-shebang=rm /s"), is("rm", 1));
        assert_eq!(a("coreutils --coreutils-prog=a/rm"), None);
        assert_eq!(a("busybox --install -s"), None);
        assert_eq!(a("busybox"), None);
        // A path library's file name: uutils runs `rm` for these.
        assert_eq!(a("rm/ -rf x"), is("rm", 0));
        assert_eq!(a("/x/rm/. -rf x"), is("rm", 0));
        assert_eq!(a("coreutils-rm / -rf"), is("coreutils-rm coreutils rm", 0));
        assert_eq!(a("/ -rf"), None);
        let b = applet(&v("x rm -rf"), false).map(|a| (a.names, a.argv_at));
        assert_eq!(b, is("x", 0));
        assert_eq!(applet(&[], true), None);
    }

    #[test]
    fn kernel_devices_are_major_shifted_by_20() {
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(0, 0x23)), 0x23);
    }
}
