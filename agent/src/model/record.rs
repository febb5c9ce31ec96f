//! Records: what the store keeps of each action of a watched session.

use std::net::IpAddr;

use airlock_common::{EventKind, LossReason};
use serde::{Deserialize, Serialize, Serializer};

use super::{ActionKind, Decision};

/// Who acted: the identity every record carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Thread id of the acting task.
    pub pid: u32,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Process id of the real parent.
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    /// cgroup v2 id.
    pub cgroup_id: u64,
}

/// One recorded action, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub session_id: u64,
    /// Wall-clock time, ns since the Unix epoch.
    pub ts_ns: i64,
    pub kind: EventKind,
    pub process: Process,
    pub detail: Detail,
    /// Set when the kernel stopped this action and it waits for a decision.
    pub hold: Option<HoldInfo>,
}

impl Record {
    /// A loss record for a session, made from the kernel's counters.
    pub fn loss(session_id: u64, ts_ns: i64, kind: EventKind, reason: LossReason, n: u64) -> Self {
        Self {
            session_id,
            ts_ns,
            kind: EventKind::Loss,
            process: Process::default(),
            detail: Detail::Loss {
                lost_kind: kind,
                reason,
                count: n,
            },
            hold: None,
        }
    }

    /// The kind of action a held record asks about.
    pub fn action_kind(&self) -> Option<ActionKind> {
        match self.kind {
            EventKind::Exec => Some(ActionKind::Exec),
            EventKind::FileOpen => Some(ActionKind::File),
            EventKind::Connect | EventKind::ConnectHeld | EventKind::UnixConnect => {
                Some(ActionKind::Connect)
            }
            _ => None,
        }
    }
}

/// What resuming or refusing a held action needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldInfo {
    /// The verdict key's digest (0 for an exec stopped after the fact).
    pub digest: u64,
    /// Held inside the syscall: resumed through a verdict the retried
    /// syscall consumes. Otherwise (exec without BPF LSM) resumed by
    /// SIGCONT and refused by SIGKILL.
    pub in_syscall: bool,
}

/// What a rule (or the fail mode) did to an action, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enforcement {
    /// Stopped; waits for a decision.
    #[serde(rename = "held")]
    Held,
    /// Refused by a deny rule.
    #[serde(rename = "denied")]
    Denied,
    /// A verdict let a held action through.
    #[serde(rename = "approved")]
    Approved,
    /// A verdict refused a held action.
    #[serde(rename = "refused")]
    Refused,
    /// An action a rule flagged where it cannot be held: a connect on a
    /// kernel that cannot hold one, or an action in io_uring (which does
    /// not re-issue a held request).
    #[serde(rename = "denied: cannot hold here")]
    HoldUnavailable,
    /// No daemon alive to ask, fail mode closed.
    #[serde(rename = "denied: no daemon (fail closed)")]
    NoDaemonDenied,
    /// No daemon alive to ask, fail mode open.
    #[serde(rename = "allowed: no daemon (fail open)")]
    NoDaemonAllowed,
    /// With BPF LSM, an exec whose new image received another argv than
    /// the one it was decided on (rewritten while execve copied it):
    /// killed before its first instruction.
    #[serde(rename = "denied: argv or environment changed during exec")]
    ChangedDuringExec,
}

impl Enforcement {
    pub fn name(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Denied => "denied",
            Self::Approved => "approved",
            Self::Refused => "refused",
            Self::HoldUnavailable => "denied: cannot hold here",
            Self::NoDaemonDenied => "denied: no daemon (fail closed)",
            Self::NoDaemonAllowed => "allowed: no daemon (fail open)",
            Self::ChangedDuringExec => "denied: argv or environment changed during exec",
        }
    }

    /// The fail mode's answer when no daemon was alive.
    pub fn no_daemon(denied: bool) -> Self {
        if denied {
            Self::NoDaemonDenied
        } else {
            Self::NoDaemonAllowed
        }
    }
}

/// What is particular to each kind of event. Stored as JSON in the
/// events table: field names are kept forever.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    Fork {
        child_tgid: u32,
    },
    Exec {
        /// The path string the caller handed to execve: recorded as
        /// written, never decided on.
        path: String,
        argv: Vec<String>,
        argv_truncated: bool,
        path_truncated: bool,
        argv_unreadable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<Enforcement>,
        /// The file the kernel opened to run (for a script, its
        /// interpreter where the exec was seen after the fact).
        file: ExecFile,
    },
    Exit(ExitStatus),
    Net {
        protocol: Protocol,
        addr: Option<IpAddr>,
        port: u16,
        ret: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<Enforcement>,
    },
    /// A connect (or a datagram flow) to a Unix-domain socket.
    Unix {
        /// The socket's address as its server bound it: a path, or `@`
        /// and an abstract name.
        socket: String,
        /// A datagram socket (the first datagram to it, or its connect).
        datagram: bool,
        /// The socket file (0 and 0 for an abstract address): the same
        /// whatever name the caller used.
        ino: u64,
        dev: u32,
        /// The process that made the listening socket, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        peer_tgid: Option<u32>,
        /// That process is not in the acting session (or is not known).
        peer_outside: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<Enforcement>,
    },
    File {
        /// The opened file's path (only its name when `path_truncated`).
        path: String,
        /// Opened for writing (write-only or read-write).
        write: bool,
        path_truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<Enforcement>,
        /// What was done to it, when it was not opened: cut by
        /// truncate(2), its name given to another file (rename, link,
        /// symlink) or moved away (rename), or removed (unlink, rmdir).
        /// Each is a write.
        #[serde(skip_serializing_if = "FileOp::is_open")]
        op: FileOp,
        /// The file (inode number, device): the same under every name.
        ino: u64,
        dev: u32,
        /// The directory holding it (inode number, device).
        dir_ino: u64,
        dir_dev: u32,
    },
    Loss {
        #[serde(serialize_with = "kind_name")]
        lost_kind: EventKind,
        #[serde(serialize_with = "reason_name")]
        reason: LossReason,
        count: u64,
    },
    /// The policy's decision on a candidate action (written by the daemon).
    Decision {
        action: ActionKind,
        /// The command line, the destination, or the path.
        target: String,
        decision: Decision,
        /// The deciding rule (`pack/rule`); absent when none matched.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// A monitor rule's would-be decision: "would hold by pack/rule".
        #[serde(skip_serializing_if = "Option::is_none")]
        monitor: Option<String>,
        /// What the process saw, or the request filed for a hold.
        outcome: String,
        /// From the kernel's event to the decision carried out, in µs.
        decided_in_us: u64,
    },
}

