//! File candidates: the names the kernel's `lsm_file_open` looks up before
//! it does anything else with an open (agent-ebpf/src/lsm.rs). A file is a
//! candidate when its own name is in the map with [`FILE_CAND_NAME`], or
//! the name of the directory that contains it is there with
//! [`FILE_CAND_DIR`]. Candidate opens of watched sessions are held and
//! recorded; every other open is neither.

use std::collections::HashMap as StdHashMap;

use airlock_common::{FILE_CAND_DIR, FILE_CAND_NAME, FILE_NAME_HASHED, name_hash};
use aya::Ebpf;

use super::SensorError;

/// The map entry for one name (a single path component): None when the
/// kernel could never match it (empty, with a `/`, or longer than
/// [`FILE_NAME_HASHED`] bytes), or `bits` has no `FILE_CAND_*` bit.
pub fn candidate(name: &str, bits: u32) -> Option<(u64, u32)> {
    let bits = bits & (FILE_CAND_NAME | FILE_CAND_DIR);
    let ok = !name.is_empty() && !name.contains('/') && name.len() <= FILE_NAME_HASHED;
    (ok && bits != 0).then(|| (name_hash(name.as_bytes()), bits))
}

/// Makes `names` (name hash, `FILE_CAND_*` bits) the candidate set: entries
/// not in it are removed, bits of a name given twice are merged.
pub fn set_file_candidates(ebpf: &mut Ebpf, names: &[(u64, u32)]) -> Result<(), SensorError> {
    let mut want: StdHashMap<u64, u32> = StdHashMap::new();
    for &(hash, bits) in names {
        *want.entry(hash).or_default() |= bits;
    }
    super::rules::sync(ebpf, "FILE_NAMES", &want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_single_short_names() {
        assert_eq!(
            candidate("id_test", FILE_CAND_NAME),
            Some((name_hash(b"id_test"), FILE_CAND_NAME))
        );
        assert_eq!(candidate(".ssh", 7), Some((name_hash(b".ssh"), 3)));
        assert_eq!(candidate("", 1), None);
        assert_eq!(candidate("a/b", 1), None);
        assert_eq!(
            candidate(&"x".repeat(FILE_NAME_HASHED), 1).map(|c| c.1),
            Some(1)
        );
        assert_eq!(candidate(&"x".repeat(FILE_NAME_HASHED + 1), 1), None);
        assert_eq!(candidate("x", 4), None);
    }
}
