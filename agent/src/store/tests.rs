use std::collections::BTreeMap;

use airlock_common::{EventKind, LossReason};

use super::*;
use crate::model::{ActionKind, ApprovalRequest, Detail, ExitStatus, Process, Record, State};

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
        kind: EventKind::Exec,
        process: Process {
            pid: 5,
            tgid: 5,
            ppid: 4,
            uid: 1000,
            euid: 1000,
            gid: 1000,
            cgroup_id: u64::MAX - 1,
        },
        hold: None,
        detail: Detail::Exec {
            path: "/usr/bin/git".into(),
            argv: vec!["git".into(), "status".into()],
            argv_truncated: false,
            path_truncated: false,
            argv_unreadable: false,
            enforcement: None,
            file: Default::default(),
        },
    }
}

#[test]
fn the_session_columns_name_the_loss_kind_by_its_id() {
    assert_eq!(EventKind::Loss as u32, 900, "SESSION_COLUMNS in query.rs");
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/airlock.db");
    let mut store = Store::open(&path).unwrap();
    let id = session(&mut store);
    let mut exit = exec(id, 300);
    exit.kind = EventKind::Exit;
    exit.detail = Detail::Exit(ExitStatus::from_wait_status(2 << 8));
    store
        .insert(&[
            exec(id, 200),
            exit,
            Record::loss(id, 350, EventKind::Exec, LossReason::RingbufFull, 3),
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
    assert_eq!(events[0].process.cgroup_id, u64::MAX - 1);
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

/// A store written by every earlier schema version, with the rows of its
/// time, opens at the current version with nothing lost; version 4 drops
/// the kernel's vestigial `rule_id` from stored details.
#[test]
fn every_older_schema_migrates_to_the_current_one() {
    for from in 1..super::schema::VERSION {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            super::schema::migrate_to(&mut conn, from).unwrap();
            assert_eq!(super::schema::version(&conn).unwrap(), from);
            conn.execute_batch(
                "INSERT INTO sessions (started_at, root_pid, command, labels)
                     VALUES (1, 42, '[\"sh\"]', '{\"agent\":\"a\"}');
                 INSERT INTO events (session_id, ts, kind, pid, tgid, ppid, uid, euid, gid, cgroup_id, detail)
                     VALUES (1, 2, 2, 5, 5, 4, 0, 0, 0, 9,
                     '{\"path\":\"/bin/sh\",\"argv\":[\"sh\"],\"argv_truncated\":false,\"path_truncated\":false,\"argv_unreadable\":false,\"enforcement\":\"held\",\"rule_id\":1}');
                 INSERT INTO events (session_id, ts, kind, pid, tgid, ppid, uid, euid, gid, cgroup_id, detail)
                     VALUES (1, 3, 100, 5, 5, 4, 0, 0, 0, 9,
                     '{\"protocol\":\"tcp\",\"addr\":\"10.0.0.1\",\"port\":443,\"ret\":0}');",
            )
            .unwrap();
            if from >= 2 {
                let body = serde_json::json!({
                    "id": 1, "state": "pending", "session_id": 1, "labels": {"agent": "a"},
                    "kind": "exec", "pid": 5, "tgid": 5, "uid": 0, "ancestry": [],
                    "action": {"path": "/bin/sh", "argv": ["sh"], "enforcement": "held", "rule_id": 1},
                    "rule": "p/r", "requested_at": 2, "deadline": 3, "on_timeout": "deny",
                    "decided_at": null, "decided_by": null, "reason": null, "outcome": null,
                    "digest": 7, "start_time": 8
                });
                conn.execute(
                    "INSERT INTO requests (session_id, state, requested_at, body) VALUES (1, 'pending', 2, ?1)",
                    [body.to_string()],
                )
                .unwrap();
            }
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            super::schema::version(&store.conn).unwrap(),
            super::schema::VERSION,
            "from version {from}"
        );
        let events = store.events(1).unwrap();
        assert_eq!(events.len(), 2, "from version {from}");
        assert_eq!(events[0].detail.get("rule_id"), None, "from version {from}");
        assert_eq!(events[0].detail["enforcement"], "held");
        assert_eq!(events[1].detail["port"], 443);
        if from >= 2 {
            let reqs = store.requests(Some(State::Pending)).unwrap();
            assert_eq!(reqs.len(), 1, "from version {from}");
            let r: &ApprovalRequest = &reqs[0];
            assert_eq!(r.kind, ActionKind::Exec);
            assert_eq!(r.action.get("rule_id"), None);
            assert_eq!(r.approvals_needed, 1, "defaults of later fields");
        }
    }
}

#[test]
fn the_data_directory_and_the_store_are_roots_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _lock = super::lock_data_dir(&data, &data.join("airlock.lock")).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let db = data.join("airlock.db");
    let mut store = Store::open(&db).unwrap();
    let id = session(&mut store);
    store.insert(&[exec(id, 1)]).unwrap();
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&data.join("airlock.db-wal")), 0o600, "the log too");
    // A second lock on the same directory is refused.
    let e = super::lock_data_dir(&data, &data.join("airlock.lock")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("another airlock daemon is running on"),
        "{e}"
    );
}
