//! Helpers shared by the hold tests: waiting for `airlock run`, reading
//! process states, and asking the daemon what it can enforce here.

use std::{
    io::Read,
    process::Child,
    time::{Duration, Instant},
};

use crate::{Daemon, scaled};

/// Waits for an `airlock run` child (at most 5 minutes, far beyond any
/// test under emulation, and within the VM's time limit); returns its
/// stdout.
pub fn finish(c: Child) -> String {
    finish_within(c, scaled(Duration::from_secs(100)))
}

/// Waits for an `airlock run` child at most `limit` (killing it after);
/// returns its stdout and insists it succeeded.
pub fn finish_within(mut c: Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let st = loop {
        if let Some(st) = c.try_wait().expect("wait airlock run") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("airlock run still running after {limit:?}: a hold nobody answers?");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(st.success(), "airlock run failed: {st}\n{out}\n{err}");
    out
}

/// The actor's own line comes last, after what the held program printed.
pub fn last(out: &str) -> &str {
    out.lines().last().unwrap_or("").trim()
}

/// The state letter of a process (`T` when stopped), `?` when gone.
pub fn state_of(pid: u64) -> char {
    airlock::procfs::stat(pid as u32).map_or('?', |s| s.state)
}

/// Whether the kernel under test runs BPF LSM, from the environment and
/// never from the daemon under test: the VM tier sets
/// `AIRLOCK_EXPECT_LSM=1` on kernels booted with `bpf` in `lsm=` and `0` on
/// those booted without; unset means this project's development host,
/// which refuses LSM programs.
pub fn lsm_expected() -> bool {
    std::env::var("AIRLOCK_EXPECT_LSM").as_deref() == Ok("1")
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (n.next().unwrap_or(0), n.next().unwrap_or(0))
}

/// Whether a connect can be held inside the syscall here: BPF LSM, or the
/// cgroup connect hook, which may stop a task from Linux 6.18 on.
pub fn connect_hold_expected() -> bool {
    lsm_expected() || kernel_version() >= (6, 18)
}

/// True when execve itself waits (BPF LSM): a refused exec then fails with
/// EPERM; otherwise the exec is stopped after the fact and refused by SIGKILL.
pub fn exec_held_in_syscall() -> bool {
    lsm_expected()
}

/// What the actor prints for a refused exec here.
pub fn refused_exec() -> &'static str {
    if exec_held_in_syscall() {
        "error:1"
    } else {
        "signal:9"
    }
}

/// The daemon says it runs in the mode this kernel calls for: with BPF LSM
/// where it is active, with the fallbacks where it is not, and it holds
/// connects exactly where they can be held.
pub fn expect_lsm(d: &Daemon) {
    let status = d.status();
    let mode = status["mode"].as_str().unwrap_or_default();
    assert_eq!(
        mode.starts_with("record and hold with BPF LSM"),
        lsm_expected(),
        "BPF LSM expected here: {}; the daemon says: {status:#}\n{}",
        lsm_expected(),
        d.log()
    );
    assert_eq!(
        enforces(d, "connect hold: the syscall waits"),
        connect_hold_expected(),
        "connect holds expected here: {}; the daemon says: {status:#}",
        connect_hold_expected()
    );
}

/// Whether one of the daemon's `can_enforce` lines starts with `prefix`.
fn enforces(d: &Daemon, prefix: &str) -> bool {
    d.status()["can_enforce"].as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s.as_str().unwrap_or("").starts_with(prefix))
    })
}

/// True when connects can be held here (see [`connect_hold_expected`]).
/// Otherwise says so loudly; fails in CI, where the tier does not run
/// such a test on a kernel that cannot hold connects.
pub fn connects_held(test: &str) -> bool {
    let can_hold = connect_hold_expected();
    if !can_hold {
        crate::skip(
            test,
            "this kernel cannot hold a connect (no BPF LSM, cgroup hook before 6.18)",
        );
    }
    can_hold
}
