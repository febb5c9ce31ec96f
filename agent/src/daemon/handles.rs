//! Typed handles to the daemon's actors. Each actor (sensor, recorder,
//! broker) serves one message enum defined here; everyone else holds a
//! cloneable handle whose async methods send a message and, where an
//! answer is due, await it through [`ask`]. A call site reads like a method
//! call, and its handler is the match arm of the same name in the actor.

use std::sync::Arc;

use airlock_common::LossReason;
use tokio::sync::{mpsc, oneshot};

use super::inforce::InForce;
use crate::{
    bpf::BpfError,
    model::{ApprovalRequest, DecideError, EnvBinding, HoldInfo, PolicyLoad, Record},
    store::{NewSession, StoreError},
};

/// Why a call to an actor did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("the {0} has stopped")]
    Stopped(&'static str),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends a message built around a reply channel and awaits the reply.
async fn ask<M, T>(
    tx: &mpsc::Sender<M>,
    actor: &'static str,
    make: impl FnOnce(oneshot::Sender<T>) -> M,
) -> Result<T, HandleError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| HandleError::Stopped(actor))?;
    rx.await.map_err(|_| HandleError::Stopped(actor))
}

/// What the sensor task (the owner of the kernel programs) is asked.
pub enum SensorMsg {
    Watch {
        tgid: u32,
        session_id: u64,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    Verdict {
        tgid: u32,
        pid: u32,
        kind: u32,
        digest: u64,
        allow: bool,
        env: Option<EnvBinding>,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    ForgetVerdict {
        tgid: u32,
        pid: u32,
        kind: u32,
        digest: u64,
        reply: oneshot::Sender<bool>,
    },
    Candidates {
        in_force: Arc<InForce>,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    LossTotals {
        reply: oneshot::Sender<Vec<(LossReason, u64)>>,
    },
}

/// The kernel programs' maps, through the sensor task.
#[derive(Clone)]
pub struct SensorHandle(mpsc::Sender<SensorMsg>);

impl SensorHandle {
    pub fn channel() -> (Self, mpsc::Receiver<SensorMsg>) {
        let (tx, rx) = mpsc::channel(64);
        (Self(tx), rx)
    }

    /// Puts `tgid` (and so its future children) into `session_id`.
    pub async fn watch(&self, tgid: u32, session_id: u64) -> Result<(), HandleError> {
        Ok(ask(&self.0, "sensor", |reply| SensorMsg::Watch {
            tgid,
            session_id,
            reply,
        })
        .await??)
    }

    /// Stores a one-shot verdict for a thread held inside a syscall (the
    /// caller then resumes the task, whose retried syscall consumes it).
    pub async fn verdict(
        &self,
        (tgid, pid): (u32, u32),
        (kind, digest): (u32, u64),
        allow: bool,
        env: Option<EnvBinding>,
    ) -> Result<(), HandleError> {
        Ok(ask(&self.0, "sensor", |reply| SensorMsg::Verdict {
            tgid,
            pid,
            kind,
            digest,
            allow,
            env,
            reply,
        })
        .await??)
    }

    /// Drops the verdict written for a thread if it is still there (the
    /// thread went on without taking it); true if it was.
    pub async fn forget_verdict(
        &self,
        (tgid, pid): (u32, u32),
        (kind, digest): (u32, u64),
    ) -> Result<bool, HandleError> {
        ask(&self.0, "sensor", |reply| SensorMsg::ForgetVerdict {
            tgid,
            pid,
            kind,
            digest,
            reply,
        })
        .await
    }

    /// Replaces the kernel's candidate maps with a new policy's.
    pub async fn candidates(&self, in_force: Arc<InForce>) -> Result<(), HandleError> {
        Ok(ask(&self.0, "sensor", |reply| SensorMsg::Candidates {
            in_force,
            reply,
        })
        .await??)
    }

    /// The kernel-side loss counters by reason.
    pub async fn loss_totals(&self) -> Result<Vec<(LossReason, u64)>, HandleError> {
        ask(&self.0, "sensor", |reply| SensorMsg::LossTotals { reply }).await
    }
}

/// What the recorder thread (the store's one writer) is asked.
pub enum RecorderMsg {
    Records(Vec<Record>),
    CreateSession {
        session: NewSession,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    CreateRequest {
        req: Box<ApprovalRequest>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    UpdateRequest {
        req: Box<ApprovalRequest>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    PolicyLoad(Box<PolicyLoad>),
}

/// The store's writer, through the recorder thread.
#[derive(Clone)]
pub struct RecorderHandle(mpsc::Sender<RecorderMsg>);

/// Room for one message to the recorder, reserved ahead: sending on it
/// cannot block.
pub struct RecorderPermit(mpsc::OwnedPermit<RecorderMsg>);

impl RecorderPermit {
    pub fn records(self, batch: Vec<Record>) {
        self.0.send(RecorderMsg::Records(batch));
    }
}

impl RecorderHandle {
    pub fn channel() -> (Self, mpsc::Receiver<RecorderMsg>) {
        let (tx, rx) = mpsc::channel(256);
        (Self(tx), rx)
    }

    /// Waits for room in the recorder's queue (for a caller that must not
    /// block while holding what it sends).
    pub async fn reserve(&self) -> Result<RecorderPermit, HandleError> {
        self.0
            .clone()
            .reserve_owned()
            .await
            .map(RecorderPermit)
            .map_err(|_| HandleError::Stopped("recorder"))
    }

    /// Queues records for the next batch.
    pub async fn records(&self, batch: Vec<Record>) -> Result<(), HandleError> {
        self.0
            .send(RecorderMsg::Records(batch))
            .await
            .map_err(|_| HandleError::Stopped("recorder"))
    }

    /// Registers a session (earlier records are written first).
    pub async fn create_session(&self, session: NewSession) -> Result<u64, HandleError> {
        Ok(
            ask(&self.0, "recorder", |reply| RecorderMsg::CreateSession {
                session,
                reply,
            })
            .await??,
        )
    }

    /// Stores a new request (after the held action's own record); its id.
    pub async fn create_request(&self, req: ApprovalRequest) -> Result<u64, HandleError> {
        Ok(
            ask(&self.0, "recorder", |reply| RecorderMsg::CreateRequest {
                req: Box::new(req),
                reply,
            })
            .await??,
        )
    }

    /// Stores a request's new state; returns once it is written, so an
    /// API client reads its own decision back.
    pub async fn update_request(&self, req: ApprovalRequest) -> Result<(), HandleError> {
        Ok(
            ask(&self.0, "recorder", |reply| RecorderMsg::UpdateRequest {
                req: Box::new(req),
                reply,
            })
            .await??,
        )
    }

    /// Stores a policy load or reload.
    pub async fn policy_load(&self, load: PolicyLoad) -> Result<(), HandleError> {
        self.0
            .send(RecorderMsg::PolicyLoad(Box::new(load)))
            .await
            .map_err(|_| HandleError::Stopped("recorder"))
    }
}

/// What the approval broker is told or asked.
pub enum BrokerMsg {
    /// The kernel stopped an action.
    Held { record: Record, hold: HoldInfo },
    /// A watched process exited.
    Exited { tgid: u32 },
    /// A human's decision.
    Decide {
        id: u64,
        approve: bool,
        by: String,
        reason: Option<String>,
        reply: oneshot::Sender<Result<ApprovalRequest, DecideError>>,
    },
}

/// The approval broker.
#[derive(Clone)]
pub struct BrokerHandle(mpsc::Sender<BrokerMsg>);

/// Room for one message to the broker, reserved ahead.
pub struct BrokerPermit(mpsc::OwnedPermit<BrokerMsg>);

impl BrokerPermit {
    /// A held action to decide.
    pub fn held(self, record: Record, hold: HoldInfo) {
        self.0.send(BrokerMsg::Held { record, hold });
    }

    /// A watched process exited.
    pub fn exited(self, tgid: u32) {
        self.0.send(BrokerMsg::Exited { tgid });
    }
}

impl BrokerHandle {
    pub fn channel() -> (Self, mpsc::Receiver<BrokerMsg>) {
        let (tx, rx) = mpsc::channel(1024);
        (Self(tx), rx)
    }

    /// Waits for room in the broker's queue.
    pub async fn reserve(&self) -> Result<BrokerPermit, HandleError> {
        self.0
            .clone()
            .reserve_owned()
            .await
            .map(BrokerPermit)
            .map_err(|_| HandleError::Stopped("broker"))
    }

    /// A held action to decide (by policy, or by a human).
    pub async fn held(&self, record: Record, hold: HoldInfo) -> Result<(), HandleError> {
        self.tell(BrokerMsg::Held { record, hold }).await
    }

    /// A watched process exited: its pending requests are abandoned.
    pub async fn exited(&self, tgid: u32) -> Result<(), HandleError> {
        self.tell(BrokerMsg::Exited { tgid }).await
    }

    /// An approver's decision on request `id`.
    pub async fn decide(
        &self,
        id: u64,
        approve: bool,
        by: String,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, DecideError> {
        ask(&self.0, "broker", |reply| BrokerMsg::Decide {
            id,
            approve,
            by,
            reason,
            reply,
        })
        .await
        .unwrap_or(Err(DecideError::Stopped))
    }

    async fn tell(&self, msg: BrokerMsg) -> Result<(), HandleError> {
        self.0
            .send(msg)
            .await
            .map_err(|_| HandleError::Stopped("broker"))
    }
}
