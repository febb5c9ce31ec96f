//! The daemon's assembly (recorder, broker, API) against a real store,
//! holding a real (stopped) process; no kernel programs needed.

use std::{collections::BTreeMap, process::Command, time::Duration};

use airlock_common::EventKind;
use reqwest::StatusCode;
use tokio::sync::watch;

mod contract;

use super::{
    api::serve,
    assemble::{Assembly, Parts, assemble},
    handles::{SensorHandle, SensorMsg},
};
use crate::{
    config::Approver,
    model::{Detail, Enforcement, HoldInfo, Process, Record},
    store::{NewSession, Store},
};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";
const CAROL: &str = "carol-token-0123456789";

struct Harness {
    base: String,
    assembly: Assembly,
    /// The session the held processes are in.
    session: u64,
    child: std::process::Child,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
    /// Nobody serves the sensor: these tests hold execs stopped after the
    /// fact (resumed by signals), which need no kernel program.
    _sensor: tokio::sync::mpsc::Receiver<SensorMsg>,
}

async fn harness(timeout_s: u64) -> Harness {
    let policy = format!(
        "pack: t\nrules:\n  - name: hold-sleep\n    on: exec\n    when: {{exe: sleep, args: \"30\"}}\n    decision: hold\n    hold: {{timeout: {timeout_s}, message: \"{{agent}} wants {{command}}\"}}\n"
    );
    harness_with(&policy, "30").await
}

