//! The API against a real broker, store and recorder, holding a real
//! (stopped) process; no kernel programs needed.

use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

use airlock_common::EventKind;
use reqwest::StatusCode;
use tokio::sync::{broadcast, mpsc, watch};

use super::*;
use crate::{
    broker::Broker,
    event::{Detail, EventKindName, HoldInfo, Record},
    stats::Stats,
    store::NewSession,
};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const CAROL: &str = "carol-token-0123456789";

struct Harness {
    base: String,
    broker: mpsc::Sender<BrokerMsg>,
    child: std::process::Child,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

async fn harness(timeout_s: u64) -> Harness {
    let policy = format!(
        "pack: t\nrules:\n  - name: hold-sleep\n    on: exec\n    when: {{exe: sleep, args: \"30\"}}\n    decision: hold\n    hold: {{timeout: {timeout_s}, message: \"{{agent}} wants {{command}}\"}}\n"
    );
    harness_with(&policy, "30").await
}

/// A broker and API under `policy`, with `/bin/sleep ARG` stopped and
/// handed to the broker as a held exec.
async fn harness_with(policy: &str, arg: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("airlock.db");
    let mut store = Store::open(&db).unwrap();
    let labels: BTreeMap<String, String> = [
        ("user".to_string(), "bob".to_string()),
        ("agent".to_string(), "codex".to_string()),
    ]
    .into();
    let session = store
        .create_session(&NewSession {
            started_at: 1,
            root_pid: 1,
            command: vec![],
            labels,
        })
        .unwrap();
    let (rec_tx, rec_rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        crate::recorder::run(
            store,
            rec_rx,
            64,
            Arc::new(Stats::default()),
            Default::default(),
        )
    });
    let (sensor_tx, _sensor_rx) = mpsc::channel(16);
    let (updates, _) = broadcast::channel(16);
    let policy =
        crate::policy::Policy::from_sources(&[("t.yaml".into(), policy.to_string())]).unwrap();
    let (_policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    let approvers = [
        Approver {
            name: "alice".into(),
            token: ALICE.into(),
            groups: vec!["security".into()],
        },
        Approver {
            name: "bob".into(),
            token: BOB.into(),
            groups: vec![],
        },
        Approver {
            name: "carol".into(),
            token: CAROL.into(),
            groups: vec!["security".into()],
        },
    ];
    let broker = Broker::new(
        policy_rx,
        approvers.to_vec(),
        rec_tx,
        sensor_tx,
        updates.clone(),
        db.clone(),
        vec![],
        Default::default(),
    );
    let (broker_tx, broker_rx) = mpsc::channel(16);
    tokio::spawn(broker.run(broker_rx));
    let state = Arc::new(ApiState::new(broker_tx.clone(), &approvers, db, updates));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(serve(listener, state, rx));

    // A real process, stopped as the kernel program stops a held exec.
    let child = Command::new("/bin/sleep").arg(arg).spawn().unwrap();
    let pid = child.id();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let record = Record {
        session_id: session,
        ts_ns: 1,
        kind: EventKindName(EventKind::Exec),
        pid,
        tgid: pid,
        ppid: std::process::id(),
        uid: 0,
        euid: 0,
        gid: 0,
        cgroup_id: 0,
        detail: Detail::Exec {
            path: "/bin/sleep".into(),
            argv: vec!["/bin/sleep".into(), arg.into()],
            argv_truncated: false,
            path_truncated: false,
            argv_unreadable: false,
            enforcement: Some("held"),
        },
        hold: Some(HoldInfo {
            digest: 0,
            in_syscall: false,
        }),
    };
    broker_tx
        .send(BrokerMsg::Held {
            record,
            hold: HoldInfo {
                digest: 0,
                in_syscall: false,
            },
        })
        .await
        .unwrap();
    Harness {
        base,
        broker: broker_tx,
        child,
        _dir: dir,
        _shutdown: shutdown,
    }
}

fn state_of(pid: u32) -> char {
    crate::broker::process::stat(pid).map_or('?', |s| s.0)
}

async fn pending(h: &Harness) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let r: Vec<serde_json::Value> = reqwest::Client::new()
            .get(format!("{}/v1/requests?state=pending", h.base))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !r.is_empty() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vec::new()
}

