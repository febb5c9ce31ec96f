//! Held execs and connects, decided over the API, by timeout, or by the
//! process's end: on the host (no BPF LSM) and in the VMs (BPF LSM).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions: a panic is the failure"
)]

use std::{
    net::TcpListener,
    process::Child,
    time::{Duration, Instant},
};

use airlock_tests::{
    Daemon, can_run,
    held::{
        connect_hold_expected, connects_held, exec_held_in_syscall, expect_lsm, finish, last,
        refused_exec, state_of,
    },
    scaled,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";

/// Rules: hold /usr/bin/id (timeout `t` s, default `default`), deny
/// /usr/bin/whoami, hold connects to 127.0.0.2; approvers alice and bob.
fn daemon(t: u64, default: &str) -> Daemon {
    let policy = format!(
        "pack: test\nrules:\n\
         - {{name: hold-id, on: exec, when: {{exe: /usr/bin/id}}, decision: hold, hold: {{timeout: {t}, on_timeout: {default}}}}}\n\
         - {{name: no-whoami, on: exec, when: {{exe: /usr/bin/whoami}}, decision: deny}}\n\
         - {{name: hold-127-0-0-2, on: connect, when: {{dest: 127.0.0.2/32}}, decision: hold, hold: {{timeout: {t}, on_timeout: {default}}}}}\n"
    );
    let d = Daemon::start_with_policy(
        &[("test.yaml", &policy)],
        &format!(
            "[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n\n[[approver]]\nname = \"bob\"\ntoken = \"{BOB}\"\n"
        ),
    );
    expect_lsm(&d);
    d
}

fn decide(d: &Daemon, verb: &str, id: u64, token: &str) -> std::process::Output {
    d.approvals(
        token,
        &[verb, &id.to_string(), "--reason", "test", "--json"],
    )
}

#[test]
fn exec_held_then_approved_runs_after_the_delay() {
    if !can_run("exec_held_then_approved_runs_after_the_delay") {
        return;
    }
    let d = daemon(60, "deny");
    let run = d.spawn_run(
        &["user=bob", "agent=test"],
        &[ACTOR, "run-timed", "/usr/bin/id", "-u"],
    );
    let reqs = d.wait_pending(ALICE, 1);
    let r = &reqs[0];
    assert_eq!(
        (r["kind"].as_str(), r["rule"].as_str()),
        (Some("exec"), Some("test/hold-id"))
    );
    assert_eq!(
        r["action"]["argv"],
        serde_json::json!(["/usr/bin/id", "-u"])
    );
    assert_eq!(r["labels"]["agent"], "test");
    let tgid = r["tgid"].as_u64().unwrap();
    assert_eq!(state_of(tgid), 'T', "the held process is stopped");
    assert!(
        r["ancestry"].as_array().unwrap().len() >= 3,
        "process, actor, airlock run: {}",
        r["ancestry"]
    );

    // bob is the session's user: he cannot approve it; a bad token cannot either.
    let out = decide(&d, "approve", r["id"].as_u64().unwrap(), BOB);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no self-approval"),
        "{out:?}"
    );
    let out = decide(
        &d,
        "approve",
        r["id"].as_u64().unwrap(),
        "not-a-token-at-all",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown token (401"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let out = decide(&d, "approve", r["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    let decided: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (decided["state"].as_str(), decided["decided_by"].as_str()),
        (Some("approved"), Some("alice"))
    );

    let out = finish(run);
    let (ms, status) = last(&out).split_once(' ').unwrap();
    assert_eq!(status, "exit:0", "the program ran: {out}");
    let ms: u64 = ms.parse().unwrap();
    assert!(
        (1000..60_000).contains(&ms), // the CLI calls around it take seconds under emulation
        "exec took as long as the approval: {ms} ms"
    );
    let out = decide(&d, "deny", r["id"].as_u64().unwrap(), ALICE);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already approved (409"),
        "{out:?}"
    );
}

#[test]
fn exec_held_then_denied_is_killed_and_deny_rules_kill_at_once() {
    if !can_run("exec_held_then_denied_is_killed_and_deny_rules_kill_at_once") {
        return;
    }
    let d = daemon(60, "deny");
    let run = d.spawn_run(
        &[],
        &[
            "/bin/sh",
            "-c",
            &format!(
                "{ACTOR} run-timed /usr/bin/id; {ACTOR} run-timed /usr/bin/whoami; echo after"
            ),
        ],
    );
    let reqs = d.wait_pending(ALICE, 1);
    let out = decide(&d, "deny", reqs[0]["id"].as_u64().unwrap(), ALICE);
    let decided: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (outcome, refused) = if exec_held_in_syscall() {
        ("resumed: execve fails with EPERM", "error:1")
    } else {
        ("killed (SIGKILL) before its first instruction", "signal:9")
    };
    assert_eq!(decided["outcome"], outcome);
    let out = finish(run);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].ends_with(refused), "denied exec: {out}");
    assert!(lines[1].ends_with(refused), "deny rule: {out}");
    assert_eq!(lines[2], "after", "the caller continues");
    assert_eq!(
        d.requests(ALICE, true).len(),
        0,
        "a deny rule makes no request"
    );
}

