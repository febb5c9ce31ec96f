//! The bottom floor: pure data. What the kernel's events become (records
//! of processes and their actions), what a held action becomes (an
//! approval request), and time. Nothing here does I/O or knows of an
//! actor; everything above builds on these types.
//!
//! May import: `airlock_common` only.

mod action;
mod record;
mod request;
mod time;

pub use action::{ActionKind, Decision, OnTimeout};
pub use record::{
    Detail, Enforcement, ExecFile, ExitStatus, FileOp, HoldInfo, PolicyLoad, Process, Protocol,
    Record,
};
pub use request::{
    Ancestor, Approval, ApprovalRequest, DecideError, EnvBinding, ExecContext, State,
};
pub use time::{Clock, monotonic_ns, wall_now_ns};
