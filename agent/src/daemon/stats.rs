//! Counters the daemon keeps about itself, shown by `airlock status`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use airlock_common::EventKind;

use crate::ctl::KindCount;

const KINDS: [EventKind; 8] = [
    EventKind::Fork,
    EventKind::Exec,
    EventKind::Exit,
    EventKind::FileOpen,
    EventKind::Connect,
    EventKind::Accept,
    EventKind::UdpSend,
    EventKind::UnixConnect,
];

#[derive(Default)]
pub struct Stats {
    by_kind: [AtomicU64; KINDS.len()],
    pub decode_errors: AtomicU64,
    /// Records the store failed to write (each one logged).
    pub store_errors: AtomicU64,
    pub records_written: AtomicU64,
    pub sessions_registered: AtomicU64,
}

impl Stats {
    pub fn count_event(&self, kind: EventKind) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.by_kind[i].fetch_add(1, Relaxed);
        }
    }

    pub fn count_undecodable(&self, n: u64) {
        if n > 0 {
            self.decode_errors.fetch_add(n, Relaxed);
        }
    }

    pub fn events(&self) -> Vec<KindCount> {
        KINDS
            .iter()
            .zip(&self.by_kind)
            .map(|(k, n)| KindCount {
                kind: k.name().into(),
                count: n.load(Relaxed),
            })
            .collect()
    }
}
