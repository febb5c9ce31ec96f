//! Writes the configured rules into the kernel's pre-filter maps.

use std::os::unix::ffi::OsStrExt;

use airlock_common::{EXEC_RULE_KEY, ExecRule, NetRule, RuleAction};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use ipnet::IpNet;

use super::SensorError;
use crate::config::{self, Rule};

pub fn load(ebpf: &mut Ebpf, rules: &[Rule]) -> Result<(), SensorError> {
    let mut exec: HashMap<_, [u8; EXEC_RULE_KEY], ExecRule> = HashMap::try_from(
        ebpf.map_mut("EXEC_RULES")
            .ok_or(SensorError::MissingMap("EXEC_RULES"))?,
    )
    .map_err(|e| SensorError::map("EXEC_RULES", e))?;
    for (i, r) in rules.iter().enumerate() {
        let value = ExecRule {
            rule_id: i as u32 + 1,
            action: action(r.action) as u32,
        };
        for p in &r.exec {
            let mut key = [0u8; EXEC_RULE_KEY];
            let bytes = p.as_os_str().as_bytes();
            key[..bytes.len()].copy_from_slice(bytes);
            exec.insert(key, value, 0)
                .map_err(|e| SensorError::map("EXEC_RULES", e))?;
        }
    }
    let mut net: LpmTrie<_, [u8; 16], NetRule> = LpmTrie::try_from(
        ebpf.map_mut("NET_RULES")
            .ok_or(SensorError::MissingMap("NET_RULES"))?,
    )
    .map_err(|e| SensorError::map("NET_RULES", e))?;
    for (i, r) in rules.iter().enumerate() {
        let value = NetRule {
            rule_id: i as u32 + 1,
            action: action(r.action) as u32,
            port: r.port.unwrap_or(0),
            _pad: [0; 6],
        };
        for n in &r.connect {
            let (len, data) = trie_key(n);
            net.insert(&Key::new(len, data), value, 0)
                .map_err(|e| SensorError::map("NET_RULES", e))?;
        }
    }
    Ok(())
}

fn action(a: config::RuleAction) -> RuleAction {
    match a {
        config::RuleAction::Hold => RuleAction::Hold,
        config::RuleAction::Deny => RuleAction::Deny,
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
}
