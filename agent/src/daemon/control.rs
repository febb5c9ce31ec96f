//! The control socket's server (its protocol and client are `crate::ctl`):
//! registers sessions and answers status requests. Only root, or members
//! of the configured group, may use it.

use std::{
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

use super::{
    handles::{RecorderHandle, SensorHandle},
    reload::PolicyStatus,
    stats::Stats,
    status::Facts,
};
use crate::{
    ctl::{KindCount, MAX_REQUEST, Request, Response, StatusReport},
    model::wall_now_ns,
    procfs,
    store::NewSession,
};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another airlock daemon is already listening on {0}")]
    InUse(PathBuf),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket group {0:?} does not exist")]
    NoGroup(String),
}

/// What the server needs from the rest of the daemon.
pub struct Context {
    pub sensor: SensorHandle,
    pub recorder: RecorderHandle,
    pub stats: Arc<Stats>,
    pub facts: Facts,
    pub started: Instant,
    pub allowed_gid: Option<u32>,
    /// The policy in force (the reloader keeps it current).
    pub policy: watch::Receiver<PolicyStatus>,
}

/// Binds the socket: stale files are replaced, a live daemon is not.
pub fn bind(
    path: &Path,
    group: Option<&str>,
) -> Result<(std::os::unix::net::UnixListener, Option<u32>), BindError> {
    let io = |source| BindError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let gid = group
        .map(|g| group_id(g).ok_or_else(|| BindError::NoGroup(g.into())))
        .transpose()?;
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(io)?;
    }
    Ok((listener, gid))
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &ctx).await {
                            warn!(error = %e, "control connection");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accepting a control connection"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

async fn handle(stream: UnixStream, ctx: &Context) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let response = if !authorized(cred.uid(), cred.pid(), ctx.allowed_gid) {
        error("permission denied: only root or the configured socket_group may use airlock")
    } else {
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Err(_) => error("no request within 10 s"),
            Ok(Err(e)) => error(format!("reading request: {e}")),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Err(e) => error(format!("bad request: {e}")),
                Ok(req) => respond(req, cred.pid(), ctx).await,
            },
        }
    };
    let mut out = serde_json::to_string(&response)
        .unwrap_or_else(|_| "{\"result\":\"error\",\"message\":\"internal\"}".into());
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

async fn respond(req: Request, pid: Option<i32>, ctx: &Context) -> Response {
    match req {
        Request::Status {} => Response::Status(Box::new(status(ctx).await)),
        Request::Register { labels, command } => {
            let Some(pid) = pid.filter(|p| *p > 0) else {
                return error("the caller's pid is unknown (SO_PEERCRED)");
            };
            if let Some(bad) = labels.keys().find(|k| k.is_empty() || k.len() > 64) {
                return error(format!("label key {bad:?} must be 1 to 64 bytes"));
            }
            let pid = pid as u32;
            let session = NewSession {
                started_at: wall_now_ns(),
                root_pid: pid,
                command,
                labels,
            };
            let session_id = match ctx.recorder.create_session(session).await {
                Ok(id) => id,
                Err(e) => return error(format!("creating the session: {e}")),
            };
            if let Err(e) = ctx.sensor.watch(pid, session_id).await {
                return error(format!("watching pid {pid}: {e}"));
            }
            ctx.stats
                .sessions_registered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!(session_id, pid, "session registered");
            Response::Registered { session_id }
        }
    }
}

async fn status(ctx: &Context) -> StatusReport {
    // Without the sensor the loss totals are unknown: shown as none.
    let losses = ctx
        .sensor
        .loss_totals()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(reason, count)| KindCount {
            kind: reason.name().into(),
            count,
        })
        .collect();
    let policy = ctx.policy.borrow().line();
    ctx.facts
        .report(&ctx.stats, ctx.started.elapsed(), policy, losses)
}

/// Root always; others only when in the configured group.
fn authorized(uid: u32, pid: Option<i32>, allowed_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    match (allowed_gid, pid) {
        (Some(gid), Some(pid)) if pid > 0 => procfs::in_group(pid as u32, gid),
        _ => false,
    }
}

pub(super) fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse().ok()))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_authorized_and_strangers_are_not() {
        assert!(authorized(0, None, None));
        assert!(!authorized(1000, Some(1), None));
        assert!(group_id("root") == Some(0));
        assert!(group_id("no-such-group-airlock").is_none());
    }
}
