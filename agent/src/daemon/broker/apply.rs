//! Carrying out a decision on a held task: a verdict the re-issued
//! syscall consumes, then SIGCONT (held inside a syscall); or SIGCONT /
//! SIGKILL (an exec stopped before its first instruction, without BPF LSM).

use super::Broker;
use crate::{
    daemon::handles::HandleError,
    model::{ActionKind, ApprovalRequest},
    procfs::{self, SignalError},
};

/// What resuming or refusing a held task needs.
pub(super) struct Target {
    pub kind: ActionKind,
    /// The held thread.
    pub pid: u32,
    pub tgid: u32,
    pub start_time: u64,
    pub digest: u64,
    pub in_syscall: bool,
    /// The kernel event kind the hold was published as.
    pub event_kind: u32,
}

impl Target {
    pub fn of(req: &ApprovalRequest) -> Self {
        Self {
            kind: req.kind,
            pid: req.pid,
            tgid: req.tgid,
            start_time: req.start_time,
            digest: req.digest,
            in_syscall: req.in_syscall,
            event_kind: req.event_kind,
        }
    }
}

/// Why a decision could not be carried out.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApplyError {
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Verdict(#[from] HandleError),
}

impl Broker {
    /// Resumes or refuses the held task; returns what the process sees.
    pub(super) async fn apply(&self, t: &Target, allow: bool) -> Result<String, ApplyError> {
        if t.kind == ActionKind::Exec && !t.in_syscall {
            // Held at sched_process_exec: the new image has not run yet.
            return Ok(procfs::release_new_image(t.tgid, t.start_time, allow)?.into());
        }
        // An allow goes only to the process that was held: a verdict left
        // for a process nobody could resume would wait for its own SIGCONT.
        // A denial may always be written.
        if allow {
            procfs::check_same(t.tgid, t.start_time)?;
        }
        self.sensor
            .verdict((t.tgid, t.pid), (t.event_kind, t.digest), allow)
            .await?;
        procfs::signal_if_same(t.tgid, t.start_time, libc::SIGCONT)?;
        let call = t.kind.syscall();
        Ok(if allow {
            format!("resumed: {call} re-issued")
        } else {
            format!("resumed: {call} fails with EPERM")
        })
    }
}
