//! Start-up steps that look at what an earlier daemon left: the data
//! directory's lock, sessions still watched in the pinned map, holds that
//! ended while no daemon ran, and losses already recorded.

use std::collections::{HashMap, HashSet};

use airlock_common::{EventKind, LossKey, LossReason};
use tracing::{info, warn};

use crate::{
    bpf::Bpf,
    config::Config,
    model::{ApprovalRequest, wall_now_ns},
    procfs,
    store::{LockError, Store, StoreError},
};

/// Raises the open-file limit to its hard limit: every API client and
/// store reader holds a descriptor, and running out must not be something
/// a local user can cause with idle connections.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Takes the data directory's lock: one daemon per store and pin set.
pub fn lock(config: &Config) -> Result<std::fs::File, LockError> {
    crate::store::lock_data_dir(&config.data_dir, &config.lock_path())
}

/// Sessions the store has open: those whose root process is still a member
/// in the kernel (the pinned session map outlived the last daemon) go on,
/// with their roots returned; the others are ended now.
pub fn take_over_sessions(store: &mut Store, bpf: &Bpf) -> Result<HashMap<u64, u32>, StoreError> {
    let mut roots = HashMap::new();
    let mut ended = 0;
    let now = wall_now_ns();
    for (id, root) in store.open_sessions()? {
        if bpf.is_member(root, id) {
            roots.insert(id, root);
        } else {
            store.end_session(id, now)?;
            ended += 1;
        }
    }
    if ended > 0 {
        warn!(ended, "ended sessions whose processes are gone");
    }
    if !roots.is_empty() {
        info!(
            sessions = roots.len(),
            "still watching sessions from an earlier daemon"
        );
    }
    Ok(roots)
}

/// Pending requests whose process is still there but no longer held: the
/// hold ended while no daemon ran.
pub fn holds_ended(pending: &[ApprovalRequest], bpf: &Bpf) -> HashSet<u64> {
    pending
        .iter()
        .filter(|r| {
            let Some(st) = procfs::stat(r.tgid) else {
                return false;
            };
            let held = if r.in_syscall {
                bpf.hold_pending(r.tgid, r.digest)
            } else {
                st.stopped()
            };
            st.start_time == r.start_time && !held
        })
        .map(|r| r.id)
        .collect()
}

/// What an earlier daemon already recorded of the pinned loss counters.
pub fn recorded_losses(store: &Store) -> Result<HashMap<LossKey, u64>, StoreError> {
    let mut seen = HashMap::new();
    for (session_id, kind, reason, count) in store.recorded_losses()? {
        let (Some(k), Some(r)) = (EventKind::from_name(&kind), LossReason::from_name(&reason))
        else {
            continue;
        };
        let key = LossKey {
            session_id,
            kind: k as u32,
            reason: r as u32,
        };
        seen.insert(key, count);
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_records_name_their_kind_and_reason_by_stable_names() {
        for (name, kind) in [
            ("exec", EventKind::Exec),
            ("file_open", EventKind::FileOpen),
            ("connect_held", EventKind::ConnectHeld),
            ("loss", EventKind::Loss),
        ] {
            assert_eq!(EventKind::from_name(name), Some(kind));
        }
        assert_eq!(EventKind::from_name("nothing"), None);
        assert_eq!(
            LossReason::from_name("hold_unpublished"),
            Some(LossReason::HoldUnpublished)
        );
        assert_eq!(LossReason::from_name("ringbuf"), None);
    }
}
