//! What outlives one daemon, pinned in bpffs under the pin directory
//! (default `/sys/fs/bpf/airlock`):
//!
//! - `maps/`: the maps shared by every generation of the programs (see
//!   [`PINNED`]): session membership, verdicts, pending holds, the ring
//!   buffer, the loss counters, and the control array (active generation,
//!   heartbeat, fail mode).
//! - `links-N/`: the links of generation N's programs, so they stay
//!   attached when the daemon that loaded them exits or dies.
//!
//! A starting daemon loads generation N+1 on the same maps with its links
//! silent (the programs act only while the control array names their
//! generation), then switches the control array to N+1 and removes
//! `links-N`, which detaches the old programs: no gap, no double records.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use airlock_common::{
    CTL_CONTENT_SEED, CTL_DAEMON_PID, CTL_DIGEST_SEED, CTL_FAIL_OPEN, CTL_GENERATION,
    CTL_HEARTBEAT_NS, CTL_LAYOUT, CTL_STALE_NS, HoldKey, PIN_LAYOUT, SessionEntry,
};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::{ProgramError, links::FdLink},
};
use tracing::{info, warn};

use super::BpfError;
use crate::model::monotonic_ns;

/// Maps shared by every generation; the rest belong to one load.
pub const PINNED: &[&str] = &[
    "CONTROL",
    "SESSIONS",
    "VERDICTS",
    "HOLD_PENDING",
    "EVENTS",
    "LOSSES",
    "LOSS_TOTALS",
    // An exec let through by one generation's LSM hook is compared by
    // the next one's sched_process_exec during a takeover.
    "EXEC_DECIDED",
];

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a BPF filesystem (bpffs): set pin_dir to a directory under a bpffs mount such as /sys/fs/bpf"
    )]
    NotBpffs(PathBuf),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "another airlock daemon (pid {pid}) is running on the pins at {dir}: stop it, or give this one another pin_dir"
    )]
    InUse { pid: u32, dir: PathBuf },
    #[error(
        "this process is inside watched session {session} (the pins at {dir} say so): a daemon started there would watch, and hold, itself; start it outside any `airlock run`"
    )]
    InSession { session: u64, dir: PathBuf },
    #[error("pinned map {path}: {message}")]
    Map { path: PathBuf, message: String },
    #[error("writing slot {slot} of the pinned control array: {message}")]
    Control { slot: u32, message: String },
}

/// What an earlier daemon left in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// Nothing: this is the first load.
    Nothing,
    /// Maps this build can use, with their active generation.
    Reusable { generation: u64 },
}

