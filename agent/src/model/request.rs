//! Approval requests: a held action waiting for, or resolved by, a decision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ActionKind, OnTimeout};

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
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Approved,
        Self::Denied,
        Self::TimedOut,
        Self::Abandoned,
        Self::Failed,
    ];

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
        Self::ALL.into_iter().find(|st| st.name() == s)
    }
}

/// One process of a held task's ancestry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

/// A held action waiting for, or resolved by, a decision. Stored whole as
/// JSON and served by the API: field names are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApprovalRequest {
    pub id: u64,
    pub state: State,
    pub session_id: u64,
    /// The session's labels: agent, model, user, ...
    pub labels: BTreeMap<String, String>,
    /// The session's labels could not be read when the request was filed:
    /// nobody may decide it (the self-approval check needs them) until
    /// they can be; otherwise its timeout ends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labels_unread: bool,
    pub kind: ActionKind,
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
    /// Verdict key digest.
    pub digest: u64,
    /// Start time of the held process (clock ticks since boot), against pid reuse.
    pub start_time: u64,
    /// Held inside the syscall (BPF LSM, or the cgroup connect hook): the
    /// decision is a one-shot verdict the re-issued syscall consumes.
    #[serde(default)]
    pub in_syscall: bool,
    /// The kernel event kind the hold was published as (`EventKind` id):
    /// the verdict names it, so it covers no other kind of action.
    #[serde(default)]
    pub event_kind: u32,
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
    /// For an exec: where it runs and the environment it gets (values
    /// that can change what a program does shown, others only named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ExecContext>,
    /// For an exec held inside execve: the environment shown, as the new
    /// image must receive it (else it is killed before it runs). Never
    /// serialized (neither to the API nor to the store): a hash keyed with
    /// FNV-1a gives its key away to whoever knows what it hashed. A daemon
    /// that takes over reads it again from the held process.
    #[serde(skip)]
    pub env_binding: Option<EnvBinding>,
}

/// What an approver sees of an exec besides its command line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecContext {
    /// The working directory, when it could be read.
    pub cwd: Option<String>,
    /// Every variable by name, in order: the value where it can change
    /// what a program does (`LD_*`, proxies, `*_HOME`, `PATH`, ...),
    /// else `(set)`, as others often hold secrets.
    pub env: Vec<(String, String)>,
    /// False when the environment could not be read whole (longer than
    /// 32 KiB, or unreadable).
    pub env_complete: bool,
}

/// The environment an approver saw, for the kernel to compare with the
/// new image's: the keyed FNV-1a of its bytes (as in the verdict map).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvBinding {
    pub hash: u64,
    pub len: u32,
    /// Only the first `len` bytes (the rest was not read).
    pub prefix: bool,
}

impl EnvBinding {
    /// The verdict map's `env_flags` for it.
    pub fn verdict_flags(&self) -> u32 {
        airlock_common::VERDICT_ENV_CHECK
            | if self.prefix {
                airlock_common::VERDICT_ENV_PREFIX
            } else {
                0
            }
    }
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

impl ApprovalRequest {
    /// Whether the held action is an exec stopped after the fact, before
    /// its first instruction (resumed by SIGCONT, refused by SIGKILL),
    /// rather than held inside its syscall (resumed through a verdict).
    pub fn stopped_after_exec(&self) -> bool {
        self.kind == ActionKind::Exec && !self.in_syscall
    }
}

/// Why a decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no request {0}")]
    NotFound(u64),
    #[error("request {id} is already {}", state.name())]
    AlreadyDecided { id: u64, state: State },
    #[error(
        "{who} cannot decide request {id}: the session runs on their behalf (no self-approval)"
    )]
    SelfApproval { id: u64, who: String },
    #[error("{who} may not decide request {id}: its rule names other approvers")]
    NotAnApprover { id: u64, who: String },
    #[error("{who} has already approved request {id}; it needs {needed} distinct approvals")]
    AlreadyApproved { id: u64, who: String, needed: u32 },
    #[error(
        "request {id} cannot be decided yet: its session's labels could not be read, and without them no self-approval check is possible (it ends by its timeout otherwise)"
    )]
    LabelsUnread { id: u64 },
    #[error("the broker has stopped")]
    Stopped,
}
