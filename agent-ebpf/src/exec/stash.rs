//! The caller's argv, copied at the syscall's entry for the LSM exec hook
//! (by fentry where the kernel loads trampolines, else by syscall
//! tracepoints).

use airlock_common::{ARGS_MAX, MODE_LSM_EXEC};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated},
    macros::{fentry, map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{FEntryContext, TracePointContext},
};

use crate::{
    maps::{MODE, session_of},
    task::{REGS_CX, REGS_DX, REGS_SI, read},
};

/// argv as the caller passed it to execve, kept from the syscall's entry
/// until the LSM hook (the new image's copy is not readable there). Twice
/// ARGS_MAX so every bounded write stays inside for the verifier.
#[repr(C)]
pub struct ArgvStash {
    pub len: u32,
    pub truncated: u32,
    pub bytes: [u8; 2 * ARGS_MAX],
}

#[map]
pub static ARGV_STASH: LruHashMap<u64, ArgvStash> = LruHashMap::with_max_entries(1024, 0);

#[map]
static STASH_SCRATCH: PerCpuArray<ArgvStash> = PerCpuArray::with_max_entries(1, 0);

/// Most argv entries read from the caller.
const MAX_ARGS: u32 = 64;

/// syscalls:sys_enter_execve (`argv` at offset 24): stashes the caller's
/// argv for `lsm_bprm_creds_for_exec`, where fentry cannot load. A syscall
/// tracepoint puts every syscall of every task on the slow path, so the
/// fentry programs below are preferred.
#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn exec_sys_enter_execve(ctx: TracePointContext) -> u32 {
    // SAFETY: a syscall tracepoint's arguments are 8-byte slots from 16 on.
    if let Ok(argv) = unsafe { ctx.read_at::<u64>(24) } {
        stash_argv::<8>(argv);
    }
    0
}

/// syscalls:sys_enter_execveat (`argv` at offset 32): as execve.
#[tracepoint(category = "syscalls", name = "sys_enter_execveat")]
pub fn exec_sys_enter_execveat(ctx: TracePointContext) -> u32 {
    // SAFETY: as above.
    if let Ok(argv) = unsafe { ctx.read_at::<u64>(32) } {
        stash_argv::<8>(argv);
    }
    0
}

/// fentry/__x64_sys_execve (`argv` in rsi): the stash, without putting
/// every other syscall on the tracing slow path.
#[fentry(function = "__x64_sys_execve")]
pub fn exec_fentry_execve(ctx: FEntryContext) -> u32 {
    stash_from_regs::<8>(ctx.arg(0), REGS_SI);
    0
}

/// fentry/__x64_sys_execveat (`argv` in rdx).
#[fentry(function = "__x64_sys_execveat")]
pub fn exec_fentry_execveat(ctx: FEntryContext) -> u32 {
    stash_from_regs::<8>(ctx.arg(0), REGS_DX);
    0
}

/// fentry/__ia32_compat_sys_execve: `int $0x80` execve (`argv` in ecx, an
/// array of 32-bit pointers), which fires no syscall tracepoint.
#[fentry(function = "__ia32_compat_sys_execve")]
pub fn exec_fentry_compat_execve(ctx: FEntryContext) -> u32 {
    stash_from_regs::<4>(ctx.arg(0), REGS_CX);
    0
}

/// fentry/__ia32_compat_sys_execveat (`argv` in edx).
#[fentry(function = "__ia32_compat_sys_execveat")]
pub fn exec_fentry_compat_execveat(ctx: FEntryContext) -> u32 {
    stash_from_regs::<4>(ctx.arg(0), REGS_DX);
    0
}

/// fentry/__x64_compat_sys_execve: an x32 caller's execve (`argv` in rsi,
/// 32-bit pointers), where the kernel has the x32 ABI.
#[fentry(function = "__x64_compat_sys_execve")]
pub fn exec_fentry_x32_execve(ctx: FEntryContext) -> u32 {
    stash_from_regs::<4>(ctx.arg(0), REGS_SI);
    0
}

/// fentry/__x64_compat_sys_execveat (`argv` in rdx).
#[fentry(function = "__x64_compat_sys_execveat")]
pub fn exec_fentry_x32_execveat(ctx: FEntryContext) -> u32 {
    stash_from_regs::<4>(ctx.arg(0), REGS_DX);
    0
}