/// The pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a shared map is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    fn links(&self, generation: u64) -> PathBuf {
        self.root.join(format!("links-{generation}"))
    }

    /// Whether the directory is (or would be created) on a bpffs mount.
    pub fn check_fs(&self) -> Result<(), PinError> {
        let existing = self
            .root
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        if on_bpffs(existing) {
            Ok(())
        } else {
            Err(PinError::NotBpffs(existing.to_path_buf()))
        }
    }

    /// Checks the directory and what is pinned there. Pins this build
    /// cannot use (another layout, another ring size) are released and
    /// removed, with a warning; the next generation number is kept going.
    pub fn prepare(&self, ring_bytes: u32, own_pid: u32) -> Result<(Previous, u64), PinError> {
        self.check_fs()?;
        let maps = self.root.join("maps");
        fs::create_dir_all(&maps).map_err(|error| PinError::Io {
            path: maps.clone(),
            error,
        })?;
        let _ = fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700));
        if !self.map("CONTROL").exists() {
            return Ok((Previous::Nothing, 0));
        }
        let control = self.control()?;
        let slot = |i: u32| control.get(&i, 0).unwrap_or(0);
        let owner = slot(CTL_DAEMON_PID) as u32;
        let fresh = monotonic_ns().saturating_sub(slot(CTL_HEARTBEAT_NS)) <= slot(CTL_STALE_NS);
        // SAFETY: kill(2) with signal 0 only checks that the pid exists.
        if owner != 0 && owner != own_pid && fresh && unsafe { libc::kill(owner as i32, 0) } == 0 {
            return Err(PinError::InUse {
                pid: owner,
                dir: self.root.clone(),
            });
        }
        let generation = slot(CTL_GENERATION);
        let layout = slot(CTL_LAYOUT);
        let ring = MapInfo::from_pin(self.map("EVENTS"))
            .map(|i| i.max_entries())
            .unwrap_or(0);
        let why = if layout != PIN_LAYOUT {
            Some(format!(
                "they have layout {layout}, this build uses {PIN_LAYOUT}"
            ))
        } else if ring != ring_bytes {
            Some(format!(
                "their ring buffer has {} KiB, ring_buffer_kib asks for {}",
                ring / 1024,
                ring_bytes / 1024
            ))
        } else {
            None
        };
        match why {
            None => {
                if let Some(session) = self.session_of(own_pid) {
                    return Err(PinError::InSession {
                        session,
                        dir: self.root.clone(),
                    });
                }
                Ok((Previous::Reusable { generation }, generation))
            }
            Some(why) => {
                warn!(
                    "pins under {} left by an earlier daemon cannot be reused ({why}): releasing their holds and starting afresh",
                    self.root.display()
                );
                self.unload()?;
                fs::create_dir_all(&maps).map_err(|error| PinError::Io {
                    path: maps.clone(),
                    error,
                })?;
                Ok((Previous::Nothing, generation))
            }
        }
    }

    /// The session the pinned programs watch `pid` in, if any. (The
    /// programs never exempt the daemon by its pid, which another process
    /// may get once the daemon is gone: the daemon is never in a session.)
    fn session_of(&self, pid: u32) -> Option<u64> {
        let data = MapData::from_pin(self.map("SESSIONS")).ok()?;
        let map = Map::from_map_data(data).ok()?;
        let sessions: HashMap<MapData, u32, SessionEntry> = HashMap::try_from(map).ok()?;
        sessions.get(&pid, 0).ok().map(|e| e.session_id)
    }

    /// The pinned control array.
    pub fn control(&self) -> Result<Array<MapData, u64>, PinError> {
        let path = self.map("CONTROL");
        let err = |message: String| PinError::Map {
            path: path.clone(),
            message,
        };
        let data = MapData::from_pin(&path).map_err(|e| err(e.to_string()))?;
        let map = Map::from_map_data(data).map_err(|e| err(e.to_string()))?;
        Array::try_from(map).map_err(|e| err(e.to_string()))
    }

    /// A collector that pins generation `generation`'s links.
    pub fn link_pins(&self, generation: u64) -> Result<LinkPins, PinError> {
        let dir = self.links(generation);
        // Left by a load of the same generation that failed half way.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|error| PinError::Io {
            path: dir.clone(),
            error,
        })?;
        Ok(LinkPins {
            dir,
            attached: Vec::new(),
        })
    }

    /// Removes a generation's links after its load failed half way.
    pub fn drop_links(&self, generation: u64) {
        let _ = fs::remove_dir_all(self.links(generation));
    }

    /// Removes the links of every generation but `keep`, which detaches
    /// their programs (nothing else holds them once their daemon is gone).
    pub fn retire_links(&self, keep: u64) {
        let keep = self.links(keep);
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_links = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("links-"));
            if is_links && path != keep {
                if let Err(e) = fs::remove_dir_all(&path) {
                    warn!("removing {}: {e}", path.display());
                } else {
                    info!("detached the programs pinned at {}", path.display());
                }
            }
        }
    }

    /// Ends enforcement: marks the daemon gone (heartbeat 0), so every
    /// held task that runs again meets the fail mode, resumes the tasks
    /// held inside a syscall (they re-issue it and get the fail mode's
    /// answer at once), then removes every pin, which detaches the
    /// programs and frees the maps. Returns how many tasks were resumed.
    pub fn unload(&self) -> Result<usize, PinError> {
        if !self.root.exists() {
            return Ok(0);
        }
        let mut resumed = 0;
        if let Ok(mut control) = self.control() {
            let _ = control.set(CTL_HEARTBEAT_NS, 0, 0);
            resumed = self.resume_pending();
        }
        fs::remove_dir_all(&self.root).map_err(|error| PinError::Io {
            path: self.root.clone(),
            error,
        })?;
        Ok(resumed)
    }

    /// SIGCONT to every task with a published hold (pins of layout 3 and
    /// before mark holds with a u8, later ones with the start time).
    fn resume_pending(&self) -> usize {
        self.resume_marked::<u64>()
            .or_else(|| self.resume_marked::<u8>())
            .unwrap_or(0)
    }

    /// [`Self::resume_pending`] for marks of type `V`; None when the map
    /// is missing or has other values.
    fn resume_marked<V: aya::Pod>(&self) -> Option<usize> {
        let data = MapData::from_pin(self.map("HOLD_PENDING")).ok()?;
        let map = Map::from_map_data(data).ok()?;
        let pending = HashMap::<_, HoldKey, V>::try_from(map).ok()?;
        let mut resumed = Vec::new();
        for key in pending.keys().flatten() {
            // SAFETY: kill(2) with a plain pid and signal number.
            if unsafe { libc::kill(key.tgid as i32, libc::SIGCONT) } == 0 {
                resumed.push(key);
            }
        }
        // The programs must still be attached when the tasks re-issue their
        // syscalls (the fail mode answers there and drops the entry); only
        // then may the pins go. A task stopped again by someone else is not
        // waited for long.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while resumed.iter().any(|k| pending.get(k, 0).is_ok())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Some(resumed.len())
    }
}

