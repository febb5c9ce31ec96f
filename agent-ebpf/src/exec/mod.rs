//! Exec recording: path, argv and credentials of every image a watched
//! process runs.

use core::mem::offset_of;

use airlock_common::{
    APPLET_WINDOW, ARGS_MAX, EXEC_ARGS_TRUNCATED, EXEC_ARGS_UNREADABLE, EXEC_CHANGED, EXEC_DENIED,
    EXEC_FILE_UNKNOWN, EXEC_FILENAME_TRUNCATED, EXEC_HELD, EXEC_NAME_MAX, EXEC_NO_DAEMON,
    EXEC_RULE_BUSYBOX, EXEC_RULE_DENY_AS_APPLET, EXEC_RULE_MULTICALL, EventKind, ExecEvent,
    ExecRule, FILENAME_MAX, FNV_OFFSET, FileId, FileKey, LossReason, MODE_EXEC_ALL,
    MODE_EXEC_SETUID, MODE_LSM_EXEC, RuleAction, fnv_step,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel_str_bytes,
        bpf_send_signal, generated,
    },
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};

use crate::{
    hold::SIGSTOP,
    maps::{
        EVENTS, EXEC_FILES, EXEC_NAMES, EXEC_SCRATCH, FORCE_WAKEUP, MODE, config, count_loss,
        daemon_alive, fail_open, session_of, submit_flags,
    },
    task::{header, read},
};

mod decided;
mod stash;

use decided::exec_as_decided;
pub use decided::{
    DECIDED_ARGV, DECIDED_ARGV_CUT, EXEC_DECIDED, ExecDecided, argv_hashes, hash_walk,
};
pub use stash::ARGV_STASH;

const SIGKILL: u32 = 9;

/// `trace_sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// fired in exec_binprm once the new image is in place and before it runs:
/// argv is already in the new mm, and the exec is known to have succeeded.
/// Without BPF LSM this is also where an exec is held: SIGSTOP here stops
/// the new image before its first instruction (allow: SIGCONT; deny: SIGKILL).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn exec_sched_process_exec(ctx: BtfTracePointContext) -> u32 {
    let _ = try_exec_sched_process_exec(&ctx);
    0
}

fn try_exec_sched_process_exec(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(());
    };
    let Some(ev) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let ev: &mut ExecEvent = unsafe { &mut *ev };
    let off = config().offsets;
    ev.header = header(EventKind::Exec, session_id);
    ev.flags = 0;
    ev.digest = 0;
    let bprm: u64 = ctx.arg(2);
    // The file that runs: for a script, its interpreter (binfmt_script put
    // it in bprm->file before this tracepoint).
    exec_file(ev, bprm);
    caller_path(ev, bprm)?;
    let (arg_start, arg_end) = new_argv(ev)?;
    // With BPF LSM the rules were applied inside execve already.
    let lsm = MODE.get(MODE_LSM_EXEC).is_some_and(|v| *v == 1);
    let mut flags = submit_flags();
    // A script's (or binfmt_misc's) handler put its interpreter in place:
    // None where that cannot be read.
    let rewritten = match (
        read::<u64>(bprm, off.binprm_interp),
        read::<u64>(bprm, off.binprm_filename),
    ) {
        (Ok(interp), Ok(filename)) => Some(interp != filename),
        _ => None,
    };
    if lsm && !exec_as_decided(ev, (bprm, rewritten), tgid, arg_start, arg_end) {
        // Not the command that was decided on (or approved): it never runs.
        // SAFETY: signals the current process; no memory is touched.
        unsafe { bpf_send_signal(SIGKILL) };
        ev.flags |= EXEC_DENIED | EXEC_CHANGED;
        flags = FORCE_WAKEUP;
    }

    // A mark the LSM hook left for this exec (the fail mode let it through).
    // SAFETY: copied out at once.
    if let Some(mark) = unsafe { EXEC_MARKS.get(tgid) }.copied() {
        ev.flags |= mark;
        let _ = EXEC_MARKS.remove(tgid);
    }
    // With BPF LSM the rules were applied inside execve, to the file the
    // caller named; a script's interpreter (`#!/usr/bin/curl -K`) is only
    // known now, and is decided as without BPF LSM (unless already killed).
    let decide_here = ev.flags & EXEC_CHANGED == 0 && (!lsm || rewritten != Some(false));
    if let Some(rule) = decide_here.then(|| exec_candidate(ev)).flatten() {
        stop_or_kill(ev, rule);
        flags = FORCE_WAKEUP;
    }

    if !output_exec(ev, flags) {
        if ev.flags & EXEC_HELD != 0 {
            // Nobody will hear of this hold: fail closed rather than leave
            // the task stopped forever.
            // SAFETY: signals the current process.
            unsafe { bpf_send_signal(SIGKILL) };
            count_loss(session_id, EventKind::Exec, LossReason::HoldUnpublished);
        } else {
            count_loss(session_id, EventKind::Exec, LossReason::RingbufFull);
        }
    }
    Ok(())
}

