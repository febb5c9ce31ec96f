//! Types shared by the kernel programs (`airlock-ebpf`) and the daemon.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a
//! compile-time size assertion, because the kernel writes these bytes and
//! userspace reads them back with `read_unaligned`. Numbers that reach the
//! store (event kinds, loss reasons) are kept forever: never renumber or reuse.
#![no_std]

use core::mem::size_of;

/// Longest executable path recorded, including the NUL; longer ones are cut
/// and flagged with [`EXEC_FILENAME_TRUNCATED`].
pub const FILENAME_MAX: usize = 512;
/// Bytes of argv recorded in all (NUL-separated, as the kernel lays them out);
/// more is cut and flagged with [`EXEC_ARGS_TRUNCATED`].
pub const ARGS_MAX: usize = 4096;

/// The argv was longer than [`ARGS_MAX`] and was cut.
pub const EXEC_ARGS_TRUNCATED: u32 = 1 << 0;
/// The path was longer than [`FILENAME_MAX`] and was cut.
pub const EXEC_FILENAME_TRUNCATED: u32 = 1 << 1;
/// The argv could not be read from the new image's memory.
pub const EXEC_ARGS_UNREADABLE: u32 = 1 << 2;
/// A hold rule matched: the process was stopped before its first
/// instruction and waits for a decision.
pub const EXEC_HELD: u32 = 1 << 3;
/// A deny rule matched: killed before its first instruction, or (BPF LSM)
/// execve failed with EPERM.
pub const EXEC_DENIED: u32 = 1 << 4;
/// Held inside execve by the BPF LSM hook (resumed through a verdict).
pub const EXEC_HELD_IN_SYSCALL: u32 = 1 << 5;
/// A verdict refused a held execve: it failed with EPERM.
pub const EXEC_REFUSED: u32 = 1 << 6;
/// A hold rule matched while no daemon was alive (stale heartbeat): the
/// fail mode decided instead of a human (with [`EXEC_DENIED`] when closed).
pub const EXEC_NO_DAEMON: u32 = 1 << 7;
/// The file the kernel opened could not be read (its identity is zero):
/// the exec is a candidate, and the daemon refuses it unless a rule holds it.
pub const EXEC_FILE_UNKNOWN: u32 = 1 << 8;
/// With BPF LSM: the argv (or, for an approved exec, the environment) the
/// new image received is not the one the exec was decided on (a sibling
/// thread rewrote the caller's memory while execve copied it). Killed
/// before its first instruction, with [`EXEC_DENIED`]; the event carries
/// the argv that would have run.
pub const EXEC_CHANGED: u32 = 1 << 9;

/// The connect was refused without a human's verdict (the caller got
/// EPERM): by the fail mode ([`NET_NO_DAEMON`]) or because it could not be
/// held ([`NET_HOLD_UNAVAILABLE`]). The kernel has no connect deny rules.
pub const NET_DENIED: u32 = 1 << 0;
/// A hold rule matched and a verdict let this connect through.
pub const NET_APPROVED: u32 = 1 << 1;
/// A hold rule matched and a verdict refused this connect (EPERM).
pub const NET_REFUSED: u32 = 1 << 2;
/// A hold rule matched on a kernel that cannot hold a connect from the
/// cgroup hook (no bpf_send_signal there, before Linux 6.18): refused.
pub const NET_HOLD_UNAVAILABLE: u32 = 1 << 3;
/// A hold rule matched while no daemon was alive (stale heartbeat): the
/// fail mode decided instead of a human (with [`NET_DENIED`] when closed).
pub const NET_NO_DAEMON: u32 = 1 << 4;

/// Longest opened path recorded, including the NUL; a longer one is
/// replaced by the file's own name and flagged with [`FILE_PATH_TRUNCATED`].
pub const FILE_PATH_MAX: usize = 512;
/// Bytes of a file or directory name the kernel hashes for the file
/// candidate map; a longer name is never a candidate.
pub const FILE_NAME_HASHED: usize = 64;

/// The file was opened for writing (`FMODE_WRITE`: write-only or read-write).
pub const FILE_WRITE: u32 = 1 << 0;
/// A candidate open: the process was stopped inside open(2) and waits for
/// a decision (the open is re-issued once decided).
pub const FILE_HELD: u32 = 1 << 1;
/// A verdict let a held open through.
pub const FILE_APPROVED: u32 = 1 << 2;
/// A verdict refused a held open: it failed with EPERM.
pub const FILE_REFUSED: u32 = 1 << 3;
/// A candidate open while no daemon was alive (stale heartbeat): the fail
/// mode decided instead of a human (with [`FILE_DENIED`] when closed).
pub const FILE_NO_DAEMON: u32 = 1 << 4;
/// The open failed with EPERM without a human's verdict (fail closed).
pub const FILE_DENIED: u32 = 1 << 5;
/// The path did not fit in [`FILE_PATH_MAX`] bytes: only the file's own
/// name was recorded.
pub const FILE_PATH_TRUNCATED: u32 = 1 << 6;
/// Refused: a hold rule's candidate, in a syscall that would not be
/// re-issued after a hold (io_uring).
pub const FILE_HOLD_UNAVAILABLE: u32 = 1 << 7;

