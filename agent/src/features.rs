//! Kernel feature detection, done once and shared by the daemon's start-up
//! and the test guards.

use std::{path::Path, sync::OnceLock};

use serde::Serialize;

/// What this kernel offers Airlock.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Features {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// BTF at /sys/kernel/btf/vmlinux: needed for the tp_btf programs and the
    /// field offsets.
    pub btf: bool,
    /// "bpf" is in the active LSM list. Listed is not the same as usable:
    /// some kernels list it yet refuse LSM programs (this project's
    /// development host does); holding syscalls needs both.
    pub bpf_lsm: bool,
    /// The LSM list as read from securityfs (empty when unreadable).
    pub lsm_list: String,
    /// bpffs is mounted at /sys/fs/bpf.
    pub bpffs: bool,
    /// tracefs is mounted (the syscall tracepoints need it).
    pub tracefs: bool,
    /// Where the cgroup v2 hierarchy is mounted, if anywhere.
    pub cgroup2: Option<String>,
    /// Running as root (loading programs needs it).
    pub root: bool,
    /// Filesystems this process mounted to get there.
    pub mounted: Vec<String>,
}

impl Features {
    /// The mode the daemon runs in, in words.
    pub fn mode(&self) -> &'static str {
        if self.bpf_lsm {
            "record and hold without BPF LSM (listed as active, but the kernel refused its programs): execs held at sched_process_exec, connects in the cgroup hook"
        } else {
            "record and hold without BPF LSM (not active): execs held at sched_process_exec, connects in the cgroup hook"
        }
    }

    /// Why programs cannot be loaded here, if they cannot.
    pub fn missing(&self) -> Option<String> {
        if !self.root {
            return Some("airlock needs root to load its kernel programs".into());
        }
        if !self.btf {
            return Some(
                "the kernel has no BTF (/sys/kernel/btf/vmlinux): build it with CONFIG_DEBUG_INFO_BTF=y".into(),
            );
        }
        if self.cgroup2.is_none() {
            return Some(
                "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)".into(),
            );
        }
        if !self.tracefs {
            return Some("tracefs is not mounted and could not be (mount -t tracefs tracefs /sys/kernel/tracing)".into());
        }
        None
    }
}

static FEATURES: OnceLock<Features> = OnceLock::new();

/// Detects the features once per process, mounting securityfs, bpffs and
/// tracefs when they are absent and we are root.
pub fn detect() -> &'static Features {
    FEATURES.get_or_init(probe)
}

fn probe() -> Features {
    let root = unsafe_geteuid() == 0;
    let mut mounted = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ensure = |fstype: &str, target: &str| -> bool {
        if is_mounted(&mounts, fstype, target) {
            return true;
        }
        if !root {
            return false;
        }
        if mount(fstype, target) {
            mounted.push(format!("{fstype} on {target}"));
            true
        } else {
            // Another process (a second airlock command starting at the
            // same moment) may have mounted it meanwhile.
            let now = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            is_mounted(&now, fstype, target)
        }
    };
    let securityfs = ensure("securityfs", "/sys/kernel/security");
    let bpffs = ensure("bpf", "/sys/fs/bpf");
    let tracefs = ensure("tracefs", "/sys/kernel/tracing")
        || Path::new("/sys/kernel/debug/tracing/events").exists();
    let lsm_list = if securityfs {
        std::fs::read_to_string("/sys/kernel/security/lsm")
            .unwrap_or_default()
            .trim()
            .to_string()
    } else {
        String::new()
    };
    let bpf_lsm = lsm_list.split(',').any(|l| l == "bpf");
    let cgroup2 = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, t, ty) = (f.next(), f.next(), f.next());
        (ty == Some("cgroup2")).then(|| t.unwrap_or_default().to_string())
    });
    Features {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        bpf_lsm,
        lsm_list,
        bpffs,
        tracefs,
        cgroup2,
        root,
        mounted,
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `/proc/self/mounts` text lists `fstype` mounted on `target`.
fn is_mounted(mounts: &str, fstype: &str, target: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, t, ty) = (f.next(), f.next(), f.next());
        t == Some(target) && ty == Some(fstype)
    })
}

fn mount(fstype: &str, target: &str) -> bool {
    let (Ok(src), Ok(tgt), Ok(ty)) = (
        std::ffi::CString::new(fstype),
        std::ffi::CString::new(target),
        std::ffi::CString::new(fstype),
    ) else {
        return false;
    };
    // SAFETY: valid NUL-terminated strings and a null data pointer.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    rc == 0
}