/// Applies a candidate rule to the new image, which has not run an
/// instruction yet: stopped (hold) or killed (deny, or a hold nobody would
/// answer with the fail mode closed), before the event is published, so a
/// fast answer cannot overtake the stop.
#[inline(always)]
fn stop_or_kill(ev: &mut ExecEvent, rule: ExecRule) {
    if rule.action == RuleAction::Hold as u32 && !daemon_alive() {
        // Nobody would answer the hold: the fail mode decides.
        ev.flags |= EXEC_NO_DAEMON;
        if !fail_open() {
            // SAFETY: signals the current process; no memory is touched.
            unsafe { bpf_send_signal(SIGKILL) };
            ev.flags |= EXEC_DENIED;
        }
    } else if rule.action == RuleAction::Deny as u32 {
        // SAFETY: signals the current process; no memory is touched.
        unsafe { bpf_send_signal(SIGKILL) };
        ev.flags |= EXEC_DENIED;
    } else {
        // SAFETY: as above.
        unsafe { bpf_send_signal(SIGSTOP) };
        ev.flags |= EXEC_HELD;
    }
}

/// The path string the caller handed to execve (`bprm->filename`) into
/// `ev.filename`, flagged when cut.
#[inline(always)]
fn caller_path(ev: &mut ExecEvent, bprm: u64) -> Result<(), i64> {
    let filename: u64 = read(bprm, config().offsets.binprm_filename)?;
    // SAFETY: a kernel string read into a bounded buffer; the helper stops at
    // the buffer's end and always NUL-terminates.
    let len =
        match unsafe { bpf_probe_read_kernel_str_bytes(filename as *const u8, &mut ev.filename) } {
            Ok(s) => s.len(),
            Err(_) => 0,
        };
    if len >= FILENAME_MAX - 1 {
        ev.flags |= EXEC_FILENAME_TRUNCATED;
    }
    ev.filename_len = len as u32;
    Ok(())
}

/// The new image's argv (`mm->arg_start..arg_end`, in place before its
/// first instruction) into `ev.args`, cut at ARGS_MAX and flagged where
/// it is not all of it; returns where it lies.
#[inline(always)]
fn new_argv(ev: &mut ExecEvent) -> Result<(u64, u64), i64> {
    let off = config().offsets;
    // SAFETY: the helper returns the current task pointer as an integer.
    let task = unsafe { bpf_get_current_task() };
    let mm: u64 = read(task, off.task_mm)?;
    let arg_start: u64 = read(mm, off.mm_arg_start).unwrap_or(0);
    let arg_end: u64 = read(mm, off.mm_arg_end).unwrap_or(0);
    let mut n = arg_end.saturating_sub(arg_start);
    if n > ARGS_MAX as u64 {
        n = ARGS_MAX as u64;
        ev.flags |= EXEC_ARGS_TRUNCATED;
    }
    let mut args_len = 0u32;
    if n > 0 {
        // SAFETY: reads at most ARGS_MAX bytes of the new image's argv into
        // a buffer of exactly that size; the helper fails cleanly.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                ev.args.as_mut_ptr().cast(),
                n as u32,
                arg_start as *const _,
            )
        };
        if rc == 0 {
            args_len = n as u32;
        } else {
            ev.flags |= EXEC_ARGS_UNREADABLE;
        }
    }
    ev.args_len = args_len;
    Ok((arg_start, arg_end))
}

/// Reads the file the kernel opened to run (`bprm->file`, after every
/// symlink, whatever string the caller passed): its device, inode and mode
/// into `ev.file`, its own name into `ev.name`. Rules decide on these.
/// When it cannot be read the identity is zero and the exec is flagged
/// [`EXEC_FILE_UNKNOWN`] (a candidate, see [`exec_candidate`]).
#[inline(always)]
pub fn exec_file(ev: &mut ExecEvent, bprm: u64) {
    if read_exec_file(ev, bprm).is_err() {
        ev.file = FileId::default();
        ev.name_len = 0;
        ev.flags |= EXEC_FILE_UNKNOWN;
    }
}

