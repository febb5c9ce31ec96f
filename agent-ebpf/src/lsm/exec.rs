//! Execs held inside execve.

use airlock_common::{
    ARGS_MAX, EXEC_ARGS_TRUNCATED, EXEC_ARGS_UNREADABLE, EXEC_DENIED, EXEC_HELD,
    EXEC_HELD_IN_SYSCALL, EXEC_NO_DAEMON, EXEC_REFUSED, EventKind, ExecEvent, FILENAME_MAX,
    FNV_OFFSET, HoldKey, LossReason, RuleAction, VERDICT_ENV_CHECK, Verdict, VerdictEntry,
    fnv_step,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::lsm,
    programs::LsmContext,
};

use crate::{
    exec::{
        ARGV_STASH, DECIDED_ARGV, DECIDED_ARGV_CUT, EXEC_DECIDED, EXEC_MARKS, ExecDecided,
        argv_hashes, exec_candidate, exec_file, hash_walk, output_exec,
    },
    hold::{HoldOutcome, hold},
    maps::{
        EXEC_SCRATCH, FORCE_WAKEUP, config, count_loss, digest_seed, session_of, take_verdict_entry,
    },
    task::{header, read},
};

use super::{LsmVerdict, earlier_denial};

/// `int security_bprm_creds_for_exec(struct linux_binprm *bprm)`, called once
/// per execve before the point of no return (unlike bprm_check_security,
/// which runs again for a script's interpreter and would hold it twice).
/// Deny rules fail execve with EPERM; hold rules stop the caller and
/// restart execve until a verdict for this exact path and argv exists. On an
/// internal error it fails open (0): sched_process_exec still records.
#[lsm(hook = "bprm_creds_for_exec")]
pub fn lsm_bprm_creds_for_exec(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(1)) {
        return earlier;
    }
    match try_lsm_bprm_creds_for_exec(&ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

fn try_lsm_bprm_creds_for_exec(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let Some(ev) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let ev: &mut ExecEvent = unsafe { &mut *ev };
    ev.filename = [0; FILENAME_MAX];
    let bprm: u64 = ctx.arg(0);
    let filename: u64 = read(bprm, config().offsets.binprm_filename)?;
    // SAFETY: a kernel string read into a bounded buffer.
    let len = unsafe { bpf_probe_read_kernel_str_bytes(filename as *const u8, &mut ev.filename) }
        .map(|s| s.len())
        .unwrap_or(0);
    ev.filename_len = len as u32;
    ev.flags = 0;
    ev.args_len = 0;
    exec_file(ev, bprm);
    caller_argv(ev, pid_tgid);
    let Some(rule) = exec_candidate(ev) else {
        return Ok(allow(ev, tgid, None));
    };
    ev.header = header(EventKind::Exec, session_id);
    ev.digest = 0;
    if rule.action == RuleAction::Deny as u32 {
        ev.flags |= EXEC_DENIED;
        emit_exec(ev);
        return Ok(LsmVerdict::Deny);
    }
    let digest = exec_digest(ev);
    ev.digest = digest;
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest,
    };
    match take_verdict_entry(pid_tgid as u32, key, EventKind::Exec) {
        Some(v) => {
            if u32::from(v.verdict) == Verdict::Allow as u32 {
                // sched_process_exec records the exec that now happens.
                Ok(allow(ev, tgid, Some(&v)))
            } else {
                ev.flags |= EXEC_REFUSED;
                emit_exec(ev);
                Ok(LsmVerdict::Deny)
            }
        }
        None => match hold(key, session_id, EventKind::Exec, || {
            ev.flags |= EXEC_HELD | EXEC_HELD_IN_SYSCALL;
            output_exec(ev, FORCE_WAKEUP)
        }) {
            HoldOutcome::Held => Ok(LsmVerdict::Hold),
            HoldOutcome::Unpublished | HoldOutcome::Unrestartable => Ok(LsmVerdict::Deny),
            HoldOutcome::FailOpen => {
                // sched_process_exec records the exec with this mark.
                let _ = EXEC_MARKS.insert(tgid, EXEC_NO_DAEMON, 0);
                Ok(allow(ev, tgid, None))
            }
            HoldOutcome::FailClosed => {
                ev.flags |= EXEC_NO_DAEMON | EXEC_DENIED;
                emit_exec(ev);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}

/// Lets the exec go on, leaving what was decided on for
/// sched_process_exec to compare with the argv (and, for an approved exec,
/// the environment the approver saw) the new image receives: a sibling
/// thread can rewrite the caller's memory after the copy read here. Where
/// that cannot be left, the exec is refused: an argv nobody checks is not
/// let through.
#[inline(always)]
fn allow(ev: &ExecEvent, tgid: u32, verdict: Option<&VerdictEntry>) -> LsmVerdict {
    let env = verdict.filter(|v| v.env_flags & VERDICT_ENV_CHECK != 0);
    let argv = ev.flags & EXEC_ARGS_UNREADABLE == 0;
    if !argv && env.is_none() {
        // Nothing to compare: the rules already failed closed on argv.
        let _ = EXEC_DECIDED.remove(tgid);
        return LsmVerdict::Allow;
    }
    let (hash, tail_hash, tail_len, argc) = if argv {
        argv_hashes(&ev.args, ev.args_len)
    } else {
        (0, 0, 0, 0)
    };
    let decided = ExecDecided {
        hash,
        tail_hash,
        len: ev.args_len,
        tail_len,
        flags: if argv { DECIDED_ARGV } else { 0 }
            | if ev.flags & EXEC_ARGS_TRUNCATED != 0 {
                DECIDED_ARGV_CUT
            } else {
                0
            },
        env_len: env.map_or(0, |v| v.env_len),
        env_hash: env.map_or(0, |v| v.env_hash),
        env_flags: env.map_or(0, |v| v.env_flags),
        argc,
    };
    if EXEC_DECIDED.insert(tgid, decided, 0).is_err() {
        count_loss(
            ev.header.session_id,
            EventKind::Exec,
            LossReason::ExecUnchecked,
        );
        return LsmVerdict::Deny;
    }
    LsmVerdict::Allow
}

/// The caller's argv, stashed at the syscall's entry, into `ev` (a
/// multi-call binary's applet is named there, so before the candidate
/// check), flagged cut or unreadable where the copy is not all of it. The
/// stash is taken: a restart or a later exec copies afresh.
#[inline(always)]
fn caller_argv(ev: &mut ExecEvent, pid_tgid: u64) {
    // SAFETY: the stash is read by this task only, before it is removed.
    if let Some(stash) = unsafe { ARGV_STASH.get(pid_tgid) } {
        let n = stash.len.min(ARGS_MAX as u32);
        if n > 0 {
            // SAFETY: copies at most ARGS_MAX bytes between two buffers of
            // at least that size.
            let rc = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                    ev.args.as_mut_ptr().cast(),
                    n,
                    stash.bytes.as_ptr().cast(),
                )
            };
            if rc == 0 {
                ev.args_len = n;
            } else {
                ev.flags |= EXEC_ARGS_UNREADABLE;
            }
        }
        if stash.truncated != 0 {
            ev.flags |= EXEC_ARGS_TRUNCATED;
        }
        let _ = ARGV_STASH.remove(pid_tgid);
    } else {
        // No copy from the syscall's entry (a compat `int $0x80` execve,
        // or the stash map full): the policy cannot see argv.
        ev.flags |= EXEC_ARGS_UNREADABLE;
    }
}

/// FNV-1a over the file (device and inode) and argv: the verdict covers
/// this exact command, run from this exact file.
#[inline(always)]
fn exec_digest(ev: &ExecEvent) -> u64 {
    let mut h = FNV_OFFSET ^ digest_seed();
    for b in ev.file.ino.to_le_bytes() {
        h = fnv_step(h, b);
    }
    for b in ev.file.dev.to_le_bytes() {
        h = fnv_step(h, b);
    }
    // One 0xff byte between the file and argv (bpf_loop'd: the verifier
    // walks its callback once, not once per byte).
    h = fnv_step(h, 0xff);
    hash_walk(h, &ev.args, ev.args_len).whole
}

#[inline(always)]
fn emit_exec(ev: &ExecEvent) {
    if !output_exec(ev, FORCE_WAKEUP) {
        count_loss(
            ev.header.session_id,
            EventKind::Exec,
            LossReason::RingbufFull,
        );
    }
}
