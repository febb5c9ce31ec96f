//! The approval broker: every held action becomes a request; a human (over
//! the API), a timeout, or the process's own exit resolves it, and the
//! broker resumes or refuses the held task.

pub mod process;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, info_span, warn};

pub use process::Ancestor;

use crate::{
    config::{OnTimeout, Rule},
    event::{HoldInfo, Record, wall_now_ns},
    recorder::RecorderMsg,
    sensors::Command as SensorCommand,
};

/// Where a request stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    TimedOut,
    /// The process exited or was killed while held.
    Abandoned,
    /// The decision could not be carried out (the process changed under us).
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::TimedOut => "timed_out",
            Self::Abandoned => "abandoned",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Approved,
            Self::Denied,
            Self::TimedOut,
            Self::Abandoned,
            Self::Failed,
        ]
        .into_iter()
        .find(|st| st.name() == s)
    }
}

/// A held action waiting for, or resolved by, a decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApprovalRequest {
    pub id: u64,
    pub state: State,
    pub session_id: u64,
    /// The session's labels: agent, model, user, ...
    pub labels: BTreeMap<String, String>,
    /// "exec", "connect" or "file".
    pub kind: String,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    /// The held process and its parents, nearest first.
    pub ancestry: Vec<Ancestor>,
    /// Exactly what was held: path and argv, or address, port and protocol.
    pub action: serde_json::Value,
    /// The rule that held it.
    pub rule: String,
    pub requested_at: i64,
    pub deadline: i64,
    pub on_timeout: OnTimeout,
    pub decided_at: Option<i64>,
    /// An approver's name, "timeout", or "process-exit".
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    /// What the process saw.
    pub outcome: Option<String>,
    /// Verdict key digest (connect).
    pub digest: u64,
    /// Start time of the held process (clock ticks since boot), against pid reuse.
    pub start_time: u64,
    /// Held inside the syscall (BPF LSM, or the cgroup connect hook): the
    /// decision is a one-shot verdict the re-issued syscall consumes.
    #[serde(default)]
    pub in_syscall: bool,
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no request {0}")]
    NotFound(u64),
    #[error("request {id} is already {state}")]
    AlreadyDecided { id: u64, state: &'static str },
    #[error(
        "{who} cannot decide request {id}: the session runs on their behalf (no self-approval)"
    )]
    SelfApproval { id: u64, who: String },
    #[error("the broker has stopped")]
    Stopped,
}

pub enum BrokerMsg {
    /// A rule stopped an action (from the sensor).
    Held { record: Record, hold: HoldInfo },
    /// A watched process exited (from the sensor).
    Exited { tgid: u32 },
    /// A human's decision (from the API).
    Decide {
        id: u64,
        approve: bool,
        by: String,
        reason: Option<String>,
        reply: oneshot::Sender<Result<ApprovalRequest, DecideError>>,
    },
}

pub struct Broker {
    rules: Vec<Rule>,
    pending: HashMap<u64, ApprovalRequest>,
    recorder: mpsc::Sender<RecorderMsg>,
    sensor: mpsc::Sender<SensorCommand>,
    updates: broadcast::Sender<ApprovalRequest>,
    db: std::path::PathBuf,
    /// Pending requests (from before a restart) whose hold ended while no
    /// daemon ran: the fail mode answered, or someone resumed the task.
    ended: std::collections::HashSet<u64>,
    /// Session labels already read from the store.
    labels: HashMap<u64, BTreeMap<String, String>>,
}

impl Broker {
    pub fn new(
        rules: Vec<Rule>,
        recorder: mpsc::Sender<RecorderMsg>,
        sensor: mpsc::Sender<SensorCommand>,
        updates: broadcast::Sender<ApprovalRequest>,
        db: std::path::PathBuf,
        pending: Vec<ApprovalRequest>,
        ended: std::collections::HashSet<u64>,
    ) -> Self {
        Self {
            rules,
            pending: pending.into_iter().map(|r| (r.id, r)).collect(),
            ended,
            labels: HashMap::new(),
            recorder,
            sensor,
            updates,
            db,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<BrokerMsg>) {
        self.reconcile().await;
        loop {
            let next = self.pending.values().map(|r| r.deadline).min();
            let sleep = match next {
                Some(d) => Duration::from_nanos((d - wall_now_ns()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m).await,
                    None => return,
                },
                _ = tokio::time::sleep(sleep) => self.expire().await,
            }
        }
    }

    /// After a restart: pending requests whose process is still there and
    /// stopped stay decidable; the others were abandoned meanwhile.
    async fn reconcile(&mut self) {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let Some(r) = self.pending.get(&id) else {
                continue;
            };
            if self.ended.remove(&id) {
                self.finish(
                    id,
                    State::Failed,
                    "no-daemon",
                    None,
                    "the hold ended while no daemon ran: the fail mode answered (see the action's record), or the task was resumed by hand".into(),
                )
                .await;
                continue;
            }
            match process::stat(r.tgid) {
                Some((_, _, start)) if start == r.start_time => {
                    info!(id, "pending request still decidable after restart")
                }
                _ => {
                    self.finish(
                        id,
                        State::Abandoned,
                        "process-exit",
                        None,
                        "the process ended while the daemon was down".into(),
                    )
                    .await;
                }
            }
        }
    }

