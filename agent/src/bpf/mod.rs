//! The kernel programs' userspace half: the one owner of the loaded `Ebpf`
//! object and its maps. It loads and attaches the programs (pinned, so
//! they outlive the daemon), decodes what they send, writes the policy's
//! candidates into their maps, and reads their loss counters. It has no
//! channels and knows nothing of who consumes its records: the daemon's
//! sensor task drives it.

mod attach;
pub mod btf;
pub mod candidates;
pub mod decode;
pub mod pins;

use std::collections::HashMap as StdHashMap;

use airlock_common::{
    AgentConfig, EventKind, HoldKey, LOSS_REASONS, LossKey, LossReason, MODE_LSM_CONNECT,
    MODE_LSM_EXEC, SessionEntry, Verdict, VerdictEntry,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracing::{info, warn};

use crate::{
    config::{Config, FailMode},
    exefile::ExeIndex,
    features::Features,
    model::{Clock, Detail, EnvBinding, Record, wall_now_ns},
    policy::candidates::Candidates,
};

/// The kernel programs, built by build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{0}")]
    Btf(#[from] btf::BtfError),
    #[error("reading kernel BTF for the loader: {0}")]
    LoaderBtf(String),
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {name}: {message}")]
    Program { name: &'static str, message: String },
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pins(#[from] pins::PinError),
}

impl BpfError {
    /// Keeps the verifier log, which aya puts in the error's source chain.
    fn program(name: &'static str, e: impl std::error::Error) -> Self {
        Self::Program {
            name,
            message: chain(&e),
        }
    }

    fn map(name: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Map {
            name,
            message: e.to_string(),
        }
    }
}

/// What this load can hold, by hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holds {
    /// Connects can be held (the LSM hook, or the cgroup hook on 6.18+).
    pub connect: bool,
    /// BPF LSM `socket_connect` holds them.
    pub lsm_connect: bool,
    /// BPF LSM `bprm_creds_for_exec` holds execs inside execve.
    pub lsm_exec: bool,
    /// BPF LSM `file_open` holds candidate opens.
    pub lsm_file: bool,
    /// BPF LSM `path_truncate`, `path_rename`, `path_link`,
    /// `path_symlink`, `path_unlink` and `path_rmdir` hold the writes to
    /// candidates that open nothing.
    pub lsm_file_paths: bool,
    /// BPF LSM `task_alloc` refuses a watched fork the session map has no
    /// room for.
    pub lsm_fork: bool,
    /// BPF LSM `unix_stream_connect` and `unix_may_send` record and hold
    /// Unix socket connects.
    pub lsm_unix: bool,
}

/// A verdict whose thread is stopped, and the session of its process (0
/// when it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parked {
    pid: u32,
    session: u64,
}

/// The threads whose verdicts go when the map is full: every one of the
/// session with the most (the lowest session id on a tie).
fn parked_to_evict(parked: &[Parked]) -> Vec<u32> {
    let mut count: StdHashMap<u64, usize> = StdHashMap::new();
    for p in parked {
        *count.entry(p.session).or_default() += 1;
    }
    let Some(worst) = count
        .iter()
        .max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))
        .map(|(s, _)| *s)
    else {
        return Vec::new();
    };
    parked
        .iter()
        .filter(|p| p.session == worst)
        .map(|p| p.pid)
        .collect()
}

/// Entries of the per-session loss map (4096, see agent-ebpf maps.rs)
/// past which the daemon removes those of ended sessions.
const LOSS_PRUNE_AT: usize = 3072;

/// Events read from the ring buffer in one go.
#[derive(Debug, Default)]
pub struct Drained {
    pub records: Vec<Record>,
    /// Events that could not be decoded (each logged).
    pub undecodable: u64,
}

/// The loaded programs and the maps the daemon uses.
pub struct Bpf {
    // Dropping the Ebpf object detaches nothing (the links are pinned), but
    // it owns the maps: keep it alive.
    ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    sessions: HashMap<MapData, u32, SessionEntry>,
    losses: PerCpuHashMap<MapData, LossKey, u64>,
    loss_totals: PerCpuArray<MapData, u64>,
    verdicts: HashMap<MapData, u32, VerdictEntry>,
    hold_pending: HashMap<MapData, HoldKey, u64>,
    /// Programs attached, in words.
    pub attached: Vec<String>,
    pub holds: Holds,
    /// This load's generation, and whether it took over pinned maps (and
    /// so sessions, holds and unread events) from an earlier daemon.
    pub generation: u64,
    pub took_over: bool,
    /// The pin set's secret the kernel keys its argv and environment
    /// hashes with (the daemon keys an approved exec's environment with it).
    pub content_seed: u64,
    clock: Clock,
    /// Loss counts already recorded, so none is recorded twice.
    seen_losses: StdHashMap<LossKey, u64>,
}

