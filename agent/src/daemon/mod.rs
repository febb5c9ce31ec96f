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
mod control;
mod handles;
mod heartbeat;
mod inforce;
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
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use self::{inforce::InForce, reload::PolicyStatus};
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
    #[error("{0}; stop it first")]
    Lock(#[from] crate::store::LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Pins(#[from] crate::bpf::pins::PinError),
    #[error(transparent)]
    Socket(#[from] control::BindError),
    #[error("approval API on {addr}: {source}")]
    Api {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the sensor failed: {0}")]
    Sensor(std::io::Error),
    #[error("the sensor task panicked: {0}")]
    SensorPanicked(String),
    #[error("the sensor did not drain within {0:?}")]
    SensorDrain(Duration),
    #[error("the {0} stopped on its own")]
    ActorStopped(&'static str),
}

impl DaemonError {
    /// A mistake in the configuration or policy (exit 64), found before
    /// anything was mounted, locked or created.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Policy(_)
                | Self::NoSocketGroup(_)
                | Self::Pins(crate::bpf::pins::PinError::NotBpffs(_))
        )
    }
}

/// The servers around the actors: the reloader, the approval API and the
/// control socket, bound before the programs load.
struct Servers {
    api: std::net::TcpListener,
    ctl: std::os::unix::net::UnixListener,
    allowed_gid: Option<u32>,
    policy_dirs: Vec<std::path::PathBuf>,
}

/// Everything bound and loaded, ready to serve.
struct Ready {
    config: Config,
    in_force: InForce,
    store: Store,
    bpf: Bpf,
    servers: Servers,
    facts: status::Facts,
    roots: std::collections::HashMap<u64, u32>,
    /// Beats while the daemon serves; stops (and the kernel's fail mode
    /// takes over) when it is dropped at the end of [`run`].
    _heartbeat: heartbeat::Heartbeat,
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
    let pins = PinDir::new(&config.pin_dir);
    pins.check_fs()?;
    start::raise_fd_limit();
    let _lock = start::lock(&config)?;
    let mut store = Store::open(&config.db_path())?;
    store.insert_policy_load(&reload::load_record("start", Ok(&policy)))?;
    // Bound before the programs load: a daemon that cannot serve must not
    // replace the programs of one that does.
    let servers = bind(&config)?;
    let in_force = InForce::new(policy);
    for note in &in_force.candidates.notes {
        info!("policy: {note}");
    }
    let candidates = (&in_force.candidates, &in_force.exes);
    let mut bpf = Bpf::load(features, std::process::id(), &config, candidates, &pins)?;
    // The programs hold only while the beat is fresh: beat from now on.
    let beat = Duration::from_millis(config.heartbeat_timeout_ms / 5);
    let heartbeat = heartbeat::Heartbeat::start(pins.control()?, beat)?;
    let roots = start::take_over_sessions(&mut store, &bpf)?;
    if bpf.took_over {
        bpf.set_recorded_losses(start::recorded_losses(&store)?);
    }
    let api = format!("http://{}", servers.api.local_addr()?);
    let facts = status::Facts::new(&config, features, &bpf, api);
    let socket = config.socket_path.clone();
    let ready = Ready {
        config,
        in_force,
        store,
        bpf,
        servers,
        facts,
        roots,
        _heartbeat: heartbeat,
    };
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
        && control::group_id(g).is_none()
    {
        return Err(DaemonError::NoSocketGroup(g.clone()));
    }
    Ok(policy)
}

/// The approval API's and the control socket's listeners.
fn bind(config: &Config) -> Result<Servers, DaemonError> {
    let addr = config.api_listen;
    let err = |source| DaemonError::Api { addr, source };
    let api = std::net::TcpListener::bind(addr).map_err(err)?;
    api.set_nonblocking(true).map_err(err)?;
    let (ctl, allowed_gid) = control::bind(&config.socket_path, config.socket_group.as_deref())?;
    Ok(Servers {
        api,
        ctl,
        allowed_gid,
        policy_dirs: config.policy_dirs.clone(),
    })
}

/// Starts every actor and server, waits for SIGTERM/SIGINT (or an actor
/// to end on its own), then stops them in order under one deadline.
async fn serve(r: Ready) -> (Result<(), DaemonError>, Option<std::thread::JoinHandle<()>>) {
    let (shutdown_tx, shutdown) = watch::channel(false);
    let policy_line = r.in_force.policy.describe();
    let status = PolicyStatus::loaded_at_start(&r.in_force.policy);
    let (mut a, sensor_rx) = match start_actors(r.store, &r.config, r.in_force, &r.bpf, r.roots) {
        Ok(started) => started,
        Err(e) => return (Err(e), None),
    };
    let servers = match r.servers.spawn(&a, r.facts.clone(), status, &shutdown) {
        Ok(t) => t,
        Err(e) => return (Err(e), None),
    };
    let loss_poll = Duration::from_millis(r.config.loss_poll_ms);
    let router = a.router();
    let stats = a.stats.clone();
    let mut sensor = tokio::spawn(sensor::run(
        r.bpf, sensor_rx, router, stats, loss_poll, shutdown,
    ));
    let dirs: Vec<String> = r
        .config
        .policy_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let socket = r.config.socket_path.display().to_string();
    info!(
        "{}",
        r.facts
            .started_line(&policy_line, &dirs.join(", "), &socket)
    );

    let stop = wait_for_stop(&mut sensor, &mut a).await;
    let _ = shutdown_tx.send(true);
    let deadline = Instant::now() + DRAIN_LIMIT;
    for t in servers {
        let _ = tokio::time::timeout_at(deadline.into(), t).await;
    }
    let (actor, sensor_result) = match stop {
        Stop::Sensor(r) => (None, Ok(r)),
        Stop::Signal => (None, tokio::time::timeout_at(deadline.into(), sensor).await),
        Stop::Actor(who) => (
            Some(who),
            tokio::time::timeout_at(deadline.into(), sensor).await,
        ),
    };
    let result = match (actor, sensor_result) {
        (Some(who), _) => Err(DaemonError::ActorStopped(who)),
        (None, Ok(Ok(Ok(())))) => Ok(()),
        (None, Ok(Ok(Err(e)))) => Err(DaemonError::Sensor(e)),
        (None, Ok(Err(e))) => Err(DaemonError::SensorPanicked(e.to_string())),
        (None, Err(_)) => Err(DaemonError::SensorDrain(DRAIN_LIMIT)),
    };
    (result, Some(a.stop(deadline).await))
}

/// The recorder and the broker, with what the store says is still open.
fn start_actors(
    store: Store,
    config: &Config,
    in_force: InForce,
    bpf: &Bpf,
    roots: std::collections::HashMap<u64, u32>,
) -> Result<(Assembly, tokio::sync::mpsc::Receiver<handles::SensorMsg>), DaemonError> {
    let pending = store.requests(Some(State::Pending))?;
    let ended = start::holds_ended(&pending, bpf);
    let (sensor, sensor_rx) = SensorHandle::channel();
    let a = assemble(Parts {
        store,
        batch_max: config.batch_max,
        in_force,
        approvers: config.approvers.clone(),
        pending,
        ended,
        roots,
        sensor,
        content_seed: bpf.content_seed,
    })?;
    Ok((a, sensor_rx))
}

impl Servers {
    /// Starts the reloader, the API and the control socket.
    fn spawn(
        self,
        a: &Assembly,
        facts: status::Facts,
        status: PolicyStatus,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, DaemonError> {
        let (status_tx, status_rx) = watch::channel(status);
        let reloader = reload::Reloader {
            dirs: self.policy_dirs,
            policy: a.policy.clone(),
            sensor: a.sensor.clone(),
            recorder: a.recorder.clone(),
            status: status_tx,
        };
        let reload_task = tokio::spawn(reloader.run(shutdown.clone()));
        let api = tokio::net::TcpListener::from_std(self.api)?;
        let api_task = tokio::spawn({
            let (state, shutdown) = (a.api.clone(), shutdown.clone());
            async move {
                if let Err(e) = api::serve(api, state, shutdown).await {
                    error!("approval API: {e}");
                }
            }
        });
        let ctx = Arc::new(control::Context {
            sensor: a.sensor.clone(),
            recorder: a.recorder.clone(),
            stats: a.stats.clone(),
            facts,
            started: Instant::now(),
            allowed_gid: self.allowed_gid,
            policy: status_rx,
        });
        let listener = tokio::net::UnixListener::from_std(self.ctl)?;
        let ctl_task = tokio::spawn(control::serve(listener, ctx, shutdown.clone()));
        Ok(vec![ctl_task, api_task, reload_task])
    }
}

/// Why the daemon stops serving.
enum Stop {
    Signal,
    /// The sensor task ended on its own, with this result.
    Sensor(Result<std::io::Result<()>, tokio::task::JoinError>),
    /// The broker or the recorder ended on its own: no hold can be decided
    /// or stored any more, so the daemon stops and the kernel's fail mode
    /// takes over once the heartbeat is stale.
    Actor(&'static str),
}

/// Until SIGTERM or SIGINT, or an actor ends on its own.
async fn wait_for_stop(
    sensor: &mut tokio::task::JoinHandle<std::io::Result<()>>,
    a: &mut Assembly,
) -> Stop {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot catch SIGTERM/SIGINT: stopping");
        return Stop::Signal;
    };
    tokio::select! {
        _ = term.recv() => { info!("SIGTERM: draining"); Stop::Signal }
        _ = int.recv() => { info!("SIGINT: draining"); Stop::Signal }
        r = sensor => Stop::Sensor(r),
        who = a.ended() => {
            error!("the {who} stopped on its own: the daemon stops");
            Stop::Actor(who)
        }
    }
}
