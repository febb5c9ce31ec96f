//! Maps and globals shared by every probe family, and the loss counters.

use airlock_common::{
    AgentConfig, CTL_FAIL_OPEN, CTL_GENERATION, CTL_HEARTBEAT_NS, CTL_SLOTS, CTL_STALE_NS,
    EventKind, ExecEvent, ExecRule, FileEvent, FileKey, HoldKey, LOSS_REASONS, LossKey, LossReason,
    MODE_SLOTS, NetRule, SessionEntry, UnixEvent, VerdictEntry,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// Set by the daemon before load (`EbpfLoader::set_global`): its own tgid and
/// the kernel field offsets read from BTF.
#[unsafe(no_mangle)]
static AGENT_CONFIG: AgentConfig = AgentConfig {
    _pad: 0,
    wakeup_bytes: 0,
    offsets: airlock_common::KernelOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_real_parent: 0,
        task_exit_code: 0,
        task_mm: 0,
        task_cred: 0,
        task_signal: 0,
        signal_live: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
        cred_euid: 0,
        binprm_filename: 0,
        socket_type: 0,
        binprm_file: 0,
        file_inode: 0,
        inode_mode: 0,
        file_f_path: 0,
        file_f_mode: 0,
        path_dentry: 0,
        dentry_d_name: 0,
        dentry_d_parent: 0,
        qstr_name: 0,
        inode_i_ino: 0,
        inode_i_sb: 0,
        sb_s_dev: 0,
        msghdr_msg_name: 0,
        msghdr_msg_flags: 0,
        task_group_leader: 0,
        task_start_time: 0,
        dentry_d_inode: 0,
        socket_sk: 0,
        unix_sock_addr: 0,
        unix_sock_path: 0,
        unix_address_len: 0,
        unix_address_name: 0,
        sock_sk_peer_pid: 0,
        pid_numbers: 0,
        pid_tasks: 0,
        task_flags: 0,
        task_stack: 0,
        binprm_interp: 0,
        mm_env_start: 0,
        mm_env_end: 0,
        binprm_argc: 0,
    },
    generation: 0,
};

/// Reads the configuration through a volatile load so the compiler cannot
/// fold the zeros of the initializer into the code.
#[inline(always)]
pub fn config() -> AgentConfig {
    // SAFETY: AGENT_CONFIG is a plain static; the volatile read only stops
    // constant folding of a value the loader rewrites.
    unsafe { core::ptr::read_volatile(&AGENT_CONFIG) }
}

/// Offset of `file.f_path`, read on its own so the verifier sees a
/// constant (the configuration is a frozen read-only map): it is added to
/// a BTF pointer that `bpf_d_path` checks by type and offset.
#[inline(always)]
pub fn file_f_path_offset() -> u32 {
    // SAFETY: as in `config`, one field of the static.
    unsafe { core::ptr::read_volatile(&AGENT_CONFIG.offsets.file_f_path) }
}

/// Pinned control array (`CTL_*` slots): the active generation, the
/// daemon's heartbeat and the fail mode. Pinned, like every map that must
/// outlive one daemon (sessions, verdicts, pending holds, the ring buffer,
/// the loss counters); the rest belong to one generation of programs.
#[map]
pub static CONTROL: Array<u64> = Array::with_max_entries(CTL_SLOTS, 0);

#[inline(always)]
fn control(slot: u32) -> u64 {
    CONTROL.get(slot).copied().unwrap_or(0)
}

/// The secret every verdict digest starts from ([`CTL_DIGEST_SEED`]).
///
/// [`CTL_DIGEST_SEED`]: airlock_common::CTL_DIGEST_SEED
#[inline(always)]
pub fn digest_seed() -> u64 {
    control(airlock_common::CTL_DIGEST_SEED)
}

/// The key of the argv and environment hashes (see `CTL_CONTENT_SEED`).
#[inline(always)]
pub fn content_seed() -> u64 {
    control(airlock_common::CTL_CONTENT_SEED)
}

