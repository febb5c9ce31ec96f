//! Session membership: children join their parent's session on fork, and a
//! process leaves it when its last thread exits.

use airlock_common::{EventKind, ExitEvent, ForkEvent, LossReason, SessionEntry};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::{btf_tracepoint, lsm},
    programs::{BtfTracePointContext, LsmContext},
};

use crate::{
    exec::EXEC_DECIDED,
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
    // An exec let through that failed after the LSM hook leaves its entry.
    let _ = EXEC_DECIDED.remove(tgid);
    Ok(())
}

/// Tgids no process has (above PID_MAX_LIMIT, 2^22): the keys the fork
/// check tries the session map with, one per task.
const ROOM_PROBE: u32 = 0x8000_0000;
/// `clone_flags`: a thread of the same process, not a new one.
const CLONE_THREAD: u64 = 0x0001_0000;
const EAGAIN: i32 = 11;

/// `int security_task_alloc(struct task_struct *task, unsigned long clone_flags)`,
/// in copy_process before the new task can run: a watched process may make
/// a new process only while the session map has room for it, so a full
/// map refuses the fork (EAGAIN) rather than let a child run unwatched.
/// (A last slot taken between this check and sched_process_fork is still
/// counted as `session_map_full`.) On an internal error it allows.
#[lsm(hook = "task_alloc")]
pub fn lsm_task_alloc(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(2);
    if prev != 0 {
        return prev.clamp(-4095, 0);
    }
    let clone_flags: u64 = ctx.arg(1);
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return 0;
    };
    // One key per task (its pid is below 2^22): a task preempted between
    // the two calls below keeps its own.
    let probe = ROOM_PROBE | bpf_get_current_pid_tgid() as u32;
    let room = SessionEntry { session_id: 0 };
    if SESSIONS.insert(probe, room, BPF_NOEXIST as u64).is_err() {
        count_loss(session_id, EventKind::Fork, LossReason::ForkRefused);
        return -EAGAIN;
    }
    let _ = SESSIONS.remove(probe);
    0
}