/// Value bit of the file candidate map: a file with this name is a candidate.
pub const FILE_CAND_NAME: u32 = 1;
/// Value bit of the file candidate map: every file in a directory with this
/// name is a candidate.
pub const FILE_CAND_DIR: u32 = 2;

/// Entries of the file candidate map by inode: the files a policy's path
/// patterns name on this host ([`FILE_CAND_NAME`]) and the directories
/// whose every file is a candidate ([`FILE_CAND_DIR`]), looked up by the
/// daemon when the policy loads and every few seconds after.
pub const FILE_INODES_MAX: u32 = 16384;

/// Slot of the mode array that is 1 while the LSM socket_connect program
/// holds connects (the cgroup hook then leaves hold rules to it).
pub const MODE_LSM_CONNECT: u32 = 0;
/// Slot of the mode array that is 1 while the LSM bprm_creds_for_exec
/// program holds execs (sched_process_exec then only records).
pub const MODE_LSM_EXEC: u32 = 1;

/// Slot of the mode array that is 1 while every exec of a watched session
/// is a candidate (a policy rule names no executable).
pub const MODE_EXEC_ALL: u32 = 2;
/// Slot of the mode array that is 1 while set-user-ID and set-group-ID
/// executables are candidates.
pub const MODE_EXEC_SETUID: u32 = 3;

/// Mode slot: every Unix socket connect of a watched session is a
/// candidate (a rule names sockets by a pattern the kernel cannot look up).
pub const MODE_UNIX_ALL: u32 = 4;

/// Mode slot: a Unix socket connect to a server outside the acting
/// session is a candidate (a rule uses `outside_session`).
pub const MODE_UNIX_OUTSIDE: u32 = 5;

/// Slots of the mode array.
pub const MODE_SLOTS: u32 = 8;

/// Slots of the pinned control array (`u64` values), shared by every
/// generation of the programs and written by the daemon.
/// The generation whose programs act; programs of any other generation
/// (an old daemon's links during a hand-over) do nothing.
pub const CTL_GENERATION: u32 = 0;
/// CLOCK_MONOTONIC ns of the daemon's last heartbeat; 0 means no daemon.
pub const CTL_HEARTBEAT_NS: u32 = 1;
/// A heartbeat older than this many ns means the daemon is gone.
pub const CTL_STALE_NS: u32 = 2;
/// 1: with no daemon, flagged actions go through (fail open); 0: they are
/// refused (fail closed).
pub const CTL_FAIL_OPEN: u32 = 3;
/// [`PIN_LAYOUT`] of the programs that created the pinned maps.
pub const CTL_LAYOUT: u32 = 4;
/// Pid of the daemon that activated the current generation.
pub const CTL_DAEMON_PID: u32 = 5;
/// A random secret mixed into every verdict digest's start (set once per
/// set of pinned maps): an agent cannot compute, and so cannot aim a
/// collision at, the digest of an action it wants another verdict to
/// cover.
pub const CTL_DIGEST_SEED: u32 = 6;
/// Another secret (set once per set of pinned maps) keying the hashes of
/// the argv and environment a new image must receive. Digests are shown
/// to approvers and stored (FNV-1a gives its key away to whoever sees a
/// digest of a known action); this key is never exported.
pub const CTL_CONTENT_SEED: u32 = 7;
/// Slots in the control array.
pub const CTL_SLOTS: u32 = 8;
/// Version of the pinned maps' layout (types, keys, values). Bump it when
/// any of them changes: a daemon finding other pins starts afresh.
/// 2: exec and connect events in the pinned ring buffer carry padding
/// where a rule id was.
/// 3: exec events carry the file the kernel ran (`FileId`, its own name).
/// 4: a pending hold's mark is the process's start time (a u64).
/// 5: file events carry the file's inode, device and operation.
/// 6: a sixth loss reason (the per-reason array has six slots).
/// 7: verdicts carry an approved exec's environment hash; a seventh loss
/// reason; the exec-decided map is pinned; a second secret in the control
/// array.
pub const PIN_LAYOUT: u64 = 7;

/// What a kernel-side rule does to a matching action.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Stop the task and ask the daemon.
    Hold = 1,
    /// Refuse at once.
    Deny = 2,
}

