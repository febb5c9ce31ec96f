//! The approval broker: every held action is decided by the policy; a hold
//! becomes a request that a human (over the API), a timeout, or the
//! process's own exit resolves, and the broker resumes or refuses the held
//! task.

mod action;
mod apply;
mod decide;
mod request;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, info_span, warn};

use self::apply::Target;
use super::{
    handles::{BrokerMsg, RecorderHandle, SensorHandle},
    inforce::InForce,
};
use crate::{
    config::Approver,
    model::{
        ActionKind, ApprovalRequest, Decision, Detail, EnvBinding, HoldInfo, OnTimeout, Record,
        State, wall_now_ns,
    },
    policy::{self, Action, Subject},
    procfs,
    store::Store,
};

/// What the broker starts from.
pub struct BrokerParts {
    pub policy: watch::Receiver<Arc<InForce>>,
    pub approvers: Vec<Approver>,
    pub recorder: RecorderHandle,
    pub sensor: SensorHandle,
    /// New and resolved requests, for the API's event stream.
    pub updates: broadcast::Sender<ApprovalRequest>,
    /// The store, read for session labels and decided requests.
    pub db: PathBuf,
    /// Requests still pending from an earlier daemon.
    pub pending: Vec<ApprovalRequest>,
    /// Of those, the ones whose hold ended while no daemon ran.
    pub ended: HashSet<u64>,
    /// The kernel's argv and environment key (see `Bpf::content_seed`):
    /// an approved exec's environment is handed to the kernel keyed with it.
    pub content_seed: u64,
}

/// A held action on its way to a decision.
struct Held {
    record: Record,
    target: Target,
    action: Action,
    /// A monitor rule that matched first: "would deny by pack/rule".
    monitor: Option<String>,
}

/// How long reading a held process's context (/proc, the executable's
/// mode) may take before the action is refused.
const READ_LIMIT: Duration = Duration::from_secs(2);

/// What the kernel did not send (the process's start time, and what the
/// policy looks at: its parent, working directory, the paths of the file
/// that runs), read off the runtime and within [`READ_LIMIT`]: a path on a
/// stalled file system must not stall every other decision. No action:
/// refuse it. With the action, why the policy sees less of it, if it does.
async fn read_context(
    record: &Record,
    in_syscall: bool,
    in_force: Arc<InForce>,
) -> (Option<u64>, Option<(Action, Option<&'static str>)>) {
    let tgid = record.process.tgid;
    let read = {
        let r = record.clone();
        tokio::task::spawn_blocking(move || {
            let action = action::of(&r, in_syscall, &in_force.exes);
            (procfs::start_time(tgid), action)
        })
    };
    match tokio::time::timeout(READ_LIMIT, read).await {
        Ok(Ok(read)) => read,
        _ => {
            warn!(
                tgid,
                "the held process's context could not be read in time: refusing"
            );
            (procfs::start_time(tgid), None)
        }
    }
}

/// Why the policy saw less than the action, if it did: then only a hold or
/// a denial stands, nothing goes through unasked.
fn unseen(
    labels_read: bool,
    detail: &Detail,
    action: Option<&'static str>,
) -> Option<&'static str> {
    if !labels_read {
        Some("the session's labels could not be read: refused (fail closed)")
    } else if incomplete(detail) {
        Some(
            "the kernel's copy of its path or argv was cut or unreadable, so the policy did not see all of it: refused (fail closed)",
        )
    } else {
        action
    }
}

/// The kernel's copy of the action is not all of it. (An exec's path is
/// the caller's string: what runs is the file the kernel reports, so a cut
/// string matters only when that file is unknown.)
fn incomplete(detail: &Detail) -> bool {
    match detail {
        Detail::Exec {
            argv_truncated,
            path_truncated,
            argv_unreadable,
            file,
            ..
        } => *argv_truncated || (*path_truncated && file.unknown) || *argv_unreadable,
        Detail::File { path_truncated, .. } => *path_truncated,
        _ => false,
    }
}

/// The environment an approver sees, hashed as the kernel hashes a new
/// image's (FNV-1a from the offset basis XOR the content key), for the
/// kernel to find again in the new image.
fn env_binding(seed: u64, env: &policy::ExecEnv) -> EnvBinding {
    EnvBinding {
        hash: airlock_common::content_hash(seed, &env.raw),
        len: env.raw.len() as u32,
        prefix: env.cut,
    }
}

pub struct Broker {
    policy: watch::Receiver<Arc<InForce>>,
    approvers: Vec<Approver>,
    pending: HashMap<u64, ApprovalRequest>,
    recorder: RecorderHandle,
    sensor: SensorHandle,
    updates: broadcast::Sender<ApprovalRequest>,
    db: PathBuf,
    ended: HashSet<u64>,
    /// Session labels already read from the store.
    labels: HashMap<u64, BTreeMap<String, String>>,
    content_seed: u64,
}