/// True while a daemon heartbeat is fresh: someone will answer a hold.
#[inline(always)]
pub fn daemon_alive() -> bool {
    let beat = control(CTL_HEARTBEAT_NS);
    // SAFETY: reads the monotonic clock, the one the daemon beats with.
    let now = unsafe { bpf_ktime_get_ns() };
    beat != 0 && now.saturating_sub(beat) <= control(CTL_STALE_NS)
}

/// The fail mode for holds with no daemon alive: true lets them through.
#[inline(always)]
pub fn fail_open() -> bool {
    control(CTL_FAIL_OPEN) == 1
}

/// Session membership, keyed by tgid: written by the daemon for a session's
/// first process, inherited on fork, dropped on exit.
#[map]
pub static SESSIONS: HashMap<u32, SessionEntry> = HashMap::with_max_entries(65536, 0);

/// Exec candidates by the executed file itself (device and inode), written
/// by the daemon for the files a policy names: catches every name and hard
/// link of that file. A multi-call binary's entry ([`EXEC_RULE_MULTICALL`])
/// defers to the applet its argv names.
///
/// [`EXEC_RULE_MULTICALL`]: airlock_common::EXEC_RULE_MULTICALL
#[map]
pub static EXEC_FILES: HashMap<FileKey, ExecRule> = HashMap::with_max_entries(4096, 0);

/// Exec candidates by name ([`airlock_common::name_hash`]): looked up
/// for the executed file's own name (its dentry's, after every symlink),
/// the last component of the caller's string (a script's name where the
/// kernel reports its interpreter), and a multi-call binary's applet
/// (the file name of `argv[0]`, for a deny rule's name).
#[map]
pub static EXEC_NAMES: HashMap<u64, ExecRule> = HashMap::with_max_entries(4096, 0);

/// File candidates by `name_hash` of one path component, written by the
/// daemon from its policy: `FILE_CAND_NAME` when a file with that name is a
/// candidate, `FILE_CAND_DIR` when every file in a directory with that name
/// is. Per generation, like the rule maps.
#[map]
pub static FILE_NAMES: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// File candidates by the file itself (device and inode): the files the
/// policy's path patterns name on this host, with `FILE_CAND_NAME`, and
/// the directories whose every file is a candidate, with `FILE_CAND_DIR`.
/// A hard link, a renamed directory or a bind mount keeps the inode.
#[map]
pub static FILE_INODES: HashMap<FileKey, u32> =
    HashMap::with_max_entries(airlock_common::FILE_INODES_MAX, 0);

/// Connect candidates by destination prefix (IPv6; IPv4 as
/// ::ffff:a.b.c.d), written by the daemon from its policy: each is held.
#[map]
pub static NET_RULES: LpmTrie<[u8; 16], NetRule> = LpmTrie::with_max_entries(4096, 0);

/// One-shot verdicts by held thread, written by the daemon before it
/// resumes the task; the thread's next hooked syscall consumes (or, for
/// another action, drops) it.
#[map]
pub static VERDICTS: HashMap<u32, VerdictEntry> = HashMap::with_max_entries(8192, 0);

/// Holds already published (execs, opens, connects), so a stray SIGCONT
/// re-holds without a second request. The value is the holding process's
/// start time: a mark left by a process killed while held is not taken
/// for one of a later process that got its pid.
#[map]
pub static HOLD_PENDING: LruHashMap<HoldKey, u64> = LruHashMap::with_max_entries(8192, 0);

/// Run-time switches the daemon sets after attaching (see `MODE_*`).
#[map]
pub static MODE: Array<u32> = Array::with_max_entries(MODE_SLOTS, 0);

/// Whether the mode slot `slot` is on.
#[inline(always)]
pub fn mode(slot: u32) -> bool {
    MODE.get(slot).is_some_and(|v| *v == 1)
}

/// Unix socket candidates (value `UNIX_CAND`): the socket files a policy
/// names, by device and inode (every name and hard link of each), and
/// abstract addresses by `name_hash` (device 0).
#[map]
pub static UNIX_FILES: HashMap<FileKey, u32> = HashMap::with_max_entries(1024, 0);

