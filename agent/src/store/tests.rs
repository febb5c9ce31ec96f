use std::collections::BTreeMap;

use airlock_common::{EventKind, LossReason};

use super::*;
use crate::event::{Detail, EventKindName, ExitStatus, Record, loss_record};

fn session(store: &mut Store) -> u64 {
    let mut labels = BTreeMap::new();
    labels.insert("agent".to_string(), "claude-code".to_string());
    labels.insert("user".to_string(), "alice".to_string());
    store
        .create_session(&NewSession {
            started_at: 100,
            root_pid: 4242,
            command: vec!["bash".into(), "-c".into(), "true".into()],
            labels,
        })
        .unwrap()
}

fn exec(session_id: u64, ts: i64) -> Record {
    Record {
        session_id,
        ts_ns: ts,
        kind: EventKindName(EventKind::Exec),
        pid: 5,
        tgid: 5,
        ppid: 4,
        uid: 1000,
        euid: 1000,
        gid: 1000,
        cgroup_id: u64::MAX - 1,
        hold: None,
        detail: Detail::Exec {
            path: "/usr/bin/git".into(),
            argv: vec!["git".into(), "status".into()],
            argv_truncated: false,
            path_truncated: false,
            argv_unreadable: false,
            enforcement: None,
        },
    }
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/airlock.db");
    let mut store = Store::open(&path).unwrap();
    let id = session(&mut store);
    let mut exit = exec(id, 300);
    exit.kind = EventKindName(EventKind::Exit);
    exit.detail = Detail::Exit(ExitStatus::from_wait_status(2 << 8));
    store
        .insert(&[
            exec(id, 200),
            exit,
            loss_record(id, EventKind::Exec, LossReason::RingbufFull, 3),
        ])
        .unwrap();
    store.end_session(id, 400).unwrap();
    store.end_session(id, 500).unwrap();

    let reader = Store::open_read_only(&path).unwrap();
    let s = reader.session(id).unwrap();
    assert_eq!(s.ended_at, Some(400), "the first end stands");
    assert_eq!(s.labels["agent"], "claude-code");
    assert_eq!(s.command, vec!["bash", "-c", "true"]);
    assert_eq!((s.events, s.lost), (2, 3));
    let events = reader.events(id).unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].kind, "exec");
    assert_eq!(events[0].cgroup_id, u64::MAX - 1);
    assert_eq!(
        events[0].detail["argv"],
        serde_json::json!(["git", "status"])
    );
    assert_eq!(events[1].detail["exit_code"], 2);
    assert_eq!(reader.count(id, EventKind::Exec).unwrap(), 1);
    assert!(matches!(
        reader.events(id + 1),
        Err(StoreError::NoSession(_))
    ));
}

#[test]
fn reopen_keeps_data_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.db");
    let id = {
        let mut store = Store::open(&path).unwrap();
        session(&mut store)
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(store.open_sessions().unwrap(), vec![(id, 4242)]);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let e = Store::open(&path).err().unwrap();
    assert!(
        e.to_string().ends_with(&format!(
            "schema version 99 is newer than this airlock knows ({}); upgrade airlock",
            super::schema::VERSION
        )),
        "{e}"
    );
}

#[test]
fn missing_store_says_what_to_do() {
    let e = Store::open_read_only(Path::new("/nonexistent/airlock.db"))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "store /nonexistent/airlock.db does not exist: start the daemon (`airlock daemon`) first"
    );
}