impl Broker {
    pub fn new(p: BrokerParts) -> Self {
        Self {
            policy: p.policy,
            approvers: p.approvers,
            pending: p.pending.into_iter().map(|r| (r.id, r)).collect(),
            recorder: p.recorder,
            sensor: p.sensor,
            updates: p.updates,
            db: p.db,
            ended: p.ended,
            labels: HashMap::new(),
            content_seed: p.content_seed,
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
            let (state, by, outcome) = if self.ended.remove(&id) {
                (
                    State::Failed,
                    "no-daemon",
                    "the hold ended while no daemon ran: the fail mode answered (see the action's record), or the task was resumed by hand",
                )
            } else if procfs::is_same(r.tgid, r.start_time) {
                info!(id, "pending request still decidable after restart");
                if r.kind == ActionKind::Exec && r.in_syscall {
                    // The environment shown is bound again, read from the
                    // process that still waits inside execve.
                    let binding =
                        procfs::execve_environ(r.pid, airlock_common::ENV_MAX).map(|(raw, cut)| {
                            env_binding(self.content_seed, &policy::ExecEnv::parse(raw, cut))
                        });
                    if let Some(r) = self.pending.get_mut(&id) {
                        r.env_binding = binding;
                    }
                }
                continue;
            } else {
                (
                    State::Abandoned,
                    "process-exit",
                    "the process ended while the daemon was down",
                )
            };
            self.finish(id, state, by, None, outcome.into()).await;
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
                    let outcome = "the process exited while held".into();
                    self.finish(id, State::Abandoned, "process-exit", None, outcome)
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
        let Some(kind) = record.action_kind() else {
            warn!(
                kind = record.kind.name(),
                "a hold of an unknown kind: ignored"
            );
            return;
        };
        let tgid = record.process.tgid;
        if self
            .pending
            .values()
            .any(|r| r.tgid == tgid && r.digest == hold.digest && r.kind == kind)
        {
            // A re-issued syscall of an action already waiting: one request.
            return;
        }
        let in_force = self.policy.borrow().clone();
        let (start_time, action) = read_context(&record, hold.in_syscall, in_force.clone()).await;
        let target = Target {
            kind,
            pid: record.process.pid,
            tgid,
            start_time: start_time.unwrap_or(0),
            digest: hold.digest,
            in_syscall: hold.in_syscall,
            event_kind: record.kind as u32,
            env: match &action {
                Some((Action::Exec(e), _)) if hold.in_syscall => e
                    .env
                    .as_ref()
                    .map(|env| env_binding(self.content_seed, env)),
                _ => None,
            },
        };
        let Some((action, unseen_action)) = action else {
            warn!(
                kind = kind.name(),
                "a held action without its details: refusing it"
            );
            let _ = self.apply(&target, false).await;
            return;
        };
        let labels = self.labels(record.session_id).await;
        let none = BTreeMap::new();
        let subject = Subject {
            labels: labels.as_ref().unwrap_or(&none),
            uid: record.process.uid,
            gid: record.process.gid,
        };
        let out = in_force.policy.evaluate(&action, &subject);
        let monitor = out
            .monitor
            .map(|r| format!("would {} by {}", r.decision.name(), r.id));
        // The reason below says 32 KiB.
        const _: () = assert!(airlock_common::ENV_MAX == 32 * 1024);
        let env_unseen = match &action {
            Action::Exec(e) if in_force.policy.uses_env() => {
                e.env.as_ref().is_none_or(|env| env.cut).then_some(
                    "its environment could not be read whole (longer than 32 KiB, or unreadable), and a rule looks at it: refused (fail closed)",
                )
            }
            _ => None,
        };
        let unseen = unseen(
            labels.is_some(),
            &record.detail,
            unseen_action.or(env_unseen),
        );
        let held = Held {
            record,
            target,
            action,
            monitor,
        };
        match (out.decision, out.rule, unseen) {
            (Decision::Hold, Some(rule), _) => self.file_request(held, rule, labels).await,
            (decision, rule, None) | (decision @ Decision::Deny, rule, Some(_)) => {
                let rule = rule.map(|r| r.id.clone());
                self.decide_now(held, decision, rule, None).await
            }
            (_, _, Some(why)) => {
                warn!(session = held.record.session_id, "{why}");
                self.decide_now(held, Decision::Deny, None, Some(why)).await
            }
        }
    }

    /// A candidate the policy decides without a human: carried out at
    /// once and recorded (with `why` when the policy was not all of it).
    async fn decide_now(
        &self,
        h: Held,
        decision: Decision,
        rule: Option<String>,
        why: Option<&str>,
    ) {
        let mut outcome = match self.apply(&h.target, decision != Decision::Deny).await {
            Ok(o) => o,
            Err(e) => e.to_string(),
        };
        if let Some(why) = why {
            outcome = format!("{outcome}; {why}");
        }
        if decision != Decision::Record || h.monitor.is_some() {
            info!(kind = h.target.kind.name(), decision = decision.name(), rule = rule.as_deref().unwrap_or("-"), monitor = h.monitor.as_deref().unwrap_or("-"), action = %h.action.summary(), "decided by policy");
        }
        self.record_decision(&h, decision, rule, outcome).await;
    }

    /// A hold: the request is stored and announced, and waits.
    async fn file_request(
        &mut self,
        h: Held,
        rule: &policy::Rule,
        labels: Option<BTreeMap<String, String>>,
    ) {
        if labels.is_none() {
            warn!(
                session = h.record.session_id,
                "the session's labels could not be read: its request cannot be decided until they can"
            );
        }
        // The ancestry only for a request (it costs a /proc read per parent).
        let tgid = h.target.tgid;
        let ancestry = tokio::time::timeout(
            READ_LIMIT,
            tokio::task::spawn_blocking(move || procfs::ancestry(tgid)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        let mut req = request::new(&h, rule, labels, ancestry);
        match self.recorder.create_request(req.clone()).await {
            Ok(id) => req.id = id,
            Err(e) => {
                warn!(error = %e, "could not store the request; refusing the held action");
                let _ = self.apply(&h.target, false).await;
                return;
            }
        }
        let outcome = format!("request {} waits for a decision", req.id);
        self.record_decision(&h, Decision::Hold, Some(rule.id.clone()), outcome)
            .await;
        let span = info_span!(
            "request",
            id = req.id,
            session = req.session_id,
            tgid = req.tgid
        );
        span.in_scope(|| info!(kind = req.kind.name(), rule = %req.rule, action = %req.action, "held: waiting for a decision"));
        let _ = self.updates.send(req.clone());
        self.pending.insert(req.id, req);
    }

    /// Puts the policy's decision on a candidate into the session's record.
    async fn record_decision(
        &self,
        h: &Held,
        decision: Decision,
        rule: Option<String>,
        outcome: String,
    ) {
        let now = wall_now_ns();
        let record = Record {
            ts_ns: now,
            kind: airlock_common::EventKind::Decision,
            detail: Detail::Decision {
                action: h.action.kind(),
                target: h.action.summary(),
                decision,
                rule,
                monitor: h.monitor.clone(),
                outcome,
                decided_in_us: (now.saturating_sub(h.record.ts_ns).max(0) / 1000) as u64,
            },
            hold: None,
            ..h.record.clone()
        };
        if let Err(e) = self.recorder.records(vec![record]).await {
            warn!("{e}: a decision record was dropped");
        }
    }

    /// A session's labels, read from the store once per session; None
    /// (and logged) when they cannot be read.
    async fn labels(&mut self, session: u64) -> Option<BTreeMap<String, String>> {
        if let Some(l) = self.labels.get(&session) {
            return Some(l.clone());
        }
        let db = self.db.clone();
        let read = tokio::task::spawn_blocking(move || {
            Store::open_read_only(&db).and_then(|s| s.session_labels(session))
        })
        .await;
        let labels = match read {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                warn!(session, error = %e, "reading the session's labels");
                return None;
            }
            Err(e) => {
                warn!(session, error = %e, "reading the session's labels");
                return None;
            }
        };
        // Bounded: labels of sessions long gone are read again if needed.
        if self.labels.len() >= 1024 {
            self.labels.clear();
        }
        self.labels.insert(session, labels.clone());
        Some(labels)
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
            let on_timeout = self
                .pending
                .get(&id)
                .map_or(OnTimeout::Deny, |r| r.on_timeout);
            let reason = format!("no decision in time: on_timeout = {}", on_timeout.name());
            self.finish(id, State::TimedOut, "timeout", Some(reason), String::new())
                .await;
        }
    }

    /// Carries out a decision and records it. `outcome` is preset for
    /// requests ended without a decision (abandoned, failed); otherwise it
    /// says what the process saw.
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
            State::Pending | State::Abandoned | State::Failed => None,
        };
        req.state = state;
        req.outcome = Some(match allow {
            Some(allow) => match self.apply(&Target::of(&req), allow).await {
                Ok(o) => o,
                Err(e) => {
                    req.state = State::Failed;
                    e.to_string()
                }
            },
            None => outcome,
        });
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
        if let Err(e) = self.recorder.update_request(req.clone()).await {
            warn!(id = req.id, error = %e, "storing a request's new state");
        }
        let _ = self.updates.send(req.clone());
    }
}
