//! Root tests on the host: the real daemon records real sessions.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions: a panic is the failure"
)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use airlock_tests::{Daemon, can_run, execs, stdout};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");

fn exits(events: &[airlock::store::EventRow]) -> HashMap<u32, serde_json::Value> {
    events
        .iter()
        .filter(|e| e.kind == "exit")
        .map(|e| (e.process.tgid, e.detail.clone()))
        .collect()
}

#[test]
fn script_tree_is_recorded_with_parents_and_exit_codes() {
    if !can_run("script_tree_is_recorded_with_parents_and_exit_codes") {
        return;
    }
    let d = Daemon::start();
    let script = "/bin/echo one\n/bin/true\n( /bin/echo sub-a; /bin/echo sub-b )\n/bin/sh -c '/bin/echo grandchild; exit 4'\n/bin/sh -c 'kill -KILL $$'\n/bin/false || true\nexit 7\n";
    let (id, out) = d.run(
        &["agent=test-agent", "model=m-1.2", "user=alice"],
        &["/bin/bash", "-c", script],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "airlock run exits with the command's status"
    );
    let events = d.events(id);
    let session = d.session(id);
    assert_eq!(session.labels["agent"], "test-agent");
    assert_eq!(session.labels["model"], "m-1.2");
    assert_eq!(session.labels["user"], "alice");
    let execs = execs(&events);
    let find = |argv: &[&str]| {
        execs
            .iter()
            .find(|(_, _, _, a)| a.iter().map(String::as_str).eq(argv.iter().copied()))
            .unwrap_or_else(|| panic!("no exec of {argv:?} in {execs:#?}"))
            .clone()
    };
    let (bash, bash_parent, bash_path, _) = find(&["/bin/bash", "-c", script]);
    assert_eq!(
        bash_parent, session.root_pid,
        "the command's parent is `airlock run`"
    );
    assert!(bash_path.ends_with("bash"));
    assert_eq!(
        execs[0].0, bash,
        "the first exec of the session is the command itself"
    );

    let (_, p, path, _) = find(&["/bin/echo", "one"]);
    assert_eq!((p, path.as_str()), (bash, "/bin/echo"));
    assert_eq!(find(&["/bin/true"]).1, bash);

    // The subshell is a fork of bash that runs /bin/echo sub-a as its child.
    let (_, sub_parent, _, _) = find(&["/bin/echo", "sub-a"]);
    assert_ne!(sub_parent, bash, "sub-a runs under the subshell, not bash");
    assert!(
        events.iter().any(|e| e.kind == "fork"
            && e.process.tgid == bash
            && e.detail["child_tgid"] == sub_parent),
        "the subshell {sub_parent} is recorded as a fork of bash {bash}"
    );

    // A child of a child, with its exit code.
    let (sh, sh_parent, _, _) = find(&["/bin/sh", "-c", "/bin/echo grandchild; exit 4"]);
    assert_eq!(sh_parent, bash);
    let (gc, gc_parent, _, _) = find(&["/bin/echo", "grandchild"]);
    assert_eq!(gc_parent, sh);
    let exits = exits(&events);
    assert_eq!(exits[&sh]["exit_code"], 4);
    assert_eq!(exits[&gc]["exit_code"], 0);
    let (killed, _, _, _) = find(&["/bin/sh", "-c", "kill -KILL $$"]);
    assert_eq!(exits[&killed]["signal"], 9, "{:?}", exits[&killed]);
    let (f, _, _, _) = find(&["/bin/false"]);
    assert_eq!(exits[&f]["exit_code"], 1);
    assert_eq!(exits[&bash]["exit_code"], 7);

    // Every process in the tree has a known parent: the root or a fork child.
    let mut known: Vec<u32> = vec![session.root_pid];
    known.extend(
        events
            .iter()
            .filter(|e| e.kind == "fork")
            .filter_map(|e| e.detail["child_tgid"].as_u64().map(|v| v as u32)),
    );
    for (tgid, ppid, path, _) in &execs {
        assert!(
            known.contains(tgid),
            "exec {path} by {tgid} that never forked in the session"
        );
        assert!(
            known.contains(ppid),
            "exec {path} by {tgid} has unknown parent {ppid}"
        );
    }
    // Every recorded exec ended and every process that ended was recorded.
    for (tgid, _, path, _) in &execs {
        assert!(exits.contains_key(tgid), "no exit for {path} ({tgid})");
    }
}