/// What a file event did to the file (see `FILE_OP_*` in airlock-common).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FileOp {
    #[default]
    Open,
    Truncate,
    Rename,
    Link,
    Symlink,
    Unlink,
}

impl FileOp {
    pub fn from_kernel(op: u32) -> Self {
        match op {
            airlock_common::FILE_OP_TRUNCATE => Self::Truncate,
            airlock_common::FILE_OP_RENAME => Self::Rename,
            airlock_common::FILE_OP_LINK => Self::Link,
            airlock_common::FILE_OP_SYMLINK => Self::Symlink,
            airlock_common::FILE_OP_UNLINK => Self::Unlink,
            _ => Self::Open,
        }
    }

    fn is_open(&self) -> bool {
        *self == Self::Open
    }
}

fn kind_name<S: Serializer>(k: &EventKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.name())
}

fn reason_name<S: Serializer>(r: &LossReason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.name())
}

/// The file an exec ran, as the kernel knows it: the same file whatever
/// name, symlink, hard link or descriptor the caller used (a copy is
/// another file). For a script held inside execve (BPF LSM) the script;
/// seen after the exec, its interpreter.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecFile {
    /// Its own name (after every symlink).
    pub name: String,
    /// Inode number and device (the kernel's encoding).
    pub ino: u64,
    pub dev: u32,
    /// Type and permission bits: set-user-ID is 0o4000, set-group-ID 0o2000.
    pub mode: u32,
    /// The kernel could not read it: nothing above is known.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl ExecFile {
    /// Set-user-ID or set-group-ID.
    pub fn setuid(&self) -> bool {
        self.mode & 0o6000 != 0
    }
}

/// How a process ended, decoded from `task->exit_code` (a wait status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

impl ExitStatus {
    pub fn from_wait_status(status: u32) -> Self {
        let sig = (status & 0x7f) as i32;
        if sig == 0 {
            Self {
                exit_code: Some(((status >> 8) & 0xff) as i32),
                signal: None,
                core_dumped: false,
            }
        } else {
            Self {
                exit_code: None,
                signal: Some(sig),
                core_dumped: status & 0x80 != 0,
            }
        }
    }
}

/// Transport protocol of a network action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Other,
}

impl Protocol {
    /// From an IP protocol number.
    pub fn from_ip(p: u16) -> Self {
        match p {
            6 => Self::Tcp,
            17 => Self::Udp,
            _ => Self::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Other => "other",
        }
    }
}

/// One policy load or reload, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyLoad {
    pub ts: i64,
    /// "start", "SIGHUP" or "file change".
    pub trigger: String,
    /// The new policy is in force; when false the old one stayed.
    pub ok: bool,
    pub rules: usize,
    pub files: Vec<String>,
    /// Every error, one per line, when the load was refused.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_decoding() {
        assert_eq!(
            ExitStatus::from_wait_status(3 << 8),
            ExitStatus {
                exit_code: Some(3),
                signal: None,
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(9),
            ExitStatus {
                exit_code: None,
                signal: Some(9),
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(0x80 | 11),
            ExitStatus {
                exit_code: None,
                signal: Some(11),
                core_dumped: true
            }
        );
    }

    #[test]
    fn enforcement_serializes_as_the_names_stored_before() {
        for e in [
            Enforcement::Held,
            Enforcement::Denied,
            Enforcement::Approved,
            Enforcement::Refused,
            Enforcement::HoldUnavailable,
            Enforcement::NoDaemonDenied,
            Enforcement::NoDaemonAllowed,
        ] {
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                serde_json::Value::from(e.name())
            );
        }
    }

    #[test]
    fn loss_and_decision_details_keep_their_json_shape() {
        let l = Record::loss(3, 5, EventKind::Exec, LossReason::RingbufFull, 2);
        assert_eq!(
            serde_json::to_value(&l.detail).unwrap(),
            serde_json::json!({"lost_kind": "exec", "reason": "ringbuf_full", "count": 2})
        );
        let d = Detail::Decision {
            action: ActionKind::Connect,
            target: "tcp 1.2.3.4:443".into(),
            decision: Decision::Record,
            rule: None,
            monitor: Some("would hold by p/r".into()),
            outcome: "resumed".into(),
            decided_in_us: 7,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"action": "connect", "target": "tcp 1.2.3.4:443", "decision": "record",
                "monitor": "would hold by p/r", "outcome": "resumed", "decided_in_us": 7})
        );
    }
}