#[inline(always)]
fn read_exec_file(ev: &mut ExecEvent, bprm: u64) -> Result<(), i64> {
    let off = config().offsets;
    let file: u64 = read(bprm, off.binprm_file)?;
    let inode: u64 = read(file, off.file_inode)?;
    let sb: u64 = read(inode, off.inode_i_sb)?;
    ev.file = FileId {
        ino: read(inode, off.inode_i_ino)?,
        dev: read(sb, off.sb_s_dev)?,
        mode: u32::from(read::<u16>(inode, off.inode_mode)?),
    };
    let dentry: u64 = read(file, off.file_f_path + off.path_dentry)?;
    let name: u64 = read(dentry, off.dentry_d_name + off.qstr_name)?;
    // SAFETY: a kernel string read into the slot's bounded buffer.
    let n = unsafe {
        generated::bpf_probe_read_kernel_str(
            ev.name.as_mut_ptr().cast(),
            EXEC_NAME_MAX as u32,
            name as *const core::ffi::c_void,
        )
    };
    ev.name_len = if n > 0 && n <= EXEC_NAME_MAX as i64 {
        (n - 1) as u32
    } else {
        0
    };
    Ok(())
}

/// The candidate entry for this exec, if the policy wants the daemon to
/// decide it: the file a rule names (any name or hard link of it), a file
/// with a name a rule names, every exec, or (when asked) a set-user-ID /
/// set-group-ID executable; a multi-call binary (by file or by name) by
/// the applet its argv names (see [`multicall_rule`]). `ev.file` and `ev.name` describe the
/// file the kernel opened (see [`exec_file`]), `ev.args` holds argv.
#[inline(always)]
pub fn exec_candidate(ev: &ExecEvent) -> Option<ExecRule> {
    if ev.flags & EXEC_FILE_UNKNOWN != 0 {
        return Some(ASK);
    }
    let key = FileKey {
        ino: ev.file.ino,
        dev: ev.file.dev,
        _pad: 0,
    };
    let n = ev.name_len as usize;
    let mut own = FNV_OFFSET;
    for i in 0..EXEC_NAME_MAX {
        if i >= n {
            break;
        }
        own = fnv_step(own, ev.name[i]);
    }
    // SAFETY: the rule is copied out at once.
    if let Some(rule) = unsafe { EXEC_FILES.get(key) }.copied() {
        if rule.flags & EXEC_RULE_MULTICALL == 0 || rule.action == RuleAction::Deny as u32 {
            return Some(plain(rule));
        }
        // A multi-call binary the daemon found: its own name may still be
        // one a deny rule alone refuses (`busybox`, a hard link's).
        // SAFETY: copied out at once.
        if let Some(by_name) = unsafe { EXEC_NAMES.get(own) }.copied()
            && by_name.flags == 0
            && by_name.action == RuleAction::Deny as u32
        {
            return Some(by_name);
        }
        if let Some(rule) = multicall_rule(ev, rule.flags) {
            return Some(rule);
        }
    }
    if MODE.get(MODE_EXEC_ALL).is_some_and(|v| *v == 1) {
        return Some(ASK);
    }
    // SAFETY: copied out at once.
    if let Some(rule) = unsafe { EXEC_NAMES.get(own) }.copied()
        && let Some(rule) = by_name(ev, rule)
    {
        return Some(rule);
    }
    // The last component of the caller's string too: for a script seen
    // after the fact the file is its interpreter, and the name the rule
    // gives is the script's. FNV-1a restarted after every `/`.
    let n = ev.filename_len as usize;
    let mut h = FNV_OFFSET;
    for i in 0..FILENAME_MAX {
        if i >= n {
            break;
        }
        let b = ev.filename[i];
        h = if b == b'/' {
            FNV_OFFSET
        } else {
            fnv_step(h, b)
        };
    }
    // SAFETY: copied out at once.
    if let Some(rule) = unsafe { EXEC_NAMES.get(h) }.copied()
        && let Some(rule) = by_name(ev, rule)
    {
        return Some(rule);
    }
    // S_ISUID | S_ISGID
    if MODE.get(MODE_EXEC_SETUID).is_some_and(|v| *v == 1) && ev.file.mode & 0o6000 != 0 {
        return Some(ASK);
    }
    None
}

/// Hold and ask the daemon.
const ASK: ExecRule = ExecRule {
    action: RuleAction::Hold as u32,
    flags: 0,
};

/// The rule without its flags (what the LSM hook and the tracepoint act
/// on: hold or deny).
#[inline(always)]
fn plain(rule: ExecRule) -> ExecRule {
    ExecRule {
        action: rule.action,
        flags: 0,
    }
}

/// What a name entry says for an exec it names: a multi-call binary's
/// name defers to the applet ([`multicall_rule`]); a name refused only as
/// a multi-call binary's applet is only asked about for any other file.
#[inline(always)]
fn by_name(ev: &ExecEvent, rule: ExecRule) -> Option<ExecRule> {
    if rule.flags & EXEC_RULE_MULTICALL != 0 {
        multicall_rule(ev, rule.flags)
    } else if rule.flags & EXEC_RULE_DENY_AS_APPLET != 0 {
        Some(ASK)
    } else {
        Some(rule)
    }
}

