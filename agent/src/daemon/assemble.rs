//! Builds the daemon's actors (recorder thread, broker task) and the state
//! the API serves from, and returns their typed handles. `daemon::run`
//! adds the kernel side (the sensor task) and the servers; the API's unit
//! tests use the same assembly with no kernel programs.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    thread::JoinHandle,
    time::Instant,
};

use tokio::sync::{broadcast, oneshot, watch};
use tracing::warn;

use super::inforce::InForce;
use super::{
    api::ApiState,
    broker::{Broker, BrokerParts},
    handles::{BrokerHandle, RecorderHandle, SensorHandle},
    recorder,
    router::Router,
    stats::Stats,
};
use crate::{config::Approver, model::ApprovalRequest, store::Store};

/// What the actors start from.
pub struct Parts {
    /// The store's write connection (the recorder's from now on).
    pub store: Store,
    pub batch_max: usize,
    pub in_force: InForce,
    pub approvers: Vec<Approver>,
    /// Requests still pending from an earlier daemon, and those of them
    /// whose hold ended while none ran.
    pub pending: Vec<ApprovalRequest>,
    pub ended: HashSet<u64>,
    /// Root process of each session still open.
    pub roots: HashMap<u64, u32>,
    /// The kernel side (the sensor task, started by the caller).
    pub sensor: SensorHandle,
    /// The kernel's argv and environment key (see `Bpf::content_seed`).
    pub content_seed: u64,
}

/// The running actors and their handles.
pub struct Assembly {
    pub recorder: RecorderHandle,
    pub broker: BrokerHandle,
    pub sensor: SensorHandle,
    /// The policy in force; the reloader replaces it.
    pub policy: watch::Sender<Arc<InForce>>,
    pub api: Arc<ApiState>,
    pub stats: Arc<Stats>,
    /// New and resolved requests, as the broker announces them.
    pub updates: broadcast::Sender<ApprovalRequest>,
    recorder_thread: JoinHandle<()>,
    /// Closed when the recorder thread ends, however it ends.
    recorder_done: oneshot::Receiver<()>,
    /// None once it was seen to end.
    broker_task: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the recorder and the broker (inside a tokio runtime).
pub fn assemble(p: Parts) -> std::io::Result<Assembly> {
    let db: PathBuf = p.store.path().to_path_buf();
    let stats = Arc::new(Stats::default());
    let (recorder, recorder_rx) = RecorderHandle::channel();
    let (done_tx, recorder_done) = oneshot::channel::<()>();
    let recorder_thread = {
        let stats = stats.clone();
        let (store, batch_max, roots) = (p.store, p.batch_max, p.roots);
        std::thread::Builder::new()
            .name("airlock-recorder".into())
            .spawn(move || {
                // Dropped when the thread ends, even by a panic.
                let _done = done_tx;
                recorder::run(store, recorder_rx, batch_max, stats, roots)
            })?
    };
    let (policy, policy_rx) = watch::channel(Arc::new(p.in_force));
    let (updates, _) = broadcast::channel(256);
    let (broker, broker_rx) = BrokerHandle::channel();
    let broker_task = tokio::spawn(
        Broker::new(BrokerParts {
            policy: policy_rx,
            approvers: p.approvers.clone(),
            recorder: recorder.clone(),
            sensor: p.sensor.clone(),
            updates: updates.clone(),
            db: db.clone(),
            pending: p.pending,
            ended: p.ended,
            content_seed: p.content_seed,
        })
        .run(broker_rx),
    );
    let api = Arc::new(ApiState::new(
        broker.clone(),
        &p.approvers,
        db,
        updates.clone(),
    ));
    Ok(Assembly {
        recorder,
        broker,
        sensor: p.sensor,
        policy,
        api,
        stats,
        updates,
        recorder_thread,
        recorder_done,
        broker_task: Some(broker_task),
    })
}

impl Assembly {
    /// Where the sensor task sends what the kernel reports.
    pub fn router(&self) -> Router {
        Router {
            recorder: self.recorder.clone(),
            broker: self.broker.clone(),
        }
    }

    /// Resolves when the broker or the recorder ends on its own (it should
    /// not while the daemon serves); names which.
    pub async fn ended(&mut self) -> &'static str {
        let recorder = &mut self.recorder_done;
        match self.broker_task.as_mut() {
            Some(broker) => tokio::select! {
                _ = broker => {
                    self.broker_task = None;
                    "broker"
                }
                _ = recorder => "recorder",
            },
            None => {
                let _ = recorder.await;
                "recorder"
            }
        }
    }

    /// Lets the broker finish once every other sender is gone (the sensor
    /// and the API have stopped), by `deadline`. Returns the recorder
    /// thread, which ends once the last recorder handle is dropped (with
    /// the runtime that holds the rest) after writing its last batch.
    pub async fn stop(self, deadline: Instant) -> JoinHandle<()> {
        let Self {
            recorder,
            broker,
            sensor,
            policy,
            api,
            stats,
            updates,
            recorder_thread,
            recorder_done,
            broker_task,
        } = self;
        drop((recorder, broker, sensor, policy, api, stats, updates));
        drop(recorder_done);
        // The broker ends once its queue's last sender is gone.
        if let Some(task) = broker_task
            && tokio::time::timeout_at(deadline.into(), task)
                .await
                .is_err()
        {
            warn!("the broker did not finish in time");
        }
        recorder_thread
    }
}