    async fn handle(&mut self, msg: BrokerMsg) {
        match msg {
            BrokerMsg::Held { record, hold } => self.held(record, hold).await,
            BrokerMsg::Exited { tgid } => {
                let ids: Vec<u64> = self
                    .pending
                    .values()
                    .filter(|r| r.tgid == tgid)
                    .map(|r| r.id)
                    .collect();
                for id in ids {
                    self.finish(
                        id,
                        State::Abandoned,
                        "process-exit",
                        None,
                        "the process exited while held".into(),
                    )
                    .await;
                }
            }
            BrokerMsg::Decide {
                id,
                approve,
                by,
                reason,
                reply,
            } => {
                let r = self.decide(id, approve, by, reason).await;
                let _ = reply.send(r);
            }
        }
    }

    async fn held(&mut self, record: Record, hold: HoldInfo) {
        let kind = match record.kind.0 {
            airlock_common::EventKind::Exec => "exec",
            airlock_common::EventKind::FileOpen => "file",
            _ => "connect",
        };
        // TEMPORARY until the policy engine decides file holds: a candidate
        // open names no rule (rule_id 0) and waits with the default timeout.
        let file_rule = (kind == "file" && hold.rule_id == 0).then(|| Rule {
            name: "file candidate".into(),
            action: crate::config::RuleAction::Hold,
            exec: Vec::new(),
            connect: Vec::new(),
            port: None,
            timeout_s: 300,
            on_timeout: OnTimeout::Deny,
        });
        let Some(rule) = file_rule.or_else(|| {
            self.rules
                .get(hold.rule_id.wrapping_sub(1) as usize)
                .cloned()
        }) else {
            warn!(
                rule_id = hold.rule_id,
                "hold for an unknown rule: refusing it"
            );
            return;
        };
        if self
            .pending
            .values()
            .any(|r| r.tgid == record.tgid && r.digest == hold.digest && r.kind == kind)
        {
            // A re-issued syscall of an action already waiting: one request.
            return;
        }
        let labels = self.labels(record.session_id).await;
        let now = wall_now_ns();
        let mut req = ApprovalRequest {
            id: 0,
            state: State::Pending,
            session_id: record.session_id,
            labels,
            kind: kind.into(),
            pid: record.pid,
            tgid: record.tgid,
            uid: record.uid,
            ancestry: process::ancestry(record.tgid),
            action: serde_json::to_value(&record.detail).unwrap_or_default(),
            rule: rule.name.clone(),
            requested_at: now,
            deadline: now.saturating_add((rule.timeout_s as i64).saturating_mul(1_000_000_000)),
            on_timeout: rule.on_timeout,
            decided_at: None,
            decided_by: None,
            reason: None,
            outcome: None,
            digest: hold.digest,
            start_time: process::start_time(record.tgid).unwrap_or(0),
            in_syscall: hold.in_syscall,
        };
        let (tx, rx) = oneshot::channel();
        if self
            .recorder
            .send(RecorderMsg::CreateRequest {
                req: Box::new(req.clone()),
                reply: tx,
            })
            .await
            .is_err()
        {
            return;
        }
        match rx.await {
            Ok(Ok(id)) => req.id = id,
            _ => {
                warn!("could not store the request; refusing the held action");
                let _ = self.apply(&req, false).await;
                return;
            }
        }
        let span = info_span!(
            "request",
            id = req.id,
            session = req.session_id,
            tgid = req.tgid
        );
        span.in_scope(
            || info!(kind, rule = %req.rule, action = %req.action, "held: waiting for a decision"),
        );
        let _ = self.updates.send(req.clone());
        self.pending.insert(req.id, req);
    }

