//! Network recording: outbound connect (with the syscall's outcome), inbound
//! accept (with the peer), and datagrams sent to explicit destinations.

use core::ptr::read_volatile;

use airlock_common::{
    EventKind, HoldKey, LossReason, MODE_LSM_CONNECT, NET_APPROVED, NET_DENIED,
    NET_HOLD_UNAVAILABLE, NET_NO_DAEMON, NET_REFUSED, NET_RET_UNKNOWN, NetEvent, Verdict,
    net_digest,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_set_retval},
    macros::{cgroup_sock_addr, fentry, fexit, map, tracepoint},
    maps::{HashMap, LruHashMap, lpm_trie::Key},
    programs::{FEntryContext, FExitContext, SockAddrContext, TracePointContext},
};

use crate::{
    hold::{ERESTARTNOINTR, HoldOutcome, hold},
    maps::{
        EVENTS, FORCE_WAKEUP, LSM_APPROVED, NET_RULES, count_loss, digest_seed, session_of,
        submit_flags, take_verdict,
    },
    task::{REGS_SI, current_process_start, current_syscall, header, read},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// A connect seen by the cgroup hook, waiting for the syscall's return
/// value. A plain hash map, not an LRU one: when it is full an insert
/// fails (and [`pend_connect`] records the connect at once) instead of
/// silently evicting another connect still in flight. Its size is set by
/// the daemon (`pending_connects`).
#[map]
pub static PENDING_CONNECT: HashMap<u64, NetEvent> = HashMap::with_max_entries(8192, 0);

/// The peer-address buffer an accept call passed, keyed by pid_tgid.
#[map]
static PENDING_ACCEPT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// A process's datagram destination (an IP address and port, or, with
/// family AF_UNIX, a Unix socket's identity in `addr`). The process is its
/// tgid and start time: a process that gets a reused pid is another one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    pub tgid: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
    pub start: u64,
}

impl FlowKey {
    /// The current process's flow to `event`'s destination.
    #[inline(always)]
    pub fn of(tgid: u32, event: &NetEvent) -> Self {
        Self {
            tgid,
            family: event.family,
            port: event.port,
            addr: event.addr,
            start: current_process_start(),
        }
    }
}

/// Datagram destinations already recorded per process (IP and Unix).
#[map]
pub static FLOWS_SEEN: LruHashMap<FlowKey, u8> = LruHashMap::with_max_entries(16384, 0);

/// The verdict on a process's datagrams to a candidate destination: one
/// decision covers the flow (every datagram after the first held one),
/// as a connect's covers the connected socket.
#[map]
pub static FLOWS_DECIDED: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(16384, 0);

/// Builds a network event from a cgroup sock_addr context.
#[inline(always)]
fn from_sock_addr<const V6: bool>(
    ctx: &SockAddrContext,
    kind: EventKind,
    session_id: u64,
) -> NetEvent {
    let sa = ctx.sock_addr;
    // The verifier wants each ctx field loaded at a constant offset from the
    // unmodified ctx pointer: volatile reads keep the compiler from folding
    // them into pointer arithmetic.
    // SAFETY: the kernel hands sock_addr programs a valid bpf_sock_addr.
    let (family, protocol, port) = unsafe {
        (
            read_volatile(&(*sa).user_family) as u16,
            read_volatile(&(*sa).protocol) as u16,
            read_volatile(&(*sa).user_port),
        )
    };
    let mut addr = [0u8; 16];
    // The verifier refuses user_ip6 in a *4 program and user_ip4 in a *6
    // one, so the program kind, not the runtime family, picks the field.
    if !V6 {
        // SAFETY: as above.
        let ip4 = unsafe { read_volatile(&(*sa).user_ip4) };
        addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        // SAFETY: as above.
        let w = unsafe {
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ]
        };
        addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    }
    NetEvent {
        header: header(kind, session_id),
        family,
        protocol,
        port: u16::from_be(port as u16),
        _pad: 0,
        ret: NET_RET_UNKNOWN,
        has_ret: 0,
        addr,
        _pad2: 0,
        flags: 0,
        digest: 0,
    }
}

