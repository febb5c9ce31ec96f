//! A connect rule covers every way out to its destination, not only
//! connect(2): a UDP datagram sent with `sendto` to an explicit address,
//! a TCP Fast Open connect (`sendto(MSG_FASTOPEN)`, data in the SYN), the
//! same destination as an IPv4-mapped IPv6 address. Each is refused as the
//! plain connect is, and recorded.
use std::net::{TcpListener, UdpSocket};

use airlock_tests::{
    Daemon, can_run,
    held::{connects_held, expect_lsm},
};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");

#[test]
fn every_way_out_to_a_denied_destination_is_refused_and_recorded() {
    let test = "every_way_out_to_a_denied_destination_is_refused_and_recorded";
    if !can_run(test) {
        return;
    }
    let policy = "pack: t\nrules:\n\
         - {name: no-3, on: connect, when: {dest: 127.0.0.3/32}, decision: deny}\n";
    let daemon = Daemon::start_with_policy(&[("t.yaml", policy)], "");
    expect_lsm(&daemon);
    // Listeners at both destinations, so anything let through succeeds.
    let tcp = TcpListener::bind("127.0.0.3:0").unwrap();
    let tcp_ok = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.3:0").unwrap();
    let udp_ok = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (t, u) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let (t_ok, u_ok) = (
        tcp_ok.local_addr().unwrap().port(),
        udp_ok.local_addr().unwrap().port(),
    );
    let tricks = [
        ("connect", format!("{ACTOR} connect 127.0.0.3:{t}")),
        ("udp-sendto", format!("{ACTOR} udp-send 127.0.0.3:{u}")),
        (
            "udp-sendto-v4-mapped",
            format!("{ACTOR} udp-send [::ffff:127.0.0.3]:{u}"),
        ),
        (
            "udp-sendto-af-unspec",
            format!("{ACTOR} udp-send-unspec 127.0.0.3:{u}"),
        ),
        ("tcp-fast-open", format!("{ACTOR} tfo 127.0.0.3:{t}")),
        (
            "tcp-fast-open-v4-mapped",
            format!("{ACTOR} tfo [::ffff:127.0.0.3]:{t}"),
        ),
    ];
    let controls = [
        ("control-udp", format!("{ACTOR} udp-send 127.0.0.1:{u_ok}")),
        ("control-tfo", format!("{ACTOR} tfo 127.0.0.1:{t_ok}")),
    ];
    let all: Vec<(&str, String)> = tricks.iter().chain(&controls).cloned().collect();
    let (session, out) = daemon.run_named("agent=egress-test", &all);
    let errno = |name: &str| daemon.named_errno(&out, name);
    let escaped: Vec<String> = tricks
        .iter()
        .filter(|(name, _)| errno(name) != libc::EPERM)
        .map(|(name, _)| format!("{name}: errno {}", errno(name)))
        .collect();
    assert!(
        escaped.is_empty(),
        "these reached a denied destination (or failed otherwise than EPERM):\n{}\nall:\n{out}\ndaemon log:\n{}",
        escaped.join("\n"),
        daemon.log()
    );
    for (name, _) in &controls {
        assert_eq!(errno(name), 0, "{name} is not flagged and goes: {out}");
    }
    // Nothing reached the denied UDP listener.
    udp.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "a datagram reached 127.0.0.3"
    );

    // Each refusal is recorded, as a connect or a datagram to 127.0.0.3
    // with what was done.
    let events = daemon.events(session);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| {
            matches!(e.kind.as_str(), "connect" | "udp_send")
                && e.detail["addr"]
                    .as_str()
                    .is_some_and(|a| a.ends_with("127.0.0.3"))
                && e.detail["enforcement"].is_string()
        })
        .map(|e| (e.kind.clone(), e.detail["protocol"].clone()))
        .collect();
    let udp_refused = refused.iter().filter(|(k, _)| k == "udp_send").count();
    let tcp_refused = refused.iter().filter(|(k, _)| k == "connect").count();
    assert!(
        udp_refused >= 2 && tcp_refused >= 3,
        "refusals recorded: {refused:?}\nall events: {:#?}",
        events
            .iter()
            .map(|e| (&e.kind, &e.detail))
            .collect::<Vec<_>>()
    );
}

