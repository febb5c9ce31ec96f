//! The recorder: one thread that owns the store's write connection and
//! writes records in batched transactions.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use airlock_common::EventKind;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::{handles::RecorderMsg, stats::Stats};
use crate::{
    model::{Detail, Record},
    store::Store,
};

struct Recorder {
    store: Store,
    batch: Vec<Record>,
    /// Root process of each open session: its exit ends the session.
    roots: HashMap<u64, u32>,
    stats: Arc<Stats>,
}

/// Runs until every sender is dropped, then returns after the last write.
pub fn run(
    store: Store,
    mut rx: mpsc::Receiver<RecorderMsg>,
    batch_max: usize,
    stats: Arc<Stats>,
    roots: HashMap<u64, u32>,
) {
    let mut r = Recorder {
        store,
        batch: Vec::new(),
        roots,
        stats,
    };
    while let Some(msg) = rx.blocking_recv() {
        r.handle(msg);
        // Take whatever else is queued, up to a batch, before writing.
        while r.batch.len() < batch_max {
            match rx.try_recv() {
                Ok(msg) => r.handle(msg),
                Err(_) => break,
            }
        }
        r.flush();
    }
    r.flush();
    info!(
        written = r.stats.records_written.load(Relaxed),
        "recorder stopped"
    );
}

impl Recorder {
    fn handle(&mut self, msg: RecorderMsg) {
        // A caller that stopped waiting lost interest in the answer.
        match msg {
            RecorderMsg::Records(mut records) => self.batch.append(&mut records),
            RecorderMsg::CreateSession { session, reply } => {
                // Earlier records first, so the store stays in arrival order.
                self.flush();
                let root = session.root_pid;
                let r = self.store.create_session(&session);
                if let Ok(id) = r {
                    self.roots.insert(id, root);
                }
                let _ = reply.send(r);
            }
            RecorderMsg::CreateRequest { mut req, reply } => {
                // The held action's own record goes first.
                self.flush();
                let _ = reply.send(self.store.create_request(&mut req));
            }
            RecorderMsg::UpdateRequest { req, reply } => {
                self.flush();
                let r = self.store.update_request(&req);
                if let Err(e) = &r {
                    error!(error = %e, id = req.id, "storing a decision");
                }
                let _ = reply.send(r);
            }
            RecorderMsg::PolicyLoad(load) => {
                if let Err(e) = self.store.insert_policy_load(&load) {
                    error!(error = %e, "storing a policy load");
                }
            }
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        match self.store.insert(&self.batch) {
            Ok(()) => self.stats.records_written.fetch_add(n, Relaxed),
            Err(e) => {
                error!(error = %e, records = n, "store write failed; records lost");
                self.stats.store_errors.fetch_add(n, Relaxed)
            }
        };
        for r in &self.batch {
            if r.kind == EventKind::Exit
                && matches!(r.detail, Detail::Exit(_))
                && self.roots.get(&r.session_id) == Some(&r.process.tgid)
            {
                self.roots.remove(&r.session_id);
                if let Err(e) = self.store.end_session(r.session_id, r.ts_ns) {
                    error!(error = %e, session = r.session_id, "ending session");
                }
            }
        }
        self.batch.clear();
    }
}
