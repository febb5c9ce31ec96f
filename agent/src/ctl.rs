//! The control socket's protocol and its client: newline-delimited JSON,
//! one request and one response per connection. The daemon serves it
//! (`daemon::control`); only root, or members of the configured group, may use it.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Longest request line the daemon accepts.
pub const MAX_REQUEST: usize = 64 * 1024;

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

/// A count by name, as `airlock status` shows events and losses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KindCount {
    pub kind: String,
    pub count: u64,
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
}

/// Sends one request and waits for its response (client side).
pub fn request(path: &Path, req: &Request) -> Result<Response, CtlError> {
    let io = |source| CtlError::Io {
        path: path.into(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
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
}