/// A decision the daemon hands the kernel for one held action.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the action through.
    Allow = 1,
    /// Refuse it with EPERM.
    Deny = 2,
}

/// Value of the exec candidate maps (keys: the file's device and inode, or
/// a file name's [`name_hash`]). Which rule matched is the daemon's policy
/// to say, not the kernel's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecRule {
    /// A [`RuleAction`]: hold and ask the daemon, or deny in the kernel.
    pub action: u32,
    /// `EXEC_RULE_*` flags.
    pub flags: u32,
}
const _: () = assert!(size_of::<ExecRule>() == 8);

/// A multi-call binary (`busybox`, by file or by name): which program
/// runs is named by its argv, not its file or the caller's path, so every
/// exec of it is held for the daemon to read argv (agent-ebpf exec.rs
/// `multicall_rule`), except one the kernel refuses by `argv[0]`'s name
/// (or a deny rule refuses the binary itself).
pub const EXEC_RULE_MULTICALL: u32 = 1;

/// A name the kernel refuses only as a multi-call binary's applet (a deny
/// rule's path is an applet link, `/usr/bin/whoami -> busybox`): any other
/// file of that name is only a candidate (the daemon decides).
pub const EXEC_RULE_DENY_AS_APPLET: u32 = 2;

/// With [`EXEC_RULE_MULTICALL`]: the binary is busybox, which runs exactly
/// the applet `argv[0]`'s file name names (one leading `-` dropped), and
/// reads further words only when that name starts with `busybox`. So the
/// kernel holds it only then, or when the name is one a rule gives;
/// any other multi-call binary (toybox, coreutils, uutils, which fall
/// back to `argv[1]` for a name they do not know) is always held.
pub const EXEC_RULE_BUSYBOX: u32 = 4;

/// How many bytes of `argv[0]` the kernel reads for a multi-call binary's
/// applet name (longer, the exec is only held).
pub const APPLET_WINDOW: usize = 512;

/// Value of the network candidate LPM trie (key: an IPv6 prefix, IPv4
/// mapped into ::ffff:0:0/96). Every entry is a hold candidate whatever the
/// port: the daemon's policy decides each connect, so the kernel has no
/// connect deny rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    /// [`RuleAction::Hold`], the only action written for a connect.
    pub action: u32,
}
const _: () = assert!(size_of::<NetRule>() == 4);

/// Key of a verdict: the process and a digest of the exact action, so a
/// verdict never covers an action other than the one decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HoldKey {
    /// The held process.
    pub tgid: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// [`net_digest`] of the action.
    pub digest: u64,
}
const _: () = assert!(size_of::<HoldKey>() == 16);

/// Value of the verdict map, keyed by the held thread's id: the decision
/// and the action it covers. A thread that re-issues any other action finds
/// a stale verdict, which is dropped, and is held for the new action.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEntry {
    /// Digest of the action decided (as in [`HoldKey`]).
    pub digest: u64,
    /// A [`Verdict`].
    pub verdict: u16,
    /// The [`EventKind`] id the hold was published as (exec, file open,
    /// IP connect held, Unix connect): a verdict on one kind of action
    /// never covers another, whatever their digests.
    pub kind: u16,
    /// The process of the thread decided on: a thread id another process
    /// got since (the thread died before it took its verdict) finds a
    /// verdict that is not its own, and drops it.
    pub tgid: u32,
    /// For an exec held inside execve: the keyed FNV-1a of the environment
    /// the approver saw (the caller's envp strings, NUL-terminated), which
    /// the new image's must be ([`VERDICT_ENV_CHECK`]).
    pub env_hash: u64,
    /// Bytes `env_hash` covers.
    pub env_len: u32,
    /// `VERDICT_ENV_*` flags.
    pub env_flags: u32,
}
const _: () = assert!(size_of::<VerdictEntry>() == 32);

/// [`VerdictEntry::env_flags`]: compare the new image's environment with
/// `env_hash` before its first instruction (killed when it differs).
pub const VERDICT_ENV_CHECK: u32 = 1;
/// [`VerdictEntry::env_flags`]: the environment was longer than
/// [`ENV_MAX`]; only its first `env_len` bytes are compared.
pub const VERDICT_ENV_PREFIX: u32 = 2;
/// Bytes of an environment the daemon reads and the kernel binds to an
/// approval (a longer one is cut, and rules on the environment fail
/// closed on it).
pub const ENV_MAX: usize = 8 * ARGS_MAX;

/// FNV-1a offset basis, the start of every digest and name hash here.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a prime.
pub const FNV_PRIME: u64 = 0x100_0000_01b3;

