//! What the broker needs to know of a held process, read from /proc while
//! it is stopped, and the signals that resume or end it.

use serde::{Deserialize, Serialize};

/// One process of a held task's ancestry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

/// (state letter, ppid, start time in clock ticks) from /proc/PID/stat.
pub fn stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, ppid, start))
}

/// The process's start time, which tells it apart from a later process
/// that reuses its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.2)
}

/// The chain of parents from `pid` up to init (at most 16).
pub fn ancestry(pid: u32) -> Vec<Ancestor> {
    let mut out = Vec::new();
    let mut p = pid;
    while p > 0 && out.len() < 16 {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let exe = std::fs::read_link(format!("/proc/{p}/exe"))
            .ok()
            .map(|e| e.display().to_string());
        out.push(Ancestor { pid: p, comm, exe });
        p = match stat(p) {
            Some((_, ppid, _)) => ppid,
            None => break,
        };
    }
    out
}

/// Sends `sig` to `pid` if it is still the process that started at `start`.
pub fn signal_if_same(pid: u32, start: u64, sig: i32) -> Result<(), String> {
    match start_time(pid) {
        Some(s) if s == start => {}
        Some(_) => return Err(format!("pid {pid} now belongs to another process")),
        None => return Err(format!("process {pid} is gone")),
    }
    // SAFETY: kill has no memory effects; the pid was checked just above.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        return Err(format!(
            "signal {sig} to {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let (state, ppid, start) = stat(me).unwrap();
        assert!(matches!(state, 'R' | 'S'));
        assert!(ppid > 0 && start > 0);
        let chain = ancestry(me);
        assert_eq!(chain[0].pid, me);
        assert!(chain.len() >= 2, "{chain:?}");
        assert!(
            signal_if_same(me, start + 1, 0)
                .unwrap_err()
                .contains("another process")
        );
        assert!(signal_if_same(me, start, 0).is_ok());
    }
}