#[test]
fn connects_udp_and_outcomes_v4_and_v6() {
    if !can_run("connects_udp_and_outcomes_v4_and_v6") {
        return;
    }
    let d = Daemon::start();
    let open4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let open6 = TcpListener::bind("[::1]:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed6 = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (p4, p6) = (
        open4.local_addr().unwrap().port(),
        open6.local_addr().unwrap().port(),
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "{ACTOR} connect 127.0.0.1:{p4} && {ACTOR} connect 127.0.0.1:{closed} && {ACTOR} connect [::1]:{p6} && \
         {ACTOR} connect [::1]:{closed6} && {ACTOR} connect-nonblocking 127.0.0.1:{p4} && {ACTOR} udp 127.0.0.1:{udp} 3 && {ACTOR} udp [::1]:{udp} 2"
    );
    let (id, out) = d.run(&["agent=net"], &["/bin/sh", "-c", &script]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "0\n111\n0\n111\n0\n",
        "the actor saw: ok, refused, ok, refused, ok"
    );
    let events = d.events(id);
    let net: Vec<(String, String, String, u64, Option<i64>)> = events
        .iter()
        .filter(|e| matches!(e.kind.as_str(), "connect" | "udp_send"))
        .map(|e| {
            (
                e.kind.clone(),
                e.detail["protocol"].as_str().unwrap_or("").to_string(),
                e.detail["addr"].as_str().unwrap_or("").to_string(),
                e.detail["port"].as_u64().unwrap_or(0),
                e.detail["ret"].as_i64(),
            )
        })
        .collect();
    let s = |v: &str| v.to_string();
    assert_eq!(
        net,
        vec![
            (s("connect"), s("tcp"), s("127.0.0.1"), p4 as u64, Some(0)),
            (
                s("connect"),
                s("tcp"),
                s("127.0.0.1"),
                closed as u64,
                Some(-111)
            ),
            (s("connect"), s("tcp"), s("::1"), p6 as u64, Some(0)),
            (s("connect"), s("tcp"), s("::1"), closed6 as u64, Some(-111)),
            (
                s("connect"),
                s("tcp"),
                s("127.0.0.1"),
                p4 as u64,
                Some(-115)
            ),
            (s("udp_send"), s("udp"), s("127.0.0.1"), udp as u64, None),
            (s("udp_send"), s("udp"), s("::1"), udp as u64, None),
        ],
        "blocking connects give their outcome, a non-blocking one EINPROGRESS; 3 and 2 datagrams to one destination are one record each"
    );
}