/// One FNV-1a step: mixes byte `b` into hash `h`. The only place the hash
/// is spelled out: every digest and name hash, in the kernel and in the
/// daemon, is a loop of this step from [`FNV_OFFSET`], so both sides agree
/// bit for bit. The loops stay at the call sites; the kernel's are each
/// bounded by a constant for the verifier.
#[inline(always)]
pub const fn fnv_step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(FNV_PRIME)
}

/// FNV-1a from the offset basis XOR `seed` over `bytes`: how the kernel
/// hashes the argv and environment a new image receives (keyed with
/// [`CTL_CONTENT_SEED`]), and the daemon an approved environment.
pub fn content_hash(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET ^ seed, |h, &b| fnv_step(h, b))
}

/// FNV-1a over a file name (one path component, no `/`): the key of the
/// name candidate maps (exec candidates hash an executable's file
/// name, the file maps a file's or its directory's name). The kernel hashes
/// the bytes after the last `/` the same way, byte by byte.
#[inline(always)]
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < name.len() {
        h = fnv_step(h, name[i]);
        i += 1;
    }
    h
}

/// FNV-1a over a connect's destination: family, protocol, port and address,
/// started from [`FNV_OFFSET`] xor `seed` ([`CTL_DIGEST_SEED`]; 0 in the
/// tests). The verdict key digest of a held connect (the kernel computes
/// it; the daemon hands it back).
#[inline(always)]
pub fn net_digest(seed: u64, family: u16, protocol: u16, port: u16, addr: &[u8; 16]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    let head = [
        family as u8,
        (family >> 8) as u8,
        protocol as u8,
        (protocol >> 8) as u8,
        port as u8,
        (port >> 8) as u8,
    ];
    let mut i = 0;
    while i < head.len() {
        h = fnv_step(h, head[i]);
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        h = fnv_step(h, addr[i]);
        i += 1;
    }
    h
}

/// FNV-1a over an opened file's path (the first `len` bytes of `path`) and
/// its write intent, started as [`net_digest`] is: the verdict key digest
/// of a held open.
#[inline(always)]
pub fn file_digest(seed: u64, path: &[u8; FILE_PATH_MAX], len: usize, write: bool) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    let mut i = 0;
    while i < FILE_PATH_MAX {
        if i >= len {
            break;
        }
        h = fnv_step(h, path[i]);
        i += 1;
    }
    fnv_step(h, write as u8)
}

/// What an event records. Ids come in ranges: 1-99 process, 100-199 network,
/// 200-299 decisions, 900-999 agent-internal. Stored forever: never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A watched process created a new process (not a thread).
    Fork = 1,
    /// A watched process executed a new image.
    Exec = 2,
    /// The last thread of a watched process exited.
    Exit = 3,
    /// A watched process opened a candidate file (BPF LSM `file_open`):
    /// held, or decided (approved, refused, or by the fail mode).
    FileOpen = 4,
    /// A watched process called connect(2).
    Connect = 100,
    /// A watched process accepted an inbound connection.
    Accept = 101,
    /// A watched process sent a datagram to an explicit destination
    /// (recorded once per destination per process).
    UdpSend = 102,
    /// A connect that a hold rule stopped; it is re-issued once decided.
    ConnectHeld = 103,
    /// A watched process connected to a Unix-domain socket (stream or
    /// seqpacket connect), or sent a datagram to one (recorded once per
    /// socket per process): held when a rule names the socket.
    UnixConnect = 104,
    /// The daemon's policy decided a candidate action without a human
    /// (written by the daemon, never by the kernel).
    Decision = 200,
    /// Events lost before reaching the store, counted by reason.
    Loss = 900,
}

impl EventKind {
    /// Decodes a kind id read from the kernel or the store.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Fork,
            2 => Self::Exec,
            3 => Self::Exit,
            4 => Self::FileOpen,
            100 => Self::Connect,
            101 => Self::Accept,
            102 => Self::UdpSend,
            103 => Self::ConnectHeld,
            104 => Self::UnixConnect,
            200 => Self::Decision,
            900 => Self::Loss,
            _ => return None,
        })
    }

    /// The kind with this stable name (as the store keeps it). Kind ids
    /// are below 1000 (see the ranges above).
    pub fn from_name(name: &str) -> Option<Self> {
        (0..1000).find_map(|v| Self::from_u32(v).filter(|k| k.name() == name))
    }

    /// The stable name used in the store's views, the CLI and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fork => "fork",
            Self::Exec => "exec",
            Self::Exit => "exit",
            Self::FileOpen => "file_open",
            Self::Connect => "connect",
            Self::Accept => "accept",
            Self::UdpSend => "udp_send",
            Self::ConnectHeld => "connect_held",
            Self::UnixConnect => "unix_connect",
            Self::Decision => "decision",
            Self::Loss => "loss",
        }
    }
}