#[inline(always)]
fn stash_from_regs<const WORD: u64>(regs: u64, reg: u32) {
    match read::<u64>(regs, reg) {
        // A compat syscall takes the register's low 32 bits only: so does
        // the copy (a 64-bit caller of `int $0x80` must not show it a
        // decoy in the high half).
        Ok(argv) if WORD == 4 => stash_argv::<WORD>(argv & 0xffff_ffff),
        Ok(argv) => stash_argv::<WORD>(argv),
        // No copy: the LSM hook must not find an older call's.
        Err(_) => drop_stash(),
    }
}

/// syscalls:sys_exit_execve: the stash is this call's only. A call that
/// failed before the LSM hook (a missing file, E2BIG) must not leave its
/// argv for a later exec the stash does not see (a compat `int $0x80`
/// execve fires no syscall tracepoint). A held exec leaves here too, and
/// its restart stashes afresh. (The fentry programs cover every entry, and
/// the LSM hook takes the stash it reads, so they need no exit.)
#[tracepoint(category = "syscalls", name = "sys_exit_execve")]
pub fn exec_sys_exit_execve(_ctx: TracePointContext) -> u32 {
    drop_stash();
    0
}

/// syscalls:sys_exit_execveat: as execve.
#[tracepoint(category = "syscalls", name = "sys_exit_execveat")]
pub fn exec_sys_exit_execveat(_ctx: TracePointContext) -> u32 {
    drop_stash();
    0
}

#[inline(always)]
fn drop_stash() {
    if MODE.get(MODE_LSM_EXEC).is_some_and(|v| *v == 1) {
        let _ = ARGV_STASH.remove(bpf_get_current_pid_tgid());
    }
}

/// Copies the caller's argv (an array of `WORD`-byte pointers at `argv`)
/// into this thread's stash.
#[inline(always)]
fn stash_argv<const WORD: u64>(argv: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !MODE.get(MODE_LSM_EXEC).is_some_and(|v| *v == 1)
        || session_of((pid_tgid >> 32) as u32).is_none()
    {
        return;
    }
    // Built in this CPU's scratch (8 KiB is far beyond the stack), then
    // copied into the map under this thread's key.
    let Some(stash) = STASH_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let stash = unsafe { &mut *stash };
    stash.truncated = 0;
    let mut off: u32 = 0;
    // Every way this copy ends short of the whole argv (more than
    // MAX_ARGS words, ARGS_MAX bytes, a page not in memory) marks it
    // truncated: the daemon then fails closed on it.
    let mut ended = false;
    for i in 0..MAX_ARGS {
        let Ok(p) = user_word::<WORD>(argv + i as u64 * WORD) else {
            stash.truncated = 1;
            ended = true;
            break;
        };
        if p == 0 {
            ended = true;
            break;
        }
        // black_box keeps the mask: LLVM would drop it as redundant, but the
        // verifier needs it to bound the write.
        let at = (core::hint::black_box(off) & (ARGS_MAX as u32 - 1)) as usize;
        // SAFETY: writes at most ARGS_MAX bytes from `at` < ARGS_MAX into a
        // buffer of 2 * ARGS_MAX.
        let n = unsafe {
            generated::bpf_probe_read_user_str(
                stash.bytes.as_mut_ptr().add(at).cast(),
                ARGS_MAX as u32,
                p as *const _,
            )
        };
        if n <= 0 {
            stash.truncated = 1;
            ended = true;
            break;
        }
        off += n as u32;
        if off >= ARGS_MAX as u32 {
            off = ARGS_MAX as u32;
            stash.truncated = 1;
            ended = true;
            break;
        }
    }
    if !ended {
        // MAX_ARGS words read: truncated unless argv ends right here.
        let next = user_word::<WORD>(argv + MAX_ARGS as u64 * WORD).unwrap_or(1);
        if next != 0 {
            stash.truncated = 1;
        }
    }
    stash.len = off;
    let _ = ARGV_STASH.insert(pid_tgid, &*stash, 0);
}

/// One pointer of a user array of `WORD`-byte pointers (8, or 4 for a
/// compat caller).
#[inline(always)]
fn user_word<const WORD: u64>(at: u64) -> Result<u64, ()> {
    if WORD == 4 {
        // SAFETY: a user memory read that fails cleanly.
        unsafe { bpf_probe_read_user(at as *const u32) }
            .map(u64::from)
            .map_err(drop)
    } else {
        // SAFETY: as above.
        unsafe { bpf_probe_read_user(at as *const u64) }.map_err(drop)
    }
}
