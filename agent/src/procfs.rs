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

/// The environment of a process stopped before its new image's first
/// instruction (`/proc/PID/environ`, the kernel's copy): at most `max`
/// bytes, and whether it was longer.
pub fn environ(pid: u32, max: usize) -> Option<(Vec<u8>, bool)> {
    use std::io::Read as _;
    let f = std::fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut bytes = Vec::new();
    f.take(max as u64 + 1).read_to_end(&mut bytes).ok()?;
    let cut = bytes.len() > max;
    bytes.truncate(max);
    Some((bytes, cut))
}

/// The environment a thread held inside execve passes to it: the `envp`
/// its registers hold (`/proc/TID/syscall`), read from its memory. At
/// most `max` bytes of its NUL-terminated strings, and whether there was
/// more. None when the thread is not in an execve or cannot be read.
pub fn execve_environ(tid: u32, max: usize) -> Option<(Vec<u8>, bool)> {
    // The thread may still be on its way to its stop: the file says
    // "running" until it is off the CPU.
    let mut fields = Vec::new();
    for _ in 0..50 {
        let text = std::fs::read_to_string(format!("/proc/{tid}/syscall")).ok()?;
        fields = text.split_whitespace().map(String::from).collect();
        if fields.first().is_some_and(|f| f != "running") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let arg = |i: usize| u64::from_str_radix(fields.get(i + 1)?.trim_start_matches("0x"), 16).ok();
    // x86_64 execve (59) and execveat (322); an `int $0x80` caller's
    // execve (11) and execveat (358), and an x32 caller's (520 and 545 with
    // bit 30), pass arrays of 32-bit pointers.
    let (envp, word) = match fields.first()?.as_str() {
        "59" => (arg(2)?, 8),
        "322" => (arg(3)?, 8),
        "11" => (arg(2)?, 4),
        "358" => (arg(3)?, 4),
        "1073742344" => (arg(2)?, 4),
        "1073742369" => (arg(3)?, 4),
        _ => return None,
    };
    let mem = std::fs::File::open(format!("/proc/{tid}/mem")).ok()?;
    read_strings(&mem, envp, word, max)
}

/// The NUL-terminated strings a NULL-terminated array of `word`-byte
/// pointers at `at` points to, in `mem`: at most `max` bytes, and whether
/// there was more.
fn read_strings(mem: &std::fs::File, at: u64, word: u64, max: usize) -> Option<(Vec<u8>, bool)> {
    use std::os::unix::fs::FileExt as _;
    let mut out = Vec::new();
    for i in 0..(max as u64 + 1) {
        let mut w = [0u8; 8];
        mem.read_exact_at(&mut w[..word as usize], at + i * word)
            .ok()?;
        let p = u64::from_le_bytes(w);
        if p == 0 {
            return Some((out, false));
        }
        // The string, a chunk at a time (the next page may be unmapped).
        let mut s = p;
        loop {
            let mut chunk = [0u8; 256];
            let n = mem.read_at(&mut chunk, s).ok()?;
            if n == 0 {
                return None;
            }
            let end = chunk[..n].iter().position(|&b| b == 0);
            let take = end.map_or(n, |e| e + 1);
            out.extend_from_slice(&chunk[..take]);
            if out.len() > max {
                out.truncate(max);
                return Some((out, true));
            }
            if end.is_some() {
                break;
            }
            s += n as u64;
        }
    }
    Some((out, true))
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
    fn strings_behind_a_pointer_array_are_read_whole_or_cut() {
        let strings = [c"A=1", c"LD_PRELOAD=/x.so", c"B="];
        let ptrs: Vec<u64> = strings
            .iter()
            .map(|s| s.as_ptr() as u64)
            .chain([0])
            .collect();
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let at = ptrs.as_ptr() as u64;
        let (bytes, cut) = read_strings(&mem, at, 8, 4096).unwrap();
        assert_eq!(
            (bytes.as_slice(), cut),
            (&b"A=1\0LD_PRELOAD=/x.so\0B=\0"[..], false)
        );
        let (bytes, cut) = read_strings(&mem, at, 8, 6).unwrap();
        assert_eq!((bytes.as_slice(), cut), (&b"A=1\0LD"[..], true));
        // Exactly the limit: whole.
        let (_, cut) = read_strings(&mem, at, 8, 24).unwrap();
        assert!(!cut);
        // 32-bit pointers: an array below 4 GiB is not at hand here, so
        // only the NULL terminator is tried.
        let zero = [0u32; 2];
        let (bytes, cut) = read_strings(&mem, zero.as_ptr() as u64, 4, 64).unwrap();
        assert!(bytes.is_empty() && !cut);
    }

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