impl Bpf {
    /// Loads every program as the next generation on the pinned maps,
    /// attaches and pins them, then makes them the active generation (the
    /// previous daemon's programs, if any, fall silent and are detached).
    /// `daemon_tgid` is the daemon's own pid (for the pins' owner).
    pub fn load(
        features: &Features,
        daemon_tgid: u32,
        settings: &Config,
        candidates: (&Candidates, &ExeIndex),
        pins: &pins::PinDir,
    ) -> Result<Self, BpfError> {
        let ring_bytes = settings.ring_buffer_kib * 1024;
        let (previous, last) = pins.prepare(ring_bytes, daemon_tgid)?;
        let generation = last + 1;
        let mut bpf = Self::load_generation(features, settings, candidates, pins, generation)
            .inspect_err(|_| pins.drop_links(generation))?;
        let mut control = pins.control()?;
        pins::activate(
            &mut control,
            generation,
            settings.heartbeat_timeout_ms * 1_000_000,
            settings.fail_mode == FailMode::Open,
            daemon_tgid,
        )?;
        bpf.content_seed = control
            .get(&airlock_common::CTL_CONTENT_SEED, 0)
            .map_err(|e| BpfError::map("CONTROL", e))?;
        pins.retire_links(generation);
        bpf.took_over = previous != pins::Previous::Nothing;
        Ok(bpf)
    }

