//! Time: the kernel stamps events with CLOCK_MONOTONIC, the store keeps
//! wall-clock ns since the epoch.

/// Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns, measured once.
    offset_ns: i64,
}

impl Clock {
    pub fn now() -> Self {
        let rt = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: rt - mono,
        }
    }

    pub fn fixed(offset_ns: i64) -> Self {
        Self { offset_ns }
    }

    pub fn wall(&self, mono_ns: u64) -> i64 {
        (mono_ns as i64).saturating_add(self.offset_ns)
    }
}

/// Now, in wall-clock ns since the epoch.
pub fn wall_now_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC).max(0) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer; these clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}