/// Why an event never reached the ring buffer. Indexes the loss counters;
/// stored forever: never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// `bpf_ringbuf_reserve` failed: userspace did not drain fast enough.
    RingbufFull = 1,
    /// The session map was full, so a new process could not join its session
    /// (its actions go unrecorded; this counts the fork).
    SessionMapFull = 2,
    /// The map pairing a connect's entry with its exit was full: the
    /// connect was recorded at once, without its outcome (its `ret`).
    PendingMapFull = 3,
    /// A hold request could not be published: the held task was killed
    /// instead of being left stopped with nobody to answer.
    HoldUnpublished = 4,
    /// The session map was full: with BPF LSM the fork was refused
    /// (EAGAIN), so no process ran unwatched; this counts the refusals.
    ForkRefused = 5,
    /// With BPF LSM, the map that carries the argv an exec was decided on
    /// to the new image's check was full: the exec was refused (EPERM)
    /// rather than run with an argv nobody compared.
    ExecUnchecked = 6,
}

/// Number of slots in the per-reason loss counter array.
pub const LOSS_REASONS: u32 = 7;

impl LossReason {
    /// Decodes a reason id.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::RingbufFull,
            2 => Self::SessionMapFull,
            3 => Self::PendingMapFull,
            4 => Self::HoldUnpublished,
            5 => Self::ForkRefused,
            6 => Self::ExecUnchecked,
            _ => return None,
        })
    }

    /// The reason with this stable name (as loss records keep it).
    pub fn from_name(name: &str) -> Option<Self> {
        (0..LOSS_REASONS).find_map(|v| Self::from_u32(v).filter(|r| r.name() == name))
    }

    /// The stable name shown by the CLI and stored in loss records.
    pub fn name(self) -> &'static str {
        match self {
            Self::RingbufFull => "ringbuf_full",
            Self::SessionMapFull => "session_map_full",
            Self::PendingMapFull => "pending_map_full",
            Self::HoldUnpublished => "hold_unpublished",
            Self::ForkRefused => "fork_refused",
            Self::ExecUnchecked => "exec_unchecked",
        }
    }
}

/// Common head of every event the kernel emits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] id.
    pub kind: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the event happened.
    pub ts_ns: u64,
    /// The session the process belongs to.
    pub session_id: u64,
    /// Thread id of the acting task.
    pub pid: u32,
    /// Process id (thread group id) of the acting task.
    pub tgid: u32,
    /// Process id of the real parent.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// cgroup v2 id of the acting task.
    pub cgroup_id: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 56);

/// A process executed a new image (`sched_process_exec`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    /// Common head, `kind` = [`EventKind::Exec`].
    pub header: EventHeader,
    /// Bytes of `filename` used, without the NUL.
    pub filename_len: u32,
    /// Bytes of `args` used.
    pub args_len: u32,
    /// `EXEC_*` flags.
    pub flags: u32,
    /// Bytes of `name` used, without the NUL.
    pub name_len: u32,
    /// Verdict key digest of a held execve (the file and argv), else 0.
    pub digest: u64,
    /// The file the kernel opened to run (`bprm->file`): what the rules
    /// decide on, whatever string the caller passed.
    pub file: FileId,
    /// The path string handed to execve (`bprm->filename`), as the caller
    /// wrote it: recorded, never decided on.
    pub filename: [u8; FILENAME_MAX],
    /// The opened file's own name (its dentry's, after every symlink).
    pub name: [u8; EXEC_NAME_MAX],
    /// argv as laid out in the new image: NUL-separated strings.
    pub args: [u8; ARGS_MAX],
}
const _: () =
    assert!(size_of::<ExecEvent>() == 56 + 24 + 16 + FILENAME_MAX + EXEC_NAME_MAX + ARGS_MAX);

/// Bytes of an executable's own name recorded, with its NUL (NAME_MAX + 1).
pub const EXEC_NAME_MAX: usize = 256;

/// A file as the kernel knows it: the same file under any name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Inode number.
    pub ino: u64,
    /// The filesystem's device (`inode->i_sb->s_dev`, the kernel's encoding).
    pub dev: u32,
    /// `inode->i_mode`: type and permission bits (set-user-ID among them).
    pub mode: u32,
}
const _: () = assert!(size_of::<FileId>() == 16);

/// Key of the executable-file candidate map: the file a rule names (and
/// every hard link of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Inode number.
    pub ino: u64,
    /// The filesystem's device, as in [`FileId::dev`].
    pub dev: u32,
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<FileKey>() == 16);