#[test]
fn inbound_accept_records_the_peer() {
    if !can_run("inbound_accept_records_the_peer") {
        return;
    }
    let d = Daemon::start();
    let port = TcpListener::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut run = Command::new(airlock_tests::airlock_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--", ACTOR, "accept", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    // The client is outside the session: its connect is not recorded.
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let local = client.local_addr().unwrap();
    let peer = lines.next().unwrap().unwrap();
    assert!(run.wait().unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    let id: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("airlock: session "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let events = d.events(id);
    let accepts: Vec<_> = events.iter().filter(|e| e.kind == "accept").collect();
    assert_eq!(accepts.len(), 1, "{events:#?}");
    assert_eq!(
        accepts[0].detail["addr"], "::ffff:127.0.0.1",
        "peer printed by the actor: {peer}"
    );
    assert_eq!(accepts[0].detail["port"], local.port());
    assert!(
        accepts[0].detail["ret"].as_i64().unwrap() >= 0,
        "accept returned a fd"
    );
    assert!(
        !events.iter().any(|e| e.kind == "connect"),
        "the outside client is not recorded"
    );
}

#[test]
fn processes_outside_the_session_are_not_recorded() {
    if !can_run("processes_outside_the_session_are_not_recorded") {
        return;
    }
    let d = Daemon::start();
    let marker = format!("outside-marker-{}", std::process::id());
    // Unwatched processes run for the whole session: started before it,
    // stopped only once it has ended.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outside = std::thread::spawn({
        let (marker, stop) = (marker.clone(), stop.clone());
        move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                Command::new("/bin/echo")
                    .arg(&marker)
                    .stdout(Stdio::null())
                    .status()
                    .unwrap();
                n += 1;
            }
            n
        }
    });
    let (id, out) = d.run(&[], &[ACTOR, "spawn", "300", "/bin/true"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outside_runs = outside.join().unwrap();
    assert!(out.status.success());
    assert!(
        outside_runs >= 2,
        "the unwatched loop ran beside the session"
    );
    let events = d.events(id);
    let execs = execs(&events);
    assert_eq!(
        execs.iter().filter(|(_, _, p, _)| p == "/bin/true").count(),
        300
    );
    for s in d.store().sessions().unwrap() {
        for e in d.store().events(s.id).unwrap() {
            assert!(
                !e.detail.to_string().contains(&marker),
                "unwatched process recorded: {e:?}"
            );
        }
    }
}

#[test]
fn a_thousand_execs_give_a_thousand_records() {
    if !can_run("a_thousand_execs_give_a_thousand_records") {
        return;
    }
    let d = Daemon::start();
    let (id, out) = d.run(&[], &[ACTOR, "spawn", "1000", "/bin/true"]);
    assert_eq!(stdout(&out), "1000\n");
    let events = d.events(id);
    let execs = execs(&events);
    assert_eq!(
        execs
            .iter()
            .filter(|(_, _, p, a)| p == "/bin/true" && a == &["/bin/true"])
            .count(),
        1000
    );
    assert_eq!(execs.len(), 1001, "the actor's own exec and 1000 children");
    assert!(
        !events.iter().any(|e| e.kind == "loss"),
        "no loss at this rate"
    );
}

/// Runs an exec storm in a new session, stops the daemon (which drains the
/// ring buffer and the loss counters into the store) and returns
/// (execs performed, exec records, execs counted lost).
fn storm(mut d: Daemon, secs: u32, threads: u32) -> (u64, u64, u64, Daemon) {
    let (id, out) = d.run(
        &[],
        &[
            ACTOR,
            "storm",
            &secs.to_string(),
            &threads.to_string(),
            "/bin/true",
        ],
    );
    let performed: u64 = stdout(&out).trim().parse().expect("storm count");
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    let events = d.store().events(id).unwrap();
    let recorded = events.iter().filter(|e| e.kind == "exec").count() as u64;
    let lost: u64 = events
        .iter()
        .filter(|e| e.kind == "loss" && e.detail["lost_kind"] == "exec")
        .map(|e| e.detail["count"].as_u64().unwrap_or(0))
        .sum();
    let s = d.store().session(id).unwrap();
    assert!(s.lost >= lost, "the session shows its gaps");
    (performed, recorded, lost, d)
}

#[test]
fn exec_storm_is_recorded_or_counted_exactly() {
    if !can_run("exec_storm_is_recorded_or_counted_exactly") {
        return;
    }
    let (performed, recorded, lost, _d) = storm(Daemon::start(), 10, 4);
    eprintln!(
        "storm: {performed} execs performed in 10 s, {recorded} recorded, {lost} counted lost"
    );
    assert!(performed > 1000, "the storm ran ({performed})");
    assert_eq!(
        recorded + lost,
        performed + 1,
        "every exec (the actor's own too) is recorded or counted"
    );
}

#[test]
fn losses_from_a_tiny_ring_buffer_are_counted_exactly() {
    if !can_run("losses_from_a_tiny_ring_buffer_are_counted_exactly") {
        return;
    }
    // 4 KiB holds about five exec events: a storm must overflow it.
    let (performed, recorded, lost, _d) = storm(Daemon::start_with("ring_buffer_kib = 4"), 3, 4);
    eprintln!("tiny ring: {performed} execs performed, {recorded} recorded, {lost} counted lost");
    assert!(
        lost > 0,
        "a 4 KiB ring under a storm loses events ({recorded} recorded)"
    );
    assert_eq!(
        recorded + lost,
        performed + 1,
        "every exec is recorded or counted"
    );
}

#[test]
fn long_argv_is_cut_and_flagged() {
    if !can_run("long_argv_is_cut_and_flagged") {
        return;
    }
    let d = Daemon::start();
    let long = "x".repeat(3000);
    let (id, out) = d.run(&[], &["/bin/echo", "first", &long, &long]);
    assert!(out.status.success());
    let events = d.events(id);
    let e = events
        .iter()
        .find(|e| e.kind == "exec")
        .expect("exec recorded");
    assert_eq!(e.detail["argv_truncated"], true, "{:?}", e.detail);
    let argv: Vec<&str> = e.detail["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&argv[..3], &["/bin/echo", "first", long.as_str()]);
    let kept: usize = argv.iter().map(|a| a.len() + 1).sum();
    assert!(
        kept <= 4096 + 1 && kept > 4000,
        "about 4 KiB of argv kept, got {kept}"
    );
    assert!(
        long.starts_with(argv[3]) && argv[3].len() < long.len(),
        "the last argument is cut"
    );
}

#[test]
fn control_socket_is_for_root_and_the_socket_group_only() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    if !can_run("control_socket_is_for_root_and_the_socket_group_only") {
        return;
    }
    let status_as_nobody = |d: &Daemon| {
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
        Command::new(airlock_tests::airlock_bin())
            .arg("--config")
            .arg(&d.config)
            .arg("status")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let root_only = Daemon::start();
    let out = status_as_nobody(&root_only);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the airlock daemon") && err.contains("Permission denied"),
        "{err}"
    );

    let group = Daemon::start_with("socket_group = \"nogroup\"");
    let out = status_as_nobody(&group);
    assert!(
        out.status.success(),
        "a member of socket_group may ask: {out:?}"
    );
}

/// The cgroup v2 id of this process (the inode of its cgroup directory),
/// which its children inherit.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mount = airlock::features::detect()
        .cgroup2
        .clone()
        .expect("a cgroup v2 mount");
    let line = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = line
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    std::fs::metadata(format!("{mount}{path}")).unwrap().ino()
}

