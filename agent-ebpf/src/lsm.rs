//! BPF LSM hooks: hold an action inside its syscall. The hook stops the
//! task (SIGSTOP) and returns -ERESTARTNOINTR; once the daemon has stored a
//! verdict and resumed the task, the kernel re-issues the syscall, the hook
//! consumes the verdict (one shot) and returns 0 or -EPERM. The caller sees
//! a syscall that took as long as the approval.

use airlock_common::{
    EventKind, HoldKey, NET_APPROVED, NET_REFUSED, NET_RET_UNKNOWN, NetEvent, RuleAction, Verdict,
    net_digest,
};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::lsm, programs::LsmContext};

use crate::{
    maps::{HOLD_PENDING, LSM_APPROVED, VERDICTS, config, session_of},
    net::{ERESTARTNOINTR, PENDING_CONNECT, net_rule, publish_hold},
    task::{header, read},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EPERM: i32 = 1;

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

/// `int security_socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)`,
/// called from __sys_connect_file before the protocol's connect: holding
/// here stops connect(2) itself, before any packet leaves. On an internal
/// error it fails open (0): recording goes on in the cgroup hook.
#[lsm(hook = "socket_connect")]
pub fn lsm_socket_connect(ctx: LsmContext) -> i32 {
    // An earlier LSM's denial passes through unchanged, clamped to the
    // range the verifier accepts.
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return if prev < -4095 {
            -4095
        } else if prev > 0 {
            0
        } else {
            prev
        };
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
    let sock: u64 = ctx.arg(0);
    let address: u64 = ctx.arg(1);
    let family: u16 = read(address, 0)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(LsmVerdict::Allow);
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
        1 => 6,  // SOCK_STREAM: TCP
        2 => 17, // SOCK_DGRAM: UDP
        _ => 0,
    };
    let mut event = NetEvent {
        header: header(EventKind::Connect, session_id),
        family,
        protocol,
        port,
        _pad: 0,
        ret: NET_RET_UNKNOWN,
        has_ret: 0,
        addr,
        rule_id: 0,
        flags: 0,
        digest: 0,
    };
    let rule = if family == AF_INET {
        net_rule::<false>(&event)
    } else {
        net_rule::<true>(&event)
    };
    // Deny rules and unflagged connects are the cgroup hook's to record.
    let Some(rule) = rule.filter(|r| r.action == RuleAction::Hold as u32) else {
        return Ok(LsmVerdict::Allow);
    };
    event.rule_id = rule.rule_id;
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest: net_digest(family, protocol, port, &addr),
    };
    event.digest = key.digest;
    // SAFETY: copied out at once.
    match unsafe { VERDICTS.get(key) }.copied() {
        Some(v) => {
            let _ = VERDICTS.remove(key);
            let _ = HOLD_PENDING.remove(key);
            if v == Verdict::Allow as u32 {
                let _ = LSM_APPROVED.insert(pid_tgid, NET_APPROVED, 0);
                Ok(LsmVerdict::Allow)
            } else {
                // The cgroup hook will not run: record the refusal here.
                event.flags |= NET_REFUSED;
                let _ = PENDING_CONNECT.insert(pid_tgid, event, 0);
                Ok(LsmVerdict::Deny)
            }
        }
        None if publish_hold(event, key) => Ok(LsmVerdict::Hold),
        None => Ok(LsmVerdict::Deny),
    }
}
