//! Carrying out a decision on a held task: a verdict the re-issued
//! syscall consumes, then SIGCONT (held inside a syscall); or SIGCONT /
//! SIGKILL (an exec stopped before its first instruction, without BPF LSM).

use super::Broker;
use crate::{
    daemon::handles::HandleError,
    model::{ActionKind, ApprovalRequest, EnvBinding},
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
    /// An exec's environment as the approver saw it (held inside execve).
    pub env: Option<EnvBinding>,
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
            env: req.env_binding,
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
    #[error("{0}; the held process was killed, since nothing else could end its hold")]
    VerdictKilled(HandleError),
}

/// How long a resumed thread has to take its verdict before it counts as
/// gone on without it (it re-issues its syscall at once; a thread stopped
/// again meanwhile, by another hold of its process, is waited for).
const VERDICT_TAKEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a verdict is kept for a thread that stays stopped.
const VERDICT_KEPT_AT_MOST: std::time::Duration = std::time::Duration::from_secs(3600);

impl Broker {
    /// Watches a resumed thread's verdict: one the thread went on without
    /// (its syscall was not re-issued: ptrace, a partial sendmmsg) is
    /// dropped, so it can neither cover a later action nor fill the map.
    fn drop_untaken_verdict(&self, t: &Target) {
        let sensor = self.sensor.clone();
        let (ids, action) = ((t.tgid, t.pid), (t.event_kind, t.digest));
        tokio::spawn(async move {
            let mut waited = std::time::Duration::ZERO;
            loop {
                tokio::time::sleep(VERDICT_TAKEN_WITHIN).await;
                waited += VERDICT_TAKEN_WITHIN;
                match procfs::stat(ids.1) {
                    // Gone: the kernel dropped its verdict with it.
                    None => return,
                    Some(st) if st.stopped() && waited < VERDICT_KEPT_AT_MOST => continue,
                    Some(_) => {}
                }
                if let Ok(true) = sensor.forget_verdict(ids, action).await {
                    tracing::warn!(
                        tgid = ids.0,
                        pid = ids.1,
                        "a resumed thread went on without taking its verdict: dropped"
                    );
                }
                return;
            }
        });
    }

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
        if let Err(e) = self
            .sensor
            .verdict((t.tgid, t.pid), (t.event_kind, t.digest), allow, t.env)
            .await
        {
            // Without its verdict the task re-holds at every SIGCONT and
            // nobody is asked again: end it rather than leave it stopped.
            let _ = procfs::signal_if_same(t.tgid, t.start_time, libc::SIGKILL);
            return Err(ApplyError::VerdictKilled(e));
        }
        procfs::signal_if_same(t.tgid, t.start_time, libc::SIGCONT)?;
        self.drop_untaken_verdict(t);
        let call = t.kind.syscall();
        Ok(if allow {
            format!("resumed: {call} re-issued")
        } else {
            format!("resumed: {call} fails with EPERM")
        })
    }
}