/// Every event says who acted, as the process was at that moment: uid,
/// euid and gid (root, then nobody once the actor dropped to it) and the
/// cgroup. The store, read with SQLite directly, answers the README's
/// example query, and its kind ids are the README's.
#[test]
fn every_event_carries_the_credentials_and_cgroup_of_its_process() {
    if !can_run("every_event_carries_the_credentials_and_cgroup_of_its_process") {
        return;
    }
    let d = Daemon::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let script = format!("{ACTOR} connect {target}; /bin/true");
    let (id, out) = d.run(
        &[],
        &[ACTOR, "as-user", "65534", "65534", "/bin/sh", "-c", &script],
    );
    assert!(out.status.success(), "{out:?}");
    let root = d.session(id).root_pid;
    let events = d.events(id);
    let cgroup = own_cgroup_id();
    let mut kinds = std::collections::BTreeSet::new();
    for e in &events {
        kinds.insert(e.kind.as_str());
        assert_eq!(e.process.cgroup_id, cgroup, "cgroup of {e:?}");
        // Root acted until the actor dropped to nobody: airlock run itself
        // and the actor's own exec.
        let as_root = e.process.tgid == root
            || (e.kind == "exec" && e.detail["argv"][1].as_str() == Some("as-user"));
        let want = if as_root { 0 } else { 65534 };
        assert_eq!(
            (e.process.uid, e.process.euid, e.process.gid),
            (want, want, want),
            "{e:?}"
        );
    }
    for k in ["fork", "exec", "exit", "connect"] {
        assert!(kinds.contains(k), "a {k} was recorded: {events:#?}");
    }

    // The README's query, with this session's id, on the file itself.
    let readme =
        std::fs::read_to_string(airlock_tests::checkout().join("README.md")).expect("README.md");
    let sql = readme
        .lines()
        .find_map(|l| l.strip_prefix("sqlite3 /var/lib/airlock/airlock.db \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the README's sqlite3 example")
        .replace("session_id=1", &format!("session_id={id}"));
    let db = rusqlite::Connection::open_with_flags(
        d.dir.path().join("data/airlock.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let argvs: Vec<String> = db
        .prepare(&sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        argvs.contains(&format!("[\"{ACTOR}\",\"connect\",\"{target}\"]")),
        "{sql}: {argvs:?}"
    );
    assert!(argvs.contains(&"[\"/bin/true\"]".to_string()), "{argvs:?}");

    // The README's list of kind ids names every kind, as the store keeps it.
    let list = readme
        .split("Event kind ids are stable: ")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .expect("the README's kind ids")
        .replace('\n', " ");
    let listed: Vec<(u32, String)> = list
        .split(',')
        .map(|p| {
            let (n, name) = p.trim().split_once(' ').expect("ID NAME");
            (n.parse().expect("an id"), name.to_string())
        })
        .collect();
    let every: Vec<(u32, String)> = (0..1000)
        .filter_map(|n| airlock_common_kind(n).map(|k| (n, k)))
        .collect();
    assert_eq!(listed, every, "the README lists every kind with its id");
    let stored: Vec<(u32, u32)> = db
        .prepare("SELECT kind, count(*) FROM events WHERE session_id = ?1 GROUP BY kind")
        .unwrap()
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (kind, n) in stored {
        let name = airlock_common_kind(kind).expect("a known kind id");
        let counted = events.iter().filter(|e| e.kind == name).count() as u32;
        assert_eq!(n, counted, "kind {kind} is {name}");
    }
}

/// The stable name of a kind id.
fn airlock_common_kind(id: u32) -> Option<String> {
    airlock_common::EventKind::from_u32(id).map(|k| k.name().to_string())
}

/// More connects in flight than the kernel's pending-connect map holds:
/// every connect is still recorded, those beyond the map at once and
/// without their outcome, and exactly that many lost outcomes are counted
/// (`pending_map_full`). None is lost silently.
#[test]
fn connects_beyond_the_pending_map_are_recorded_without_their_outcome() {
    if !can_run("connects_beyond_the_pending_map_are_recorded_without_their_outcome") {
        return;
    }
    const SLOTS: usize = 4;
    const BLOCKED: usize = 12;
    let d = Daemon::start_with(&format!("pending_connects = {SLOTS}\n"));
    let wait_ms = airlock_tests::scaled(Duration::from_secs(3))
        .as_millis()
        .to_string();
    let (id, out) = d.run(
        &[],
        &[ACTOR, "connect-blocked", &BLOCKED.to_string(), &wait_ms],
    );
    let calls: usize = stdout(&out)
        .trim()
        .strip_prefix("connects:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    let events = d.events(id);
    let connects: Vec<_> = events.iter().filter(|e| e.kind == "connect").collect();
    assert_eq!(connects.len(), calls, "every connect recorded: {events:#?}");
    let without = connects
        .iter()
        .filter(|e| e.detail["ret"].is_null())
        .count();
    assert_eq!(
        without,
        BLOCKED - SLOTS,
        "the blocked connects beyond the {SLOTS} slots, recorded at once: {connects:#?}"
    );
    // The loss records come with the daemon's next poll of the counters.
    let deadline = std::time::Instant::now() + airlock_tests::scaled(Duration::from_secs(10));
    loop {
        let lost: u64 = d
            .store()
            .events(id)
            .expect("events")
            .iter()
            .filter(|e| {
                e.kind == "loss"
                    && e.detail["lost_kind"] == "connect"
                    && e.detail["reason"] == "pending_map_full"
            })
            .map(|e| e.detail["count"].as_u64().unwrap_or(0))
            .sum();
        if lost == without as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && lost < without as u64,
            "{lost} outcomes counted lost, {without} connects recorded without one"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