#[inline(always)]
pub fn emit(event: &NetEvent) {
    if EVENTS.output::<NetEvent>(event, submit_flags()).is_err() {
        count_loss(
            event.header.session_id,
            EventKind::from_u32(event.header.kind).unwrap_or(EventKind::Connect),
            LossReason::RingbufFull,
        );
    }
}

/// Remembers a watched connect until `sys_exit_connect` gives its outcome,
/// after checking the connect candidates: a candidate stops the task and
/// restarts the syscall (-ERESTARTNOINTR) until a verdict exists (unless
/// the LSM hook holds connects, or this kernel cannot hold here).
/// Returns 1 to let the connect proceed, 0 to refuse or hold it.
#[inline(always)]
fn on_connect<const V6: bool, const HOLD: bool>(ctx: &SockAddrContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return 1;
    };
    let mut event = from_sock_addr::<V6>(ctx, EventKind::Connect, session_id);
    let mut verdict = 1;
    if net_candidate::<V6>(&event) {
        if lsm_holds_connects() {
            // The LSM hook ran first and let this connect through: it was
            // either approved there or is a retry it already decided.
            // SAFETY: copied out at once.
            if let Some(flags) = unsafe { LSM_APPROVED.get(pid_tgid) }.copied() {
                event.flags |= flags;
                let _ = LSM_APPROVED.remove(pid_tgid);
            }
        } else if !HOLD {
            // Without a way to stop the task here, refuse rather than let a
            // flagged connect through unasked.
            event.flags |= NET_DENIED | NET_HOLD_UNAVAILABLE;
            verdict = 0;
        } else {
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
            // One shot: a verdict covers this attempt only.
            match take_verdict(pid_tgid as u32, key, EventKind::ConnectHeld) {
                Some(v) => {
                    if v == Verdict::Allow as u32 {
                        event.flags |= NET_APPROVED;
                    } else {
                        event.flags |= NET_REFUSED;
                        verdict = 0;
                    }
                }
                None => match hold(key, session_id, EventKind::ConnectHeld, || {
                    publish_connect(&event)
                }) {
                    HoldOutcome::Held => {
                        // SAFETY: sets this syscall's return value; no
                        // memory is touched. 0 below then means "restart
                        // after the stop", not EPERM.
                        unsafe { bpf_set_retval(ERESTARTNOINTR) };
                        return 0;
                    }
                    HoldOutcome::Unpublished => return 0,
                    HoldOutcome::Unrestartable => {
                        event.flags |= NET_HOLD_UNAVAILABLE | NET_DENIED;
                        verdict = 0;
                    }
                    HoldOutcome::FailOpen => event.flags |= NET_NO_DAEMON,
                    HoldOutcome::FailClosed => {
                        event.flags |= NET_NO_DAEMON | NET_DENIED;
                        verdict = 0;
                    }
                },
            }
        }
    }
    pend_connect(pid_tgid, &event);
    verdict
}

/// Keeps a connect until its syscall returns (`net_sys_exit_connect` adds
/// the outcome and emits it). With the map full, the connect is emitted
/// now, without its outcome, and the lost outcome is counted. A connect
/// whose syscall no exit tracepoint of ours pairs with (io_uring, a
/// 32-bit `int $0x80` call, sendmmsg) is emitted now, without its
/// outcome: held there, it would never be recorded.
#[inline(always)]
pub fn pend_connect(pid_tgid: u64, event: &NetEvent) {
    if !matches!(current_syscall(), Some(NR_CONNECT | NR_SENDTO | NR_SENDMSG)) {
        emit(event);
        return;
    }
    if PENDING_CONNECT.insert(pid_tgid, *event, 0).is_err() {
        count_loss(
            event.header.session_id,
            EventKind::Connect,
            LossReason::PendingMapFull,
        );
        emit(event);
    }
}

/// x86_64 numbers of the syscalls whose exit we pair a connect with
/// (a 32-bit caller's connect has another number: 362, or socketcall).
const NR_CONNECT: u64 = 42;
const NR_SENDTO: u64 = 44;
const NR_SENDMSG: u64 = 46;

/// True while the LSM socket_connect program holds connects.
#[inline(always)]
pub fn lsm_holds_connects() -> bool {
    crate::maps::mode(MODE_LSM_CONNECT)
}

