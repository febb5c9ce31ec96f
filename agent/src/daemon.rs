//! `airlock daemon`: detect, load, serve, and drain on SIGTERM/SIGINT.

use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use airlock_common::{EventKind, LossKey, LossReason};

use crate::{
    config::Config,
    ctl::{self, StatusReport},
    features, recorder,
    sensors::{
        Sensor,
        pins::{PinDir, spawn_heartbeat},
    },
    stats::Stats,
    store::Store,
};

/// Takes the data directory's lock: one daemon per store and pin set.
fn lock(config: &Config) -> anyhow::Result<std::fs::File> {
    let path = config.lock_path();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.data_dir.display()))?;
    let file =
        std::fs::File::create(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another airlock daemon is running on {} (it holds {}); stop it first",
            config.data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("locking {}: {e}", path.display()),
    }
}

/// Sessions the store has open: those whose root process is still a member
/// in the kernel (the pinned session map outlived the last daemon) go on,
/// with their roots returned; the others are ended now.
fn take_over_sessions(
    store: &mut Store,
    sensor: &Sensor,
) -> anyhow::Result<std::collections::HashMap<u64, u32>> {
    let mut roots = std::collections::HashMap::new();
    let mut ended = 0;
    let now = crate::event::wall_now_ns();
    for (id, root) in store.open_sessions()? {
        if sensor.is_member(root, id) {
            roots.insert(id, root);
        } else {
            store.end_session(id, now)?;
            ended += 1;
        }
    }
    if ended > 0 {
        warn!(ended, "ended sessions whose processes are gone");
    }
    if !roots.is_empty() {
        info!(
            sessions = roots.len(),
            "still watching sessions from an earlier daemon"
        );
    }
    Ok(roots)
}

/// Pending requests whose process is still there but no longer held: the
/// hold ended while no daemon ran.
fn holds_ended(
    pending: &[crate::broker::ApprovalRequest],
    sensor: &Sensor,
) -> std::collections::HashSet<u64> {
    pending
        .iter()
        .filter(|r| {
            let Some((state, _, start)) = crate::broker::process::stat(r.tgid) else {
                return false;
            };
            let held = if r.in_syscall {
                sensor.hold_pending(r.tgid, r.digest)
            } else {
                state == 'T' || state == 't'
            };
            start == r.start_time && !held
        })
        .map(|r| r.id)
        .collect()
}

/// What an earlier daemon already recorded of the pinned loss counters.
fn recorded_losses(store: &Store) -> anyhow::Result<std::collections::HashMap<LossKey, u64>> {
    let mut seen = std::collections::HashMap::new();
    for (session_id, kind, reason, count) in store.recorded_losses()? {
        let (Some(k), Some(r)) = (EventKind::from_name(&kind), LossReason::from_name(&reason))
        else {
            continue;
        };
        let key = LossKey {
            session_id,
            kind: k as u32,
            reason: r as u32,
        };
        seen.insert(key, count);
    }
    Ok(seen)
}

/// What can be recorded in every mode today.
const RECORDS: &[&str] = &["fork", "exec", "exit", "connect", "accept", "udp_send"];

/// What rules can do in this build, which uses no BPF LSM program yet.
fn enforces(connect_hold: bool, lsm_connect: bool, lsm_exec: bool, lsm_file: bool) -> Vec<String> {
    let mut v = if lsm_exec {
        vec![
            "exec hold: execve waits and is re-issued (BPF LSM bprm_creds_for_exec; allow runs the program, deny fails execve with EPERM)",
            "exec deny: execve fails with EPERM",
        ]
    } else {
        vec![
            "exec hold: stopped before its first instruction (allow resumes it, deny kills it with SIGKILL)",
            "exec deny: killed with SIGKILL before its first instruction",
        ]
    };
    v.push(if lsm_connect {
        "connect hold: the syscall waits and is re-issued (BPF LSM socket_connect; allow connects, deny fails with EPERM)"
    } else if connect_hold {
        "connect hold: the syscall waits and is re-issued (cgroup connect hook; allow connects, deny fails with EPERM)"
    } else {
        "connect hold: not possible on this kernel without BPF LSM: flagged connects fail with EPERM"
    });
    v.push("connect deny: EPERM");
    v.push(if lsm_file {
        "file: candidate opens (files and directories named by file rules) are recorded and held inside open (BPF LSM file_open)"
    } else {
        "file: not possible without BPF LSM: file rules are not enforced and file opens not recorded"
    });
    v.into_iter().map(String::from).collect()
}

