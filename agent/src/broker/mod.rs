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
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, info_span, warn};

pub use process::Ancestor;

use crate::{
    config::{Approver, OnTimeout},
    event::{Detail, EventKindName, HoldInfo, Record, wall_now_ns},
    policy::{Action, Decision, Policy, Subject},
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
    /// The rule's message for approvers, placeholders filled in.
    #[serde(default)]
    pub message: Option<String>,
    /// A monitor rule that matched first: "would deny by pack/rule".
    #[serde(default)]
    pub monitor: Option<String>,
    /// Who may decide: these approvers or members of these groups; both
    /// empty means any configured approver.
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Distinct approvals needed (one denial is final).
    #[serde(default = "one")]
    pub approvals_needed: u32,
    /// Approvals given so far.
    #[serde(default)]
    pub approvals: Vec<Approval>,
}

fn one() -> u32 {
    1
}

/// One approver's approval of a request that needs several.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Approval {
    pub by: String,
    pub at: i64,
    pub reason: Option<String>,
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
    #[error("{who} may not decide request {id}: its rule names other approvers")]
    NotAnApprover { id: u64, who: String },
    #[error("{who} has already approved request {id}; it needs {needed} distinct approvals")]
    AlreadyApproved { id: u64, who: String, needed: u32 },
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
    policy: watch::Receiver<Arc<Policy>>,
    approvers: Vec<Approver>,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: watch::Receiver<Arc<Policy>>,
        approvers: Vec<Approver>,
        recorder: mpsc::Sender<RecorderMsg>,
        sensor: mpsc::Sender<SensorCommand>,
        updates: broadcast::Sender<ApprovalRequest>,
        db: std::path::PathBuf,
        pending: Vec<ApprovalRequest>,
        ended: std::collections::HashSet<u64>,
    ) -> Self {
        Self {
            policy,
            approvers,
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
        if self
            .pending
            .values()
            .any(|r| r.tgid == record.tgid && r.digest == hold.digest && r.kind == kind)
        {
            // A re-issued syscall of an action already waiting: one request.
            return;
        }
        let labels = self.labels(record.session_id).await;
        let target = Target {
            kind,
            pid: record.pid,
            tgid: record.tgid,
            start_time: process::start_time(record.tgid).unwrap_or(0),
            digest: hold.digest,
            in_syscall: hold.in_syscall,
        };
        let Some(action) = action_of(&record) else {
            warn!(kind, "a held action without its details: refusing it");
            let _ = self.apply(&target, false).await;
            return;
        };
        let policy = self.policy.borrow().clone();
        let subject = Subject {
            labels: &labels,
            uid: record.uid,
            gid: record.gid,
        };
        let out = policy.evaluate(&action, &subject);
        let monitor = out
            .monitor
            .map(|r| format!("would {} by {}", r.decision.name(), r.id));
        let rule = match (out.decision, out.rule) {
            (Decision::Hold, Some(rule)) => rule.clone(),
            (decision, rule) => {
                // Decided without a human: carry it out and record it.
                let allow = decision != Decision::Deny;
                let outcome = match self.apply(&target, allow).await {
                    Ok(o) | Err(o) => o,
                };
                let rule = rule.map(|r| r.id.clone());
                if decision != Decision::Record || monitor.is_some() {
                    info!(kind, decision = decision.name(), rule = rule.as_deref().unwrap_or("-"), monitor = monitor.as_deref().unwrap_or("-"), action = %action.summary(), "decided by policy");
                }
                self.record_decision(&record, &action, decision, rule, monitor, outcome)
                    .await;
                return;
            }
        };
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
            rule: rule.id.clone(),
            requested_at: now,
            deadline: now
                .saturating_add((rule.hold.timeout_s as i64).saturating_mul(1_000_000_000)),
            on_timeout: rule.hold.on_timeout,
            decided_at: None,
            decided_by: None,
            reason: None,
            outcome: None,
            digest: hold.digest,
            start_time: target.start_time,
            in_syscall: hold.in_syscall,
            message: None,
            monitor: monitor.clone(),
            approvers: rule.hold.approvers.clone(),
            groups: rule.hold.groups.clone(),
            approvals_needed: rule.hold.approvals,
            approvals: Vec::new(),
        };
        req.message = rule
            .hold
            .message
            .as_deref()
            .map(|m| render(m, &rule, &action, &req));
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
                let _ = self.apply(&target, false).await;
                return;
            }
        }
        self.record_decision(
            &record,
            &action,
            Decision::Hold,
            Some(rule.id.clone()),
            monitor,
            format!("request {} waits for a decision", req.id),
        )
        .await;
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

    /// Puts the policy's decision on a candidate into the session's record.
    async fn record_decision(
        &self,
        held: &Record,
        action: &Action,
        decision: Decision,
        rule: Option<String>,
        monitor: Option<String>,
        outcome: String,
    ) {
        let now = wall_now_ns();
        let record = Record {
            ts_ns: now,
            kind: EventKindName(airlock_common::EventKind::Decision),
            detail: Detail::Decision {
                action: action.kind().name(),
                target: action.summary(),
                decision: decision.name(),
                rule,
                monitor,
                outcome,
                decided_in_us: (now.saturating_sub(held.ts_ns).max(0) / 1000) as u64,
            },
            hold: None,
            ..held.clone()
        };
        let _ = self.recorder.send(RecorderMsg::Records(vec![record])).await;
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
        if !may_decide(req, &by, &self.approvers) {
            return Err(DecideError::NotAnApprover { id, who: by });
        }
        if !approve {
            return self
                .finish(id, State::Denied, &by, reason, String::new())
                .await
                .ok_or(DecideError::NotFound(id));
        }
        if req.approvals.iter().any(|a| a.by == by) {
            return Err(DecideError::AlreadyApproved {
                id,
                who: by,
                needed: req.approvals_needed,
            });
        }
        let needed = req.approvals_needed.max(1) as usize;
        if req.approvals.len() + 1 < needed {
            // Not enough yet: store the approval, the hold goes on.
            let Some(req) = self.pending.get_mut(&id) else {
                return Err(DecideError::NotFound(id));
            };
            req.approvals.push(Approval {
                by: by.clone(),
                at: wall_now_ns(),
                reason,
            });
            info!(
                id,
                by,
                have = req.approvals.len(),
                needed,
                "approval recorded"
            );
            let req = req.clone();
            self.store_and_announce(&req).await;
            return Ok(req);
        }
        let mut by_all: Vec<String> = req.approvals.iter().map(|a| a.by.clone()).collect();
        by_all.push(by.clone());
        if let Some(req) = self.pending.get_mut(&id) {
            req.approvals.push(Approval {
                by: by.clone(),
                at: wall_now_ns(),
                reason: reason.clone(),
            });
        }
        self.finish(
            id,
            State::Approved,
            &by_all.join(", "),
            reason,
            String::new(),
        )
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
            Some(allow) => match self.apply(&Target::of(&req), allow).await {
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
        self.store_and_announce(&req).await;
        Some(req)
    }

    /// Writes a request's new state (waiting until it is stored, so an API
    /// client reads its own decision back), then tells the event stream.
    async fn store_and_announce(&self, req: &ApprovalRequest) {
        let (tx, rx) = oneshot::channel();
        let msg = RecorderMsg::UpdateRequest {
            req: Box::new(req.clone()),
            reply: tx,
        };
        if self.recorder.send(msg).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.updates.send(req.clone());
    }

    /// Resumes or refuses the held task; returns what the process sees.
    async fn apply(&self, req: &Target, allow: bool) -> Result<String, String> {
        match (req.kind, allow) {
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
                let call = match req.kind {
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

/// What resuming or refusing a held task needs.
struct Target {
    kind: &'static str,
    pid: u32,
    tgid: u32,
    start_time: u64,
    digest: u64,
    in_syscall: bool,
}

impl Target {
    fn of(req: &ApprovalRequest) -> Self {
        Self {
            kind: match req.kind.as_str() {
                "exec" => "exec",
                "file" => "file",
                _ => "connect",
            },
            pid: req.pid,
            tgid: req.tgid,
            start_time: req.start_time,
            digest: req.digest,
            in_syscall: req.in_syscall,
        }
    }
}

/// The action a held record describes, with what the rules look at that
/// the kernel did not send (parent, working directory, set-user-ID bit).
fn action_of(record: &Record) -> Option<Action> {
    match &record.detail {
        Detail::Exec { path, argv, .. } => {
            let mut a = crate::policy::ExecAction::new(path.clone(), argv.clone());
            a.cwd = std::fs::read_link(format!("/proc/{}/cwd", record.tgid))
                .ok()
                .map(|p| p.display().to_string());
            a.parent_exe = std::fs::read_link(format!("/proc/{}/exe", record.ppid))
                .ok()
                .map(|p| p.display().to_string());
            let full = match &a.cwd {
                Some(cwd) if !path.starts_with('/') => format!("{cwd}/{path}"),
                _ => path.clone(),
            };
            a.setuid = std::fs::metadata(full)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o6000 != 0)
                .unwrap_or(false);
            Some(Action::Exec(a))
        }
        Detail::File { path, write, .. } => Some(Action::File {
            path: path.clone(),
            write: *write,
        }),
        Detail::Net {
            protocol,
            addr: Some(addr),
            port,
            ..
        } => Some(Action::Connect {
            addr: *addr,
            port: *port,
            protocol: match protocol {
                crate::event::Protocol::Tcp => Some(crate::policy::Protocol::Tcp),
                crate::event::Protocol::Udp => Some(crate::policy::Protocol::Udp),
                _ => None,
            },
        }),
        _ => None,
    }
}

/// Whether `who` may decide `req`: any approver when the rule names none,
/// else a named approver or a member of a named group.
fn may_decide(req: &ApprovalRequest, who: &str, approvers: &[Approver]) -> bool {
    if req.approvers.is_empty() && req.groups.is_empty() {
        return true;
    }
    req.approvers.iter().any(|a| a == who)
        || approvers
            .iter()
            .filter(|a| a.name == who)
            .any(|a| a.groups.iter().any(|g| req.groups.contains(g)))
}

/// Fills a rule's message: {command}, {exe}, {dest}, {path}, {rule},
/// {pack}, {user} and any session label; unknown names become `?`.
fn render(
    template: &str,
    rule: &crate::policy::Rule,
    action: &Action,
    req: &ApprovalRequest,
) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        let value = match (name, action) {
            ("command", Action::Exec(e)) => e.cmdline().to_string(),
            ("exe", Action::Exec(e)) => e.path.clone(),
            ("dest", Action::Connect { .. }) => action.summary(),
            ("path", Action::File { path, .. }) => path.clone(),
            ("rule", _) => rule.id.clone(),
            ("pack", _) => rule.pack.clone(),
            ("user", _) => req.uid.to_string(),
            (label, _) => req.labels.get(label).cloned().unwrap_or_else(|| "?".into()),
        };
        out.push_str(&value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Shared handle for the API.
pub type Updates = Arc<broadcast::Sender<ApprovalRequest>>;