/// A process created a child process (`sched_process_fork`, threads excluded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkEvent {
    /// Common head, `kind` = [`EventKind::Fork`]; describes the parent.
    pub header: EventHeader,
    /// Process id of the new child.
    pub child_tgid: u32,
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<ForkEvent>() == 64);

/// The last thread of a process exited (`sched_process_exit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitEvent {
    /// Common head, `kind` = [`EventKind::Exit`].
    pub header: EventHeader,
    /// `task->exit_code`: a wait(2) status (exit code << 8, or the signal).
    pub exit_code: u32,
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<ExitEvent>() == 64);

/// A network action: connect, accept, or a datagram to a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetEvent {
    /// Common head, `kind` = one of the network [`EventKind`]s.
    pub header: EventHeader,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, or 0 when unknown.
    pub protocol: u16,
    /// Remote port, host byte order.
    pub port: u16,
    /// Padding, always zero.
    pub _pad: u16,
    /// The syscall's return value: 0 or a new fd for success, `-errno` else.
    /// [`NET_RET_UNKNOWN`] when the outcome was not observed.
    pub ret: i32,
    /// Non-zero when `ret` holds the real outcome.
    pub has_ret: u32,
    /// Remote address: 4 bytes for IPv4, 16 for IPv6, network byte order.
    pub addr: [u8; 16],
    /// Padding, always zero.
    pub _pad2: u32,
    /// `NET_*` flags.
    pub flags: u32,
    /// [`net_digest`] of the destination (set for held connects).
    pub digest: u64,
}
const _: () = assert!(size_of::<NetEvent>() == 56 + 48);

/// A watched process opened a candidate file (`security_file_open`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEvent {
    /// Common head, `kind` = [`EventKind::FileOpen`].
    pub header: EventHeader,
    /// `FILE_*` flags.
    pub flags: u32,
    /// Bytes of `path` used, without the NUL.
    pub path_len: u32,
    /// [`file_digest`] of the path and write intent, then the operation
    /// (when it is not an open), the file's and the directory's inodes and
    /// the device: the verdict key.
    pub digest: u64,
    /// The file's inode number and device (the kernel's encoding): the
    /// same file under every name.
    pub ino: u64,
    pub dev: u32,
    /// What was done: a `FILE_OP_*`.
    pub op: u32,
    /// The directory holding it (its dentry's parent), inode and device.
    pub dir_ino: u64,
    pub dir_dev: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// The file's path (`bpf_d_path`), NUL-terminated.
    pub path: [u8; FILE_PATH_MAX],
}
const _: () = assert!(size_of::<FileEvent>() == 56 + 48 + FILE_PATH_MAX);

/// [`FileEvent::op`]: the file was opened (`security_file_open`).
pub const FILE_OP_OPEN: u32 = 0;
/// [`FileEvent::op`]: the file is cut to a length by path (`truncate(2)`,
/// `security_path_truncate`): a write.
pub const FILE_OP_TRUNCATE: u32 = 1;
/// [`FileEvent::op`]: another file is renamed to this name, or this name
/// is renamed away (`security_path_rename`): a write.
pub const FILE_OP_RENAME: u32 = 2;
/// [`FileEvent::op`]: a hard link is made with this name
/// (`security_path_link`): a write.
pub const FILE_OP_LINK: u32 = 3;
/// [`FileEvent::op`]: a symlink is made with this name
/// (`security_path_symlink`): a write.
pub const FILE_OP_SYMLINK: u32 = 4;
/// [`FileEvent::op`]: this name is removed (`security_path_unlink`,
/// `security_path_rmdir`): a write.
pub const FILE_OP_UNLINK: u32 = 5;

/// Bytes of a Unix socket's address (`sockaddr_un.sun_path`).
pub const UNIX_PATH_MAX: usize = 108;

/// The socket is a datagram socket: the event is its first datagram to
/// that socket (or its connect), and a decision covers the flow.
pub const UNIX_DGRAM: u32 = 1 << 8;
/// The socket's address is abstract (`sun_path` starts with a NUL; no
/// file): `dev` and `ino` are zero.
pub const UNIX_ABSTRACT: u32 = 1 << 9;
/// The process serving the socket (the listener's creator) is not in the
/// acting session, or is not known.
pub const UNIX_PEER_OUTSIDE: u32 = 1 << 10;
/// The connect is held: a request for the daemon.
pub const UNIX_HELD: u32 = 1 << 11;