    fn load_generation(
        features: &Features,
        settings: &Config,
        candidates: (&Candidates, &ExeIndex),
        pins: &pins::PinDir,
        generation: u64,
    ) -> Result<Self, BpfError> {
        let ring_bytes = settings.ring_buffer_kib * 1024;
        let offsets = btf::kernel_offsets()?;
        // A quarter of the ring, at most 256 KiB, before the kernel wakes us.
        let wakeup_bytes = (ring_bytes / 4).min(256 * 1024);
        let config = AgentConfig {
            _pad: 0,
            wakeup_bytes,
            offsets,
            generation,
        };
        let btf = Btf::from_sys_fs().map_err(|e| BpfError::LoaderBtf(e.to_string()))?;
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global("AGENT_CONFIG", &config, true)
            .map_max_entries("EVENTS", ring_bytes)
            .map_max_entries("PENDING_CONNECT", settings.pending_connects);
        for name in pins::PINNED {
            loader.map_pin_path(name, pins.map(name));
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| BpfError::Load(chain(&e)))?;
        let mut links = pins.link_pins(generation)?;
        attach::process(&mut ebpf, &btf, &mut links)?;
        let cgroup2 = features.cgroup2.as_deref().unwrap_or("/sys/fs/cgroup");
        let mut holds = Holds {
            connect: attach::network(&mut ebpf, &btf, cgroup2, &mut links)?,
            ..Holds::default()
        };
        // BPF LSM where the kernel runs it; each hook that attaches tells
        // its fallback (the cgroup hook, sched_process_exec) to stand back.
        // Only where `bpf` is in the active LSM list: elsewhere (stock
        // kernels built with BPF LSM but not booted with it) the programs
        // load and attach, yet the kernel never calls them, and standing
        // the fallbacks back would leave nothing held at all.
        if features.bpf_lsm {
            attach_lsm(
                &mut ebpf,
                &btf,
                &mut links,
                &mut holds,
                btf::has_unix(&offsets),
            )?;
        } else {
            info!(
                "BPF LSM is not in the kernel's active LSM list ({}): holding with the fallbacks",
                features.lsm_list
            );
        }

        let ring = take(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let sessions = take(&mut ebpf, "SESSIONS", HashMap::try_from)?;
        let losses = take(&mut ebpf, "LOSSES", PerCpuHashMap::try_from)?;
        let loss_totals = take(&mut ebpf, "LOSS_TOTALS", PerCpuArray::try_from)?;
        let verdicts = take(&mut ebpf, "VERDICTS", HashMap::try_from)?;
        let hold_pending = take(&mut ebpf, "HOLD_PENDING", HashMap::try_from)?;
        candidates::apply(&mut ebpf, candidates.0, candidates.1)?;
        Ok(Self {
            ebpf,
            ring: Some(ring),
            sessions,
            losses,
            loss_totals,
            verdicts,
            hold_pending,
            attached: links.attached,
            holds,
            generation,
            took_over: false,
            content_seed: 0,
            clock: Clock::now(),
            seen_losses: StdHashMap::new(),
        })
    }

    /// The ring buffer, once: its reader polls it for readiness.
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Decodes every event waiting in `ring`.
    pub fn drain(&self, ring: &mut RingBuf<MapData>) -> Drained {
        let mut out = Drained::default();
        while let Some(item) = ring.next() {
            match decode::decode(&item, &self.clock) {
                Ok(r) => out.records.push(r),
                Err(e) => {
                    out.undecodable += 1;
                    warn!(error = %e, "undecodable event");
                }
            }
        }
        out
    }

    /// Whether `tgid` is still a member of `session_id` (sessions survive
    /// a daemon restart in the pinned map).
    pub fn is_member(&self, tgid: u32, session_id: u64) -> bool {
        self.sessions
            .get(&tgid, 0)
            .is_ok_and(|e| e.session_id == session_id)
    }

    /// Whether the kernel still holds this action inside its syscall (a
    /// hold ended by the fail mode while no daemon ran is gone from the map).
    pub fn hold_pending(&self, tgid: u32, digest: u64) -> bool {
        let key = HoldKey {
            tgid,
            _pad: 0,
            digest,
        };
        self.hold_pending.get(&key, 0).is_ok()
    }

    /// Puts `tgid` (and so its future children) into `session_id`.
    pub fn watch(&mut self, tgid: u32, session_id: u64) -> Result<(), BpfError> {
        self.sessions
            .insert(tgid, SessionEntry { session_id }, 0)
            .map_err(|e| BpfError::map("SESSIONS", e))
    }

    /// Stores a one-shot verdict for the held thread `pid` of process
    /// `tgid`: its re-issued syscall consumes it if it is still the action
    /// `digest` names, of the event kind `kind`.
    pub fn set_verdict(
        &mut self,
        (tgid, pid): (u32, u32),
        (kind, digest): (u32, u64),
        allow: bool,
        env: Option<EnvBinding>,
    ) -> Result<(), BpfError> {
        let v = VerdictEntry {
            digest,
            verdict: if allow { Verdict::Allow } else { Verdict::Deny } as u16,
            kind: kind as u16,
            tgid,
            env_hash: env.map_or(0, |e| e.hash),
            env_len: env.map_or(0, |e| e.len),
            env_flags: env.map_or(0, |e| e.verdict_flags()),
        };
        if self.verdicts.insert(pid, v, 0).is_ok() {
            return Ok(());
        }
        // Full: verdicts of threads that are gone (the kernel drops a
        // thread's verdict when it exits; these were left another way)
        // make room; failing that, those of the session that keeps the
        // most threads stopped on untaken verdicts (one session filling
        // the map must not end every other session's holds).
        self.prune_verdicts();
        if self.verdicts.insert(pid, v, 0).is_ok() {
            return Ok(());
        }
        self.evict_parked_verdicts();
        self.verdicts
            .insert(pid, v, 0)
            .map_err(|e| BpfError::map("VERDICTS", e))
    }

    /// Removes the verdicts of stopped threads of the session holding the
    /// most of them: each of those threads, once resumed, is held and
    /// asked about again.
    fn evict_parked_verdicts(&mut self) {
        let entries: Vec<(u32, VerdictEntry)> = self
            .verdicts
            .iter()
            .flatten()
            .filter(|(pid, _)| crate::procfs::stat(*pid).is_some_and(|st| st.stopped()))
            .collect();
        let parked: Vec<Parked> = entries
            .iter()
            .map(|(pid, v)| Parked {
                pid: *pid,
                session: self.sessions.get(&v.tgid, 0).map_or(0, |e| e.session_id),
            })
            .collect();
        let evict = parked_to_evict(&parked);
        for (pid, v) in entries.iter().filter(|(pid, _)| evict.contains(pid)) {
            self.drop_verdict(*pid, v.tgid, v.digest);
        }
        warn!(
            removed = evict.len(),
            "the verdict map was full of verdicts stopped threads never took: removed those of the session with the most"
        );
    }

    /// Removes the verdict of thread `pid` if it is still the one written
    /// for `tgid`, `kind` and `digest` (not taken); true if it was.
    pub fn forget_verdict(&mut self, (tgid, pid): (u32, u32), (kind, digest): (u32, u64)) -> bool {
        let stale = self
            .verdicts
            .get(&pid, 0)
            .is_ok_and(|v| v.tgid == tgid && u32::from(v.kind) == kind && v.digest == digest);
        stale && self.drop_verdict(pid, tgid, digest)
    }

    /// Removes a verdict and its action's pending mark: a thread that
    /// comes back to the action is then held and asked about again, not
    /// stopped for good on a mark that says it was asked already.
    fn drop_verdict(&mut self, pid: u32, tgid: u32, digest: u64) -> bool {
        let key = HoldKey {
            tgid,
            _pad: 0,
            digest,
        };
        let _ = self.hold_pending.remove(&key);
        self.verdicts.remove(&pid).is_ok()
    }

    /// Removes the verdicts of threads that no longer exist.
    fn prune_verdicts(&mut self) {
        let gone: Vec<(u32, VerdictEntry)> = self
            .verdicts
            .iter()
            .flatten()
            .filter(|(pid, _)| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        for (pid, v) in &gone {
            self.drop_verdict(*pid, v.tgid, v.digest);
        }
        warn!(
            removed = gone.len(),
            "the verdict map was full: removed the verdicts of threads that are gone"
        );
    }

    /// Replaces the candidate maps with a new policy's.
    pub fn apply_candidates(&mut self, c: &Candidates, exes: &ExeIndex) -> Result<(), BpfError> {
        candidates::apply(&mut self.ebpf, c, exes)
    }

    /// The kernel-side loss counters, by reason, summed over CPUs.
    pub fn loss_totals(&self) -> Vec<(LossReason, u64)> {
        (1..LOSS_REASONS)
            .filter_map(|i| {
                let reason = LossReason::from_u32(i)?;
                let n = self
                    .loss_totals
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                Some((reason, n))
            })
            .collect()
    }

    /// Loss counts already recorded (by an earlier daemon, on the same
    /// pinned counters), so they are not recorded twice.
    pub fn set_recorded_losses(&mut self, seen: StdHashMap<LossKey, u64>) {
        self.seen_losses = seen;
    }

    /// Turns growth of the per-session loss counters into loss records,
    /// and keeps room in the counter map (see [`Self::prune_losses`]).
    pub fn poll_losses(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        let mut keys = 0;
        for entry in self.losses.iter() {
            keys += 1;
            let Ok((key, values)) = entry else { continue };
            let total: u64 = values.iter().sum();
            let seen = self.seen_losses.entry(key).or_insert(0);
            if total <= *seen {
                continue;
            }
            let (Some(kind), Some(reason)) = (
                EventKind::from_u32(key.kind),
                LossReason::from_u32(key.reason),
            ) else {
                continue;
            };
            let n = total - *seen;
            warn!(
                session = key.session_id,
                kind = kind.name(),
                reason = reason.name(),
                count = n,
                "events lost"
            );
            records.push(Record::loss(key.session_id, wall_now_ns(), kind, reason, n));
            *seen = total;
        }
        if keys >= LOSS_PRUNE_AT {
            self.prune_losses();
        }
        let full = records.iter().any(|r| {
            matches!(
                r.detail,
                Detail::Loss {
                    reason: LossReason::SessionMapFull | LossReason::ForkRefused,
                    ..
                }
            )
        });
        if full {
            self.prune_sessions();
        }
        records
    }

    /// Removes the session map's entries of processes that no longer
    /// exist (each is removed at its exit; these were left another way),
    /// when a fork found the map full.
    fn prune_sessions(&mut self) {
        let gone: Vec<u32> = self
            .sessions
            .keys()
            .flatten()
            .filter(|tgid| !std::path::Path::new(&format!("/proc/{tgid}")).exists())
            .collect();
        for tgid in &gone {
            let _ = self.sessions.remove(tgid);
        }
        warn!(
            removed = gone.len(),
            "the session map was full: removed the entries of processes that are gone"
        );
    }

    /// Removes the counters of sessions that have ended (no member left in
    /// the session map) once their counts are recorded: nothing can count
    /// there any more, and a full map would leave a new session's losses
    /// in the per-reason totals only. Runs only when the map fills up, as
    /// it reads the whole session map.
    fn prune_losses(&mut self) {
        let live: std::collections::HashSet<u64> = self
            .sessions
            .iter()
            .flatten()
            .map(|(_, e)| e.session_id)
            .collect();
        let done: Vec<LossKey> = self
            .losses
            .iter()
            .flatten()
            .filter(|(k, v)| {
                k.session_id != 0
                    && !live.contains(&k.session_id)
                    && self.seen_losses.get(k).copied() == Some(v.iter().sum())
            })
            .map(|(k, _)| k)
            .collect();
        for k in &done {
            if self.losses.remove(k).is_ok() {
                self.seen_losses.remove(k);
            }
        }
        info!(
            removed = done.len(),
            "loss counters of ended sessions removed (their counts are recorded)"
        );
    }
}

/// The BPF LSM programs, each one where the kernel accepts it.
fn attach_lsm(
    ebpf: &mut Ebpf,
    btf: &Btf,
    links: &mut pins::LinkPins,
    holds: &mut Holds,
    unix: bool,
) -> Result<(), BpfError> {
    match attach::lsm(ebpf, btf, links, "lsm_task_alloc", "task_alloc") {
        Ok(()) => holds.lsm_fork = true,
        Err(why) => warn!("BPF LSM task_alloc not attached: {why}"),
    }
    // The ways out that never call connect(2) first: connect holds move
    // to BPF LSM only with both hooks in place (socket_sendmsg acts only
    // once MODE_LSM_CONNECT is set).
    let sendmsg = attach::lsm(ebpf, btf, links, "lsm_socket_sendmsg", "socket_sendmsg");
    let connect = match sendmsg {
        Ok(()) => attach::lsm(ebpf, btf, links, "lsm_socket_connect", "socket_connect"),
        Err(e) => Err(e),
    };
    match connect {
        Ok(()) => {
            candidates::set_mode(ebpf, MODE_LSM_CONNECT, true)?;
            holds.lsm_connect = true;
            holds.connect = true;
        }
        Err(why) => info!("BPF LSM socket_sendmsg and socket_connect not attached: {why}"),
    }
    if holds.lsm_connect {
        match attach::lsm_exec(ebpf, btf, links) {
            Ok(()) => {
                candidates::set_mode(ebpf, MODE_LSM_EXEC, true)?;
                holds.lsm_exec = true;
            }
            Err(why) => warn!("BPF LSM bprm_creds_for_exec not attached: {why}"),
        }
        match attach::lsm(ebpf, btf, links, "lsm_file_open", "file_open") {
            Ok(()) => holds.lsm_file = true,
            Err(why) => warn!("BPF LSM file_open not attached: {why}"),
        }
        // The path hooks (CONFIG_SECURITY_PATH): writes that open nothing.
        let mut paths = holds.lsm_file;
        // Each with the path (bpf_d_path), or where this kernel refuses
        // that helper in the hook (6.1), with the file's name only.
        for (name, named, hook) in [
            (
                "lsm_path_truncate",
                "lsm_path_truncate_named",
                "path_truncate",
            ),
            ("lsm_path_rename", "lsm_path_rename_named", "path_rename"),
            ("lsm_path_link", "lsm_path_link_named", "path_link"),
            ("lsm_path_symlink", "lsm_path_symlink_named", "path_symlink"),
            ("lsm_path_unlink", "lsm_path_unlink_named", "path_unlink"),
            ("lsm_path_rmdir", "lsm_path_rmdir_named", "path_rmdir"),
        ] {
            let attached = attach::lsm(ebpf, btf, links, name, hook).or_else(|why| {
                info!("BPF LSM {hook} with bpf_d_path refused ({why}): the file's name only");
                attach::lsm(ebpf, btf, links, named, hook)
            });
            if let Err(why) = attached {
                warn!("BPF LSM {hook} not attached: {why}");
                paths = false;
            }
        }
        holds.lsm_file_paths = paths;
        if unix {
            let stream = attach::lsm(
                ebpf,
                btf,
                links,
                "lsm_unix_stream_connect",
                "unix_stream_connect",
            );
            match stream
                .and_then(|()| attach::lsm(ebpf, btf, links, "lsm_unix_may_send", "unix_may_send"))
            {
                Ok(()) => holds.lsm_unix = true,
                Err(why) => {
                    warn!("BPF LSM unix_stream_connect and unix_may_send not attached: {why}")
                }
            }
        } else {
            warn!(
                "AF_UNIX is not in the kernel's own BTF (a module?): Unix socket connects are neither recorded nor held"
            );
        }
    }
    Ok(())
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    conv(map).map_err(|e| BpfError::map(name, e))
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_verdict_map_gives_up_the_session_that_parks_the_most() {
        let p = |pid, session| Parked { pid, session };
        let parked = [p(1, 7), p(2, 9), p(3, 9), p(4, 9), p(5, 7), p(6, 0)];
        assert_eq!(parked_to_evict(&parked), [2, 3, 4]);
        assert_eq!(parked_to_evict(&[p(1, 7), p(2, 9)]), [1], "tie: lowest id");
        assert!(parked_to_evict(&[]).is_empty());
    }
}
