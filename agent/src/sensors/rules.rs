//! Writes the policy's candidates into the kernel's pre-filter maps.

use std::collections::{HashMap as StdHashMap, HashSet};

use airlock_common::{
    EXEC_RULE_KEY, ExecRule, MODE_EXEC_ALL, MODE_EXEC_SETUID, NetRule, RuleAction, name_hash,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::IpNet;

use super::SensorError;
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
pub fn apply(ebpf: &mut Ebpf, c: &Candidates) -> Result<(), SensorError> {
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
        LpmTrie::try_from(map(ebpf, "NET_RULES")?).map_err(|e| SensorError::map("NET_RULES", e))?;
    let value = NetRule {
        action: RuleAction::Hold as u32,
    };
    let mut want = HashSet::new();
    for &(len, data) in &c.net {
        net.insert(&Key::new(len, data), value, 0)
            .map_err(|e| SensorError::map("NET_RULES", e))?;
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

    let files: Vec<(u64, u32)> = c
        .files
        .iter()
        .filter_map(|(name, bits)| super::files::candidate(name, *bits))
        .collect();
    super::files::set_file_candidates(ebpf, &files)?;

    let mut mode: Array<&mut MapData, u32> =
        Array::try_from(map(ebpf, "MODE")?).map_err(|e| SensorError::map("MODE", e))?;
    mode.set(MODE_EXEC_ALL, u32::from(c.exec_all), 0)
        .map_err(|e| SensorError::map("MODE", e))?;
    mode.set(MODE_EXEC_SETUID, u32::from(c.exec_setuid), 0)
        .map_err(|e| SensorError::map("MODE", e))?;
    Ok(())
}

/// Makes the kernel hash map `name` hold exactly `want`: new entries
/// first, then the stale ones removed (one gone meanwhile is as wanted).
pub fn sync<K, V>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &StdHashMap<K, V>,
) -> Result<(), SensorError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(|e| SensorError::map(name, e))?;
    for (k, v) in want {
        m.insert(k, v, 0).map_err(|e| SensorError::map(name, e))?;
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

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, SensorError> {
    ebpf.map_mut(name).ok_or(SensorError::MissingMap(name))
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
}
