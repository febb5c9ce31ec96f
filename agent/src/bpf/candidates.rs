//! Writes the policy's candidates into the kernel's pre-filter maps:
//! executables by file (device and inode) and by name, connect address prefixes, file and directory
//! names, Unix socket files (device and inode) and abstract addresses,
//! and the "every exec" / "set-user-ID" / "every Unix socket" / "servers
//! outside the session" switches.
//!
//! File candidates are the names and inodes the kernel's `lsm_file_open`
//! looks up before it does anything else with an open
//! (agent-ebpf/src/lsm/file.rs): a file is a candidate when its own name
//! or inode is in the maps with [`FILE_CAND_NAME`], or the name or inode
//! of the directory that contains it is there with [`FILE_CAND_DIR`].

use std::collections::{HashMap as StdHashMap, HashSet};

use airlock_common::{
    EXEC_RULE_BUSYBOX, EXEC_RULE_DENY_AS_APPLET, EXEC_RULE_MULTICALL, ExecRule, FILE_CAND_DIR,
    FILE_CAND_NAME, FILE_NAME_HASHED, FileKey, MODE_EXEC_ALL, MODE_EXEC_SETUID, MODE_UNIX_ALL,
    MODE_UNIX_OUTSIDE, NetRule, RuleAction, UNIX_CAND, name_hash,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};

use super::BpfError;
use crate::{
    exefile::{self, ExeIndex, Role},
    policy::candidates::Candidates,
};

/// A candidate map entry says "hold and ask the daemon"; the daemon's
/// policy decides.
const CANDIDATE: ExecRule = ExecRule {
    action: RuleAction::Hold as u32,
    flags: 0,
};

/// A multi-call binary (by file or by name): held, or refused in the
/// kernel by the applet its argv names.
const MULTICALL: ExecRule = ExecRule {
    action: RuleAction::Hold as u32,
    flags: EXEC_RULE_MULTICALL,
};

/// busybox: held only when `argv[0]`'s name starts with `busybox` or is a
/// name a rule gives (it runs exactly the applet that name names).
const BUSYBOX: ExecRule = ExecRule {
    action: RuleAction::Hold as u32,
    flags: EXEC_RULE_MULTICALL | EXEC_RULE_BUSYBOX,
};

/// A name a deny rule alone decides for a multi-call binary's applet link:
/// refused as that applet, a candidate as any other file's name.
const DENIED_AS_APPLET: ExecRule = ExecRule {
    action: RuleAction::Deny as u32,
    flags: EXEC_RULE_DENY_AS_APPLET,
};

/// An executable a deny rule alone decides: refused in the kernel.
const DENIED: ExecRule = ExecRule {
    action: RuleAction::Deny as u32,
    flags: 0,
};

/// Replaces the candidate maps' contents with `c` (and the files `exes`
/// found for it): new entries first, then the stale ones removed, so no
/// candidate of both policies is missed.
pub fn apply(ebpf: &mut Ebpf, c: &Candidates, exes: &ExeIndex) -> Result<(), BpfError> {
    let files: StdHashMap<FileKey, ExecRule> = exes
        .files()
        .map(|(k, role)| {
            let rule = match role {
                Role::Multicall { deny, busybox } => ExecRule {
                    action: if deny {
                        RuleAction::Deny as u32
                    } else {
                        RuleAction::Hold as u32
                    },
                    ..if busybox { BUSYBOX } else { MULTICALL }
                },
                Role::Denied => DENIED,
                Role::Candidate => CANDIDATE,
            };
            (k, rule)
        })
        .collect();
    sync(ebpf, "EXEC_FILES", &files)?;
    sync(ebpf, "EXEC_NAMES", &exec_names(c, exes))?;

    let mut net: LpmTrie<&mut MapData, [u8; 16], NetRule> =
        LpmTrie::try_from(map(ebpf, "NET_RULES")?).map_err(|e| BpfError::map("NET_RULES", e))?;
    let value = NetRule {
        action: RuleAction::Hold as u32,
    };
    let mut want = HashSet::new();
    for &(len, data) in &c.net {
        net.insert(&Key::new(len, data), value, 0)
            .map_err(|e| BpfError::map("NET_RULES", e))?;
        want.insert((len, data));
    }
    let stale: Vec<_> = net
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
        .collect();
    for k in stale {
        let _ = net.remove(&k);
    }

    // A name given twice (as a file and as a directory) has both bits.
    let mut files: StdHashMap<u64, u32> = StdHashMap::new();
    for (name, bits) in &c.files {
        if let Some((hash, bits)) = file_candidate(name, *bits) {
            *files.entry(hash).or_default() |= bits;
        }
    }
    sync(ebpf, "FILE_NAMES", &files)?;
    let inodes: StdHashMap<FileKey, u32> = exes.protected().map(|(k, b)| (*k, b)).collect();
    sync(ebpf, "FILE_INODES", &inodes)?;

    // Socket files by device and inode; addresses by the hash of the name
    // (device 0): a path as a server binds it (a restarted server's new
    // socket, before the next look-up finds its file), an abstract one
    // after the `@`.
    let mut unix: StdHashMap<FileKey, u32> = exes.sockets().map(|k| (*k, UNIX_CAND)).collect();
    let names = c
        .unix
        .abstracts
        .iter()
        .chain(&c.unix.paths)
        .map(String::as_str);
    for a in names.chain(exes.socket_paths_all()) {
        let name = a.strip_prefix('@').unwrap_or(a);
        let key = FileKey {
            ino: name_hash(name.as_bytes()),
            dev: 0,
            _pad: 0,
        };
        unix.insert(key, UNIX_CAND);
    }
    sync(ebpf, "UNIX_FILES", &unix)?;

    set_mode(ebpf, MODE_EXEC_ALL, c.exec_all)?;
    set_mode(ebpf, MODE_EXEC_SETUID, c.exec_setuid)?;
    set_mode(ebpf, MODE_UNIX_ALL, c.unix.all)?;
    set_mode(ebpf, MODE_UNIX_OUTSIDE, c.unix.outside)?;
    forget_flows(ebpf)
}