/// A multi-call binary runs the program its argv names: `argv[0]`'s file
/// name, or more words when that names the binary itself, with rules of
/// its own per binary (busybox takes any name starting `busybox` for
/// itself; toybox and uutils fall back to `argv[1]`, uutils strips
/// prefixes and extensions). So the daemon reads argv whole (ASK) for
/// every exec of one, except: the kernel refuses it alone where
/// `argv[0]`'s file name (one leading `-` dropped, read up to
/// [`APPLET_WINDOW`] bytes) is a name only deny rules give; and busybox
/// (`flags` has [`EXEC_RULE_BUSYBOX`]) runs that name's applet and nothing
/// else, so it is no candidate when the name is neither one a rule gives
/// nor one starting `busybox`.
#[inline(always)]
fn multicall_rule(ev: &ExecEvent, flags: u32) -> Option<ExecRule> {
    let mut scan = AppletScan {
        ev,
        n: ev.args_len.min(ARGS_MAX as u32),
        ended: 0,
        at_name: 1,
        pos: 0,
        busybox: 1,
        h: FNV_OFFSET,
    };
    // bpf_loop: the verifier walks the callback once, not once per byte
    // and per way the program got here.
    // SAFETY: the callback only reads `scan` and the event it points to,
    // both alive for the call.
    unsafe {
        generated::bpf_loop(
            APPLET_WINDOW as u32,
            applet_scan_byte as *mut core::ffi::c_void,
            (&mut scan as *mut AppletScan).cast(),
            0,
        )
    };
    if scan.ended == 0 {
        return Some(ASK);
    }
    // SAFETY: copied out at once.
    match unsafe { EXEC_NAMES.get(scan.h) }.copied() {
        Some(rule) if rule.action == RuleAction::Deny as u32 => Some(plain(rule)),
        Some(_) => Some(ASK),
        None if flags & EXEC_RULE_BUSYBOX != 0 => {
            (scan.busybox == 1 && scan.pos >= BUSYBOX.len() as u32).then_some(ASK)
        }
        None => Some(ASK),
    }
}

const BUSYBOX: &[u8; 7] = b"busybox";

/// [`multicall_rule`]'s walk over `argv[0]`: FNV-1a of its file name
/// (restarted after every `/`, one leading `-` dropped), and whether the
/// name starts with `busybox`.
#[repr(C)]
struct AppletScan {
    ev: *const ExecEvent,
    n: u32,
    /// `argv[0]` ended inside the window.
    ended: u32,
    /// At the start of a file name.
    at_name: u32,
    /// Bytes of the file name so far.
    pos: u32,
    /// The file name's first bytes are `busybox`'s so far.
    busybox: u32,
    h: u64,
}

/// One byte of [`AppletScan`]: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn applet_scan_byte(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer multicall_rule gave it.
    let scan = unsafe { &mut *ctx.cast::<AppletScan>() };
    let i = (i as usize) & (ARGS_MAX - 1);
    if i >= scan.n as usize {
        return 1;
    }
    // SAFETY: `ev` is the per-CPU event slot, alive for the whole program;
    // `i` is below ARGS_MAX.
    let b = unsafe { (*scan.ev).args[i] };
    if b == 0 {
        scan.ended = 1;
        return 1;
    } else if b == b'/' {
        scan.h = FNV_OFFSET;
        scan.at_name = 1;
        scan.pos = 0;
        scan.busybox = 1;
    } else if scan.at_name == 1 && b == b'-' {
        scan.at_name = 0;
    } else {
        scan.at_name = 0;
        let pos = scan.pos as usize;
        if pos < BUSYBOX.len() && BUSYBOX[pos] != b {
            scan.busybox = 0;
        }
        scan.pos = scan.pos.saturating_add(1);
        scan.h = fnv_step(scan.h, b);
    }
    0
}

/// Publishes an exec event cut to the argv bytes used (most argv are far
/// below ARGS_MAX). False when the ring buffer is full.
#[inline(always)]
pub fn output_exec(ev: &ExecEvent, flags: u64) -> bool {
    let mut size = offset_of!(ExecEvent, args) + ev.args_len as usize;
    if size > core::mem::size_of::<ExecEvent>() {
        size = core::mem::size_of::<ExecEvent>();
    }
    // SAFETY: `size` is bounded by the scratch slot's size just above.
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const ExecEvent).cast::<u8>(), size) };
    EVENTS.output::<[u8]>(bytes, flags).is_ok()
}

/// Flags the LSM exec hook leaves for sched_process_exec's record of the
/// same exec, by tgid (the execing thread may not be the leader yet).
#[map]
pub static EXEC_MARKS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);