/// Writes the daemon's settings and heartbeat into the control array and
/// makes `generation` the active one.
pub fn activate(
    control: &mut Array<MapData, u64>,
    generation: u64,
    stale_ns: u64,
    fail_open: bool,
    pid: u32,
) -> Result<(), PinError> {
    let set = |c: &mut Array<MapData, u64>, slot: u32, v: u64| {
        c.set(slot, v, 0).map_err(|e| PinError::Control {
            slot,
            message: e.to_string(),
        })
    };
    set(control, CTL_LAYOUT, PIN_LAYOUT)?;
    set(control, CTL_STALE_NS, stale_ns)?;
    set(control, CTL_FAIL_OPEN, u64::from(fail_open))?;
    set(control, CTL_DAEMON_PID, u64::from(pid))?;
    set(control, CTL_HEARTBEAT_NS, monotonic_ns())?;
    // One secret per set of pinned maps: pending holds keep their
    // digests across a daemon restart.
    for slot in [CTL_DIGEST_SEED, CTL_CONTENT_SEED] {
        if control.get(&slot, 0).unwrap_or(0) == 0 {
            set(control, slot, random_seed()?)?;
        }
    }
    set(control, CTL_GENERATION, generation)
}

/// A fresh, non-zero random seed (the digest and content keys).
fn random_seed() -> Result<u64, PinError> {
    use std::io::Read;
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|error| PinError::Io {
            path: PathBuf::from("/dev/urandom"),
            error,
        })?;
    Ok(u64::from_ne_bytes(b).max(1))
}

/// Writes a heartbeat into the control array: the kernel side holds
/// flagged actions only while the last beat is fresh.
pub fn beat(control: &mut Array<MapData, u64>) -> Result<(), aya::maps::MapError> {
    control.set(CTL_HEARTBEAT_NS, monotonic_ns(), 0)
}

/// Pins one generation's links as they are attached, and says what was.
pub struct LinkPins {
    dir: PathBuf,
    /// Programs attached, in words (for `airlock status`).
    pub attached: Vec<String>,
}

impl LinkPins {
    /// Pins a link just taken from program `name` under its name; from
    /// then on it stays attached until its pin is removed.
    pub fn keep<L>(
        &mut self,
        name: &'static str,
        link: Result<L, ProgramError>,
        what: String,
    ) -> Result<(), BpfError>
    where
        L: TryInto<FdLink>,
        L::Error: std::error::Error,
    {
        let link: FdLink = link
            .map_err(|e| BpfError::program(name, e))?
            .try_into()
            .map_err(|e| BpfError::program(name, e))?;
        link.pin(self.dir.join(name))
            .map_err(|e| BpfError::program(name, e))?;
        self.attached.push(what);
        Ok(())
    }
}

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