/// Scratch space for the Unix socket event, too large for the stack.
#[map]
pub static UNIX_SCRATCH: PerCpuArray<UnixEvent> = PerCpuArray::with_max_entries(1, 0);

/// Connects the LSM hook approved, for the cgroup hook to record as such.
#[map]
pub static LSM_APPROVED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(8192, 0);

/// Every event goes through this ring buffer to the daemon's sensor task.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(32 * 1024 * 1024, 0);

/// Scratch space for the exec event, too large for the 512-byte stack.
#[map]
pub static EXEC_SCRATCH: PerCpuArray<ExecEvent> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the file event, too large for the 512-byte stack.
#[map]
pub static FILE_SCRATCH: PerCpuArray<FileEvent> = PerCpuArray::with_max_entries(1, 0);

/// Lost events per session, kind and reason. Per-CPU, because BPF here has
/// no atomic fetch_add; userspace sums the CPUs.
#[map]
pub static LOSSES: PerCpuHashMap<LossKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Lost events per reason, whatever the session: survives a full `LOSSES`.
#[map]
pub static LOSS_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_REASONS, 0);

/// Counts one lost event in both loss maps.
#[inline(always)]
pub fn count_loss(session_id: u64, kind: EventKind, reason: LossReason) {
    if let Some(total) = LOSS_TOTALS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate mid-run.
        unsafe { *total += 1 };
    }
    let key = LossKey {
        session_id,
        kind: kind as u32,
        reason: reason as u32,
    };
    match LOSSES.get_ptr_mut(key) {
        // SAFETY: as above, this CPU's slot.
        Some(count) => unsafe { *count += 1 },
        None => {
            // A full map is already covered by LOSS_TOTALS.
            let _ = LOSSES.insert(key, 1, 0);
        }
    }
}

/// The session of a tgid, unless the tgid is unwatched. (No pid is
/// exempt: the daemon is never in a session, and refuses to start inside
/// one; a pid it had may be a watched process's once it is gone.)
#[inline(always)]
pub fn session_of(tgid: u32) -> Option<u64> {
    let cfg = config();
    // Only the active generation acts: during a hand-over between daemons
    // both sets of programs are attached, and one must stay silent.
    if control(CTL_GENERATION) != cfg.generation {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { SESSIONS.get(tgid) }.map(|e| e.session_id)
}

/// Flags for submitting to [`EVENTS`]: wake the daemon only when enough has
/// piled up (it also drains on a timer).
#[inline(always)]
pub fn submit_flags() -> u64 {
    let pending = EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64);
    if pending >= config().wakeup_bytes as u64 {
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64
    }
}

/// Publishes with an immediate wakeup: a held task waits on this event.
pub const FORCE_WAKEUP: u64 = aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64;

/// Takes the daemon's verdict for the current thread, if it stored one:
/// one shot, and the action decided stops being pending. A verdict for
/// another process or another action than `key`'s (the held syscall was rewritten, or the
/// thread went elsewhere) is dropped with its pending mark: it covers
/// nothing, and the new action is held on its own.
#[inline(always)]
pub fn take_verdict(pid: u32, key: HoldKey, kind: EventKind) -> Option<u32> {
    take_verdict_entry(pid, key, kind).map(|v| u32::from(v.verdict))
}

/// [`take_verdict`], with the whole entry (an exec's also binds the
/// environment the approver saw).
#[inline(always)]
pub fn take_verdict_entry(pid: u32, key: HoldKey, kind: EventKind) -> Option<VerdictEntry> {
    // SAFETY: the value is copied out before the entry is removed.
    let v = unsafe { VERDICTS.get(pid) }.copied()?;
    let _ = VERDICTS.remove(pid);
    let decided = HoldKey {
        digest: v.digest,
        ..key
    };
    let _ = HOLD_PENDING.remove(decided);
    (v.digest == key.digest && v.tgid == key.tgid && v.kind == kind as u16).then_some(v)
}
