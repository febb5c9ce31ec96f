//! Writes the policy's candidates into the kernel's pre-filter maps: exec
//! paths and file names, connect address prefixes, file and directory
//! names, and the "every exec" / "set-user-ID" switches.
//!
//! File candidates are the names the kernel's `lsm_file_open` looks up
//! before it does anything else with an open (agent-ebpf/src/lsm.rs): a
//! file is a candidate when its own name is in the map with
//! [`FILE_CAND_NAME`], or the name of the directory that contains it is
//! there with [`FILE_CAND_DIR`].

use std::collections::{HashMap as StdHashMap, HashSet};

use airlock_common::{
    EXEC_RULE_KEY, ExecRule, FILE_CAND_DIR, FILE_CAND_NAME, FILE_NAME_HASHED, MODE_EXEC_ALL,
    MODE_EXEC_SETUID, NetRule, RuleAction, name_hash,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};

use super::BpfError;
use crate::policy::candidates::Candidates;

/// A candidate map entry says "hold and ask the daemon"; the daemon's
/// policy decides.
const CANDIDATE: ExecRule = ExecRule {
    action: RuleAction::Hold as u32,
};

/// An executable a deny rule alone decides: refused in the kernel.
const DENIED: ExecRule = ExecRule {
    action: RuleAction::Deny as u32,
};

/// Replaces the candidate maps' contents with `c`: new entries first, then
/// the stale ones removed, so no candidate of both policies is missed.
pub fn apply(ebpf: &mut Ebpf, c: &Candidates) -> Result<(), BpfError> {
    let verdict = |deny: bool| if deny { DENIED } else { CANDIDATE };
    let mut paths = StdHashMap::new();
    for p in &c.exec_paths {
        let bytes = p.as_bytes();
        if bytes.len() >= EXEC_RULE_KEY {
            // Longer paths are matched by file name instead.
            continue;
        }
        let mut key = [0u8; EXEC_RULE_KEY];
        key[..bytes.len()].copy_from_slice(bytes);
        paths.insert(key, verdict(c.exec_deny_paths.contains(p)));
    }
    sync(ebpf, "EXEC_RULES", &paths)?;

    let long_paths = c
        .exec_paths
        .iter()
        .filter(|p| p.len() >= EXEC_RULE_KEY)
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string());
    let names: StdHashMap<u64, ExecRule> = c
        .exec_names
        .iter()
        .cloned()
        .chain(long_paths)
        .map(|n| {
            (
                name_hash(n.as_bytes()),
                verdict(c.exec_deny_names.contains(&n)),
            )
        })
        .collect();
    sync(ebpf, "EXEC_NAMES", &names)?;

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

    set_mode(ebpf, MODE_EXEC_ALL, c.exec_all)?;
    set_mode(ebpf, MODE_EXEC_SETUID, c.exec_setuid)
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
}