#[tokio::test]
async fn approve_flow_with_auth_errors_and_no_self_approval() {
    let mut h = harness(300).await;
    let c = reqwest::Client::new();
    let reqs = pending(&h).await;
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        (r["id"].as_u64(), r["kind"].as_str(), r["rule"].as_str()),
        (Some(1), Some("exec"), Some("t/hold-sleep"))
    );
    assert_eq!(r["message"], "codex wants /bin/sleep 30");
    assert_eq!(r["labels"]["agent"], "codex");
    assert_eq!(r["action"]["argv"], serde_json::json!(["/bin/sleep", "30"]));
    assert_eq!(r["ancestry"][0]["pid"], h.child.id());
    assert_eq!(state_of(h.child.id()), 'T', "held: stopped");

    let url = |p: &str| format!("{}{p}", h.base);
    let status = |r: reqwest::Response| r.status();
    assert_eq!(
        status(c.get(url("/v1/requests")).send().await.unwrap()),
        StatusCode::UNAUTHORIZED
    );
    let r = c
        .get(url("/v1/requests"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "unknown token"
    );
    assert_eq!(
        status(
            c.get(url("/v1/requests/abc"))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status(
            c.get(url("/v1/requests?state=maybe"))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status(
            c.get(url("/v1/requests/99"))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(
            c.post(url("/v1/requests/99/approve"))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NOT_FOUND
    );
    let r = c
        .post(url("/v1/requests/1/approve"))
        .bearer_auth(ALICE)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .post(url("/v1/requests/1/approve"))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.json::<serde_json::Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("no self-approval")
    );
    assert_eq!(
        state_of(h.child.id()),
        'T',
        "still held after refused attempts"
    );

    let r = c
        .post(url("/v1/requests/1/approve"))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({"reason": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (
            r["state"].as_str(),
            r["decided_by"].as_str(),
            r["reason"].as_str()
        ),
        (Some("approved"), Some("alice"), Some("ok"))
    );
    assert_eq!(r["outcome"], "resumed: the program runs");
    assert_ne!(state_of(h.child.id()), 'T', "resumed");
    assert_eq!(
        status(
            c.post(url("/v1/requests/1/deny"))
                .bearer_auth(ALICE)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::CONFLICT
    );
    let stored: serde_json::Value = c
        .get(url("/v1/requests/1"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["state"], "approved", "the decision is in the store");
    let doc = c.get(url("/v1/openapi.json")).send().await.unwrap();
    assert_eq!(doc.status(), StatusCode::OK);
    assert_eq!(
        doc.json::<serde_json::Value>().await.unwrap()["openapi"],
        "3.0.3"
    );
    let _ = h.child.kill();
    let _ = h.child.wait();
}

#[tokio::test]
async fn deny_kills_and_timeout_applies_default() {
    let mut h = harness(1).await;
    assert_eq!(pending(&h).await.len(), 1);
    // Nobody decides: after the 1 s timeout the default (deny) kills it.
    let st = tokio::task::spawn_blocking(move || {
        let st = h.child.wait().unwrap();
        (st, h)
    })
    .await
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.0.signal(), Some(libc::SIGKILL));
    let h = st.1;
    let r: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/requests/1", h.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["state"].as_str(), r["decided_by"].as_str()),
        (Some("timed_out"), Some("timeout"))
    );
    assert!(r["outcome"].as_str().unwrap().contains("SIGKILL"), "{r}");
    drop(h.broker);
}

#[tokio::test]
async fn stream_announces_decisions_to_approvers_only() {
    let mut h = harness(300).await;
    assert_eq!(pending(&h).await.len(), 1);
    let c = reqwest::Client::new();
    let url = format!("{}/v1/stream", h.base);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let mut stream = c.get(&url).bearer_auth(ALICE).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let r = c
        .post(format!("{}/v1/requests/1/deny", h.base))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({"reason": "not now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Read the stream until the resolution arrives (keep-alives aside).
    let mut text = String::new();
    let read = async {
        // Until the resolved event is complete (ends with a blank line).
        while !text
            .split("event: resolved")
            .nth(1)
            .is_some_and(|rest| rest.contains("\n\n"))
        {
            match stream.chunk().await.unwrap() {
                Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                None => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a resolved event within 10 s");
    let data = text
        .lines()
        .skip_while(|l| *l != "event: resolved")
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line: {text:?}"));
    let r: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (r["id"].as_u64(), r["state"].as_str(), r["reason"].as_str()),
        (Some(1), Some("denied"), Some("not now"))
    );
    let _ = h.child.kill();
    let _ = h.child.wait();
}

#[test]
fn openapi_is_valid_json_naming_every_route() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    for p in [
        "/v1/requests",
        "/v1/requests/{id}",
        "/v1/requests/{id}/approve",
        "/v1/requests/{id}/deny",
        "/v1/stream",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} documented");
    }
}

async fn decide(h: &Harness, token: &str, verb: &str) -> (StatusCode, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/requests/1/{verb}", h.base))
        .bearer_auth(token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn two_approvals_from_a_group_are_needed_and_others_may_not_decide() {
    let policy = "pack: t\nrules:\n  - name: two\n    on: exec\n    when: {exe: sleep}\n    decision: hold\n    hold: {groups: [security], approvals: 2}\n";
    let mut h = harness_with(policy, "33").await;
    assert_eq!(pending(&h).await.len(), 1);
    // bob is an approver, but not in the group the rule names.
    let (status, body) = decide(&h, BOB, "approve").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = decide(&h, ALICE, "approve").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "pending");
    assert_eq!(body["approvals"][0]["by"], "alice");
    assert_eq!(
        state_of(h.child.id()),
        'T',
        "one approval of two: still held"
    );
    let (status, _) = decide(&h, ALICE, "approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "the same approver twice");
    let (status, body) = decide(&h, CAROL, "approve").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "approved");
    assert_eq!(body["decided_by"], "alice, carol");
    assert_ne!(
        state_of(h.child.id()),
        'T',
        "resumed after the second approval"
    );
    let _ = h.child.kill();
}

#[tokio::test]
async fn candidates_no_hold_rule_matches_are_resumed_at_once_and_recorded() {
    // The kernel held `sleep 34` as a candidate (the rule names sleep), but
    // the rule wants another argument: the broker resumes it without a
    // request and records the decision.
    let policy = "pack: t\nrules:\n  - name: long-sleep\n    on: exec\n    when: {exe: sleep, args: \"3600\"}\n    decision: hold\n  - name: watch-sleep\n    on: exec\n    mode: monitor\n    when: {exe: sleep}\n    decision: deny\n";
    let mut h = harness_with(policy, "34").await;
    let mut state = 'T';
    for _ in 0..200 {
        state = state_of(h.child.id());
        if state != 'T' {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(state, 'T', "resumed without a human");
    assert!(pending(&h).await.is_empty(), "no request");
    let db = h._dir.path().join("airlock.db");
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = Store::open_read_only(&db).unwrap().events(1).unwrap();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = &rows
        .iter()
        .find(|r| r.kind == "decision")
        .expect("a decision record")
        .detail;
    assert_eq!(d["decision"], "record");
    assert_eq!(d["monitor"], "would deny by t/watch-sleep");
    assert_eq!(d["outcome"], "resumed: the program runs");
    // The API's replay shows the would-be decision too.
    let events: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!("{}/v1/sessions/1/events", h.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "decision"
                && e["detail"]["monitor"] == "would deny by t/watch-sleep"),
        "{events:?}"
    );
    let r = reqwest::Client::new()
        .get(format!("{}/v1/sessions/99/events", h.base))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let _ = h.child.kill();
}
