//! What the daemon reads of other processes in /proc (state, parent,
//! start time, working directory, executable, groups, ancestry), and the
//! signal that resumes or ends a held one, sent only to the process that
//! was held (checked by its start time against pid reuse).

use std::path::PathBuf;

use crate::model::Ancestor;

/// Fields of `/proc/PID/stat` the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// State letter: R, S, D, T (stopped), t (traced), Z, ...
    pub state: char,
    pub ppid: u32,
    /// Start time in clock ticks since boot: tells a process apart from a
    /// later one that reuses its pid.
    pub start_time: u64,
}

impl Stat {
    /// Stopped by a signal (or a tracer).
    pub fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// Why a signal was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("process {0} is gone")]
    Gone(u32),
    #[error("pid {0} now belongs to another process")]
    Reused(u32),
    #[error("signal {sig} to {pid}: {error}")]
    Kill { pid: u32, sig: i32, error: String },
}

/// `/proc/PID/stat`, or None when the process is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: the fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// The process's start time (see [`Stat::start_time`]).
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// The process's working directory.
pub fn cwd(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The process's executable.
pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Whether the process has `gid` as its real, effective or a
/// supplementary group (SO_PEERCRED carries only the first).
pub fn in_group(pid: u32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        (l.starts_with("Groups:") || l.starts_with("Gid:"))
            && l.split_whitespace().skip(1).any(|g| g.parse() == Ok(gid))
    })
}

/// The chain of parents from `pid` up to init (at most 16).
pub fn ancestry(pid: u32) -> Vec<Ancestor> {
    let mut out = Vec::new();
    let mut p = pid;
    while p > 0 && out.len() < 16 {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let exe = exe(p).map(|e| e.display().to_string());
        out.push(Ancestor { pid: p, comm, exe });
        p = match stat(p) {
            Some(s) => s.ppid,
            None => break,
        };
    }
    out
}

/// Whether `pid` is still the process that started at `start` (not gone,
/// not a later process that reuses its pid).
pub fn is_same(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// Lets an exec stopped before its first instruction run (SIGCONT), or
/// kills it (SIGKILL), if it is still the process that started at
/// `start`; says what the process saw.
pub fn release_new_image(pid: u32, start: u64, allow: bool) -> Result<&'static str, SignalError> {
    let (sig, seen) = if allow {
        (libc::SIGCONT, "resumed: the program runs")
    } else {
        (
            libc::SIGKILL,
            "killed (SIGKILL) before its first instruction",
        )
    };
    signal_if_same(pid, start, sig).map(|()| seen)
}

/// [`is_same`], or why not.
pub fn check_same(pid: u32, start: u64) -> Result<(), SignalError> {
    match start_time(pid) {
        Some(s) if s == start => Ok(()),
        Some(_) => Err(SignalError::Reused(pid)),
        None => Err(SignalError::Gone(pid)),
    }
}

/// Sends `sig` to `pid` if it is still the process that started at `start`.
pub fn signal_if_same(pid: u32, start: u64, sig: i32) -> Result<(), SignalError> {
    check_same(pid, start)?;
    // SAFETY: kill has no memory effects; the pid was checked just above.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        return Err(SignalError::Kill {
            pid,
            sig,
            error: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(matches!(s.state, 'R' | 'S'));
        assert!(s.ppid > 0 && s.start_time > 0);
        let chain = ancestry(me);
        assert_eq!(chain[0].pid, me);
        assert!(chain.len() >= 2, "{chain:?}");
        assert_eq!(
            signal_if_same(me, s.start_time + 1, 0),
            Err(SignalError::Reused(me))
        );
        assert!(signal_if_same(me, s.start_time, 0).is_ok());
        assert!(cwd(me).is_some() && exe(me).is_some());
        // SAFETY: getgid has no preconditions.
        assert!(in_group(me, unsafe { libc::getgid() }));
    }
}
