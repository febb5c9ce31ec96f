//! BPF LSM hooks: hold an action inside its syscall. The hook stops the
//! task (SIGSTOP) and returns -ERESTARTNOINTR; once the daemon has stored a
//! verdict and resumed the task, the kernel re-issues the syscall, the hook
//! consumes the verdict (one shot) and returns 0 or -EPERM. The caller sees
//! a syscall that took as long as the approval.

mod exec;
mod file;
mod net;
mod unix;

use airlock_common::{EventKind, HoldKey, LossReason, Verdict};
use aya_ebpf::maps::RingBuf;

use crate::{
    hold::{ERESTARTNOINTR, HoldOutcome, hold},
    maps::{EVENTS, FORCE_WAKEUP, count_loss, take_verdict},
};

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

/// An earlier LSM's denial (the hook's last argument) passes through
/// unchanged, clamped to the range the verifier accepts for LSM returns.
#[inline(always)]
fn earlier_denial(prev: i32) -> Option<i32> {
    (prev != 0).then(|| prev.clamp(-4095, 0))
}

/// The flag bits an event type marks its outcomes with.
struct Marks {
    held: u32,
    approved: u32,
    refused: u32,
    no_daemon: u32,
    denied: u32,
    unavailable: u32,
}

/// An event with its flags, as the hooks that share [`verdict_or_hold`]
/// fill it.
trait Flagged: Copy {
    fn flags(&mut self) -> &mut u32;
    fn session(&self) -> u64;
}

/// The one flow of a held action whose event is recorded by the hook
/// itself (files, Unix sockets): the thread's verdict for `key` if the
/// daemon left one (recorded as approved or refused), else a hold (the
/// request is the event, flagged held), or what the hold could not do
/// (io_uring: refused as not holdable; no daemon: the fail mode).
/// `decided` sees a verdict taken (a datagram flow remembers it).
#[inline(always)]
fn verdict_or_hold<E: Flagged>(
    pid: u32,
    key: HoldKey,
    kind: EventKind,
    ev: &mut E,
    m: &Marks,
    decided: impl FnOnce(u32),
) -> LsmVerdict {
    let (mark, verdict) = match take_verdict(pid, key, kind) {
        Some(v) => {
            decided(v);
            if v == Verdict::Allow as u32 {
                (m.approved, LsmVerdict::Allow)
            } else {
                (m.refused, LsmVerdict::Deny)
            }
        }
        None => {
            let session = ev.session();
            match hold(key, session, kind, || {
                *ev.flags() |= m.held;
                output(&*ev)
            }) {
                HoldOutcome::Held => return LsmVerdict::Hold,
                HoldOutcome::Unpublished => return LsmVerdict::Deny,
                HoldOutcome::Unrestartable => (m.unavailable | m.denied, LsmVerdict::Deny),
                HoldOutcome::FailOpen => (m.no_daemon, LsmVerdict::Allow),
                HoldOutcome::FailClosed => (m.no_daemon | m.denied, LsmVerdict::Deny),
            }
        }
    };
    *ev.flags() |= mark;
    if !output(&*ev) {
        count_loss(ev.session(), kind, LossReason::RingbufFull);
    }
    verdict
}

/// Sends `ev` with an immediate wakeup; false if the ring buffer is full.
#[inline(always)]
fn output<E>(ev: &E) -> bool {
    let ring: &RingBuf = &EVENTS;
    ring.output::<E>(ev, FORCE_WAKEUP).is_ok()
}
