//! BPF LSM hooks: hold an action inside its syscall. The hook stops the
//! task (SIGSTOP) and returns -ERESTARTNOINTR; once the daemon has stored a
//! verdict and resumed the task, the kernel re-issues the syscall, the hook
//! consumes the verdict (one shot) and returns 0 or -EPERM. The caller sees
//! a syscall that took as long as the approval.

mod exec;
mod file;
mod net;
mod unix;

use crate::hold::ERESTARTNOINTR;

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