/// True when this destination is a connect candidate: every entry of the
/// trie is held, whatever the port (see [`airlock_common::NetRule`]).
#[inline(always)]
pub fn net_candidate<const V6: bool>(event: &NetEvent) -> bool {
    let mut addr = event.addr;
    if !V6 {
        // IPv4 rules live in the trie as ::ffff:a.b.c.d.
        addr = [
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0xff,
            0xff,
            event.addr[0],
            event.addr[1],
            event.addr[2],
            event.addr[3],
        ];
    }
    NET_RULES.get(Key::new(128, addr)).is_some()
}

/// Publishes a connect's hold request (kind [`EventKind::ConnectHeld`])
/// with a forced wakeup: [`hold`]'s `publish` for both connect hooks.
#[inline(always)]
pub fn publish_connect(event: &NetEvent) -> bool {
    match EVENTS.reserve::<NetEvent>(0) {
        Some(mut slot) => {
            let mut held = *event;
            held.header.kind = EventKind::ConnectHeld as u32;
            slot.write(held);
            slot.submit(FORCE_WAKEUP);
            true
        }
        None => false,
    }
}

/// cgroup/connect4 (`__cgroup_bpf_run_filter_sock_addr` from inet_stream_connect
/// and udp connect): sees TCP and UDP connects with the socket's protocol,
/// which the syscall tracepoints cannot tell. Holds flagged connects
/// (bpf_send_signal is allowed here from Linux 6.18).
#[cgroup_sock_addr(connect4)]
pub fn net_connect4_hold(ctx: SockAddrContext) -> i32 {
    on_connect::<false, true>(&ctx)
}

/// cgroup/connect6: as `net_connect4_hold`, for IPv6.
#[cgroup_sock_addr(connect6)]
pub fn net_connect6_hold(ctx: SockAddrContext) -> i32 {
    on_connect::<true, true>(&ctx)
}

/// cgroup/connect4 for kernels that refuse bpf_send_signal in this program
/// type: records, denies, and refuses what it cannot hold.
#[cgroup_sock_addr(connect4)]
pub fn net_connect4(ctx: SockAddrContext) -> i32 {
    on_connect::<false, false>(&ctx)
}

/// cgroup/connect6: as `net_connect4`, for IPv6.
#[cgroup_sock_addr(connect6)]
pub fn net_connect6(ctx: SockAddrContext) -> i32 {
    on_connect::<true, false>(&ctx)
}

/// syscalls:sys_exit_connect (`long ret` at offset 16): pairs the outcome with
/// the connect the cgroup hook saw on this thread. Used where fexit cannot
/// load: a syscall tracepoint puts every syscall of every task on the slow
/// path.
#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn net_sys_exit_connect(ctx: TracePointContext) -> u32 {
    finish_connect(exit_ret(&ctx));
    0
}

/// syscalls:sys_exit_sendto: a TCP Fast Open connect (`sendto` with
/// `MSG_FASTOPEN`) ends here, not in connect(2).
#[tracepoint(category = "syscalls", name = "sys_exit_sendto")]
pub fn net_sys_exit_sendto(ctx: TracePointContext) -> u32 {
    finish_connect(exit_ret(&ctx));
    0
}

/// syscalls:sys_exit_sendmsg: as sendto.
#[tracepoint(category = "syscalls", name = "sys_exit_sendmsg")]
pub fn net_sys_exit_sendmsg(ctx: TracePointContext) -> u32 {
    finish_connect(exit_ret(&ctx));
    0
}

/// fexit/__x64_sys_connect: as `net_sys_exit_connect` (the syscall wrapper
/// takes the saved registers and returns the result).
#[fexit(function = "__x64_sys_connect")]
pub fn net_fexit_connect(ctx: FExitContext) -> u32 {
    finish_connect(ctx.arg(1));
    0
}

/// fexit/__x64_sys_sendto: as `net_sys_exit_sendto`.
#[fexit(function = "__x64_sys_sendto")]
pub fn net_fexit_sendto(ctx: FExitContext) -> u32 {
    finish_connect(ctx.arg(1));
    0
}

