//! The top floor: `airlock daemon`, the only place with channels, tasks
//! and threads. [`run`] validates, then detects and mounts, locks, loads,
//! starts the actors, serves, and drains under one deadline.
//!
//! Actors (each serves the message enum of [`handles`], reached through a
//! typed handle): the sensor task (owns the kernel programs), the recorder
//! thread (owns the store's writer), the broker (decides holds). The
//! router hands the sensor's records to the recorder and the broker; the
//! reloader, the control socket and the API talk to them by handle.

pub mod api;
mod assemble;
pub mod broker;
mod ctl;
mod handles;
mod heartbeat;
mod recorder;
mod reload;
mod router;
mod sensor;
mod start;
mod stats;
mod status;
#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info};

pub use self::assemble::{Assembly, Parts, assemble};
pub use self::handles::{BrokerHandle, HandleError, SensorHandle};
use crate::{
    bpf::{Bpf, BpfError, pins::PinDir},
    config::Config,
    features,
    model::State,
    policy::{Policy, PolicyErrors},
    store::{Store, StoreError},
};

/// How long the drain after SIGTERM may take in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Why the daemon did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the policy does not load (check it with `airlock policy check FILE...`):\n{0}")]
    Policy(PolicyErrors),
    #[error("socket_group {0:?} does not exist (create it, or remove socket_group)")]
    NoSocketGroup(String),
    #[error("cannot start: {0}")]
    Kernel(String),
    #[error(transparent)]
    Lock(#[from] start::LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Pins(#[from] crate::bpf::pins::PinError),
    #[error(transparent)]
    Socket(#[from] ctl::BindError),
    #[error("approval API on {addr}: {source}")]
    Api {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the sensor failed: {0}")]
    Sensor(String),
}

impl DaemonError {
    /// A mistake in the configuration or policy (exit 64), found before
    /// anything was mounted, locked or created.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Policy(_) | Self::NoSocketGroup(_))
    }
}

/// Everything bound and loaded, ready to serve.
struct Ready {
    config: Config,
    policy: Policy,
    store: Store,
    bpf: Bpf,
    api: std::net::TcpListener,
    ctl: std::os::unix::net::UnixListener,
    allowed_gid: Option<u32>,
    facts: status::Facts,
    roots: std::collections::HashMap<u64, u32>,
}

pub fn run(config: Config) -> Result<(), DaemonError> {
    let policy = validate(&config)?;
    let features = features::detect();
    if let Some(why) = features.missing() {
        return Err(DaemonError::Kernel(why));
    }
    for m in &features.mounted {
        info!("mounted {m}");
    }
    let _lock = start::lock(&config)?;
    let mut store = Store::open(&config.db_path())?;
    store.insert_policy_load(&reload::load_record("start", Ok(&policy)))?;
    let candidates = policy.candidates();
    for note in &candidates.notes {
        info!("policy: {note}");
    }
    let pins = PinDir::new(&config.pin_dir);
    let mut bpf = Bpf::load(features, std::process::id(), &config, &candidates, &pins)?;
    let roots = start::take_over_sessions(&mut store, &bpf)?;
    if bpf.took_over {
        bpf.set_recorded_losses(start::recorded_losses(&store)?);
    }
    let beat = Duration::from_millis(config.heartbeat_timeout_ms / 5);
    let _heartbeat = heartbeat::Heartbeat::start(pins.control()?, beat)?;
    let api = bind_api(&config)?;
    let (ctl, allowed_gid) = ctl::bind(&config.socket_path, config.socket_group.as_deref())?;
    let facts = status::Facts::new(
        &config,
        features,
        &bpf,
        format!("http://{}", api.local_addr()?),
    );
    let ready = Ready {
        config,
        policy,
        store,
        bpf,
        api,
        ctl,
        allowed_gid,
        facts,
        roots,
    };
    let socket = ready.config.socket_path.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (result, recorder) = rt.block_on(serve(ready));
    // The runtime held the last recorder handles: with it gone the
    // recorder writes its last batch and ends.
    drop(rt);
    if recorder.is_some_and(|t| t.join().is_err()) {
        error!("recorder thread panicked");
    }
    let _ = std::fs::remove_file(&socket);
    info!("airlock daemon stopped");
    result
}

/// What must hold before anything is mounted, locked or created: the
/// policy loads (the configuration was checked when it was read).
fn validate(config: &Config) -> Result<Policy, DaemonError> {
    let policy = Policy::load_dirs(&config.policy_dirs).map_err(DaemonError::Policy)?;
    if let Some(g) = &config.socket_group
        && ctl::group_id(g).is_none()
    {
        return Err(DaemonError::NoSocketGroup(g.clone()));
    }
    Ok(policy)
}

fn bind_api(config: &Config) -> Result<std::net::TcpListener, DaemonError> {
    let addr = config.api_listen;
    let err = |source| DaemonError::Api { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Starts every actor and server, waits for SIGTERM/SIGINT (or the sensor
/// to fail), then stops them in order under one deadline.
async fn serve(r: Ready) -> (Result<(), DaemonError>, Option<std::thread::JoinHandle<()>>) {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let pending = match r.store.requests(Some(State::Pending)) {
        Ok(p) => p,
        Err(e) => return (Err(e.into()), None),
    };
    let ended = start::holds_ended(&pending, &r.bpf);
    let (sensor, sensor_rx) = SensorHandle::channel();
    let policy_line = r.policy.describe();
    let a = match assemble(Parts {
        store: r.store,
        batch_max: r.config.batch_max,
        policy: r.policy,
        approvers: r.config.approvers.clone(),
        pending,
        ended,
        roots: r.roots,
        sensor,
    }) {
        Ok(a) => a,
        Err(e) => return (Err(e.into()), None),
    };
    let summary = Arc::new(Mutex::new(format!("{policy_line}; loaded at start")));
    let tasks = match spawn_servers(
        &r.config,
        r.api,
        r.ctl,
        r.allowed_gid,
        r.facts.clone(),
        &a,
        summary,
        &shutdown,
    ) {
        Ok(t) => t,
        Err(e) => return (Err(e), None),
    };
    let mut sensor_task = tokio::spawn(sensor::run(
        r.bpf,
        sensor_rx,
        a.router(),
        a.stats.clone(),
        Duration::from_millis(r.config.loss_poll_ms),
        shutdown,
    ));
    let dirs: Vec<String> = r
        .config
        .policy_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    info!(
        "{}",
        r.facts.started_line(
            &policy_line,
            &dirs.join(", "),
            &r.config.socket_path.display().to_string()
        )
    );

    let early = wait_for_stop(&mut sensor_task).await;
    let _ = shutdown_tx.send(true);
    let deadline = Instant::now() + DRAIN_LIMIT;
    for t in tasks {
        let _ = tokio::time::timeout_at(deadline.into(), t).await;
    }
    let sensor_result = match early {
        Some(r) => Ok(r),
        None => tokio::time::timeout_at(deadline.into(), sensor_task).await,
    };
    let result = match sensor_result {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(DaemonError::Sensor(e.to_string())),
        Ok(Err(e)) => Err(DaemonError::Sensor(format!("panicked: {e}"))),
        Err(_) => Err(DaemonError::Sensor(format!(
            "did not drain within {DRAIN_LIMIT:?}"
        ))),
    };
    (result, Some(a.stop(deadline).await))
}

/// The reloader, the API and the control socket.
#[expect(
    clippy::too_many_arguments,
    reason = "the servers' parts, named once, in one place"
)]
fn spawn_servers(
    config: &Config,
    api: std::net::TcpListener,
    ctl_listener: std::os::unix::net::UnixListener,
    allowed_gid: Option<u32>,
    facts: status::Facts,
    a: &Assembly,
    summary: Arc<Mutex<String>>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, DaemonError> {
    let reloader = reload::Reloader {
        dirs: config.policy_dirs.clone(),
        policy: a.policy.clone(),
        sensor: a.sensor.clone(),
        recorder: a.recorder.clone(),
        summary: summary.clone(),
    };
    let reload_task = tokio::spawn(reloader.run(shutdown.clone()));
    let api = tokio::net::TcpListener::from_std(api)?;
    let api_task = tokio::spawn({
        let (state, shutdown) = (a.api.clone(), shutdown.clone());
        async move {
            if let Err(e) = api::serve(api, state, shutdown).await {
                error!("approval API: {e}");
            }
        }
    });
    let ctx = Arc::new(ctl::Context {
        sensor: a.sensor.clone(),
        recorder: a.recorder.clone(),
        stats: a.stats.clone(),
        facts,
        started: Instant::now(),
        allowed_gid,
        policy: summary,
    });
    let listener = tokio::net::UnixListener::from_std(ctl_listener)?;
    let ctl_task = tokio::spawn(ctl::serve(listener, ctx, shutdown.clone()));
    Ok(vec![ctl_task, api_task, reload_task])
}

/// Until SIGTERM or SIGINT, or the sensor task ends on its own (then its
/// result).
async fn wait_for_stop(
    sensor: &mut tokio::task::JoinHandle<std::io::Result<()>>,
) -> Option<Result<std::io::Result<()>, tokio::task::JoinError>> {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot catch SIGTERM/SIGINT: stopping");
        return None;
    };
    tokio::select! {
        _ = term.recv() => { info!("SIGTERM: draining"); None }
        _ = int.recv() => { info!("SIGINT: draining"); None }
        r = sensor => Some(r),
    }
}