/// A connect to (or a datagram for) a Unix-domain socket, seen by the BPF
/// LSM hooks `unix_stream_connect` and `unix_may_send` once the kernel has
/// found the socket: whatever name the caller used (a symlink, a hard
/// link, a relative path, `/proc/self/root/...`), `dev` and `ino` are the
/// socket file's. `flags` carries `NET_*` outcome bits and `UNIX_*` bits.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnixEvent {
    /// Common head, `kind` = [`EventKind::UnixConnect`].
    pub header: EventHeader,
    /// `NET_*` and `UNIX_*` flags.
    pub flags: u32,
    /// Bytes of `path` used: the socket's bound address as the kernel
    /// keeps it (a path with the NUL that ends it, an abstract address
    /// with its leading NUL).
    pub path_len: u32,
    /// [`unix_digest`] of the socket: the verdict key.
    pub digest: u64,
    /// The socket file's inode number (0 for an abstract address).
    pub ino: u64,
    /// Its file system's device, the kernel's encoding.
    pub dev: u32,
    /// The tgid of the process serving the socket (0 when unknown).
    pub peer_tgid: u32,
    /// The address the socket was bound to, as its server gave it.
    pub path: [u8; UNIX_PATH_MAX],
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<UnixEvent>() == 56 + 32 + UNIX_PATH_MAX + 4);

/// Value of the Unix socket candidate map (key: the socket file's
/// [`FileKey`], or `dev` 0 and `ino` the [`name_hash`] of the address: an
/// abstract one without its leading NUL, a path as bound): hold.
pub const UNIX_CAND: u32 = 1;

/// FNV-1a over a Unix socket's identity: its file (device, inode), or for
/// an abstract address the address's hash. The verdict key digest of a
/// held Unix connect, started as [`net_digest`] is.
#[inline(always)]
pub fn unix_digest(seed: u64, dev: u32, ino: u64, dgram: bool) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    let mut i = 0;
    while i < 4 {
        h = fnv_step(h, (dev >> (8 * i)) as u8);
        i += 1;
    }
    let mut i = 0;
    while i < 8 {
        h = fnv_step(h, (ino >> (8 * i)) as u8);
        i += 1;
    }
    fnv_step(fnv_step(h, b'u'), dgram as u8)
}

/// Placeholder for `NetEvent::ret` when the outcome was not observed.
pub const NET_RET_UNKNOWN: i32 = i32::MIN;

/// Value of the session-membership map (key: tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionEntry {
    /// The session the process belongs to.
    pub session_id: u64,
}
const _: () = assert!(size_of::<SessionEntry>() == 8);

/// Key of the per-session loss counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LossKey {
    /// The session whose event was lost (0 when unknown).
    pub session_id: u64,
    /// The [`EventKind`] that was lost.
    pub kind: u32,
    /// The [`LossReason`].
    pub reason: u32,
}
const _: () = assert!(size_of::<LossKey>() == 16);

/// Offsets of the kernel struct fields the programs read, in bytes, found by
/// the daemon in the running kernel's BTF and set as a global before load.
/// This keeps one object working across kernel versions without CO-RE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.real_parent`
    pub task_real_parent: u32,
    /// `task_struct.exit_code`
    pub task_exit_code: u32,
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `task_struct.cred`
    pub task_cred: u32,
    /// `task_struct.signal`
    pub task_signal: u32,
    /// `signal_struct.live` (an `atomic_t`)
    pub signal_live: u32,
    /// `mm_struct.arg_start`
    pub mm_arg_start: u32,
    /// `mm_struct.arg_end`
    pub mm_arg_end: u32,
    /// `cred.euid`
    pub cred_euid: u32,
    /// `linux_binprm.filename`
    pub binprm_filename: u32,
    /// `socket.type` (a short: SOCK_STREAM, SOCK_DGRAM, ...)
    pub socket_type: u32,
    /// `linux_binprm.file`
    pub binprm_file: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_mode` (a u16)
    pub inode_mode: u32,
    /// `file.f_path` (a `struct path`)
    pub file_f_path: u32,
    /// `file.f_mode` (an `fmode_t`)
    pub file_f_mode: u32,
    /// `path.dentry`
    pub path_dentry: u32,
    /// `dentry.d_name` (a `struct qstr`)
    pub dentry_d_name: u32,
    /// `dentry.d_parent`
    pub dentry_d_parent: u32,
    /// `qstr.name`
    pub qstr_name: u32,
    /// `inode.i_ino`
    pub inode_i_ino: u32,
    /// `inode.i_sb`
    pub inode_i_sb: u32,
    /// `super_block.s_dev`
    pub sb_s_dev: u32,
    /// `msghdr.msg_name` (the destination of a sendto/sendmsg, a kernel
    /// copy)
    pub msghdr_msg_name: u32,
    /// `msghdr.msg_flags` (the send's flags, `MSG_FASTOPEN` among them)
    pub msghdr_msg_flags: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_time` (a u64, ns since boot: with the tgid, a
    /// process that a reused pid cannot stand in for)
    pub task_start_time: u32,
    /// `dentry.d_inode`
    pub dentry_d_inode: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `unix_sock.addr` (a `struct unix_address *`)
    pub unix_sock_addr: u32,
    /// `unix_sock.path` (a `struct path`: the socket file)
    pub unix_sock_path: u32,
    /// `unix_address.len` (an int: bytes of `name` used)
    pub unix_address_len: u32,
    /// `unix_address.name` (a `struct sockaddr_un`)
    pub unix_address_name: u32,
    /// `sock.sk_peer_pid` (a `struct pid *`)
    pub sock_sk_peer_pid: u32,
    /// `pid.numbers` (`struct upid[]`; `upid.nr` first, the global
    /// number in `numbers[0]`)
    pub pid_numbers: u32,
    /// `pid.tasks` (`struct hlist_head[PIDTYPE_MAX]`: the tasks using the
    /// pid, by type; `tasks[PIDTYPE_TGID]` is empty once the process is
    /// gone)
    pub pid_tasks: u32,
    /// `task_struct.flags` (`PF_*`; `PF_IO_WORKER` among them)
    pub task_flags: u32,
    /// `task_struct.stack` (the kernel stack; the syscall's registers,
    /// `struct pt_regs`, sit at its top)
    pub task_stack: u32,
    /// `linux_binprm.interp` (the same pointer as `filename` unless a
    /// script or binfmt_misc handler put its interpreter in argv)
    pub binprm_interp: u32,
    /// `mm_struct.env_start`
    pub mm_env_start: u32,
    /// `mm_struct.env_end`
    pub mm_env_end: u32,
    /// `linux_binprm.argc` (an int)
    pub binprm_argc: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 176);

