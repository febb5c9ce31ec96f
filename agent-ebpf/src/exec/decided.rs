//! What an exec was let through on (the caller's argv, the environment an
//! approver saw), compared with what the new image received before its
//! first instruction.

use airlock_common::{
    ARGS_MAX, ENV_MAX, EXEC_FILENAME_TRUNCATED, ExecEvent, FILENAME_MAX, FNV_OFFSET,
    VERDICT_ENV_CHECK, VERDICT_ENV_PREFIX, fnv_step,
};
use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_user, generated},
    macros::map,
    maps::{HashMap, PerCpuArray},
};

use crate::{
    maps::{config, content_seed},
    task::read,
};

/// The argv an exec was let through on (the caller's copy), and the
/// environment an approver saw, left by the
/// LSM hook for sched_process_exec to compare with the new image's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecDecided {
    /// [`argv_hashes`] of the caller's copy of argv, and of its tail
    /// (after argv[0]: what a script's interpreter gets after the path).
    pub hash: u64,
    pub tail_hash: u64,
    /// Bytes of the copy, and of its tail.
    pub len: u32,
    pub tail_len: u32,
    /// `DECIDED_*` flags.
    pub flags: u32,
    /// The environment an approver saw (a verdict's `env_*`), with
    /// `VERDICT_ENV_*` flags; 0 when not compared.
    pub env_flags: u32,
    /// [`VerdictEntry`](airlock_common::VerdictEntry)'s `env_hash` and
    /// `env_len`.
    pub env_hash: u64,
    pub env_len: u32,
    /// Strings in the caller's copy.
    pub argc: u32,
}

/// [`ExecDecided::flags`]: argv is compared (the caller's copy was read).
pub const DECIDED_ARGV: u32 = 1;
/// [`ExecDecided::flags`]: the caller's copy was cut: only its prefix must
/// match.
pub const DECIDED_ARGV_CUT: u32 = 2;

/// By tgid (the execing thread becomes the leader; two threads of one
/// process cannot be between the LSM hook and sched_process_exec at once,
/// the kernel's `cred_guard_mutex` serializes them). Not LRU: an entry is
/// never dropped for room; a full map refuses the exec instead. Removed by
/// sched_process_exec, or at the process's exit (an exec that fails after
/// the LSM hook leaves its entry until then: as many entries as the
/// session map has processes).
#[map]
pub static EXEC_DECIDED: HashMap<u32, ExecDecided> = HashMap::with_max_entries(65536, 0);

/// The new image's argv, read from its end (a script's, whose front the
/// kernel rewrote), one per CPU.
#[map]
static CONTENT_SCRATCH: PerCpuArray<[u8; ARGS_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// FNV-1a, keyed with a secret of the pin set that nothing exports (so no
/// argv can be made to collide with another on purpose), over the first
/// `len` bytes of an argv buffer and over the part after its first NUL
/// (argv[1] on): (whole, tail, tail's length, strings).
#[inline(always)]
pub fn argv_hashes(bytes: &[u8; ARGS_MAX], len: u32) -> (u64, u64, u32, u32) {
    let w = hash_walk(FNV_OFFSET ^ content_seed(), bytes, len);
    (w.whole, w.tail, w.tail_len, w.strings)
}

/// The walk of [`argv_hashes`] over `len` bytes of `bytes`, its hashes
/// going on from `start`.
#[inline(always)]
pub fn hash_walk(start: u64, bytes: &[u8; ARGS_MAX], len: u32) -> HashWalk {
    let mut walk = HashWalk {
        bytes,
        n: len.min(ARGS_MAX as u32),
        in_tail: 0,
        tail_len: 0,
        strings: 0,
        whole: start,
        tail: start,
    };
    // bpf_loop: the verifier walks the callback once, not once per byte.
    // SAFETY: the callback only reads `walk` and the buffer it points to,
    // both alive for the call.
    unsafe {
        generated::bpf_loop(
            ARGS_MAX as u32,
            hash_byte as *mut core::ffi::c_void,
            (&mut walk as *mut HashWalk).cast(),
            0,
        )
    };
    walk
}

/// The keyed FNV-1a of the first `len` bytes of a buffer.
#[inline(always)]
fn hash_of(bytes: &[u8; ARGS_MAX], len: u32) -> u64 {
    argv_hashes(bytes, len).0
}

/// [`argv_hashes`]'s walk.
#[repr(C)]
pub struct HashWalk {
    bytes: *const [u8; ARGS_MAX],
    n: u32,
    /// Past the first NUL.
    in_tail: u32,
    tail_len: u32,
    /// NULs seen: the strings.
    strings: u32,
    pub whole: u64,
    tail: u64,
}

/// One byte of [`HashWalk`]: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn hash_byte(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer argv_hashes gave it.
    let walk = unsafe { &mut *ctx.cast::<HashWalk>() };
    let i = (i as usize) & (ARGS_MAX - 1);
    if i >= walk.n as usize {
        return 1;
    }
    // SAFETY: `bytes` is a per-CPU map slot, alive for the whole program;
    // `i` is below ARGS_MAX.
    let b = unsafe { (*walk.bytes)[i] };
    walk.whole = fnv_step(walk.whole, b);
    if b == 0 {
        walk.strings += 1;
    }
    if walk.in_tail == 1 {
        walk.tail = fnv_step(walk.tail, b);
        walk.tail_len += 1;
    } else if b == 0 {
        walk.in_tail = 1;
    }
    0
}

