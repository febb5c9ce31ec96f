//! Session membership: children join their parent's session on fork, and a
//! process leaves it when its last thread exits.

use airlock_common::{EventKind, ExitEvent, ForkEvent, LossReason, SessionEntry};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{EVENTS, SESSIONS, VERDICTS, config, count_loss, session_of, submit_flags},
    task::{header, read},
};

/// `trace_sched_process_fork(struct task_struct *parent, struct task_struct *child)`,
/// fired in kernel_clone after copy_process, in the parent's context: the one
/// place every new process passes before it can run.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn session_sched_process_fork(ctx: BtfTracePointContext) -> u32 {
    let _ = try_session_sched_process_fork(&ctx);
    0
}

fn try_session_sched_process_fork(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(session_id) = session_of(parent_tgid) else {
        return Ok(());
    };
    let child: u64 = ctx.arg(1);
    let child_tgid: u32 = read(child, config().offsets.task_tgid)?;
    if child_tgid == parent_tgid {
        // A new thread: the process is already a member.
        return Ok(());
    }
    if SESSIONS
        .insert(child_tgid, SessionEntry { session_id }, 0)
        .is_err()
    {
        count_loss(session_id, EventKind::Fork, LossReason::SessionMapFull);
        return Ok(());
    }
    let event = ForkEvent {
        header: header(EventKind::Fork, session_id),
        child_tgid,
        _pad: 0,
    };
    if EVENTS.output::<ForkEvent>(&event, submit_flags()).is_err() {
        count_loss(session_id, EventKind::Fork, LossReason::RingbufFull);
    }
    Ok(())
}

/// `trace_sched_process_exit(struct task_struct *p[, bool group_dead])`, in
/// do_exit after exit_code is set, for every thread: one argument on 6.12,
/// two on 6.18, so this reads neither and checks `signal->live` itself,
/// which works on both.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn session_sched_process_exit(_ctx: BtfTracePointContext) -> u32 {
    let _ = try_session_sched_process_exit();
    0
}

fn try_session_sched_process_exit() -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(());
    };
    // A thread killed while held takes its verdict with it: the map holds
    // verdicts of live threads only.
    let _ = VERDICTS.remove(pid_tgid as u32);
    let off = config().offsets;
    // SAFETY: the helper returns the current task pointer as an integer.
    let task = unsafe { bpf_get_current_task() };
    let signal: u64 = read(task, off.task_signal)?;
    let live: i32 = read(signal, off.signal_live)?;
    if live != 0 {
        // Other threads still run: the process has not exited yet.
        return Ok(());
    }
    let exit_code: u32 = read(task, off.task_exit_code).unwrap_or(0);
    let event = ExitEvent {
        header: header(EventKind::Exit, session_id),
        exit_code,
        _pad: 0,
    };
    if EVENTS.output::<ExitEvent>(&event, submit_flags()).is_err() {
        count_loss(session_id, EventKind::Exit, LossReason::RingbufFull);
    }
    let _ = SESSIONS.remove(tgid);
    Ok(())
}
