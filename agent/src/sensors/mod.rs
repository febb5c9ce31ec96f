//! The sensor task: the one owner of the loaded eBPF object and its maps.
//! Everyone else talks to it with [`Command`]s over a channel.

mod exec;
pub mod files;
mod lsm;
mod net;
pub mod pins;
mod rules;

pub use rules::trie_key;

use std::collections::HashMap as StdHashMap;

use airlock_common::{
    AgentConfig, EventKind, HoldKey, LOSS_REASONS, LossKey, LossReason, SessionEntry, Verdict,
    VerdictEntry,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, warn};

use crate::{
    broker::BrokerMsg,
    event::{Clock, Record, decode, loss_record},
    features::Features,
    recorder::RecorderMsg,
    stats::Stats,
};

/// The kernel programs, built by build.rs and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/airlock"));

/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Names of the programs attached, for `airlock status`.
pub type Attached = Vec<String>;

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("{0}")]
    Btf(#[from] crate::btf::BtfError),
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
    #[error("watching the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("{0}")]
    Pins(#[from] pins::PinError),
    #[error("activating the programs: {0}")]
    Activate(String),
}

impl SensorError {
    /// Keeps the verifier log, which aya puts in the error's Display chain.
    fn program(name: &'static str, e: impl std::error::Error) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::Program { name, message }
    }

    fn map(name: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Map {
            name,
            message: e.to_string(),
        }
    }
}

/// Requests to the sensor task.
pub enum Command {
    /// Put `tgid` (and so its future children) into `session_id`.
    Watch {
        tgid: u32,
        session_id: u64,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Snapshot of the kernel-side loss counters by reason.
    LossTotals {
        reply: oneshot::Sender<Vec<(&'static str, u64)>>,
    },
    /// Store a one-shot verdict for a held connect (the caller then resumes
    /// the task, whose retried connect consumes it).
    Verdict {
        /// The held thread.
        pid: u32,
        digest: u64,
        allow: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Replace the candidate maps with a new policy's.
    Candidates {
        candidates: Box<crate::policy::candidates::Candidates>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The loaded programs and the maps the daemon uses.
pub struct Sensor {
    // Dropping the Ebpf object detaches everything: keep it alive.
    ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    sessions: HashMap<MapData, u32, SessionEntry>,
    losses: PerCpuHashMap<MapData, LossKey, u64>,
    loss_totals: PerCpuArray<MapData, u64>,
    verdicts: HashMap<MapData, u32, VerdictEntry>,
    hold_pending: HashMap<MapData, HoldKey, u8>,
    /// Programs attached, in words.
    pub attached: Attached,
    /// Whether connects can be held (LSM hook, or the cgroup hook on 6.18+).
    pub connect_hold: bool,
    /// Whether the BPF LSM socket_connect program holds them.
    pub lsm_connect: bool,
    /// Whether the BPF LSM bprm_creds_for_exec program holds execs.
    pub lsm_exec: bool,
    /// Whether the BPF LSM file_open program holds candidate opens.
    pub lsm_file: bool,
    /// This load's generation, and whether it took over pinned maps (and
    /// so sessions, holds and unread events) from an earlier daemon.
    pub generation: u64,
    pub took_over: bool,
    clock: Clock,
    seen_losses: StdHashMap<LossKey, u64>,
}

impl Sensor {
    /// Loads every program as the next generation on the pinned maps,
    /// attaches and pins them, then makes them the active generation (the
    /// previous daemon's programs, if any, fall silent and are detached).
    /// `daemon_tgid` is never recorded.
    pub fn load(
        features: &Features,
        daemon_tgid: u32,
        settings: &crate::config::Config,
        candidates: &crate::policy::candidates::Candidates,
        pins: &pins::PinDir,
    ) -> Result<Self, SensorError> {
        let ring_bytes = settings.ring_buffer_kib * 1024;
        let (previous, last) = pins.prepare(ring_bytes, daemon_tgid)?;
        let generation = last + 1;
        let loaded = Self::load_generation(
            features,
            daemon_tgid,
            settings,
            candidates,
            pins,
            generation,
        );
        let mut sensor = match loaded {
            Ok(s) => s,
            Err(e) => {
                pins.drop_links(generation);
                return Err(e);
            }
        };
        let mut control = pins.control()?;
        pins::activate(
            &mut control,
            generation,
            settings.heartbeat_timeout_ms * 1_000_000,
            settings.fail_mode == crate::config::FailMode::Open,
            daemon_tgid,
        )
        .map_err(SensorError::Activate)?;
        pins.retire_links(generation);
        sensor.took_over = previous != pins::Previous::Nothing;
        Ok(sensor)
    }

    fn load_generation(
        features: &Features,
        daemon_tgid: u32,
        settings: &crate::config::Config,
        candidates: &crate::policy::candidates::Candidates,
        pins: &pins::PinDir,
        generation: u64,
    ) -> Result<Self, SensorError> {
        let ring_bytes = settings.ring_buffer_kib * 1024;
        let offsets = crate::btf::kernel_offsets()?;
        // A quarter of the ring, at most 256 KiB, before the kernel wakes us.
        let wakeup_bytes = (ring_bytes / 4).min(256 * 1024);
        let config = AgentConfig {
            daemon_tgid,
            wakeup_bytes,
            offsets,
            generation,
        };
        let btf = Btf::from_sys_fs().map_err(|e| SensorError::LoaderBtf(e.to_string()))?;
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global("AGENT_CONFIG", &config, true)
            .map_max_entries("EVENTS", ring_bytes);
        for name in pins::PINNED {
            loader.map_pin_path(name, pins.map(name));
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| SensorError::Load(chain(&e)))?;
        let link_pins = pins.link_pins(generation)?;
        let mut attached = Vec::new();
        exec::attach(&mut ebpf, &btf, &link_pins, &mut attached)?;
        let cgroup2 = features
            .cgroup2
            .clone()
            .unwrap_or_else(|| "/sys/fs/cgroup".into());
        let mut connect_hold = net::attach(&mut ebpf, &cgroup2, &link_pins, &mut attached)?;
        let lsm_connect = match lsm::attach(&mut ebpf, &btf, &link_pins, &mut attached) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!("BPF LSM socket_connect not attached: {why}");
                false
            }
        };
        connect_hold |= lsm_connect;
        let lsm_exec = lsm_connect
            && match lsm::attach_exec(&mut ebpf, &btf, &link_pins, &mut attached) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!("BPF LSM bprm_creds_for_exec not attached: {why}");
                    false
                }
            };
        let lsm_file = lsm_connect
            && match lsm::attach_file(&mut ebpf, &btf, &link_pins, &mut attached) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!("BPF LSM file_open not attached: {why}");
                    false
                }
            };

        let ring = take(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let sessions = take(&mut ebpf, "SESSIONS", HashMap::try_from)?;
        let losses = take(&mut ebpf, "LOSSES", PerCpuHashMap::try_from)?;
        let loss_totals = take(&mut ebpf, "LOSS_TOTALS", PerCpuArray::try_from)?;
        let verdicts = take(&mut ebpf, "VERDICTS", HashMap::try_from)?;
        let hold_pending = take(&mut ebpf, "HOLD_PENDING", HashMap::try_from)?;
        rules::apply(&mut ebpf, candidates)?;
        Ok(Self {
            ebpf,
            ring: Some(ring),
            sessions,
            losses,
            loss_totals,
            verdicts,
            hold_pending,
            attached,
            connect_hold,
            lsm_connect,
            lsm_exec,
            lsm_file,
            generation,
            took_over: false,
            clock: Clock::now(),
            seen_losses: StdHashMap::new(),
        })
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

    /// Loss counts already recorded (by an earlier daemon, on the same
    /// pinned counters), so they are not recorded twice.
    pub fn set_recorded_losses(&mut self, seen: StdHashMap<LossKey, u64>) {
        self.seen_losses = seen;
    }

    /// Runs until `shutdown` turns true, then drains what the kernel still
    /// holds and the loss counters, so nothing recorded is left behind.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        out: mpsc::Sender<RecorderMsg>,
        broker: mpsc::Sender<BrokerMsg>,
        stats: std::sync::Arc<Stats>,
        loss_poll: std::time::Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SensorError> {
        let ring = self.ring.take().ok_or(SensorError::MissingMap("EVENTS"))?;
        // SAFETY: the AsyncFd owns the RingBuf, whose map fd stays open (and is
        // not closed behind tokio's back) for as long as the AsyncFd lives.
        let mut ring =
            unsafe { AsyncFd::register(ring) }.map_err(|e| SensorError::Poll(e.into_parts().1))?;
        let mut tick = tokio::time::interval(loss_poll);
        // The kernel batches wakeups (see AgentConfig::wakeup_bytes): drain
        // on this timer too, so a quiet session's events still arrive fast.
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = drain.tick() => {
                    let batch = self.drain(ring.get_mut(), &stats);
                    send(&out, &broker, batch).await;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(SensorError::Poll)?;
                    let batch = self.drain(guard.get_inner_mut(), &stats);
                    guard.clear_ready();
                    send(&out, &broker, batch).await;
                }
                Some(cmd) = commands.recv() => self.command(cmd),
                _ = tick.tick() => {
                    let losses = self.poll_losses();
                    send(&out, &broker, losses).await;
                }
                _ = shutdown.changed() => break,
            }
        }
        let batch = self.drain(ring.get_mut(), &stats);
        send(&out, &broker, batch).await;
        let losses = self.poll_losses();
        send(&out, &broker, losses).await;
        Ok(())
    }

    fn drain(&self, ring: &mut RingBuf<MapData>, stats: &Stats) -> Vec<Record> {
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            match decode(&item, &self.clock) {
                Ok(r) => {
                    stats.count_event(r.kind.0);
                    batch.push(r);
                }
                Err(e) => {
                    stats
                        .decode_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(error = %e, "undecodable event");
                }
            }
        }
        batch
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Watch {
                tgid,
                session_id,
                reply,
            } => {
                let r = self
                    .sessions
                    .insert(tgid, SessionEntry { session_id }, 0)
                    .map_err(|e| e.to_string());
                debug!(tgid, session_id, ok = r.is_ok(), "watch");
                let _ = reply.send(r);
            }
            Command::Verdict {
                pid,
                digest,
                allow,
                reply,
            } => {
                let v = VerdictEntry {
                    digest,
                    verdict: if allow { Verdict::Allow } else { Verdict::Deny } as u32,
                    _pad: 0,
                };
                let _ = reply.send(self.verdicts.insert(pid, v, 0).map_err(|e| e.to_string()));
            }
            Command::Candidates { candidates, reply } => {
                let r = rules::apply(&mut self.ebpf, &candidates).map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::LossTotals { reply } => {
                let mut totals = Vec::new();
                for reason in 1..LOSS_REASONS {
                    let Some(r) = LossReason::from_u32(reason) else {
                        continue;
                    };
                    let n = self
                        .loss_totals
                        .get(&reason, 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0);
                    totals.push((r.name(), n));
                }
                let _ = reply.send(totals);
            }
        }
    }

    /// Turns growth of the per-session loss counters into loss records.
    fn poll_losses(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        for entry in self.losses.iter() {
            let Ok((key, values)) = entry else { continue };
            let total: u64 = values.iter().sum();
            let seen = self.seen_losses.entry(key).or_insert(0);
            if total > *seen {
                let (Some(kind), Some(reason)) = (
                    EventKind::from_u32(key.kind),
                    LossReason::from_u32(key.reason),
                ) else {
                    continue;
                };
                warn!(
                    session = key.session_id,
                    kind = kind.name(),
                    reason = reason.name(),
                    count = total - *seen,
                    "events lost"
                );
                records.push(loss_record(key.session_id, kind, reason, total - *seen));
                *seen = total;
            }
        }
        records
    }
}

/// Hands a batch to the recorder, and holds and exits to the broker.
async fn send(
    out: &mpsc::Sender<RecorderMsg>,
    broker: &mpsc::Sender<BrokerMsg>,
    batch: Vec<Record>,
) {
    if batch.is_empty() {
        return;
    }
    for r in &batch {
        let msg = match (r.hold, &r.detail) {
            (Some(hold), _) => BrokerMsg::Held {
                record: r.clone(),
                hold,
            },
            (None, crate::event::Detail::Exit(_)) => BrokerMsg::Exited { tgid: r.tgid },
            _ => continue,
        };
        if broker.send(msg).await.is_err() {
            warn!("broker is gone");
        }
    }
    if out.send(RecorderMsg::Records(batch)).await.is_err() {
        warn!("recorder is gone; records dropped");
    }
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, SensorError> {
    let map = ebpf.take_map(name).ok_or(SensorError::MissingMap(name))?;
    conv(map).map_err(|e| SensorError::map(name, e))
}

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