/// With BPF LSM, whether the argv the new image received (`ev.args`, the
/// first bytes of `arg_start..arg_end`) is the one the exec was decided on.
/// No entry: the caller's copy was unreadable and the rules failed closed
/// on it. Where a script's handler replaced argv[0] by its interpreter,
/// the script's path (and an interpreter option), the caller's argv[1..]
/// must be the new argv's end.
#[inline(always)]
pub(super) fn exec_as_decided(
    ev: &ExecEvent,
    (bprm, rewritten): (u64, Option<bool>),
    tgid: u32,
    arg_start: u64,
    arg_end: u64,
) -> bool {
    // SAFETY: copied out at once.
    let Some(d) = (unsafe { EXEC_DECIDED.get(tgid) }).copied() else {
        return true;
    };
    let _ = EXEC_DECIDED.remove(tgid);
    if d.env_flags & VERDICT_ENV_CHECK != 0 && !env_as_approved(&d) {
        return false;
    }
    if d.flags & DECIDED_ARGV == 0 {
        return true;
    }
    let total = arg_end.saturating_sub(arg_start);
    let Some(rewritten) = rewritten else {
        return false;
    };
    if !rewritten {
        let whole = d.flags & DECIDED_ARGV_CUT == 0;
        if whole && d.len == 0 {
            // An empty argv: since 5.18 the new image gets one empty string.
            return total <= 1 && ev.args_len <= 1 && (ev.args_len == 0 || ev.args[0] == 0);
        }
        if ev.args_len < d.len || (whole && (total != d.len as u64 || ev.args_len != d.len)) {
            return false;
        }
        return hash_of(&ev.args, d.len) == d.hash;
    }
    if d.flags & DECIDED_ARGV_CUT != 0 {
        // A cut copy's tail cannot be found in the new argv: its rules
        // already failed closed on the part they did not see.
        return true;
    }
    // The handler put strings of its own (the interpreter, an option from
    // the `#!` line; again for a script run by a script) and the script's
    // path in argv[0]'s place: the caller's argv[1..] follows the path,
    // and nothing else. (A path of FILENAME_MAX bytes or more cannot be
    // compared: refused.)
    let Ok(argc) = read::<i32>(bprm, config().offsets.binprm_argc) else {
        return false;
    };
    let added = argc as i64 - (d.argc as i64 - 1);
    if added < 2 || ev.flags & EXEC_FILENAME_TRUNCATED != 0 {
        return false;
    }
    let n = d.tail_len as u64;
    let path_len = ev.filename_len as u64;
    // [interpreter ...] path NUL tail: the path ends right before the tail.
    if n + path_len + 2 > total {
        return false;
    }
    let Some(buf) = CONTENT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let buf = unsafe { &mut *buf };
    if n > 0 {
        // SAFETY: user memory reads (of the new image, before it runs) that
        // fail cleanly, at most ARGS_MAX bytes into a buffer of that size.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                buf.as_mut_ptr().cast(),
                (n as u32) & (ARGS_MAX as u32 - 1),
                (arg_end - n) as *const _,
            )
        };
        if rc != 0 || hash_of(buf, d.tail_len) != d.tail_hash {
            return false;
        }
    }
    // The string before the tail is the script's path, and a string ends
    // before it.
    let path_at = arg_end - n - 1 - path_len;
    // SAFETY: as above.
    let ends = unsafe { bpf_probe_read_user((arg_end - n - 1) as *const u8) } == Ok(0)
        && unsafe { bpf_probe_read_user((path_at - 1) as *const u8) } == Ok(0);
    // SAFETY: as above; the path is below FILENAME_MAX bytes.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            buf.as_mut_ptr().cast(),
            (path_len as u32) & (FILENAME_MAX as u32 - 1),
            path_at as *const _,
        )
    };
    ends && rc == 0 && same_bytes(buf, &ev.filename, ev.filename_len)
}