    /// A session's labels, read from the store once per session.
    async fn labels(&mut self, session: u64) -> BTreeMap<String, String> {
        if let Some(l) = self.labels.get(&session) {
            return l.clone();
        }
        let db = self.db.clone();
        let labels = tokio::task::spawn_blocking(move || {
            crate::store::Store::open_read_only(&db)
                .and_then(|s| s.session_labels(session))
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        // Bounded: labels of sessions long gone are read again if needed.
        if self.labels.len() >= 1024 {
            self.labels.clear();
        }
        self.labels.insert(session, labels.clone());
        labels
    }

    async fn decide(
        &mut self,
        id: u64,
        approve: bool,
        by: String,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, DecideError> {
        let Some(req) = self.pending.get(&id) else {
            let db = self.db.clone();
            let stored = tokio::task::spawn_blocking(move || {
                crate::store::Store::open_read_only(&db)
                    .ok()?
                    .request(id)
                    .ok()?
            })
            .await
            .ok()
            .flatten();
            return Err(match stored {
                Some(r) => DecideError::AlreadyDecided {
                    id,
                    state: r.state.name(),
                },
                None => DecideError::NotFound(id),
            });
        };
        if req.labels.get("user") == Some(&by) {
            return Err(DecideError::SelfApproval { id, who: by });
        }
        let state = if approve {
            State::Approved
        } else {
            State::Denied
        };
        self.finish(id, state, &by, reason, String::new())
            .await
            .ok_or(DecideError::NotFound(id))
    }

    /// Resolves the requests whose deadline has passed with their default.
    async fn expire(&mut self) {
        let now = wall_now_ns();
        let due: Vec<u64> = self
            .pending
            .values()
            .filter(|r| r.deadline <= now)
            .map(|r| r.id)
            .collect();
        for id in due {
            let approve = self
                .pending
                .get(&id)
                .is_some_and(|r| r.on_timeout == OnTimeout::Allow);
            let reason = format!(
                "no decision in time: on_timeout = {}",
                if approve { "allow" } else { "deny" }
            );
            self.finish(id, State::TimedOut, "timeout", Some(reason), String::new())
                .await;
        }
    }

    /// Carries out a decision and records it. `outcome` is preset for
    /// abandoned requests; otherwise it says what the process saw.
    async fn finish(
        &mut self,
        id: u64,
        state: State,
        by: &str,
        reason: Option<String>,
        outcome: String,
    ) -> Option<ApprovalRequest> {
        let mut req = self.pending.remove(&id)?;
        let allow = match state {
            State::Approved => Some(true),
            State::Denied => Some(false),
            State::TimedOut => Some(req.on_timeout == OnTimeout::Allow),
            _ => None,
        };
        req.outcome = Some(match allow {
            Some(allow) => match self.apply(&req, allow).await {
                Ok(o) => o,
                Err(e) => {
                    req.state = State::Failed;
                    e
                }
            },
            None => outcome,
        });
        if req.state != State::Failed {
            req.state = state;
        }
        req.decided_at = Some(wall_now_ns());
        req.decided_by = Some(by.to_string());
        req.reason = reason;
        info!(
            id,
            state = req.state.name(),
            by,
            outcome = req.outcome.as_deref().unwrap_or(""),
            "request resolved"
        );
        let (tx, rx) = oneshot::channel();
        let msg = RecorderMsg::UpdateRequest {
            req: Box::new(req.clone()),
            reply: tx,
        };
        if self.recorder.send(msg).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.updates.send(req.clone());
        Some(req)
    }

    /// Resumes or refuses the held task; returns what the process sees.
    async fn apply(&self, req: &ApprovalRequest, allow: bool) -> Result<String, String> {
        match (req.kind.as_str(), allow) {
            // Held at sched_process_exec: the new image has not run yet.
            ("exec", true) if !req.in_syscall => {
                process::signal_if_same(req.tgid, req.start_time, libc::SIGCONT)
                    .map(|()| "resumed: the program runs".into())
            }
            ("exec", false) if !req.in_syscall => {
                process::signal_if_same(req.tgid, req.start_time, libc::SIGKILL)
                    .map(|()| "killed (SIGKILL) before its first instruction".into())
            }
            (_, allow) => {
                let (tx, rx) = oneshot::channel();
                let cmd = SensorCommand::Verdict {
                    pid: req.pid,
                    digest: req.digest,
                    allow,
                    reply: tx,
                };
                self.sensor
                    .send(cmd)
                    .await
                    .map_err(|_| "the sensor has stopped".to_string())?;
                rx.await
                    .map_err(|_| "the sensor has stopped".to_string())??;
                process::signal_if_same(req.tgid, req.start_time, libc::SIGCONT)?;
                let call = match req.kind.as_str() {
                    "exec" => "execve",
                    "file" => "open",
                    _ => "connect",
                };
                Ok(if allow {
                    format!("resumed: {call} re-issued")
                } else {
                    format!("resumed: {call} fails with EPERM")
                })
            }
        }
    }
}

/// Shared handle for the API.
pub type Updates = Arc<broadcast::Sender<ApprovalRequest>>;