/// Forgets every datagram flow's decision (`FLOWS_DECIDED`, keyed by
/// process and destination, an IP address or a Unix socket): they were taken under the policy
/// this one replaces, so the next datagram of each is asked about again.
/// (Key: tgid, family, port, address, process start: 32 bytes.)
fn forget_flows(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let mut flows: HashMap<&mut MapData, [u8; 32], u32> =
        HashMap::try_from(map(ebpf, "FLOWS_DECIDED")?)
            .map_err(|e| BpfError::map("FLOWS_DECIDED", e))?;
    let keys: Vec<[u8; 32]> = flows.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = flows.remove(&k);
    }
    Ok(())
}

/// The exec name map: each name a rule gives, the file name of each path a
/// rule gives (a file made there after the policy loaded has no entry by
/// inode), and, when any rule names an executable, the dynamic loaders
/// (which run the program their first operand names) and the multi-call
/// binaries (which run the applet their argv names: the kernel reads it).
/// The kernel refuses a name itself only where every rule behind it is a
/// deny rule that alone decides: a name a rule gives, and the applet
/// link's name of a path a rule gives (as an applet only). The rest are
/// candidates: the daemon decides on the file.
pub fn exec_names(c: &Candidates, exes: &ExeIndex) -> StdHashMap<u64, ExecRule> {
    let named = !c.exec_names.is_empty() || !c.exec_paths.is_empty();
    let loaders = exefile::LOADERS
        .iter()
        .filter(|_| named)
        .map(|n| (*n, CANDIDATE));
    let multicall = exefile::MULTICALL
        .iter()
        .filter(|_| named)
        .map(|n| (*n, if *n == "busybox" { BUSYBOX } else { MULTICALL }));
    let paths = c.exec_paths.iter().map(|p| {
        let deny = c.exec_deny_paths.contains(p) && exes.applet_link(p);
        (
            p.rsplit('/').next().unwrap_or(p),
            if deny { DENIED_AS_APPLET } else { CANDIDATE },
        )
    });
    let names = c.exec_names.iter().map(|n| {
        let deny = c.exec_deny_names.contains(n);
        (n.as_str(), if deny { DENIED } else { CANDIDATE })
    });
    let mut map: StdHashMap<u64, ExecRule> = StdHashMap::new();
    for (name, rule) in loaders.chain(multicall).chain(paths).chain(names) {
        map.entry(name_hash(name.as_bytes()))
            .and_modify(|had| *had = join(*had, rule))
            .or_insert(rule);
    }
    map
}

/// One name entry for two reasons: refused where both refuse (a name a
/// deny rule gives stays refused as a multi-call binary's name: that file
/// is refused whatever it runs), else a candidate.
fn join(a: ExecRule, b: ExecRule) -> ExecRule {
    let pair = |x, y| (a == x && b == y) || (a == y && b == x);
    let multi = |r: ExecRule| r == MULTICALL || r == BUSYBOX;
    if a == b {
        a
    } else if pair(DENIED, DENIED_AS_APPLET) {
        DENIED_AS_APPLET
    } else if (a == DENIED && multi(b)) || (b == DENIED && multi(a)) {
        DENIED
    } else {
        CANDIDATE
    }
}

/// Turns a `MODE_*` switch the kernel programs read on or off.
pub fn set_mode(ebpf: &mut Ebpf, slot: u32, on: bool) -> Result<(), BpfError> {
    let mut mode: Array<&mut MapData, u32> =
        Array::try_from(map(ebpf, "MODE")?).map_err(|e| BpfError::map("MODE", e))?;
    mode.set(slot, u32::from(on), 0)
        .map_err(|e| BpfError::map("MODE", e))
}

/// The map entry for one file or directory name (a single path
/// component): None when the kernel could never match it (empty, with a
/// `/`, or longer than [`FILE_NAME_HASHED`] bytes), or `bits` has no
/// `FILE_CAND_*` bit.
pub fn file_candidate(name: &str, bits: u32) -> Option<(u64, u32)> {
    let bits = bits & (FILE_CAND_NAME | FILE_CAND_DIR);
    let ok = !name.is_empty() && !name.contains('/') && name.len() <= FILE_NAME_HASHED;
    (ok && bits != 0).then(|| (name_hash(name.as_bytes()), bits))
}