/// fexit/__x64_sys_sendmsg: as `net_sys_exit_sendmsg`.
#[fexit(function = "__x64_sys_sendmsg")]
pub fn net_fexit_sendmsg(ctx: FExitContext) -> u32 {
    finish_connect(ctx.arg(1));
    0
}

/// `long ret` of a syscalls:sys_exit_* tracepoint.
#[inline(always)]
fn exit_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: offset 16 is `long ret` in every syscalls:sys_exit_* format.
    unsafe { ctx.read_at(16) }.unwrap_or(NET_RET_UNKNOWN as i64)
}

#[inline(always)]
fn finish_connect(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { PENDING_CONNECT.get(pid_tgid) }) else {
        return;
    };
    let mut event = *pending;
    let _ = PENDING_CONNECT.remove(pid_tgid);
    event.ret = ret as i32;
    event.has_ret = 1;
    emit(&event);
}

/// Datagram sends to an explicit address (sendto/sendmsg on an unconnected
/// UDP socket, e.g. DNS queries): recorded once per destination per
/// process; to a connect candidate, held like a connect (once per
/// destination per process: the verdict covers the flow), unless the LSM
/// hook decided it already or this kernel cannot hold here (then refused).
/// Returns 1 to let the datagram go, 0 to refuse or hold it.
#[inline(always)]
fn on_sendmsg<const V6: bool, const HOLD: bool>(ctx: &SockAddrContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return 1;
    };
    let mut event = from_sock_addr::<V6>(ctx, EventKind::UdpSend, session_id);
    let flow = FlowKey::of(tgid, &event);
    if net_candidate::<V6>(&event) && !lsm_holds_connects() {
        // SAFETY: copied out at once.
        if let Some(v) = unsafe { FLOWS_DECIDED.get(flow) }.copied() {
            return (v == Verdict::Allow as u32) as i32;
        }
        if !HOLD {
            event.flags |= NET_DENIED | NET_HOLD_UNAVAILABLE;
            emit(&event);
            return 0;
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
                if v != Verdict::Allow as u32 {
                    event.flags |= NET_REFUSED;
                    emit(&event);
                    return 0;
                }
                event.flags |= NET_APPROVED;
            }
            None => match hold(key, session_id, EventKind::ConnectHeld, || {
                publish_connect(&event)
            }) {
                HoldOutcome::Held => {
                    // SAFETY: sets this syscall's return value: restart
                    // after the stop.
                    unsafe { bpf_set_retval(ERESTARTNOINTR) };
                    return 0;
                }
                HoldOutcome::Unpublished => return 0,
                HoldOutcome::Unrestartable => {
                    event.flags |= NET_HOLD_UNAVAILABLE | NET_DENIED;
                    emit(&event);
                    return 0;
                }
                HoldOutcome::FailOpen => event.flags |= NET_NO_DAEMON,
                HoldOutcome::FailClosed => {
                    event.flags |= NET_NO_DAEMON | NET_DENIED;
                    emit(&event);
                    return 0;
                }
            },
        }
    }
    // SAFETY: only the presence of the key is used.
    if unsafe { FLOWS_SEEN.get(flow) }.is_some() && event.flags == 0 {
        return 1;
    }
    let _ = FLOWS_SEEN.insert(flow, 1, 0);
    emit(&event);
    1
}

/// cgroup/sendmsg4 (udp_sendmsg with a destination address), holding
/// (Linux 6.18+).
#[cgroup_sock_addr(sendmsg4)]
pub fn net_sendmsg4_hold(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<false, true>(&ctx)
}

/// cgroup/sendmsg6: as `net_sendmsg4_hold`, for IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn net_sendmsg6_hold(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<true, true>(&ctx)
}

/// cgroup/sendmsg4 where the kernel refuses bpf_send_signal here.
#[cgroup_sock_addr(sendmsg4)]
pub fn net_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<false, false>(&ctx)
}

/// cgroup/sendmsg6: as `net_sendmsg4`, for IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn net_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg::<true, false>(&ctx)
}