/// Whether the first `len` bytes of `a` and `b` are the same.
#[inline(always)]
fn same_bytes(a: &[u8; ARGS_MAX], b: &[u8; FILENAME_MAX], len: u32) -> bool {
    let mut walk = SameWalk {
        a,
        b,
        n: len.min(FILENAME_MAX as u32),
        same: 1,
    };
    // SAFETY: the callback only reads `walk` and the buffers it points to,
    // both alive for the call.
    unsafe {
        generated::bpf_loop(
            FILENAME_MAX as u32,
            same_byte as *mut core::ffi::c_void,
            (&mut walk as *mut SameWalk).cast(),
            0,
        )
    };
    walk.same == 1
}

/// [`same_bytes`]'s walk.
#[repr(C)]
struct SameWalk {
    a: *const [u8; ARGS_MAX],
    b: *const [u8; FILENAME_MAX],
    n: u32,
    same: u32,
}

/// One byte of [`SameWalk`]: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn same_byte(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer same_bytes gave it.
    let walk = unsafe { &mut *ctx.cast::<SameWalk>() };
    let i = (i as usize) & (FILENAME_MAX - 1);
    if i >= walk.n as usize {
        return 1;
    }
    // SAFETY: both point to per-CPU map slots alive for the whole program;
    // `i` is below FILENAME_MAX.
    if unsafe { (*walk.a)[i] != (*walk.b)[i] } {
        walk.same = 0;
        return 1;
    }
    0
}

/// Whether the new image's environment (`mm->env_start..env_end`, in
/// place before its first instruction) is the one an approver saw.
#[inline(always)]
fn env_as_approved(d: &ExecDecided) -> bool {
    let off = config().offsets;
    // SAFETY: the helper returns the current task pointer as an integer.
    let task = unsafe { bpf_get_current_task() };
    let Ok(mm) = read::<u64>(task, off.task_mm) else {
        return false;
    };
    let (Ok(start), Ok(end)) = (
        read::<u64>(mm, off.mm_env_start),
        read::<u64>(mm, off.mm_env_end),
    ) else {
        return false;
    };
    let total = end.saturating_sub(start);
    let n = d.env_len as u64;
    let fits = if d.env_flags & VERDICT_ENV_PREFIX != 0 {
        total >= n
    } else {
        total == n
    };
    if !fits || n > ENV_MAX as u64 {
        return false;
    }
    let Some(buf) = CONTENT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // One walk over the whole environment, read a buffer at a time (one
    // bpf_loop: the verifier walks the callback once).
    let mut walk = EnvWalk {
        buf,
        start,
        n,
        h: FNV_OFFSET ^ content_seed(),
        ok: 1,
    };
    // SAFETY: the callback only reads and writes `walk` and the buffer it
    // points to, both alive for the call.
    unsafe {
        generated::bpf_loop(
            ENV_MAX as u32,
            env_byte as *mut core::ffi::c_void,
            (&mut walk as *mut EnvWalk).cast(),
            0,
        )
    };
    walk.ok == 1 && walk.h == d.env_hash
}

/// [`env_as_approved`]'s walk over the new image's environment.
#[repr(C)]
struct EnvWalk {
    buf: *mut [u8; ARGS_MAX],
    start: u64,
    n: u64,
    h: u64,
    /// Every read succeeded.
    ok: u32,
}

/// One byte of [`EnvWalk`] (the next buffer's worth read at each buffer's
/// start): 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn env_byte(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer env_as_approved gave it.
    let walk = unsafe { &mut *ctx.cast::<EnvWalk>() };
    if i >= walk.n {
        return 1;
    }
    let at = (i as usize) & (ARGS_MAX - 1);
    if at == 0 {
        let len = (walk.n - i).min(ARGS_MAX as u64) as u32;
        // SAFETY: a user memory read of the new image, before it runs, of
        // at most ARGS_MAX bytes into a per-CPU buffer of that size.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                walk.buf.cast(),
                len.min(ARGS_MAX as u32),
                (walk.start + i) as *const _,
            )
        };
        if rc != 0 {
            walk.ok = 0;
            return 1;
        }
    }
    // SAFETY: the per-CPU buffer, alive for the whole program; `at` is
    // below ARGS_MAX.
    walk.h = fnv_step(walk.h, unsafe { (*walk.buf)[at] });
    0
}
