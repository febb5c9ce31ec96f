//! Keeps the policy in force current: reloads on SIGHUP and when a file in
//! the policy directories changes. A new policy replaces the old one only
//! once it has loaded whole and its candidates are in the kernel; a bad
//! file keeps the old one. Every attempt is stored.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info};

use super::{
    handles::{HandleError, RecorderHandle, SensorHandle},
    inforce::InForce,
};
use crate::{
    exefile::ExeIndex,
    model::{PolicyLoad, wall_now_ns},
    policy::{Policy, PolicyErrors},
};

/// How often the policy directories are looked at for changes.
const POLL: Duration = Duration::from_secs(1);

/// How often the executables the policy names are looked up again: a
/// package upgrade replaces `/usr/bin/curl` with a new file (a new inode),
/// and a file a rule names may appear after the policy loaded.
const REINDEX: Duration = Duration::from_secs(5);

pub struct Reloader {
    pub dirs: Vec<PathBuf>,
    pub policy: watch::Sender<Arc<InForce>>,
    pub sensor: SensorHandle,
    pub recorder: RecorderHandle,
    /// The policy in force and the last reload's outcome, for `airlock status`.
    pub status: watch::Sender<PolicyStatus>,
}

/// The policy in force, and why the last reload was refused if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    /// What is in force and since when: "N rules (...) from M files; loaded at start".
    pub in_force: String,
    /// The last reload's refusal: its trigger and first error.
    pub refused: Option<String>,
}

impl PolicyStatus {
    pub fn loaded_at_start(policy: &Policy) -> Self {
        Self {
            in_force: format!("{}; loaded at start", policy.describe()),
            refused: None,
        }
    }

    /// The line `airlock status` shows.
    pub fn line(&self) -> String {
        match &self.refused {
            Some(why) => format!("{}; last reload refused {why}", self.in_force),
            None => self.in_force.clone(),
        }
    }
}

/// The stored record of a load.
pub fn load_record(trigger: &str, r: Result<&Policy, &PolicyErrors>) -> PolicyLoad {
    match r {
        Ok(p) => PolicyLoad {
            ts: wall_now_ns(),
            trigger: trigger.into(),
            ok: true,
            rules: p.rules.len(),
            files: p.files.iter().map(|f| f.display().to_string()).collect(),
            error: None,
        },
        Err(e) => PolicyLoad {
            ts: wall_now_ns(),
            trigger: trigger.into(),
            ok: false,
            rules: 0,
            files: Vec::new(),
            error: Some(e.to_string()),
        },
    }
}

impl Reloader {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                error!(error = %e, "cannot catch SIGHUP: the policy reloads on file changes only");
                None
            }
        };
        let mut last = fingerprint(&self.dirs);
        let mut tick = tokio::time::interval(POLL);
        let mut reindex = tokio::time::interval(REINDEX);
        loop {
            let (trigger, now) = tokio::select! {
                _ = reindex.tick() => {
                    self.reindex().await;
                    continue;
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => ("SIGHUP", fingerprint(&self.dirs)),
                _ = tick.tick() => {
                    let now = fingerprint(&self.dirs);
                    if now == last {
                        continue;
                    }
                    ("file change", now)
                }
                _ = shutdown.changed() => return,
            };
            last = now;
            self.reload(trigger).await;
        }
    }

    async fn reload(&self, trigger: &str) {
        let dirs = self.dirs.clone();
        let load = move || Policy::load_dirs(&dirs).map(InForce::new);
        let loaded = match tokio::task::spawn_blocking(load).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "policy load panicked: the old policy stays in force");
                return;
            }
        };
        let mut record = load_record(trigger, loaded.as_ref().map(|f| &f.policy));
        match loaded {
            Ok(in_force) => match self.install(Arc::new(in_force)).await {
                Ok(in_force) => {
                    let line = in_force.policy.describe();
                    info!(trigger, "policy reloaded: {line}");
                    self.status.send_replace(PolicyStatus {
                        in_force: format!("{line}; reloaded ({trigger})"),
                        refused: None,
                    });
                    let _ = self.policy.send(in_force);
                }
                Err(e) => {
                    error!(trigger, error = %e, "the new policy's candidates could not be written: the old policy stays in force");
                    let old = self.policy.borrow().clone();
                    let _ = self.install(old).await;
                    record.ok = false;
                    record.error = Some(e.to_string());
                }
            },
            Err(errors) => {
                error!(
                    trigger,
                    "policy reload refused, the old policy stays in force:\n{errors}"
                );
                let first = errors.0.first().map(|e| e.to_string()).unwrap_or_default();
                self.status
                    .send_modify(|s| s.refused = Some(format!("({trigger}): {first}")));
            }
        }
        if let Err(e) = self.recorder.policy_load(record).await {
            error!("{e}: a policy load was not stored");
        }
    }

    /// Looks the policy's executables, sockets and protected files up
    /// again and, where a file changed (replaced, new, gone), puts the new
    /// files in force. A protected file or directory stays protected by
    /// its inode even where its path no longer names it (renamed away).
    async fn reindex(&self) {
        let current = self.policy.borrow().clone();
        let c = current.clone();
        let exes = match tokio::task::spawn_blocking(move || {
            let mut exes = ExeIndex::of(&c.candidates);
            exes.keep_protected(&c.exes);
            exes
        })
        .await
        {
            Ok(exes) => exes,
            Err(e) => {
                error!(error = %e, "looking the policy's executables up again failed: the old files stay in force");
                return;
            }
        };
        if exes == current.exes {
            return;
        }
        let in_force = Arc::new(InForce {
            policy: current.policy.clone(),
            candidates: current.candidates.clone(),
            exes,
        });
        match self.install(in_force).await {
            Ok(in_force) => {
                info!(
                    files = in_force.exes.len(),
                    "the executables the policy names changed on disk: their files are in force"
                );
                let _ = self.policy.send(in_force);
            }
            Err(e) => {
                error!(error = %e, "the policy's changed executables could not be written: the old files stay in force");
                let _ = self.install(current).await;
            }
        }
    }

    /// Writes the candidates into the kernel; `in_force` back when they are in.
    async fn install(&self, in_force: Arc<InForce>) -> Result<Arc<InForce>, HandleError> {
        self.sensor.candidates(in_force.clone()).await?;
        Ok(in_force)
    }
}

/// Names, sizes and modification times of the policy files.
fn fingerprint(dirs: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if !matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                continue;
            }
            let meta = e.metadata().ok();
            out.push((
                p,
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            ));
        }
    }
    out.sort();
    out
}
