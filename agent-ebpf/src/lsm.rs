//! BPF LSM hooks: hold an action inside its syscall. The hook stops the
//! task (SIGSTOP) and returns -ERESTARTNOINTR; once the daemon has stored a
//! verdict and resumed the task, the kernel re-issues the syscall, the hook
//! consumes the verdict (one shot) and returns 0 or -EPERM. The caller sees
//! a syscall that took as long as the approval.

use airlock_common::{
    ARGS_MAX, EXEC_ARGS_TRUNCATED, EXEC_ARGS_UNREADABLE, EXEC_DENIED, EXEC_HELD,
    EXEC_HELD_IN_SYSCALL, EXEC_NO_DAEMON, EXEC_REFUSED, EventKind, ExecEvent, FILE_APPROVED,
    FILE_CAND_DIR, FILE_CAND_NAME, FILE_DENIED, FILE_HELD, FILE_NAME_HASHED, FILE_NO_DAEMON,
    FILE_PATH_MAX, FILE_PATH_TRUNCATED, FILE_REFUSED, FILE_WRITE, FILENAME_MAX, FNV_OFFSET,
    FileEvent, HoldKey, LossReason, NET_APPROVED, NET_DENIED, NET_NO_DAEMON, NET_REFUSED,
    NET_RET_UNKNOWN, NetEvent, RuleAction, Verdict, file_digest, fnv_step, net_digest,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::lsm,
    programs::LsmContext,
};