#[test]
fn connect_held_then_allowed_or_denied_without_leaking_restart_codes() {
    if !can_run("connect_held_then_allowed_or_denied_without_leaking_restart_codes") {
        return;
    }
    let d = daemon(60, "deny");
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    if !connect_hold_expected() {
        // Before Linux 6.18 the cgroup hook cannot stop the task: the daemon
        // says so, and a flagged connect is refused at once, never let through.
        let (id, out) = d.run(&[], &[ACTOR, "connect-timed", &target]);
        let (_, errno) = out_line(&out);
        assert_eq!(errno.parse::<i32>().unwrap(), libc::EPERM);
        assert_eq!(
            d.requests(ALICE, true).len(),
            0,
            "no request without a hold"
        );
        let events = d.events(id);
        let c = events
            .iter()
            .find(|e| e.kind == "connect")
            .expect("connect recorded");
        assert_eq!(c.detail["enforcement"], "denied: cannot hold here");
        eprintln!(
            "this kernel cannot hold a connect in the cgroup hook: checked that it refuses instead"
        );
        return;
    }
    let run = d.spawn_run(
        &[],
        &[
            "/bin/sh",
            "-c",
            &format!("{ACTOR} connect-timed {target}; {ACTOR} connect-timed {target}"),
        ],
    );
    let first = d.wait_pending(ALICE, 1);
    assert_eq!(first[0]["kind"], "connect");
    assert_eq!(
        first[0]["action"]["port"],
        listener.local_addr().unwrap().port()
    );
    let tgid = first[0]["tgid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(state_of(tgid), 'T');
    // A stray SIGCONT only re-runs the check: held again, no second request.
    // SAFETY: signalling a test process.
    assert_eq!(unsafe { libc::kill(tgid as i32, libc::SIGCONT) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state_of(tgid), 'T', "re-held after a stray SIGCONT");
    assert_eq!(d.wait_pending(ALICE, 1).len(), 1, "no duplicate request");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        decide(&d, "approve", first[0]["id"].as_u64().unwrap(), ALICE)
            .status
            .success()
    );
    let second = loop {
        let p = d.wait_pending(ALICE, 1);
        if p[0]["id"] != first[0]["id"] {
            break p;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        decide(&d, "deny", second[0]["id"].as_u64().unwrap(), ALICE)
            .status
            .success()
    );
    let out = finish(run);
    let lines: Vec<(u64, i32)> = out
        .lines()
        .map(|l| {
            let (ms, errno) = l.split_once(' ').unwrap();
            (ms.parse().unwrap(), errno.parse().unwrap())
        })
        .collect();
    assert_eq!(lines[0].1, 0, "allowed: connected ({out})");
    assert!(
        lines[0].0 >= 1000,
        "the connect waited for the approval: {out}"
    );
    assert_eq!(
        lines[1].1,
        libc::EPERM,
        "denied: EPERM, never EINTR or 513 ({out})"
    );
}

#[test]
fn timeout_applies_the_rule_default() {
    if !can_run("timeout_applies_the_rule_default") {
        return;
    }
    let d = daemon(1, "allow");
    let (id, out) = d.run(&[], &[ACTOR, "run-timed", "/usr/bin/id"]);
    let (ms, status) = out_line(&out);
    assert_eq!(status, "exit:0", "on_timeout = allow lets it run");
    assert!(ms >= 1000, "after the 1 s timeout: {ms} ms");
    let reqs = d.requests(ALICE, false);
    assert_eq!(
        (reqs[0]["state"].as_str(), reqs[0]["decided_by"].as_str()),
        (Some("timed_out"), Some("timeout"))
    );
    assert_eq!(reqs[0]["session_id"], id);

    let d = daemon(1, "deny");
    let (_, out) = d.run(&[], &[ACTOR, "run-timed", "/usr/bin/id"]);
    assert_eq!(
        out_line(&out).1,
        refused_exec(),
        "on_timeout = deny refuses it"
    );
}

fn out_line(out: &std::process::Output) -> (u64, String) {
    let s = String::from_utf8_lossy(&out.stdout);
    let (ms, status) = last(&s).split_once(' ').unwrap_or_else(|| {
        panic!(
            "actor printed {s:?}; {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (ms.parse().unwrap(), status.to_string())
}

#[test]
fn process_killed_while_held_is_abandoned() {
    if !can_run("process_killed_while_held_is_abandoned") {
        return;
    }
    let d = daemon(60, "deny");
    let run = d.spawn_run(&[], &[ACTOR, "run-timed", "/usr/bin/id"]);
    let r = d.wait_pending(ALICE, 1);
    let tgid = r[0]["tgid"].as_u64().unwrap();
    // SAFETY: killing a test process.
    unsafe { libc::kill(tgid as i32, libc::SIGKILL) };
    let out = finish(run);
    assert!(last(&out).ends_with("signal:9"), "killed while held: {out}");
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let reqs = d.requests(ALICE, false);
        if reqs[0]["state"] == "abandoned" {
            assert_eq!(reqs[0]["decided_by"], "process-exit");
            break;
        }
        assert!(Instant::now() < deadline, "not abandoned: {reqs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fifty_holds_at_once_are_each_resolved_as_decided() {
    if !can_run("fifty_holds_at_once_are_each_resolved_as_decided") {
        return;
    }
    // Deciding 50 requests one CLI call at a time takes minutes in an
    // emulated VM: the timeout must not overtake the decisions.
    let d = daemon(900, "deny");
    let run = d.spawn_run(&[], &[ACTOR, "parallel", "50", "/usr/bin/id"]);
    let reqs = d.wait_pending(ALICE, 50);
    assert_eq!(reqs.len(), 50);
    let mut approved = 0;
    for (i, r) in reqs.iter().enumerate() {
        let verb = if i % 2 == 0 { "approve" } else { "deny" };
        let out = decide(&d, verb, r["id"].as_u64().unwrap(), ALICE);
        assert!(out.status.success(), "{out:?}");
        approved += usize::from(i % 2 == 0);
    }
    let want = if exec_held_in_syscall() {
        format!("exit:{approved} signal:0 refused:{}", 50 - approved)
    } else {
        format!("exit:{approved} signal:{} refused:0", 50 - approved)
    };
    assert_eq!(last(&finish(run)), want);
}

#[test]
fn pending_holds_survive_a_daemon_restart() {
    if !can_run("pending_holds_survive_a_daemon_restart") {
        return;
    }
    let mut d = daemon(120, "deny");
    let run = d.spawn_run(&[], &[ACTOR, "run-timed", "/usr/bin/id"]);
    let before = d.wait_pending(ALICE, 1);
    d.restart();
    let after = d.wait_pending(ALICE, 1);
    assert_eq!(
        after[0]["id"], before[0]["id"],
        "the same request, still pending"
    );
    assert_eq!(
        state_of(after[0]["tgid"].as_u64().unwrap()),
        'T',
        "still held"
    );
    assert!(
        decide(&d, "approve", after[0]["id"].as_u64().unwrap(), ALICE)
            .status
            .success()
    );
    assert!(
        finish(run).trim().ends_with("exit:0"),
        "decided by the restarted daemon"
    );
}

/// The state letter of every thread of `tgid`, by tid.
fn thread_states(tgid: u64) -> Vec<(u64, char)> {
    let mut out: Vec<(u64, char)> = std::fs::read_dir(format!("/proc/{tgid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                // /proc/TID/stat is the thread's own stat.
                .map(|tid: u64| (tid, state_of(tid)))
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Waits until `tgid` has `n` threads and every one is stopped ('T').
fn wait_all_stopped(tgid: u64, n: usize) -> Vec<(u64, char)> {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let states = thread_states(tgid);
        if states.len() == n && states.iter().all(|&(_, s)| s == 'T') {
            return states;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s, threads of held process {tgid} (want {n}, all 'T'): {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The workers' counters the actor writes into its progress file.
fn progress(path: &std::path::Path, workers: usize) -> Vec<u64> {
    let bytes = std::fs::read(path).expect("progress file");
    assert_eq!(bytes.len(), 8 * workers, "progress file size");
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Waits for a pending request other than `not`.
fn wait_next_pending(d: &Daemon, not: &serde_json::Value) -> serde_json::Value {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        let pending = d.requests(ALICE, true);
        if let Some(r) = pending.into_iter().find(|r| r["id"] != not["id"]) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no request after {} within 30 s; daemon log:\n{}",
            not["id"],
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when nobody has connected to `l` (it is left non-blocking).
fn never_connected(l: &TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn multi_threaded_process_is_held_and_resumed_whole() {
    const TEST: &str = "multi_threaded_process_is_held_and_resumed_whole";
    const WORKERS: usize = 4;
    if !can_run(TEST) {
        return;
    }
    let d = daemon(120, "deny");
    if !connects_held(TEST) {
        return;
    }
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap();
    let file = d.dir.path().join("progress");
    let run = d.spawn_run(
        &[],
        &[
            ACTOR,
            "threads-connect",
            &WORKERS.to_string(),
            file.to_str().unwrap(),
            &target.to_string(),
        ],
    );
    let req = d.wait_pending(ALICE, 1).remove(0);
    assert_eq!(
        (req["kind"].as_str(), req["action"]["port"].as_u64()),
        (Some("connect"), Some(u64::from(target.port()))),
        "{req:#}"
    );
    let tgid = req["tgid"].as_u64().unwrap();

    // One thread's hold stops the whole thread group: the main thread (in
    // join), the workers (counting) and the connecting thread.
    let states = wait_all_stopped(tgid, WORKERS + 2);
    let stopped = progress(&file, WORKERS);
    assert!(
        stopped.iter().all(|&n| n > 0),
        "every worker counted before the hold: {stopped:?}"
    );
    // The counters are the workers' own view: none advances while held.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        progress(&file, WORKERS),
        stopped,
        "no worker runs while one thread is held"
    );
    assert_eq!(thread_states(tgid), states, "still stopped, every thread");

    let out = decide(&d, "approve", req["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    // The actor prints only once every worker counted again after the connect.
    let out = finish(run);
    assert_eq!(last(&out), "0", "the held connect completed: {out}");
    let resumed = progress(&file, WORKERS);
    assert!(
        resumed.iter().zip(&stopped).all(|(r, s)| r > s),
        "every worker ran again: held at {stopped:?}, finished at {resumed:?}"
    );
    assert!(
        !never_connected(&listener),
        "the approved connection reached the listener"
    );
    let all = d.requests(ALICE, false);
    assert_eq!(
        all.len(),
        1,
        "resuming every thread re-ran the check once, with no new request: {all:#?}"
    );
    assert_eq!(all[0]["state"], "approved");
}

/// A connect held at A, rewritten to B by a SIGUSR1 handler while held,
/// A approved: the restarted connect, now to B, is held as a second request.
struct Rewritten {
    run: Child,
    la: TcpListener,
    lb: TcpListener,
    first: serde_json::Value,
    second: serde_json::Value,
}

/// Starts a daemon and runs `actor connect-rewritten A B EXTRA...` up to
/// B's pending request; None when `test` cannot run here.
fn held_then_rewritten(test: &str, extra: &[&str]) -> Option<(Daemon, Rewritten)> {
    if !can_run(test) {
        return None;
    }
    let d = daemon(120, "deny");
    if !connects_held(test) {
        return None;
    }
    let (la, lb) = (
        TcpListener::bind("127.0.0.2:0").unwrap(),
        TcpListener::bind("127.0.0.2:0").unwrap(),
    );
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let mut cmd = vec![ACTOR, "connect-rewritten"];
    let (a_arg, b_arg) = (a.to_string(), b.to_string());
    cmd.extend([a_arg.as_str(), b_arg.as_str()]);
    cmd.extend_from_slice(extra);
    let run = d.spawn_run(&[], &cmd);
    let first = d.wait_pending(ALICE, 1).remove(0);
    assert_eq!(first["action"]["port"], a.port(), "{first:#}");
    let tgid = first["tgid"].as_u64().unwrap();
    wait_all_stopped(tgid, 1);

    // A stopped process runs no handler: SIGUSR1 stays pending (shared
    // pending set, bit 9) and the process stays stopped and held.
    // SAFETY: signalling a test process.
    assert_eq!(unsafe { libc::kill(tgid as i32, libc::SIGUSR1) }, 0);
    let status = std::fs::read_to_string(format!("/proc/{tgid}/status")).unwrap();
    let shd_pnd = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no ShdPnd in {status}"));
    assert_ne!(shd_pnd & (1 << (libc::SIGUSR1 - 1)), 0, "{status}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(wait_all_stopped(tgid, 1).len(), 1);
    assert_eq!(d.wait_pending(ALICE, 1).len(), 1, "still the one request");

    // Approving A resumes the process: the kernel delivers SIGUSR1 before
    // it re-issues the connect (-ERESTARTNOINTR restarts even after a
    // handler, SA_RESTART or not), the handler points the sockaddr at B,
    // and the restarted connect is for B. A's verdict does not match B's
    // digest: B is held as a request of its own.
    let out = decide(&d, "approve", first["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    let second = wait_next_pending(&d, &first);
    assert_eq!(
        (
            second["kind"].as_str(),
            second["tgid"].as_u64(),
            second["action"]["port"].as_u64()
        ),
        (Some("connect"), Some(tgid), Some(u64::from(b.port()))),
        "the rewritten connect is held anew: {second:#}"
    );
    wait_all_stopped(tgid, 1);
    Some((
        d,
        Rewritten {
            run,
            la,
            lb,
            first,
            second,
        },
    ))
}

#[test]
fn connect_rewritten_while_held_is_held_again() {
    const TEST: &str = "connect_rewritten_while_held_is_held_again";
    let Some((
        d,
        Rewritten {
            run,
            la,
            lb,
            first,
            second,
        },
    )) = held_then_rewritten(TEST, &[])
    else {
        return;
    };
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let out = decide(&d, "deny", second["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    let out = finish(run);
    assert_eq!(
        last(&out),
        format!("handled:1 errno:{}", libc::EPERM),
        "the handler ran once, then the connect to B was refused"
    );
    assert!(
        never_connected(&la),
        "A was approved but never connected to"
    );
    assert!(never_connected(&lb), "B was denied");

    let session = first["session_id"].as_u64().unwrap();
    let connects: Vec<(String, u64, Option<String>, Option<i64>)> = d
        .events(session)
        .iter()
        .filter(|e| e.kind.starts_with("connect"))
        .map(|e| {
            (
                e.kind.clone(),
                e.detail["port"].as_u64().unwrap_or(0),
                e.detail["enforcement"].as_str().map(String::from),
                e.detail["ret"].as_i64(),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    let (pa, pb) = (u64::from(a.port()), u64::from(b.port()));
    assert_eq!(
        connects,
        vec![
            (s("connect_held"), pa, Some(s("held")), None),
            (s("connect_held"), pb, Some(s("held")), None),
            (
                s("connect"),
                pb,
                Some(s("refused")),
                Some(-i64::from(libc::EPERM))
            ),
        ],
        "held at A, held again at B, refused at B; never made to A"
    );
}

/// The approval of A above is never consumed (the restarted connect went to
/// B). It must not outlive that: a later, separate connect to A by the same
/// process is a new attempt, held as a new request, not let through on the
/// leftover verdict (the thread's next hooked syscall drops a verdict for
/// another action).
#[test]
fn approval_of_an_attempt_never_made_does_not_cover_a_later_one() {
    const TEST: &str = "approval_of_an_attempt_never_made_does_not_cover_a_later_one";
    let Some((
        d,
        Rewritten {
            mut run,
            la,
            lb: _lb,
            first,
            second,
        },
    )) = held_then_rewritten(TEST, &["then-a"])
    else {
        return;
    };
    let out = decide(&d, "deny", second["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    // The actor now connects to A once more: a new attempt, to be held as a
    // new request. Either that request appears or the actor finishes.
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    let third = loop {
        let pending = d.requests(ALICE, true);
        if let Some(r) = pending
            .into_iter()
            .find(|r| r["id"] != first["id"] && r["id"] != second["id"])
        {
            break r;
        }
        if let Ok(Some(_)) = run.try_wait() {
            let out = finish(run);
            panic!(
                "a new connect to A went through with no request, on the verdict left \
                 over from request {} (approved for an attempt that was rewritten to B): {out}",
                first["id"]
            );
        }
        assert!(
            Instant::now() < deadline,
            "neither a request for the second connect to A nor the actor's end within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(third["action"]["port"], la.local_addr().unwrap().port());
    let out = decide(&d, "deny", third["id"].as_u64().unwrap(), ALICE);
    assert!(out.status.success(), "{out:?}");
    let out = finish(run);
    assert_eq!(last(&out), format!("again:{}", libc::EPERM), "{out}");
    assert!(never_connected(&la), "A was never connected to");
}

const CAROL: &str = "carol-token-0123456789";

/// A hold that names its approvers and wants two approvals, end to end:
/// an approver it does not name may not decide, one approval leaves the
/// process held, and one denial ends it at once.
#[test]
fn named_approvers_two_approvals_and_one_denial_ends_it() {
    if !can_run("named_approvers_two_approvals_and_one_denial_ends_it") {
        return;
    }
    let d = Daemon::start_with_policy(
        &[(
            "test.yaml",
            "pack: test\nrules:\n- {name: two-of-us, on: exec, when: {exe: /usr/bin/id}, decision: hold, hold: {approvers: [alice, carol], approvals: 2, timeout: 600}}\n",
        )],
        &format!(
            "[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n\n[[approver]]\nname = \"bob\"\ntoken = \"{BOB}\"\n\n[[approver]]\nname = \"carol\"\ntoken = \"{CAROL}\"\n"
        ),
    );
    expect_lsm(&d);
    let run = d.spawn_run(&["user=dave"], &[ACTOR, "run-timed", "/usr/bin/id"]);
    let r = d.wait_pending(ALICE, 1).remove(0);
    let id = r["id"].as_u64().unwrap();
    let tgid = r["tgid"].as_u64().unwrap();
    assert_eq!(r["approvers"], serde_json::json!(["alice", "carol"]));
    assert_eq!(r["approvals_needed"], 2);

    let out = decide(&d, "approve", id, BOB);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bob may not decide request"),
        "an approver the rule does not name: {out:?}"
    );
    let out = decide(&d, "approve", id, ALICE);
    assert!(out.status.success(), "{out:?}");
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["state"], "pending", "one approval of two: {after:#}");
    assert_eq!(after["approvals"][0]["by"], "alice");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state_of(tgid), 'T', "still held after one approval");

    let out = decide(&d, "deny", id, CAROL);
    assert!(out.status.success(), "{out:?}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (done["state"].as_str(), done["decided_by"].as_str()),
        (Some("denied"), Some("carol")),
        "one denial ends it: {done:#}"
    );
    let out = finish(run);
    assert!(last(&out).ends_with(refused_exec()), "refused: {out}");
}