/// A datagram flow to a held destination waits for one decision: the
/// first `sendto` is held (the process stopped inside it), approved once,
/// and every datagram of the flow then arrives, with no second request.
#[test]
fn a_held_datagram_flow_waits_for_one_approval() {
    let test = "a_held_datagram_flow_waits_for_one_approval";
    if !can_run(test) || !connects_held(test) {
        return;
    }
    const ALICE: &str = "alice-token-0123456789";
    let policy = "pack: t\nrules:\n\
         - {name: hold-4, on: connect, when: {dest: 127.0.0.4/32}, decision: hold, hold: {timeout: 120}}\n";
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", policy)],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    let udp = UdpSocket::bind("127.0.0.4:0").unwrap();
    let target = udp.local_addr().unwrap().to_string();
    let run = daemon.spawn_run(&[], &[ACTOR, "udp", &target, "3"]);
    let pending = daemon.wait_pending(ALICE, 1);
    assert_eq!(pending[0]["kind"], "connect");
    assert_eq!(pending[0]["action"]["protocol"], "udp", "{pending:#?}");
    // Nothing went while it waits.
    udp.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_err(), "a datagram left unasked");
    let id = pending[0]["id"].as_u64().unwrap().to_string();
    let out = daemon.approvals(ALICE, &["approve", &id, "--reason", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    airlock_tests::held::finish(run);
    udp.set_nonblocking(false).unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    for i in 0..3 {
        assert!(
            udp.recv_from(&mut buf).is_ok(),
            "datagram {i} of the approved flow did not arrive"
        );
    }
    assert_eq!(
        daemon.requests(ALICE, false).len(),
        1,
        "one request for the flow"
    );
}

/// A policy reload revokes the decisions on datagram flows: a flow
/// approved under a hold rule is asked about again, and refused, once the
/// rule has become a deny rule.
#[test]
fn a_reload_revokes_an_approved_datagram_flow() {
    let test = "a_reload_revokes_an_approved_datagram_flow";
    if !can_run(test) || !connects_held(test) {
        return;
    }
    const ALICE: &str = "alice-token-0123456789";
    let rule = |decision: &str| {
        format!(
            "pack: t\nrules:\n\
             - {{name: r-5, on: connect, when: {{dest: 127.0.0.5/32}}, decision: {decision}}}\n"
        )
    };
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", &rule("hold"))],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    let udp = UdpSocket::bind("127.0.0.5:0").unwrap();
    let target = udp.local_addr().unwrap().to_string();
    let gate = daemon.dir.path().join("gate");
    let gate_s = gate.display().to_string();
    let run = daemon.spawn_run(&[], &[ACTOR, "udp-gated", &target, &gate_s]);
    let pending = daemon.wait_pending(ALICE, 1);
    let id = pending[0]["id"].as_u64().unwrap().to_string();
    let out = daemon.approvals(ALICE, &["approve", &id, "--reason", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    // The first datagram arrived: the flow is approved.
    udp.set_read_timeout(Some(airlock_tests::scaled(std::time::Duration::from_secs(
        5,
    ))))
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_ok(), "the approved datagram");
    // Now the rule refuses, and the policy reloads.
    std::fs::write(daemon.policy_dir().join("t.yaml"), rule("deny")).unwrap();
    let deadline =
        std::time::Instant::now() + airlock_tests::scaled(std::time::Duration::from_secs(30));
    while !daemon.log().contains("policy reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::write(&gate, "").unwrap();
    let out = airlock_tests::held::finish(run);
    let errnos: Vec<&str> = out.lines().collect();
    assert_eq!(
        errnos,
        ["0", &libc::EPERM.to_string()],
        "approved, then refused after the reload: {out}\n{}",
        daemon.log()
    );
}

/// A datagram flow's decision belongs to the process, not to its pid: a
/// process that gets the pid of one whose flow was approved is asked
/// about its own datagrams.
#[test]
fn a_flow_decision_is_not_inherited_by_a_reused_pid() {
    let test = "a_flow_decision_is_not_inherited_by_a_reused_pid";
    if !can_run(test) || !connects_held(test) {
        return;
    }
    const ALICE: &str = "alice-token-0123456789";
    let policy = "pack: t\nrules:\n\
         - {name: hold-6, on: connect, when: {dest: 127.0.0.6/32}, decision: hold}\n";
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", policy)],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    let udp = UdpSocket::bind("127.0.0.6:0").unwrap();
    let target = udp.local_addr().unwrap().to_string();
    let pidfile = daemon.dir.path().join("pid");
    let script = format!(
        "{ACTOR} udp-send {target}; while [ ! -e {p} ]; do sleep 0.05; done; {ACTOR} run-as-pid $(cat {p}) {ACTOR} udp-send {target}",
        p = pidfile.display()
    );
    let run = daemon.spawn_run(&[], &["/bin/sh", "-c", &script]);
    let first = daemon.wait_pending(ALICE, 1);
    let tgid = first[0]["tgid"].as_u64().unwrap();
    let id = first[0]["id"].as_u64().unwrap().to_string();
    assert!(
        daemon
            .approvals(ALICE, &["approve", &id, "--reason", "test"])
            .status
            .success()
    );
    let deadline =
        std::time::Instant::now() + airlock_tests::scaled(std::time::Duration::from_secs(30));
    while std::path::Path::new(&format!("/proc/{tgid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "{tgid} did not end");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Another process, with the same pid, to the same destination.
    std::fs::write(&pidfile, tgid.to_string()).unwrap();
    let mut run = run;
    let mut asked = false;
    while run.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the session did not end"
        );
        for r in daemon.requests(ALICE, true) {
            assert_eq!(r["tgid"].as_u64(), Some(tgid), "{r:#?}");
            let id = r["id"].as_u64().unwrap().to_string();
            assert!(
                daemon
                    .approvals(ALICE, &["deny", &id, "--reason", "test"])
                    .status
                    .success()
            );
            asked = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = airlock_tests::held::finish(run);
    assert!(
        asked,
        "the process with the reused pid {tgid} was not asked about: {out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["0", &libc::EPERM.to_string(), "exit:0"],
        "approved for the first process, refused for the second: {out}"
    );
}

/// io_uring does not re-issue a request a hook held (its completion
/// would carry -ERESTARTNOINTR, and the process would stay stopped with
/// nobody asked): a flagged connect through io_uring is refused at once,
/// not held, and recorded as such; an unflagged one goes and is recorded
/// too (no exit tracepoint to pair it with).
#[test]
fn io_uring_connects_are_refused_not_held_and_recorded() {
    let test = "io_uring_connects_are_refused_not_held_and_recorded";
    if !can_run(test) {
        return;
    }
    const ALICE: &str = "alice-token-0123456789";
    let policy = "pack: t\nrules:\n\
         - {name: hold-9, on: connect, when: {dest: 127.0.0.9/32}, decision: hold, hold: {timeout: 120}}\n";
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", policy)],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    let held = TcpListener::bind("127.0.0.9:0").unwrap();
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let script = format!(
        "{ACTOR} uring-connect {}; {ACTOR} uring-connect {}",
        held.local_addr().unwrap(),
        free.local_addr().unwrap()
    );
    let run = daemon.spawn_run(&[], &["/bin/sh", "-c", &script]);
    let out = airlock_tests::held::finish_within(
        run,
        airlock_tests::scaled(std::time::Duration::from_secs(30)),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [libc::EPERM.to_string().as_str(), "0"],
        "the flagged io_uring connect refused, the other one made: {out}\n{}",
        daemon.log()
    );
    assert!(
        daemon.requests(ALICE, false).is_empty(),
        "nothing was asked: it could not have been held"
    );
    let session = daemon.last_session();
    let events = daemon.events(session);
    let connects: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.kind == "connect")
        .map(|e| {
            (
                e.detail["addr"].as_str().unwrap_or("").to_string(),
                e.detail["enforcement"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        connects.contains(&("127.0.0.9".into(), "denied: cannot hold here".into()))
            && connects
                .iter()
                .any(|(a, e)| a == "127.0.0.1" && e.is_empty()),
        "both io_uring connects recorded: {connects:?}"
    );
}