/// How long the drain after SIGTERM may take before the daemon gives up.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub fn run(config: Config) -> anyhow::Result<()> {
    let features = features::detect();
    if let Some(why) = features.missing() {
        anyhow::bail!("cannot start: {why}");
    }
    for m in &features.mounted {
        info!("mounted {m}");
    }
    let _lock = lock(&config)?;
    let mut store = Store::open(&config.db_path())?;
    let pid = std::process::id();
    let pins = PinDir::new(&config.pin_dir);
    let policy = crate::policy::Policy::load_dirs(&config.policy_dirs).map_err(|e| {
        anyhow::anyhow!(
            "the policy does not load (check it with `airlock policy check FILE...`):\n{e}"
        )
    })?;
    store.insert_policy_load(&crate::policy::reload::load_record("start", Ok(&policy)))?;
    let policy_line = crate::policy::reload::describe(&policy);
    let candidates = policy.candidates();
    for note in &candidates.notes {
        info!("policy: {note}");
    }
    let mut sensor = Sensor::load(features, pid, &config, &candidates, &pins)?;
    let roots = take_over_sessions(&mut store, &sensor)?;
    if sensor.took_over {
        sensor.set_recorded_losses(recorded_losses(&store)?);
    }
    spawn_heartbeat(
        pins.control()?,
        Duration::from_millis(config.heartbeat_timeout_ms / 5),
    )?;
    let pending = store.requests(Some("pending"))?;
    let ended = holds_ended(&pending, &sensor);
    let api_listener = std::net::TcpListener::bind(config.api_listen)
        .map_err(|e| anyhow::anyhow!("approval API on {}: {e}", config.api_listen))?;
    api_listener.set_nonblocking(true)?;
    let api_addr = api_listener.local_addr()?;
    let (listener_std, allowed_gid) =
        ctl::bind(&config.socket_path, config.socket_group.as_deref())?;
    let enforce = enforces(
        sensor.connect_hold,
        sensor.lsm_connect,
        sensor.lsm_exec,
        sensor.lsm_file,
    );
    let mode = if sensor.lsm_exec {
        "record and hold with BPF LSM: execve and connect wait inside the syscall"
    } else if sensor.lsm_connect {
        "record and hold (BPF LSM holds connects; execs are held at sched_process_exec)"
    } else {
        features.mode()
    };
    let survival = format!(
        "programs pinned at {} (generation {}{}); with no daemon for {} ms, held actions fail {}",
        config.pin_dir.display(),
        sensor.generation,
        if sensor.took_over {
            ", took over from an earlier daemon"
        } else {
            ""
        },
        config.heartbeat_timeout_ms,
        config.fail_mode.name()
    );
    info!(
        "airlock daemon {} pid {pid}: mode {}; records {}; enforces {}; {survival}; policy {policy_line} ({}); kernel {}; store {}; socket {}; approval API http://{}",
        env!("CARGO_PKG_VERSION"),
        mode,
        RECORDS.join(", "),
        enforce.join("; "),
        config
            .policy_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        features.kernel,
        config.db_path().display(),
        config.socket_path.display(),
        api_addr
    );
    let status = StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        policy: String::new(),
        pid,
        mode: mode.into(),
        kernel: features.kernel.clone(),
        bpf_lsm: features.bpf_lsm,
        can_record: RECORDS.iter().map(|s| s.to_string()).collect(),
        can_enforce: enforce,
        programs: sensor.attached.clone(),
        survival,
        store: config.db_path().display().to_string(),
        api: format!("http://{api_addr}"),
        uptime_s: 0,
        sessions_registered: 0,
        events: Vec::new(),
        records_written: 0,
        losses: Vec::new(),
        decode_errors: 0,
        store_errors: 0,
    };

    let stats = Arc::new(Stats::default());
    let (rec_tx, rec_rx) = mpsc::channel(256);
    let recorder = {
        let stats = stats.clone();
        let batch_max = config.batch_max;
        std::thread::Builder::new()
            .name("airlock-recorder".into())
            .spawn(move || recorder::run(store, rec_rx, batch_max, stats, roots))?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener_std)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (sensor_tx, sensor_rx) = mpsc::channel(64);
        let (broker_tx, broker_rx) = mpsc::channel(1024);
        let (updates, _) = tokio::sync::broadcast::channel(256);
        let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
        let policy_summary = Arc::new(std::sync::Mutex::new(format!(
            "{policy_line}; loaded at start"
        )));
        let reloader = crate::policy::reload::Reloader {
            dirs: config.policy_dirs.clone(),
            policy: policy_tx,
            sensor: sensor_tx.clone(),
            recorder: rec_tx.clone(),
            summary: policy_summary.clone(),
        };
        tokio::spawn(reloader.run(shutdown_rx.clone()));
        let broker = crate::broker::Broker::new(
            policy_rx,
            config.approvers.clone(),
            rec_tx.clone(),
            sensor_tx.clone(),
            updates.clone(),
            config.db_path(),
            pending,
            ended,
        );
        let broker_task = tokio::spawn(broker.run(broker_rx));
        let api_state = Arc::new(crate::api::ApiState::new(
            broker_tx.clone(),
            &config.approvers,
            config.db_path(),
            updates,
        ));
        let api_task = tokio::spawn(crate::api::serve(
            tokio::net::TcpListener::from_std(api_listener)?,
            api_state,
            shutdown_rx.clone(),
        ));
        let ctx = Arc::new(ctl::Context {
            sensor: sensor_tx,
            recorder: rec_tx.clone(),
            stats: stats.clone(),
            status,
            started: std::time::Instant::now(),
            allowed_gid,
            policy: policy_summary,
        });
        let mut sensor_task = tokio::spawn(sensor.run(
            sensor_rx,
            rec_tx,
            broker_tx,
            stats.clone(),
            Duration::from_millis(config.loss_poll_ms),
            shutdown_rx.clone(),
        ));
        let ctl_task = tokio::spawn(ctl::serve(listener, ctx, shutdown_rx));

        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let early = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); None }
            _ = int.recv() => { info!("SIGINT: draining"); None }
            r = &mut sensor_task => Some(r),
        };
        let _ = shutdown_tx.send(true);
        let _ = tokio::time::timeout(DRAIN_LIMIT, ctl_task).await;
        let _ = tokio::time::timeout(DRAIN_LIMIT, api_task).await;
        let sensor_result = match early {
            Some(r) => Ok(r),
            None => tokio::time::timeout(DRAIN_LIMIT, sensor_task).await,
        };
        match sensor_result {
            Ok(Ok(Ok(()))) => {
                // The sensor dropped its broker sender; the API's is gone too.
                let _ = tokio::time::timeout(DRAIN_LIMIT, broker_task).await;
                anyhow::Ok(())
            }
            Ok(Ok(Err(e))) => Err(anyhow::anyhow!("sensor failed: {e}")),
            Ok(Err(e)) => Err(anyhow::anyhow!("sensor task panicked: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "sensor did not drain within {DRAIN_LIMIT:?}"
            )),
        }
    });
    // The context held a recorder sender; with the runtime gone every sender
    // is dropped and the recorder finishes its last batch.
    drop(rt);
    if recorder.join().is_err() {
        error!("recorder thread panicked");
    }
    let _ = std::fs::remove_file(&config.socket_path);
    info!("airlock daemon stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_records_name_their_kind_and_reason_by_stable_names() {
        for (name, kind) in [
            ("exec", EventKind::Exec),
            ("file_open", EventKind::FileOpen),
            ("connect_held", EventKind::ConnectHeld),
            ("loss", EventKind::Loss),
        ] {
            assert_eq!(EventKind::from_name(name), Some(kind));
        }
        assert_eq!(EventKind::from_name("nothing"), None);
        assert_eq!(
            LossReason::from_name("hold_unpublished"),
            Some(LossReason::HoldUnpublished)
        );
        assert_eq!(LossReason::from_name("ringbuf"), None);
    }
}
