//! Connects to Unix-domain sockets, held once the kernel has found the
//! socket: the identity is the socket file (device and inode) or the
//! abstract address, never the path string the caller passed.

use airlock_common::{
    EventKind, FNV_OFFSET, FileKey, HoldKey, MODE_UNIX_ALL, MODE_UNIX_OUTSIDE, NET_APPROVED,
    NET_DENIED, NET_HOLD_UNAVAILABLE, NET_NO_DAEMON, NET_REFUSED, UNIX_ABSTRACT, UNIX_DGRAM,
    UNIX_HELD, UNIX_PATH_MAX, UNIX_PEER_OUTSIDE, UnixEvent, Verdict, fnv_step, unix_digest,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, macros::lsm, programs::LsmContext,
};

use crate::{
    maps::{
        EVENTS, FORCE_WAKEUP, UNIX_FILES, UNIX_SCRATCH, config, count_loss, digest_seed, mode,
        session_of,
    },
    net::{FLOWS_DECIDED, FLOWS_SEEN, FlowKey},
    task::{current_process_start, header, read},
};

use super::{Flagged, LsmVerdict, Marks, earlier_denial, verdict_or_hold};

/// How Unix socket events mark their outcomes.
const UNIX_MARKS: Marks = Marks {
    held: UNIX_HELD,
    approved: NET_APPROVED,
    refused: NET_REFUSED,
    no_daemon: NET_NO_DAEMON,
    denied: NET_DENIED,
    unavailable: NET_HOLD_UNAVAILABLE,
};

impl Flagged for UnixEvent {
    fn flags(&mut self) -> &mut u32 {
        &mut self.flags
    }
    fn session(&self) -> u64 {
        self.header.session_id
    }
}

const AF_UNIX: u16 = 1;
/// `enum pid_type`'s PIDTYPE_TGID: `pid.tasks[1]` holds the thread-group
/// leader using the pid.
const PIDTYPE_TGID: u32 = 1;

/// `int security_unix_stream_connect(struct sock *sock, struct sock *other, struct sock *newsk)`,
/// called from unix_stream_connect (stream and seqpacket) once the
/// listening socket `other` is found, before the connection is made. On
/// an internal error it fails open (0).
#[lsm(hook = "unix_stream_connect")]
pub fn lsm_unix_stream_connect(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(3)) {
        return earlier;
    }
    match try_unix(ctx.arg(1), false) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// `int security_unix_may_send(struct socket *sock, struct socket *other)`,
/// called from unix_dgram_connect and for every datagram unix_dgram_sendmsg
/// sends, once the receiving socket `other` is found. A decision covers
/// the process's datagrams to that socket from then on, as a UDP flow's
/// does. On an internal error it fails open (0).
#[lsm(hook = "unix_may_send")]
pub fn lsm_unix_may_send(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(2)) {
        return earlier;
    }
    let other: u64 = ctx.arg(1);
    let Ok(sk) = read::<u64>(other, config().offsets.socket_sk) else {
        return 0;
    };
    match try_unix(sk, true) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// The decision on a connect (or datagram) to the socket whose `struct
