//! Holding an action inside its syscall: the one stop-publish-re-hold
//! sequence that the exec, file, connect and Unix socket hooks share.

use airlock_common::{EventKind, HoldKey, LossReason};
use aya_ebpf::helpers::bpf_send_signal;

use crate::{
    maps::{HOLD_PENDING, count_loss, daemon_alive, fail_open},
    task::{current_process_start, in_io_uring},
};

pub const SIGSTOP: u32 = 19;
const SIGCONT: u32 = 18;
/// The kernel re-issues a syscall that returns this once the task resumes;
/// the caller never sees it.
pub const ERESTARTNOINTR: i32 = -513;

/// How a hold attempt ended.
pub enum HoldOutcome {
    /// The task is stopped and the daemon told (now, or by an earlier try
    /// of the same action): restart the syscall.
    Held,
    /// The hold request could not be published (ring buffer full): the
    /// task is not stopped and a loss is counted; refuse the action.
    Unpublished,
    /// No daemon is alive to answer and the fail mode is open: nothing
    /// stopped; let the action through and say so.
    FailOpen,
    /// No daemon is alive to answer and the fail mode is closed: nothing
    /// stopped; refuse the action and say so.
    FailClosed,
    /// The syscall would not be re-issued after a hold (io_uring, see
    /// [`in_io_uring`]): nothing stopped; refuse the action and say it
    /// could not be held.
    Unrestartable,
}

/// Holds the current task for the action `key`, unless nobody could answer.
///
/// The first time, it stops the task and publishes the hold request
/// (`publish` writes it to the ring buffer with a forced wakeup and says
/// whether that worked), then marks the action pending. A re-issued
/// syscall for a pending action (a stray SIGCONT, or another thread's
/// SIGCONT) is only stopped again: no second request.
///
/// The order, the same for every hook: SIGSTOP first, then publish. The
/// daemon may answer (verdict, SIGCONT) as soon as it reads the request; a
/// stop sent after that could land after the SIGCONT and leave the task
/// stopped for good. If publishing fails, SIGCONT undoes the stop before
/// the task ever stops: generating SIGCONT discards a pending SIGSTOP
/// (prepare_signal in kernel/signal.c). Both are signalled at once, in
/// order: these hooks run in the syscall's own context with interrupts on,
/// where bpf_send_signal does not defer to irq_work. So a full ring buffer
/// never leaves a task stopped with nobody told; the caller refuses.
#[inline(always)]
pub fn hold(
    key: HoldKey,
    session_id: u64,
    kind: EventKind,
    publish: impl FnOnce() -> bool,
) -> HoldOutcome {
    if in_io_uring() {
        return HoldOutcome::Unrestartable;
    }
    if !daemon_alive() {
        // Nobody would answer: the fail mode decides, and the caller says so.
        let _ = HOLD_PENDING.remove(key);
        return if fail_open() {
            HoldOutcome::FailOpen
        } else {
            HoldOutcome::FailClosed
        };
    }
    let start = current_process_start();
    // SAFETY: the value is compared at once.
    let published = unsafe { HOLD_PENDING.get(key) }.is_some_and(|s| *s == start);
    // SAFETY: signals the current process; no memory is touched.
    unsafe { bpf_send_signal(SIGSTOP) };
    if !published {
        if !publish() {
            // Nobody would hear of this hold: refuse instead.
            count_loss(session_id, kind, LossReason::HoldUnpublished);
            // SAFETY: as above; the task is not left stopped.
            unsafe { bpf_send_signal(SIGCONT) };
            return HoldOutcome::Unpublished;
        }
        let _ = HOLD_PENDING.insert(key, start, 0);
    }
    HoldOutcome::Held
}
