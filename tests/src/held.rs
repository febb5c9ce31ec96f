//! Helpers shared by the hold tests: waiting for `airlock run`, reading
//! process states, and asking the daemon what it can enforce here.

use std::{
    io::Read,
    process::Child,
    time::{Duration, Instant},
};

use crate::{Daemon, in_ci};

/// Waits for an `airlock run` child (at most 5 minutes, far beyond any
/// test under emulation, and within the VM's time limit); returns its
/// stdout.
pub fn finish(c: Child) -> String {
    finish_within(c, Duration::from_secs(300))
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

/// In the VM tier (AIRLOCK_EXPECT_LSM=1) the kernel runs BPF LSM: the
/// daemon must hold inside the syscalls there, not fall back.
pub fn expect_lsm(d: &Daemon) {
    if std::env::var("AIRLOCK_EXPECT_LSM").as_deref() != Ok("1") {
        return;
    }
    let status = d.status();
    let mode = status["mode"].as_str().unwrap_or_default();
    assert!(
        mode.starts_with("record and hold with BPF LSM"),
        "BPF LSM expected, daemon says: {status:#}\n{}",
        d.log()
    );
}

/// Whether one of the daemon's `can_enforce` lines starts with `prefix`.
pub fn enforces(d: &Daemon, prefix: &str) -> bool {
    d.status()["can_enforce"].as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s.as_str().unwrap_or("").starts_with(prefix))
    })
}

/// True when execve itself waits (BPF LSM): a refused exec then fails with
/// EPERM; otherwise the exec is stopped after the fact and refused by SIGKILL.
pub fn exec_held_in_syscall(d: &Daemon) -> bool {
    enforces(d, "exec hold: execve waits")
}

/// True when this daemon holds connects inside the syscall (BPF LSM, or the
/// cgroup hook from Linux 6.18). Otherwise says so loudly; fails in CI.
pub fn connects_held(d: &Daemon, test: &str) -> bool {
    let can_hold = enforces(d, "connect hold: the syscall waits");
    if !can_hold {
        let why = "this kernel cannot hold a connect (no BPF LSM, cgroup hook before 6.18)";
        assert!(
            !in_ci(),
            "{test}: cannot run and CI=true forbids skipping: {why}"
        );
        eprintln!("SKIPPED {test}: {why}");
    }
    can_hold
}
