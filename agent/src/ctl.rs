//! The daemon's local control socket: newline-delimited JSON, one request
//! and one response per connection. Only root, or members of the configured
//! group, may use it.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tracing::{info, warn};

use crate::{
    event::wall_now_ns,
    recorder::RecorderMsg,
    sensors::Command,
    stats::{KindCount, Stats},
    store::NewSession,
};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a session whose first process is the caller.
    Register {
        labels: BTreeMap<String, String>,
        command: Vec<String>,
    },
    /// The daemon's mode and counters.
    Status {},
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Registered { session_id: u64 },
    Status(Box<StatusReport>),
    Error { message: String },
}

/// What `airlock status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub version: String,
    /// The policy in force and the last reload's outcome.
    #[serde(default)]
    pub policy: String,
    pub pid: u32,
    pub mode: String,
    pub kernel: String,
    pub bpf_lsm: bool,
    pub can_record: Vec<String>,
    pub can_enforce: Vec<String>,
    pub programs: Vec<String>,
    /// Where the programs are pinned, their generation, and the fail mode.
    pub survival: String,
    pub store: String,
    /// The approval API's address, as bound.
    pub api: String,
    pub uptime_s: u64,
    pub sessions_registered: u64,
    pub events: Vec<KindCount>,
    pub records_written: u64,
    pub losses: Vec<KindCount>,
    pub decode_errors: u64,
    pub store_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the airlock daemon at {path}: {source} (is `airlock daemon` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the airlock daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the airlock daemon sent a reply this CLI does not understand: {0}")]
    Reply(String),
    #[error("{0}")]
    Daemon(String),
    #[error("another airlock daemon is already listening on {0}")]
    InUse(PathBuf),
    #[error("socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket group {0:?} does not exist")]
    NoGroup(String),
}

/// Sends one request and waits for its response (client side).
pub fn request(path: &Path, req: &Request) -> Result<Response, CtlError> {
    let io = |source| CtlError::Io {
        path: path.into(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.into(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| CtlError::Reply(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    match serde_json::from_str(&reply).map_err(|e| CtlError::Reply(format!("{e}: {reply:?}")))? {
        Response::Error { message } => Err(CtlError::Daemon(message)),
        r => Ok(r),
    }
}

/// What the server needs from the rest of the daemon.
pub struct Context {
    pub sensor: mpsc::Sender<Command>,
    pub recorder: mpsc::Sender<RecorderMsg>,
    pub stats: Arc<Stats>,
    pub status: StatusReport,
    pub started: std::time::Instant,
    pub allowed_gid: Option<u32>,
    /// The policy in force, in one line (the reloader keeps it current).
    pub policy: Arc<std::sync::Mutex<String>>,
}

/// Binds the socket: stale files are replaced, a live daemon is not.
pub fn bind(
    path: &Path,
    group: Option<&str>,
) -> Result<(std::os::unix::net::UnixListener, Option<u32>), CtlError> {
    let bind_err = |source| CtlError::Bind {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(CtlError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let gid = group
        .map(|g| group_id(g).ok_or_else(|| CtlError::NoGroup(g.into())))
        .transpose()?;
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(bind_err)?;
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

async fn handle(stream: UnixStream, ctx: &Context) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = TokioBufReader::new(read).take(MAX_REQUEST as u64);
    let response = if !authorized(cred.uid(), cred.pid(), ctx.allowed_gid) {
        Response::Error {
            message: "permission denied: only root or the configured socket_group may use airlock"
                .into(),
        }
    } else {
        match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
            Err(_) => Response::Error {
                message: "no request within 10 s".into(),
            },
            Ok(Err(e)) => Response::Error {
                message: format!("reading request: {e}"),
            },
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
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
                return Response::Error {
                    message: "the caller's pid is unknown (SO_PEERCRED)".into(),
                };
            };
            if let Some(bad) = labels.keys().find(|k| k.is_empty() || k.len() > 64) {
                return Response::Error {
                    message: format!("label key {bad:?} must be 1 to 64 bytes"),
                };
            }
            let pid = pid as u32;
            let session = NewSession {
                started_at: wall_now_ns(),
                root_pid: pid,
                command,
                labels,
            };
            let (tx, rx) = oneshot::channel();
            if ctx
                .recorder
                .send(RecorderMsg::CreateSession { session, reply: tx })
                .await
                .is_err()
            {
                return Response::Error {
                    message: "the recorder has stopped".into(),
                };
            }
            let session_id = match rx.await {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => {
                    return Response::Error {
                        message: format!("creating the session: {e}"),
                    };
                }
                Err(_) => {
                    return Response::Error {
                        message: "the recorder has stopped".into(),
                    };
                }
            };
            let (tx, rx) = oneshot::channel();
            if ctx
                .sensor
                .send(Command::Watch {
                    tgid: pid,
                    session_id,
                    reply: tx,
                })
                .await
                .is_err()
            {
                return Response::Error {
                    message: "the sensor has stopped".into(),
                };
            }
            match rx.await {
                Ok(Ok(())) => {
                    ctx.stats
                        .sessions_registered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    info!(session_id, pid, "session registered");
                    Response::Registered { session_id }
                }
                Ok(Err(e)) => Response::Error {
                    message: format!("watching pid {pid}: {e}"),
                },
                Err(_) => Response::Error {
                    message: "the sensor has stopped".into(),
                },
            }
        }
    }
}

async fn status(ctx: &Context) -> StatusReport {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = ctx.status.clone();
    s.uptime_s = ctx.started.elapsed().as_secs();
    s.policy = ctx.policy.lock().map(|p| p.clone()).unwrap_or_default();
    s.events = ctx.stats.events();
    s.records_written = ctx.stats.records_written.load(Relaxed);
    s.decode_errors = ctx.stats.decode_errors.load(Relaxed);
    s.store_errors = ctx.stats.store_errors.load(Relaxed);
    s.sessions_registered = ctx.stats.sessions_registered.load(Relaxed);
    let (tx, rx) = oneshot::channel();
    if ctx
        .sensor
        .send(Command::LossTotals { reply: tx })
        .await
        .is_ok()
        && let Ok(totals) = rx.await
    {
        s.losses = totals
            .into_iter()
            .map(|(k, n)| KindCount {
                kind: k.into(),
                count: n,
            })
            .collect();
    }
    s
}

/// Root always; others only when in the configured group.
fn authorized(uid: u32, pid: Option<i32>, allowed_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let (Some(gid), Some(pid)) = (allowed_gid, pid) else {
        return false;
    };
    // SO_PEERCRED carries no supplementary groups: read them from /proc.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().any(|l| {
        (l.starts_with("Groups:") || l.starts_with("Gid:"))
            && l.split_whitespace().skip(1).any(|g| g.parse() == Ok(gid))
    })
}

fn group_id(name: &str) -> Option<u32> {
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
    fn request_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"op":"register","labels":{"agent":"x"},"command":["sh"]}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Register {
                labels: [("agent".into(), "x".into())].into(),
                command: vec!["sh".into()]
            }
        );
        let e = serde_json::from_str::<Request>(r#"{"op":"status","extra":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"op":"rm -rf"}"#).is_err());
    }

    #[test]
    fn root_is_authorized_and_strangers_are_not() {
        assert!(authorized(0, None, None));
        assert!(!authorized(1000, Some(1), None));
        assert!(group_id("root") == Some(0));
        assert!(group_id("no-such-group-airlock").is_none());
    }
}
