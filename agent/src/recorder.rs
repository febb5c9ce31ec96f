//! The recorder: one thread that owns the store's write connection and
//! writes records in batched transactions.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use airlock_common::EventKind;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::{
    broker::ApprovalRequest,
    event::{Detail, Record},
    stats::Stats,
    store::{NewSession, Store},
};

pub enum RecorderMsg {
    Records(Vec<Record>),
    /// Store a new approval request; replies with its id.
    CreateRequest {
        req: Box<ApprovalRequest>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Store a request's new state.
    /// Store a request's new state; the reply comes once it is written, so
    /// an API client reads its own decision back.
    UpdateRequest {
        req: Box<ApprovalRequest>,
        reply: oneshot::Sender<()>,
    },
    CreateSession {
        session: NewSession,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Store a policy load or reload.
    PolicyLoad(Box<crate::store::PolicyLoad>),
}

/// Runs until every sender is dropped, then returns after the last write.
pub fn run(
    mut store: Store,
    mut rx: mpsc::Receiver<RecorderMsg>,
    batch_max: usize,
    stats: Arc<Stats>,
    // Root process of each open session: its exit ends the session.
    mut roots: std::collections::HashMap<u64, u32>,
) {
    let mut batch: Vec<Record> = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        handle(msg, &mut store, &mut batch, &mut roots, &stats);
        // Take whatever else is queued, up to a batch, before writing.
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(msg) => handle(msg, &mut store, &mut batch, &mut roots, &stats),
                Err(_) => break,
            }
        }
        flush(&mut store, &mut batch, &mut roots, &stats);
    }
    flush(&mut store, &mut batch, &mut roots, &stats);
    info!(
        written = stats.records_written.load(Relaxed),
        "recorder stopped"
    );
}

fn handle(
    msg: RecorderMsg,
    store: &mut Store,
    batch: &mut Vec<Record>,
    roots: &mut std::collections::HashMap<u64, u32>,
    stats: &Stats,
) {
    match msg {
        RecorderMsg::Records(mut records) => batch.append(&mut records),
        RecorderMsg::CreateSession { session, reply } => {
            // Earlier records first, so the store stays in arrival order.
            flush(store, batch, roots, stats);
            let root = session.root_pid;
            let r = store.create_session(&session).map_err(|e| e.to_string());
            if let Ok(id) = r {
                roots.insert(id, root);
            }
            let _ = reply.send(r);
        }
        RecorderMsg::CreateRequest { mut req, reply } => {
            // The held action's own record goes first.
            flush(store, batch, roots, stats);
            let _ = reply.send(store.create_request(&mut req).map_err(|e| e.to_string()));
        }
        RecorderMsg::PolicyLoad(load) => {
            if let Err(e) = store.insert_policy_load(&load) {
                error!(error = %e, "storing a policy load");
            }
        }
        RecorderMsg::UpdateRequest { req, reply } => {
            flush(store, batch, roots, stats);
            if let Err(e) = store.update_request(&req) {
                error!(error = %e, id = req.id, "storing a decision");
            }
            let _ = reply.send(());
        }
    }
}

fn flush(
    store: &mut Store,
    batch: &mut Vec<Record>,
    roots: &mut std::collections::HashMap<u64, u32>,
    stats: &Stats,
) {
    if batch.is_empty() {
        return;
    }
    match store.insert(batch) {
        Ok(()) => {
            stats.records_written.fetch_add(batch.len() as u64, Relaxed);
        }
        Err(e) => {
            stats.store_errors.fetch_add(batch.len() as u64, Relaxed);
            error!(error = %e, records = batch.len(), "store write failed; records lost");
        }
    }
    for r in batch.iter() {
        if r.kind.0 == EventKind::Exit
            && matches!(r.detail, Detail::Exit(_))
            && roots.get(&r.session_id) == Some(&r.tgid)
        {
            roots.remove(&r.session_id);
            if let Err(e) = store.end_session(r.session_id, r.ts_ns) {
                error!(error = %e, session = r.session_id, "ending session");
            }
        }
    }
    batch.clear();
}