fn approvers() -> Vec<Approver> {
    let a = |name: &str, token: &str, groups: &[&str]| Approver {
        name: name.into(),
        token: token.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    vec![
        a("alice", ALICE, &["security"]),
        a("bob", BOB, &[]),
        a("carol", CAROL, &["security"]),
    ]
}

/// The daemon's assembly (recorder, broker, API) under `policy`, with
/// `/bin/sleep ARG` stopped and handed to the broker as a held exec of
/// session `session` (1 is registered with labels; others are not).
async fn harness_in(policy: &str, arg: &str, session: Option<u64>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("airlock.db");
    let mut store = Store::open(&db).unwrap();
    let labels: BTreeMap<String, String> = [
        ("user".to_string(), "bob".to_string()),
        ("agent".to_string(), "codex".to_string()),
    ]
    .into();
    let registered = store
        .create_session(&NewSession {
            started_at: 1,
            root_pid: 1,
            command: vec![],
            labels,
        })
        .unwrap();
    let (sensor, sensor_rx) = SensorHandle::channel();
    let policy =
        crate::policy::Policy::from_sources(&[("t.yaml".into(), policy.to_string())]).unwrap();
    let assembly = assemble(Parts {
        store,
        batch_max: 64,
        in_force: super::inforce::InForce::new(policy),
        approvers: approvers(),
        pending: vec![],
        ended: Default::default(),
        roots: Default::default(),
        sensor,
        content_seed: 0x5eed,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(serve(listener, assembly.api.clone(), rx));

    let session = session.unwrap_or(registered);
    let child = hold_sleep(&assembly, session, arg).await;
    Harness {
        base,
        assembly,
        session,
        child,
        _dir: dir,
        _shutdown: shutdown,
        _sensor: sensor_rx,
    }
}

/// `/bin/sleep ARG`, stopped as the kernel stops a held exec (after the
/// fact, resumed by signals) and handed to the broker as held in `session`.
async fn hold_sleep(assembly: &Assembly, session: u64, arg: &str) -> std::process::Child {
    hold_sleep_cut(assembly, session, arg, false).await
}

/// [`hold_sleep`], with the kernel's copy of argv flagged as cut.
async fn hold_sleep_cut(
    assembly: &Assembly,
    session: u64,
    arg: &str,
    argv_truncated: bool,
) -> std::process::Child {
    let child = Command::new("/bin/sleep").arg(arg).spawn().unwrap();
    let pid = child.id();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // Stopped before the broker hears of it, as the kernel does it.
    for _ in 0..500 {
        if state_of(pid) == 'T' {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(state_of(pid), 'T', "sleep {arg} stopped");
    let hold = HoldInfo {
        digest: 0,
        in_syscall: false,
    };
    let record = Record {
        session_id: session,
        ts_ns: 1,
        kind: EventKind::Exec,
        process: Process {
            pid,
            tgid: pid,
            ppid: std::process::id(),
            ..Process::default()
        },
        detail: Detail::Exec {
            path: "/bin/sleep".into(),
            argv: vec!["/bin/sleep".into(), arg.into()],
            argv_truncated,
            path_truncated: false,
            argv_unreadable: false,
            enforcement: Some(Enforcement::Held),
            file: file_of("/bin/sleep"),
        },
        hold: Some(hold),
    };
    assembly.broker.held(record, hold).await.unwrap();
    child
}

/// The kernel's report of the file at `path`.
fn file_of(path: &str) -> crate::model::ExecFile {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    crate::model::ExecFile {
        name: std::fs::canonicalize(path)
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        ino: m.ino(),
        dev: crate::exefile::kernel_dev(m.dev()),
        mode: m.mode(),
        unknown: false,
    }
}

async fn harness_with(policy: &str, arg: &str) -> Harness {
    harness_in(policy, arg, None).await
}

/// The held child runs again: alive (not reaped, not a zombie) and
/// running or sleeping, not stopped.
fn assert_running(child: &mut std::process::Child, what: &str) {
    // A signal takes a moment to act: a killed process may still look
    // alive, a continued one still stopped, right after the decision.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "{what}: the process ended"
    );
    let st = state_of(child.id());
    assert!(
        matches!(st, 'R' | 'S' | 'D'),
        "{what}: state {st:?}, not running"
    );
}

fn state_of(pid: u32) -> char {
    crate::procfs::stat(pid).map_or('?', |s| s.state)
}

/// Request `id` once it is no longer pending (the process may see the
/// decision a moment before the store does); the last read after 5 s.
async fn settled(h: &Harness, id: u64) -> serde_json::Value {
    let mut r = serde_json::Value::Null;
    for _ in 0..250 {
        r = reqwest::Client::new()
            .get(format!("{}/v1/requests/{id}", h.base))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if r["state"] != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r
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
    assert_running(&mut h.child, "resumed");
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
    let r = settled(&h, 1).await;
    assert_eq!(
        (r["state"].as_str(), r["decided_by"].as_str()),
        (Some("timed_out"), Some("timeout"))
    );
    assert!(r["outcome"].as_str().unwrap().contains("SIGKILL"), "{r}");
    drop(h.assembly);
}

/// Reads the event stream until a whole `event: NAME` arrives; its data.
async fn next_event(
    stream: &mut reqwest::Response,
    text: &mut String,
    name: &str,
) -> serde_json::Value {
    let marker = format!("event: {name}\n");
    let read = async {
        // Until the event is complete (its data line ends with a blank line).
        while !text
            .split(&marker)
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
        .unwrap_or_else(|_| panic!("no {name} event within 10 s: {text:?}"));
    let at = text.find(&marker).unwrap();
    let rest = text[at + marker.len()..].to_string();
    let data = rest
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line: {rest:?}"))
        .to_string();
    // What was read is consumed.
    let end = at + marker.len() + rest.find("\n\n").unwrap_or(0) + 2;
    text.drain(..end.min(text.len()));
    serde_json::from_str(&data).unwrap()
}

#[tokio::test]
async fn stream_announces_new_and_resolved_requests_to_approvers_only() {
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
    // A hold made while subscribed arrives as a `request` event.
    let mut second = hold_sleep(&h.assembly, h.session, "30").await;
    let mut text = String::new();
    let r = next_event(&mut stream, &mut text, "request").await;
    assert_eq!(
        (r["id"].as_u64(), r["state"].as_str(), r["pid"].as_u64()),
        (Some(2), Some("pending"), Some(u64::from(second.id()))),
        "{r}"
    );
    let r = c
        .post(format!("{}/v1/requests/1/deny", h.base))
        .bearer_auth(ALICE)
        .json(&serde_json::json!({"reason": "not now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = next_event(&mut stream, &mut text, "resolved").await;
    assert_eq!(
        (r["id"].as_u64(), r["state"].as_str(), r["reason"].as_str()),
        (Some(1), Some("denied"), Some("not now"))
    );
    for child in [&mut h.child, &mut second] {
        let _ = child.kill();
        let _ = child.wait();
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
    assert_running(&mut h.child, "resumed after the second approval");
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
    assert_running(&mut h.child, "resumed without a human");
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

/// A request whose session's labels cannot be read has no self-approval
/// check: nobody may decide it, not even an approver who would otherwise
/// qualify, and its timeout ends it with the rule's default.
#[tokio::test]
async fn a_request_whose_labels_cannot_be_read_is_decided_by_nobody() {
    let policy = "pack: t\nrules:\n  - name: hold-sleep\n    on: exec\n    when: {exe: sleep}\n    decision: hold\n    hold: {timeout: 2}\n";
    let mut h = harness_in(policy, "35", Some(999)).await;
    let reqs = pending(&h).await;
    assert_eq!(reqs.len(), 1, "the hold is filed");
    assert_eq!(reqs[0]["labels_unread"], true, "{:?}", reqs[0]);
    for token in [ALICE, BOB, CAROL] {
        for verb in ["approve", "deny"] {
            let (status, body) = decide(&h, token, verb).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{verb}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("labels could not be read"),
                "{body}"
            );
        }
    }
    assert_eq!(state_of(h.child.id()), 'T', "still held");
    let st = tokio::task::spawn_blocking(move || {
        let st = h.child.wait().unwrap();
        (st, h)
    })
    .await
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.0.signal(), Some(libc::SIGKILL), "the default (deny)");
    let r = settled(&st.1, 1).await;
    assert_eq!(
        (r["state"].as_str(), r["decided_by"].as_str()),
        (Some("timed_out"), Some("timeout"))
    );
}

/// Without its session's labels, a candidate the policy would let through
/// (its rule names a label it cannot check) is refused, not resumed, and
/// the refusal says why.
#[tokio::test]
async fn a_candidate_whose_labels_cannot_be_read_is_refused() {
    let policy = "pack: t\nrules:\n  - name: hold-for-codex\n    on: exec\n    when: {exe: sleep, labels: {agent: codex}}\n    decision: hold\n";
    let h = harness_in(policy, "36", Some(999)).await;
    let st = tokio::task::spawn_blocking(move || {
        let mut h = h;
        let st = h.child.wait().unwrap();
        (st, h)
    })
    .await
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.0.signal(), Some(libc::SIGKILL), "refused");
    let h = st.1;
    assert!(pending(&h).await.is_empty(), "no request");
    // Session 999 is not in the store: read its decision record directly.
    let db = h._dir.path().join("airlock.db");
    let mut details: Vec<serde_json::Value> = Vec::new();
    for _ in 0..100 {
        let conn = rusqlite::Connection::open(&db).unwrap();
        details = conn
            .prepare("SELECT detail FROM events WHERE session_id = 999 AND kind = 200")
            .unwrap()
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
            .collect();
        if !details.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(details.len(), 1, "{details:?}");
    assert_eq!(details[0]["decision"], "deny");
    assert!(
        details[0]["outcome"]
            .as_str()
            .unwrap_or("")
            .ends_with("the session's labels could not be read: refused (fail closed)"),
        "{}",
        details[0]
    );
}

/// The kernel's copy of argv was cut: the policy did not see all of it, so
/// a candidate it would let through is refused instead (an argument past
/// the cut could be the one a hold rule looks for).
#[tokio::test]
async fn a_candidate_whose_argv_was_cut_is_refused_unless_held() {
    let policy = "pack: t\nrules:\n  - name: hold-upload\n    on: exec\n    when: {exe: sleep, args: \"-T\"}\n    decision: hold\n";
    let h = harness_with(policy, "37").await;
    let mut cut = hold_sleep_cut(&h.assembly, h.session, "38", true).await;
    let st = tokio::task::spawn_blocking(move || cut.wait().unwrap())
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "refused");
    let db = h._dir.path().join("airlock.db");
    let mut outcome = String::new();
    for _ in 0..100 {
        let rows = Store::open_read_only(&db)
            .unwrap()
            .events(h.session)
            .unwrap();
        if let Some(d) = rows
            .iter()
            .find(|r| r.kind == "decision" && r.detail["decision"] == "deny")
        {
            outcome = d.detail["outcome"].as_str().unwrap_or("").to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        outcome.ends_with("so the policy did not see all of it: refused (fail closed)"),
        "{outcome:?}"
    );
    // The same command, not cut, is resumed (the rule does not hold it).
    let mut h = h;
    assert_running(&mut h.child, "the uncut candidate");
    let _ = h.child.kill();
}