use crate::{
    exec::{ARGV_STASH, EXEC_MARKS, exec_candidate, exec_file, output_exec},
    hold::{ERESTARTNOINTR, HoldOutcome, hold},
    maps::{
        EVENTS, EXEC_SCRATCH, FILE_NAMES, FILE_SCRATCH, FORCE_WAKEUP, LSM_APPROVED, config,
        count_loss, file_f_path_offset, session_of, take_verdict,
    },
    net::{
        UDP_DECIDED, UdpSeenKey, emit, lsm_holds_connects, net_candidate, pend_connect,
        publish_connect,
    },
    task::{header, read},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EPERM: i32 = 1;
const SOCK_STREAM: u16 = 1;
const SOCK_DGRAM: u16 = 2;
const MSG_FASTOPEN: u32 = 0x2000_0000;

/// LSM verdicts, converted to the hook's return value in one place.
enum LsmVerdict {
    Allow,
    Deny,
    Hold,
}

impl LsmVerdict {
    /// Constants only: the verifier bounds LSM returns to [-4095, 0].
    fn ret(self) -> i32 {
        match self {
            Self::Allow => 0,
            Self::Deny => -EPERM,
            Self::Hold => ERESTARTNOINTR,
        }
    }
}

/// An earlier LSM's denial (the hook's last argument) passes through
/// unchanged, clamped to the range the verifier accepts for LSM returns.
#[inline(always)]
fn earlier_denial(prev: i32) -> Option<i32> {
    (prev != 0).then(|| prev.clamp(-4095, 0))
}

/// `int security_socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)`,
/// called from __sys_connect_file before the protocol's connect: holding
/// here stops connect(2) itself, before any packet leaves. On an internal
/// error it fails open (0): recording goes on in the cgroup hook.
#[lsm(hook = "socket_connect")]
pub fn lsm_socket_connect(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(3)) {
        return earlier;
    }
    match try_lsm_socket_connect(&ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

fn try_lsm_socket_connect(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let Some(mut event) = inet_event(ctx.arg(0), ctx.arg(1), EventKind::Connect, session_id)?
    else {
        return Ok(LsmVerdict::Allow);
    };
    // A connect that is no candidate is the cgroup hook's to record.
    if !is_candidate(&event) {
        return Ok(LsmVerdict::Allow);
    }
    connect_verdict(pid_tgid, session_id, &mut event)
}

/// The event for an IPv4 or IPv6 `address` (a kernel `struct sockaddr`)
/// on `sock`; None for any other family.
#[inline(always)]
fn inet_event(
    sock: u64,
    address: u64,
    kind: EventKind,
    session_id: u64,
) -> Result<Option<NetEvent>, i64> {
    let family: u16 = read(address, 0)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let port = u16::from_be(read::<u16>(address, 2)?);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let a: [u8; 4] = read(address, 4)?;
        addr[..4].copy_from_slice(&a);
    } else {
        addr = read(address, 8)?;
    }
    let sock_type: u16 = read(sock, config().offsets.socket_type).unwrap_or(0);
    let protocol = match sock_type {
        SOCK_STREAM => 6,
        SOCK_DGRAM => 17,
        _ => 0,
    };
    Ok(Some(NetEvent {
        header: header(kind, session_id),
        family,
        protocol,
        port,
        _pad: 0,
        ret: NET_RET_UNKNOWN,
        has_ret: 0,
        addr,
        _pad2: 0,
        flags: 0,
        digest: 0,
    }))
}

#[inline(always)]
fn is_candidate(event: &NetEvent) -> bool {
    if event.family == AF_INET {
        net_candidate::<false>(event)
    } else {
        net_candidate::<true>(event)
    }
}

/// A candidate connect (or TCP Fast Open send): its verdict, or a hold.
#[inline(always)]
fn connect_verdict(
    pid_tgid: u64,
    session_id: u64,
    event: &mut NetEvent,
) -> Result<LsmVerdict, i64> {
    let tgid = (pid_tgid >> 32) as u32;
    let (family, protocol, port, addr) = (event.family, event.protocol, event.port, event.addr);
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest: net_digest(family, protocol, port, &addr),
    };
    event.digest = key.digest;
    match take_verdict(pid_tgid as u32, key) {
        Some(v) => {
            if v == Verdict::Allow as u32 {
                let _ = LSM_APPROVED.insert(pid_tgid, NET_APPROVED, 0);
                Ok(LsmVerdict::Allow)
            } else {
                // The cgroup hook will not run: record the refusal here.
                event.flags |= NET_REFUSED;
                pend_connect(pid_tgid, event);
                Ok(LsmVerdict::Deny)
            }
        }
        None => match hold(key, session_id, EventKind::ConnectHeld, || {
            publish_connect(event)
        }) {
            HoldOutcome::Held => Ok(LsmVerdict::Hold),
            HoldOutcome::Unpublished => Ok(LsmVerdict::Deny),
            HoldOutcome::FailOpen => {
                // The cgroup hook records it with this mark.
                let _ = LSM_APPROVED.insert(pid_tgid, NET_NO_DAEMON, 0);
                Ok(LsmVerdict::Allow)
            }
            HoldOutcome::FailClosed => {
                event.flags |= NET_NO_DAEMON | NET_DENIED;
                pend_connect(pid_tgid, event);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}

/// `int security_socket_sendmsg(struct socket *sock, struct msghdr *msg, int size)`,
/// called from sock_sendmsg for every send: the ways out that never call
/// connect(2). A datagram to an explicit destination (UDP `sendto`) and a
/// TCP Fast Open connect (`sendto(MSG_FASTOPEN)`, which sends its data in
/// the SYN) meet the connect rules here, held inside the syscall as a
/// connect is. A datagram flow's verdict covers every later datagram of
/// the process to that destination. On an internal error it fails open.
#[lsm(hook = "socket_sendmsg")]
pub fn lsm_socket_sendmsg(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(3)) {
        return earlier;
    }
    match try_lsm_socket_sendmsg(&ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

fn try_lsm_socket_sendmsg(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    // Until socket_connect holds too, the cgroup hooks hold datagrams.
    if !lsm_holds_connects() {
        return Ok(LsmVerdict::Allow);
    }
    let off = config().offsets;
    let msg: u64 = ctx.arg(1);
    let name: u64 = read(msg, off.msghdr_msg_name)?;
    if name == 0 {
        return Ok(LsmVerdict::Allow);
    }
    let Some(mut event) = inet_event(ctx.arg(0), name, EventKind::Connect, session_id)? else {
        return Ok(LsmVerdict::Allow);
    };
    let flags: u32 = read(msg, off.msghdr_msg_flags)?;
    let udp = match event.protocol {
        // A connected TCP socket ignores the address; an unconnected one
        // connects only with MSG_FASTOPEN.
        6 if flags & MSG_FASTOPEN != 0 => false,
        17 => true,
        _ => return Ok(LsmVerdict::Allow),
    };
    if !is_candidate(&event) {
        return Ok(LsmVerdict::Allow);
    }
    if !udp {
        return connect_verdict(pid_tgid, session_id, &mut event);
    }
    event.header.kind = EventKind::UdpSend as u32;
    let flow = UdpSeenKey::of(tgid, &event);
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { UDP_DECIDED.get(flow) }.copied() {
        return Ok(if v == Verdict::Allow as u32 {
            LsmVerdict::Allow
        } else {
            LsmVerdict::Deny
        });
    }
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest: net_digest(event.family, event.protocol, event.port, &event.addr),
    };
    event.digest = key.digest;
    match take_verdict(pid_tgid as u32, key) {
        Some(v) => {
            let _ = UDP_DECIDED.insert(flow, v, 0);
            if v == Verdict::Allow as u32 {
                // The cgroup hook records the datagram.
                Ok(LsmVerdict::Allow)
            } else {
                event.flags |= NET_REFUSED;
                emit(&event);
                Ok(LsmVerdict::Deny)
            }
        }
        None => match hold(key, session_id, EventKind::ConnectHeld, || {
            publish_connect(&event)
        }) {
            HoldOutcome::Held => Ok(LsmVerdict::Hold),
            HoldOutcome::Unpublished => Ok(LsmVerdict::Deny),
            HoldOutcome::FailOpen => Ok(LsmVerdict::Allow),
            HoldOutcome::FailClosed => {
                event.flags |= NET_NO_DAEMON | NET_DENIED;
                emit(&event);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}

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
    // The caller's argv, stashed at the syscall's entry (a multi-call
    // binary's applet is named there, so before the candidate check).
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
    } else {
        // No copy from the syscall's entry (a compat `int $0x80` execve,
        // or the stash map full): the policy cannot see argv.
        ev.flags |= EXEC_ARGS_UNREADABLE;
    }
    let Some(rule) = exec_candidate(ev) else {
        let _ = ARGV_STASH.remove(pid_tgid);
        return Ok(LsmVerdict::Allow);
    };
    ev.header = header(EventKind::Exec, session_id);
    ev.filename_len = len as u32;
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
    match take_verdict(pid_tgid as u32, key) {
        Some(v) => {
            let _ = ARGV_STASH.remove(pid_tgid);
            if v == Verdict::Allow as u32 {
                // sched_process_exec records the exec that now happens.
                Ok(LsmVerdict::Allow)
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
            HoldOutcome::Unpublished => Ok(LsmVerdict::Deny),
            HoldOutcome::FailOpen => {
                let _ = ARGV_STASH.remove(pid_tgid);
                // sched_process_exec records the exec with this mark.
                let _ = EXEC_MARKS.insert(tgid, EXEC_NO_DAEMON, 0);
                Ok(LsmVerdict::Allow)
            }
            HoldOutcome::FailClosed => {
                let _ = ARGV_STASH.remove(pid_tgid);
                ev.flags |= EXEC_NO_DAEMON | EXEC_DENIED;
                emit_exec(ev);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}

/// FNV-1a over the file (device and inode) and argv: the verdict covers
/// this exact command, run from this exact file.
#[inline(always)]
fn exec_digest(ev: &ExecEvent) -> u64 {
    let mut h = FNV_OFFSET;
    for b in ev.file.ino.to_le_bytes() {
        h = fnv_step(h, b);
    }
    for b in ev.file.dev.to_le_bytes() {
        h = fnv_step(h, b);
    }
    // One 0xff byte between the file and argv.
    h = fnv_step(h, 0xff);
    let n = ev.args_len as usize;
    for i in 0..ARGS_MAX {
        if i >= n {
            break;
        }
        h = fnv_step(h, ev.args[i]);
    }
    h
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

/// FMODE_WRITE in `file->f_mode`: opened write-only or read-write.
const FMODE_WRITE: u32 = 0x2;

/// `int security_file_open(struct file *file)`, called from do_dentry_open
/// once the file is set up, before open(2) returns it (and for the opens
/// inside execve and the like). Only *candidates* are looked at: files
/// whose own name, or whose directory's name, is in FILE_NAMES. Every other
/// open of a watched process returns at once and is not recorded. A
/// candidate open is held like an exec: stopped, published once, re-issued
/// until a verdict for this exact path and access exists. On an internal
/// error it fails open (0).
#[lsm(hook = "file_open")]
pub fn lsm_file_open(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(1)) {
        return earlier;
    }
    match try_lsm_file_open(&ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// FNV-1a over a dentry's name, if it is at most FILE_NAME_HASHED bytes
/// (the key of FILE_NAMES, as `airlock_common::name_hash` computes it).
#[inline(always)]
fn dentry_name_hash(dentry: u64) -> Option<u64> {
    let off = config().offsets;
    let name: u64 = read(dentry, off.dentry_d_name + off.qstr_name).ok()?;
    // Two bytes more than hashed: one for the NUL, one to tell a name that
    // fits from a longer one cut to fit.
    let mut buf = [0u8; FILE_NAME_HASHED + 2];
    // SAFETY: a kernel string read into a bounded stack buffer.
    let n = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            name as *const core::ffi::c_void,
        )
    };
    // n counts the NUL: 2..=FILE_NAME_HASHED+1 is a whole, non-empty name.
    if n < 2 || n > FILE_NAME_HASHED as i64 + 1 {
        return None;
    }
    let n = (n - 1) as usize;
    let mut h = FNV_OFFSET;
    for (i, b) in buf.iter().enumerate().take(FILE_NAME_HASHED) {
        if i >= n {
            break;
        }
        h = fnv_step(h, *b);
    }
    Some(h)
}

/// The FILE_CAND_* bits FILE_NAMES holds for a name hash (0 for none).
#[inline(always)]
fn candidate_bits(hash: Option<u64>) -> u32 {
    match hash {
        // SAFETY: copied out at once.
        Some(h) => unsafe { FILE_NAMES.get(h) }.copied().unwrap_or(0),
        None => 0,
    }
}

fn try_lsm_file_open(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let off = config().offsets;
    let file: u64 = ctx.arg(0);
    // The candidate test first, and nothing else before it.
    let dentry: u64 = read(file, off.file_f_path + off.path_dentry)?;
    let by_name = candidate_bits(dentry_name_hash(dentry)) & FILE_CAND_NAME != 0;
    let by_dir = !by_name && {
        let parent: u64 = read(dentry, off.dentry_d_parent)?;
        candidate_bits(dentry_name_hash(parent)) & FILE_CAND_DIR != 0
    };
    if !by_name && !by_dir {
        return Ok(LsmVerdict::Allow);
    }

    let Some(ev) = FILE_SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let ev: &mut FileEvent = unsafe { &mut *ev };
    ev.header = header(EventKind::FileOpen, session_id);
    ev.flags = 0;
    let f_mode: u32 = read(file, off.file_f_mode).unwrap_or(0);
    let write = f_mode & FMODE_WRITE != 0;
    if write {
        ev.flags |= FILE_WRITE;
    }
    // `&file->f_path` as a typed kernel pointer: bpf_d_path checks that it
    // points at a struct path (a constant offset into the file argument).
    let path = (file + file_f_path_offset() as u64) as *mut aya_ebpf::bindings::path;
    // SAFETY: bpf_d_path writes at most FILE_PATH_MAX bytes into the slot's
    // buffer of that size; it is allowed in security_file_open.
    let n = unsafe {
        aya_ebpf::helpers::generated::bpf_d_path(
            path,
            ev.path.as_mut_ptr().cast(),
            FILE_PATH_MAX as u32,
        )
    };
    if n > 0 && n <= FILE_PATH_MAX as i64 {
        ev.path_len = (n - 1) as u32;
    } else {
        // Too long (or unresolvable): record the file's own name instead.
        ev.flags |= FILE_PATH_TRUNCATED;
        let name: u64 = read(dentry, off.dentry_d_name + off.qstr_name).unwrap_or(0);
        // SAFETY: a kernel string read into the slot's bounded buffer.
        let n = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
                ev.path.as_mut_ptr().cast(),
                FILE_PATH_MAX as u32,
                name as *const core::ffi::c_void,
            )
        };
        ev.path_len = if n > 0 && n <= FILE_PATH_MAX as i64 {
            (n - 1) as u32
        } else {
            0
        };
    }
    let digest = file_digest(&ev.path, ev.path_len as usize, write);
    ev.digest = digest;
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest,
    };
    match take_verdict(pid_tgid as u32, key) {
        Some(v) => {
            if v == Verdict::Allow as u32 {
                ev.flags |= FILE_APPROVED;
                emit_file(ev);
                Ok(LsmVerdict::Allow)
            } else {
                ev.flags |= FILE_REFUSED;
                emit_file(ev);
                Ok(LsmVerdict::Deny)
            }
        }
        None => match hold(key, session_id, EventKind::FileOpen, || {
            ev.flags |= FILE_HELD;
            EVENTS.output::<FileEvent>(&*ev, FORCE_WAKEUP).is_ok()
        }) {
            HoldOutcome::Held => Ok(LsmVerdict::Hold),
            HoldOutcome::Unpublished => Ok(LsmVerdict::Deny),
            HoldOutcome::FailOpen => {
                ev.flags |= FILE_NO_DAEMON;
                emit_file(ev);
                Ok(LsmVerdict::Allow)
            }
            HoldOutcome::FailClosed => {
                ev.flags |= FILE_NO_DAEMON | FILE_DENIED;
                emit_file(ev);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}

#[inline(always)]
fn emit_file(ev: &FileEvent) {
    if EVENTS.output::<FileEvent>(ev, FORCE_WAKEUP).is_err() {
        count_loss(
            ev.header.session_id,
            EventKind::FileOpen,
            LossReason::RingbufFull,
        );
    }
}
