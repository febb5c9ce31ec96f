//! `airlock events`

use clap::Args;
use serde_json::Value;

use crate::{
    config::Config,
    store::{EventRow, Store},
};

/// Show a session's recorded events in time order.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The session id (see `airlock sessions`).
    pub session: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EventsArgs, config: &Config) -> anyhow::Result<()> {
    let store = Store::open_read_only(&config.db_path())?;
    let events = store.events(args.session)?;
    if args.json {
        return super::print_json(&events);
    }
    println!(
        "{:<24}  {:<8}  {:>7}  {:>7}  {:>5}  DETAIL",
        "TIME", "KIND", "PID", "PPID", "UID"
    );
    for e in &events {
        println!(
            "{:<24}  {:<8}  {:>7}  {:>7}  {:>5}  {}",
            super::time(e.ts),
            e.kind,
            e.process.tgid,
            e.process.ppid,
            e.process.uid,
            describe(e)
        );
    }
    Ok(())
}

/// One line saying what the event was.
pub fn describe(e: &EventRow) -> String {
    let d = &e.detail;
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = |k: &str| d.get(k).and_then(Value::as_i64);
    match e.kind.as_str() {
        "exec" => {
            let argv: Vec<String> = d
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|v| quote(v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            let mut line = format!("{}  [{}]", s("path"), argv.join(" "));
            // The file the kernel ran, where the caller named it otherwise
            // (a symlink, a hard link, a descriptor).
            let path = s("path");
            let file = d.get("file").unwrap_or(&Value::Null);
            match file.get("name").and_then(Value::as_str) {
                _ if file.get("unknown").and_then(Value::as_bool) == Some(true) => {
                    line.push_str(" (file unknown)");
                }
                Some(name) if !name.is_empty() && path.rsplit('/').next() != Some(name) => {
                    let ino = file.get("ino").and_then(Value::as_u64).unwrap_or(0);
                    line.push_str(&format!(" (runs file {name}, inode {ino})"));
                }
                _ => {}
            }
            if d.get("argv_truncated").and_then(Value::as_bool) == Some(true) {
                line.push_str(" (argv truncated)");
            }
            if let Some(e) = d.get("enforcement").and_then(Value::as_str) {
                line.push_str(&format!(" [{e}]"));
            }
            line
        }
        "fork" => format!("child {}", n("child_tgid").unwrap_or(0)),
        "exit" => match (n("exit_code"), n("signal")) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exit".into(),
        },
        "connect" | "accept" | "udp_send" | "connect_held" => {
            let addr = match (d.get("addr").and_then(Value::as_str), n("port")) {
                (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
                (Some(a), Some(p)) => format!("{a}:{p}"),
                _ => "peer unknown".into(),
            };
            let outcome = match n("ret") {
                None => String::new(),
                Some(r) if r >= 0 => " -> ok".into(),
                Some(r) => format!(" -> {}", std::io::Error::from_raw_os_error(-r as i32)),
            };
            let rule = match d.get("enforcement").and_then(Value::as_str) {
                Some(e) => format!(" [{e}]"),
                None => String::new(),
            };
            format!("{} {addr}{outcome}{rule}", s("protocol"))
        }
        "decision" => {
            let mut line = format!("policy: {} {} {}", s("decision"), s("action"), s("target"));
            if let Some(r) = d.get("rule").and_then(Value::as_str) {
                line.push_str(&format!(" by {r}"));
            }
            if let Some(m) = d.get("monitor").and_then(Value::as_str) {
                line.push_str(&format!(" (monitor: {m})"));
            }
            line.push_str(&format!(
                " -> {} ({} us)",
                s("outcome"),
                n("decided_in_us").unwrap_or(0)
            ));
            line
        }
        "file_open" => {
            let access = if d.get("write").and_then(Value::as_bool) == Some(true) {
                "write"
            } else {
                "read"
            };
            let mut line = format!("{access} {}", s("path"));
            if d.get("path_truncated").and_then(Value::as_bool) == Some(true) {
                line.push_str(" (path truncated: file name only)");
            }
            if let Some(e) = d.get("enforcement").and_then(Value::as_str) {
                line.push_str(&format!(" [{e}]"));
            }
            line
        }
        "loss" => format!(
            "LOST {} {} event(s): {}",
            n("count").unwrap_or(0),
            s("lost_kind"),
            s("reason")
        ),
        _ => d.to_string(),
    }
}

fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, detail: Value) -> EventRow {
        EventRow {
            id: 1,
            session_id: 1,
            ts: 0,
            kind: kind.into(),
            process: crate::model::Process {
                pid: 1,
                tgid: 1,
                ..Default::default()
            },
            detail,
        }
    }

    #[test]
    fn describes_each_kind() {
        let e = row(
            "exec",
            serde_json::json!({"path": "/bin/sh", "argv": ["sh", "-c", "echo 'hi'"], "argv_truncated": false}),
        );
        assert_eq!(describe(&e), r"/bin/sh  [sh -c 'echo '\''hi'\''']");
        let e = row(
            "exec",
            serde_json::json!({"path": "/tmp/alias", "argv": ["alias"], "file": {"name": "curl", "ino": 12, "dev": 1, "mode": 33261}}),
        );
        assert_eq!(
            describe(&e),
            "/tmp/alias  [alias] (runs file curl, inode 12)"
        );
        let e = row(
            "exec",
            serde_json::json!({"path": "/usr/bin/curl", "argv": ["curl"], "file": {"name": "curl", "ino": 12, "dev": 1, "mode": 33261}}),
        );
        assert_eq!(describe(&e), "/usr/bin/curl  [curl]");
        let e = row(
            "connect",
            serde_json::json!({"protocol": "tcp", "addr": "::1", "port": 80, "ret": -111}),
        );
        assert!(
            describe(&e).starts_with("tcp [::1]:80 -> Connection refused"),
            "{}",
            describe(&e)
        );
        let e = row(
            "file_open",
            serde_json::json!({"path": "/tmp/t/id_test", "write": false, "path_truncated": false, "enforcement": "held"}),
        );
        assert_eq!(describe(&e), "read /tmp/t/id_test [held]");
        let e = row(
            "file_open",
            serde_json::json!({"path": "id_test", "write": true, "path_truncated": true}),
        );
        assert_eq!(
            describe(&e),
            "write id_test (path truncated: file name only)"
        );
        let e = row("exit", serde_json::json!({"exit_code": null, "signal": 9}));
        assert_eq!(describe(&e), "killed by signal 9");
        let e = row(
            "loss",
            serde_json::json!({"lost_kind": "exec", "reason": "ringbuf_full", "count": 4}),
        );
        assert_eq!(describe(&e), "LOST 4 exec event(s): ringbuf_full");
    }
}