/// Run-time settings the daemon writes into the programs before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Padding, always zero (the daemon's tgid was here: no pid is
    /// exempt from watching, see agent-ebpf maps.rs `session_of`).
    pub _pad: u32,
    /// Wake the daemon only once this many bytes wait in the ring buffer;
    /// it also drains on a short timer. Batching wakeups keeps the cost of a
    /// watched exec low (one wakeup per event costs two context switches).
    pub wakeup_bytes: u32,
    /// Field offsets in the running kernel.
    pub offsets: KernelOffsets,
    /// This load's generation: the programs act only while the control
    /// array's [`CTL_GENERATION`] equals it.
    pub generation: u64,
}
const _: () = assert!(size_of::<AgentConfig>() == 192);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, made only of integers and integer
    // arrays with explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::SessionEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LossKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HoldKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VerdictEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by the digests as first shipped (and checked against
    /// a reference FNV-1a): the kernel and the daemon must keep computing
    /// exactly these, or verdicts and candidates stop matching.
    #[test]
    fn digests_keep_their_known_values() {
        assert_eq!(name_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash(b"curl"), 0x4c96_8a90_ace3_649b);
        assert_eq!(name_hash(b".ssh"), 0xa190_7aa7_3047_da65);

        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(net_digest(0, 2, 6, 443, &v4), 0x9fea_211a_1109_5b54);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(net_digest(0, 10, 17, 53, &v6), 0x89e5_fb96_02fc_bb38);

        let mut path = [0u8; FILE_PATH_MAX];
        path[..11].copy_from_slice(b"/etc/passwd");
        assert_eq!(file_digest(0, &path, 11, false), 0x82ed_a1a2_2c38_bc95);
        assert_eq!(file_digest(0, &path, 11, true), 0x82ed_a0a2_2c38_bae2);
        assert_eq!(
            file_digest(0, &[0; FILE_PATH_MAX], 0, false),
            0xaf63_bd4c_8601_b7df
        );
        let full = [0xab; FILE_PATH_MAX];
        assert_eq!(
            file_digest(0, &full, FILE_PATH_MAX, true),
            0x2ca9_f9e8_3933_642c
        );
        // The secret seed changes every digest: one cannot be aimed at
        // another without it.
        assert_ne!(
            file_digest(0x5eed, &path, 11, false),
            file_digest(0, &path, 11, false)
        );
        assert_ne!(
            net_digest(0x5eed, 2, 6, 443, &v4),
            net_digest(0, 2, 6, 443, &v4)
        );
        assert_ne!(
            unix_digest(0x5eed, 3, 7, false),
            unix_digest(0, 3, 7, false)
        );
        // A length past the buffer hashes the whole buffer, no more.
        assert_eq!(
            file_digest(0, &full, FILE_PATH_MAX + 7, true),
            0x2ca9_f9e8_3933_642c
        );
    }
}
