//! Connects and sends held inside their syscall.

use airlock_common::{
    EventKind, HoldKey, NET_APPROVED, NET_DENIED, NET_HOLD_UNAVAILABLE, NET_NO_DAEMON, NET_REFUSED,
    NET_RET_UNKNOWN, NetEvent, Verdict, net_digest,
};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::lsm, programs::LsmContext};

use crate::{
    hold::{HoldOutcome, hold},
    maps::{LSM_APPROVED, config, digest_seed, session_of, take_verdict},
    net::{
        FLOWS_DECIDED, FlowKey, emit, lsm_holds_connects, net_candidate, pend_connect,
        publish_connect,
    },
    task::{header, read},
};

use super::{LsmVerdict, earlier_denial};

const AF_UNSPEC: u16 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
const SOCK_DGRAM: u16 = 2;
const MSG_FASTOPEN: u32 = 0x2000_0000;

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
/// on `sock`; None for any other family (for a datagram send AF_UNSPEC
/// is AF_INET, as udp_sendmsg takes it).
#[inline(always)]
fn inet_event(
    sock: u64,
    address: u64,
    kind: EventKind,
    session_id: u64,
) -> Result<Option<NetEvent>, i64> {
    let mut family: u16 = read(address, 0)?;
    if family == AF_UNSPEC && kind == EventKind::UdpSend {
        // udp_sendmsg takes AF_UNSPEC as AF_INET (udpv6_sendmsg as no
        // address at all: then this only asks about a send that had none).
        family = AF_INET;
    }
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
        digest: net_digest(digest_seed(), family, protocol, port, &addr),
    };
    event.digest = key.digest;
    match take_verdict(pid_tgid as u32, key, EventKind::ConnectHeld) {
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
            HoldOutcome::Unrestartable => {
                event.flags |= NET_HOLD_UNAVAILABLE | NET_DENIED;
                pend_connect(pid_tgid, event);
                Ok(LsmVerdict::Deny)
            }
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
    let Some(mut event) = inet_event(ctx.arg(0), name, EventKind::UdpSend, session_id)? else {
        return Ok(LsmVerdict::Allow);
    };
    let flags: u32 = read(msg, off.msghdr_msg_flags)?;
    let udp = match event.protocol {
        // A connected TCP socket ignores the address; an unconnected one
        // connects only with MSG_FASTOPEN.
        6 if flags & MSG_FASTOPEN != 0 => false,
        6 => return Ok(LsmVerdict::Allow),
        // A datagram, or any other socket type that takes an address
        // (raw, ping): a flow to that destination.
        _ => true,
    };
    if !is_candidate(&event) {
        return Ok(LsmVerdict::Allow);
    }
    if !udp {
        event.header.kind = EventKind::Connect as u32;
        return connect_verdict(pid_tgid, session_id, &mut event);
    }
    let flow = FlowKey::of(tgid, &event);
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { FLOWS_DECIDED.get(flow) }.copied() {
        return Ok(if v == Verdict::Allow as u32 {
            LsmVerdict::Allow
        } else {
            LsmVerdict::Deny
        });
    }
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest: net_digest(
            digest_seed(),
            event.family,
            event.protocol,
            event.port,
            &event.addr,
        ),
    };
    event.digest = key.digest;
    match take_verdict(pid_tgid as u32, key, EventKind::ConnectHeld) {
        Some(v) => {
            let _ = FLOWS_DECIDED.insert(flow, v, 0);
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
            HoldOutcome::Unrestartable => {
                event.flags |= NET_HOLD_UNAVAILABLE | NET_DENIED;
                emit(&event);
                Ok(LsmVerdict::Deny)
            }
            HoldOutcome::FailOpen => Ok(LsmVerdict::Allow),
            HoldOutcome::FailClosed => {
                event.flags |= NET_NO_DAEMON | NET_DENIED;
                emit(&event);
                Ok(LsmVerdict::Deny)
            }
        },
    }
}