/// sock` is `peer`.
fn try_unix(peer: u64, dgram: bool) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let off = config().offsets;
    // An unbound peer (a socketpair's other end) has no address: it is
    // the caller's own, not a way out.
    let addr: u64 = read(peer, off.unix_sock_addr)?;
    if addr == 0 {
        return Ok(LsmVerdict::Allow);
    }
    let Some(ev) = UNIX_SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let ev: &mut UnixEvent = unsafe { &mut *ev };
    ev.header = header(EventKind::UnixConnect, session_id);
    ev.flags = if dgram { UNIX_DGRAM } else { 0 };
    ev._pad = 0;

    // The address as the server bound it: `len` counts sun_family.
    let len: i32 = read(addr, off.unix_address_len)?;
    let mut n = (len - 2).max(0) as u32;
    if n > UNIX_PATH_MAX as u32 {
        n = UNIX_PATH_MAX as u32;
    }
    let src = addr + off.unix_address_name as u64 + 2;
    // SAFETY: a bounded kernel read into the slot's buffer of that size.
    let r = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            ev.path.as_mut_ptr().cast(),
            n,
            src as *const core::ffi::c_void,
        )
    };
    if r != 0 {
        return Err(r);
    }
    ev.path_len = n;
    let is_abstract = n > 0 && ev.path[0] == 0;
    // The address's own key: a socket a rule names by path is found by
    // its name too, while the daemon has yet to look a new file up.
    let by_name = FileKey {
        ino: address_hash(ev, is_abstract),
        dev: 0,
        _pad: 0,
    };

    // The socket file, whatever name led to it; none for an abstract one.
    let key = if !is_abstract {
        let dentry: u64 = read(peer, off.unix_sock_path + off.path_dentry)?;
        let inode: u64 = read(dentry, off.dentry_d_inode)?;
        let sb: u64 = read(inode, off.inode_i_sb)?;
        ev.ino = read(inode, off.inode_i_ino)?;
        ev.dev = read(sb, off.sb_s_dev)?;
        FileKey {
            ino: ev.ino,
            dev: ev.dev,
            _pad: 0,
        }
    } else {
        ev.flags |= UNIX_ABSTRACT;
        ev.ino = 0;
        ev.dev = 0;
        by_name
    };

    // The server: the process that called listen() on the socket, while
    // it lives (its pid's thread-group list is not empty: a number freed
    // by its exit may be a session member's by now). Unknown (a datagram
    // socket has none, or it is gone) counts as outside the session.
    let pid: u64 = read(peer, off.sock_sk_peer_pid).unwrap_or(0);
    let leader: u64 = read(pid, off.pid_tasks + 8 * PIDTYPE_TGID).unwrap_or(0);
    ev.peer_tgid = if leader != 0 {
        read::<u32>(pid, off.pid_numbers).unwrap_or(0)
    } else {
        0
    };
    let inside = ev.peer_tgid != 0 && session_of(ev.peer_tgid) == Some(session_id);
    if !inside {
        ev.flags |= UNIX_PEER_OUTSIDE;
    }

    let digest = unix_digest(digest_seed(), key.dev, key.ino, dgram);
    ev.digest = digest;
    let mut flow_addr = [0u8; 16];
    flow_addr[..8].copy_from_slice(&key.ino.to_ne_bytes());
    flow_addr[8..12].copy_from_slice(&key.dev.to_ne_bytes());
    let flow = FlowKey {
        tgid,
        family: AF_UNIX,
        port: 0,
        addr: flow_addr,
        start: current_process_start(),
    };

    // SAFETY: only the presence of the keys is used.
    let named = unsafe { UNIX_FILES.get(key).is_some() || UNIX_FILES.get(by_name).is_some() };
    let candidate = named || mode(MODE_UNIX_ALL) || (!inside && mode(MODE_UNIX_OUTSIDE));
    if !candidate {
        // Recorded: every stream connect, a datagram flow once.
        if !dgram || FLOWS_SEEN.insert(flow, 1, BPF_NOEXIST as u64).is_ok() {
            emit_unix(ev);
        }
        return Ok(LsmVerdict::Allow);
    }
    if dgram {
        // SAFETY: copied out at once.
        if let Some(v) = unsafe { FLOWS_DECIDED.get(flow) }.copied() {
            return Ok(if v == Verdict::Allow as u32 {
                LsmVerdict::Allow
            } else {
                LsmVerdict::Deny
            });
        }
    }
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest,
    };
    Ok(verdict_or_hold(
        pid_tgid as u32,
        key,
        EventKind::UnixConnect,
        ev,
        &UNIX_MARKS,
        |v| {
            if dgram {
                let _ = FLOWS_DECIDED.insert(flow, v, 0);
            }
        },
    ))
}

/// FNV-1a over the socket's address as `airlock_common::name_hash`
/// computes it for a rule's: an abstract address without its leading NUL
/// (its other bytes as they are), a path up to its first NUL.
#[inline(always)]
fn address_hash(ev: &UnixEvent, is_abstract: bool) -> u64 {
    let n = ev.path_len as usize;
    let mut h = FNV_OFFSET;
    for (i, b) in ev.path.iter().enumerate() {
        if i >= n || (!is_abstract && *b == 0) {
            break;
        }
        if i > 0 || !is_abstract {
            h = fnv_step(h, *b);
        }
    }
    h
}

#[inline(always)]
fn emit_unix(ev: &UnixEvent) {
    if EVENTS.output::<UnixEvent>(ev, FORCE_WAKEUP).is_err() {
        count_loss(
            ev.header.session_id,
            EventKind::UnixConnect,
            airlock_common::LossReason::RingbufFull,
        );
    }
}