/// syscalls:sys_enter_accept4 (`upeer_sockaddr` at offset 24): remembers where
/// the caller wants the peer address written.
#[tracepoint(category = "syscalls", name = "sys_enter_accept4")]
pub fn net_sys_enter_accept4(ctx: TracePointContext) -> u32 {
    // SAFETY: offset 24 is the second syscall argument in the format.
    on_accept_enter(unsafe { ctx.read_at(24) }.unwrap_or(0));
    0
}

/// syscalls:sys_enter_accept: as accept4.
#[tracepoint(category = "syscalls", name = "sys_enter_accept")]
pub fn net_sys_enter_accept(ctx: TracePointContext) -> u32 {
    // SAFETY: as above.
    on_accept_enter(unsafe { ctx.read_at(24) }.unwrap_or(0));
    0
}

/// syscalls:sys_exit_accept4: a successful accept, with the peer address the
/// kernel just wrote into the caller's buffer (when it passed one).
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn net_sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(exit_ret(&ctx));
    0
}

/// syscalls:sys_exit_accept: as accept4.
#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn net_sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(exit_ret(&ctx));
    0
}

/// fentry/__x64_sys_accept4: as `net_sys_enter_accept4`.
#[fentry(function = "__x64_sys_accept4")]
pub fn net_fentry_accept4(ctx: FEntryContext) -> u32 {
    on_accept_enter(read(ctx.arg(0), REGS_SI).unwrap_or(0));
    0
}

/// fentry/__x64_sys_accept: as `net_sys_enter_accept`.
#[fentry(function = "__x64_sys_accept")]
pub fn net_fentry_accept(ctx: FEntryContext) -> u32 {
    on_accept_enter(read(ctx.arg(0), REGS_SI).unwrap_or(0));
    0
}

/// fexit/__x64_sys_accept4: as `net_sys_exit_accept4`.
#[fexit(function = "__x64_sys_accept4")]
pub fn net_fexit_accept4(ctx: FExitContext) -> u32 {
    on_accept_exit(ctx.arg(1));
    0
}

/// fexit/__x64_sys_accept: as `net_sys_exit_accept`.
#[fexit(function = "__x64_sys_accept")]
pub fn net_fexit_accept(ctx: FExitContext) -> u32 {
    on_accept_exit(ctx.arg(1));
    0
}

#[inline(always)]
fn on_accept_enter(peer: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if session_of((pid_tgid >> 32) as u32).is_none() {
        return;
    }
    let _ = PENDING_ACCEPT.insert(pid_tgid, peer, 0);
}

#[inline(always)]
fn on_accept_exit(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let Some(peer) = (unsafe { PENDING_ACCEPT.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = PENDING_ACCEPT.remove(pid_tgid);
    let Some(session_id) = session_of((pid_tgid >> 32) as u32) else {
        return;
    };
    if ret < 0 {
        // Failed accepts (EAGAIN on a non-blocking listener) are not actions.
        return;
    }
    let mut event = NetEvent {
        header: header(EventKind::Accept, session_id),
        family: 0,
        protocol: IPPROTO_TCP,
        port: 0,
        _pad: 0,
        ret: ret as i32,
        has_ret: 1,
        addr: [0; 16],
        _pad2: 0,
        flags: 0,
        digest: 0,
    };
    if peer != 0 {
        // SAFETY: user memory reads that fail cleanly.
        let family: u16 = unsafe { bpf_probe_read_user(peer as *const u16) }.unwrap_or(0);
        // SAFETY: as above; sockaddr.sa_data starts with the port.
        let port: u16 = unsafe { bpf_probe_read_user((peer + 2) as *const u16) }.unwrap_or(0);
        event.port = u16::from_be(port);
        if family == AF_INET {
            // SAFETY: as above; sockaddr_in.sin_addr is at offset 4.
            if let Ok(a) = unsafe { bpf_probe_read_user((peer + 4) as *const [u8; 4]) } {
                event.addr[..4].copy_from_slice(&a);
                event.family = family;
            }
        } else if family == AF_INET6 {
            // SAFETY: as above; sockaddr_in6.sin6_addr is at offset 8.
            if let Ok(a) = unsafe { bpf_probe_read_user((peer + 8) as *const [u8; 16]) } {
                event.addr = a;
                event.family = family;
            }
        } else {
            // A Unix or other non-IP socket: not a network action.
            return;
        }
    }
    emit(&event);
}