/// Makes the kernel hash map `name` hold exactly `want`: new entries
/// first, then the stale ones removed (one gone meanwhile is as wanted).
pub fn sync<K, V>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &StdHashMap<K, V>,
) -> Result<(), BpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(|e| BpfError::map(name, e))?;
    for (k, v) in want {
        m.insert(k, v, 0).map_err(|e| BpfError::map(name, e))?;
    }
    let stale: Vec<K> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        let _ = m.remove(&k);
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, BpfError> {
    ebpf.map_mut(name).ok_or(BpfError::MissingMap(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_single_short_names() {
        assert_eq!(
            file_candidate("id_test", FILE_CAND_NAME),
            Some((name_hash(b"id_test"), FILE_CAND_NAME))
        );
        assert_eq!(file_candidate(".ssh", 7), Some((name_hash(b".ssh"), 3)));
        assert_eq!(file_candidate("", 1), None);
        assert_eq!(file_candidate("a/b", 1), None);
        assert_eq!(
            file_candidate(&"x".repeat(FILE_NAME_HASHED), 1).map(|c| c.1),
            Some(1)
        );
        assert_eq!(file_candidate(&"x".repeat(FILE_NAME_HASHED + 1), 1), None);
        assert_eq!(file_candidate("x", 4), None);
    }

    #[test]
    fn the_kernel_refuses_a_name_only_where_every_reason_for_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "").unwrap();
        let tool = tool.display().to_string();
        let gone = dir.path().join("gone").display().to_string();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let c = Candidates {
            exec_paths: set(&[&tool, &gone, "/opt/x/nc"]),
            exec_names: set(&["nc", "whoami", "curl"]),
            exec_deny_paths: set(&[&tool, &gone]),
            exec_deny_names: set(&["nc", "whoami"]),
            ..Candidates::default()
        };
        let exes = ExeIndex::of(&c);
        let names = exec_names(&c, &exes);
        let of = |n: &str| names.get(&name_hash(n.as_bytes())).copied();
        // Found by inode: refused by file, its name only a candidate.
        assert_eq!(of("tool"), Some(CANDIDATE));
        // Not there: the daemon decides (the name may be another file's).
        assert_eq!(of("gone"), Some(CANDIDATE));
        assert_eq!(of("whoami"), Some(DENIED));
        // Denied by name, held by the path /opt/x/nc: a candidate.
        assert_eq!(of("nc"), Some(CANDIDATE));
        assert_eq!(of("curl"), Some(CANDIDATE));
        assert_eq!(of("busybox"), Some(BUSYBOX));
        assert_eq!(of("toybox"), Some(MULTICALL));
        assert_eq!(of("ld-linux-x86-64.so.2"), Some(CANDIDATE));
        assert_eq!(join(MULTICALL, DENIED), DENIED);
        assert_eq!(join(MULTICALL, CANDIDATE), CANDIDATE);
        assert_eq!(join(DENIED_AS_APPLET, DENIED), DENIED_AS_APPLET);
        assert_eq!(join(DENIED_AS_APPLET, CANDIDATE), CANDIDATE);
        assert_eq!(join(DENIED_AS_APPLET, MULTICALL), CANDIDATE);
        assert_eq!(join(BUSYBOX, DENIED), DENIED);
        assert!(!exes.applet_link(&tool) && !exes.applet_link(&gone));
    }

    #[test]
    fn an_applet_link_is_refused_by_its_name_only_as_the_applet() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = dir.path().join("busybox");
        std::fs::write(&busybox, "").unwrap();
        let link = dir.path().join("whoami");
        std::os::unix::fs::symlink(&busybox, &link).unwrap();
        let link = link.display().to_string();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let c = Candidates {
            exec_paths: set(&[&link]),
            exec_deny_paths: set(&[&link]),
            ..Candidates::default()
        };
        let exes = ExeIndex::of(&c);
        assert!(exes.applet_link(&link));
        let key = exefile::file_key(&busybox).unwrap();
        assert!(exes.files().any(|(k, r)| k == key
            && r == Role::Multicall {
                deny: false,
                busybox: true
            }));
        let names = exec_names(&c, &exes);
        let of = |n: &str| names.get(&name_hash(n.as_bytes())).copied();
        assert_eq!(of("whoami"), Some(DENIED_AS_APPLET));
        assert_eq!(of("busybox"), Some(BUSYBOX));
        // A deny rule on the binary itself refuses it, whatever it runs.
        let b = busybox.display().to_string();
        let c = Candidates {
            exec_paths: set(&[&b]),
            exec_deny_paths: set(&[&b]),
            ..Candidates::default()
        };
        let exes = ExeIndex::of(&c);
        assert!(exes.files().any(|(k, r)| k == key
            && r == Role::Multicall {
                deny: true,
                busybox: true
            }));
    }
}
