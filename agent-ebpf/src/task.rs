//! Reads of kernel structs at offsets found in the running kernel's BTF.

use airlock_common::{EventHeader, EventKind};
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
    bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
};

use crate::maps::config;

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    if base == 0 {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.map_err(|e| e as i64)
}

/// tgid of the current task's real parent (0 if unreadable).
#[inline(always)]
pub fn current_ppid() -> u32 {
    let off = config().offsets;
    // SAFETY: the helper returns the current task pointer as an integer.
    let task = unsafe { bpf_get_current_task() };
    read::<u64>(task, off.task_real_parent)
        .and_then(|parent| read::<u32>(parent, off.task_tgid))
        .unwrap_or(0)
}

/// When the current process started (its group leader's `start_time`;
/// 0 if unreadable): with the tgid, it names the process, not the pid.
#[inline(always)]
pub fn current_process_start() -> u64 {
    let off = config().offsets;
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    read::<u64>(task, off.task_group_leader)
        .and_then(|leader| read::<u64>(leader, off.task_start_time))
        .unwrap_or(0)
}

/// `PF_IO_WORKER`: an io_uring worker thread (io-wq or SQPOLL).
const PF_IO_WORKER: u32 = 0x10;
/// x86_64 `__NR_io_uring_enter` (the same number for 32-bit callers).
const NR_IO_URING_ENTER: u64 = 426;
/// x86_64: the kernel stack's size (`THREAD_SIZE`, without KASAN), the
/// size of the `struct pt_regs` at its top, and `orig_ax`'s offset in it.
const THREAD_SIZE: u64 = 16384;
const PT_REGS_SIZE: u64 = 21 * 8;
const PT_REGS_ORIG_AX: u64 = 15 * 8;

/// Offsets in x86_64 `struct pt_regs` of the registers syscalls take their
/// arguments in (a syscall's wrapper, `__x64_sys_*`, gets a pointer to the
/// saved registers): rsi, rdx (64-bit callers' second and third), rcx (a
/// 32-bit `int $0x80` caller's second). x86_64 only, as the programs are.
pub const REGS_SI: u32 = 13 * 8;
pub const REGS_DX: u32 = 12 * 8;
pub const REGS_CX: u32 = 11 * 8;

/// Whether the current action runs where a syscall re-issue cannot hold
/// it: io_uring (a worker thread, or the submitter inside
/// io_uring_enter), where a held request's -ERESTARTNOINTR would reach
/// the completion queue as its result instead of re-issuing it. Unknown
/// counts as restartable.
#[inline(always)]
pub fn in_io_uring() -> bool {
    let off = config().offsets;
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    let flags: u32 = read(task, off.task_flags).unwrap_or(0);
    flags & PF_IO_WORKER != 0 || current_syscall() == Some(NR_IO_URING_ENTER)
}

/// The number of the syscall the current task is in (`orig_ax` of the
/// registers at the top of its kernel stack, x86_64), if readable.
#[inline(always)]
pub fn current_syscall() -> Option<u64> {
    let off = config().offsets;
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    read::<u64>(task, off.task_stack)
        .and_then(|stack| read::<u64>(stack, (THREAD_SIZE - PT_REGS_SIZE + PT_REGS_ORIG_AX) as u32))
        .ok()
}

/// Effective uid of the current task (u32::MAX if unreadable).
#[inline(always)]
pub fn current_euid() -> u32 {
    let off = config().offsets;
    // SAFETY: as above.
    let task = unsafe { bpf_get_current_task() };
    read::<u64>(task, off.task_cred)
        .and_then(|cred| read::<u32>(cred, off.cred_euid))
        .unwrap_or(u32::MAX)
}

/// Fills the common head of an event for the current task.
#[inline(always)]
pub fn header(kind: EventKind, session_id: u64) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    EventHeader {
        kind: kind as u32,
        _pad: 0,
        // SAFETY: plain helper calls without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        session_id,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        ppid: current_ppid(),
        uid: uid_gid as u32,
        euid: current_euid(),
        gid: (uid_gid >> 32) as u32,
        // SAFETY: as above.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    }
}
