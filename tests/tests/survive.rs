//! What outlives the daemon: pinned programs keep enforcing, a dead
//! daemon's holds meet the fail mode, sessions and their events survive a
//! restart, and `airlock unload` ends it all. Host and VM.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] functions: a panic is the failure"
)]

use std::{
    net::TcpListener,
    path::Path,
    time::{Duration, Instant},
};

use airlock_tests::{
    Daemon, can_run,
    held::{connects_held, expect_lsm, finish_within, refused_exec},
    scaled, time_scale,
};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");
const ALICE: &str = "alice-token-0123456789";

/// The heartbeat timeout the tests configure: short, and scaled under
/// emulation so a late beat is not taken for a dead daemon.
fn heartbeat_ms() -> u64 {
    500 * u64::from(time_scale())
}

/// Beyond the heartbeat timeout.
fn stale() -> Duration {
    Duration::from_millis(heartbeat_ms() * 12 / 5)
}

/// Hold rules on /usr/bin/id and on connects to 127.0.0.2, with a short
/// heartbeat timeout and the given fail mode.
fn daemon(fail_mode: &str) -> Daemon {
    let d = Daemon::start_with_policy(
        &[(
            "test.yaml",
            "pack: test\nrules:\n\
             - {name: hold-id, on: exec, when: {exe: /usr/bin/id}, decision: hold, hold: {timeout: 120}}\n\
             - {name: hold-127-0-0-2, on: connect, when: {dest: 127.0.0.2/32}, decision: hold, hold: {timeout: 120}}\n",
        )],
        &format!(
            "heartbeat_timeout_ms = {}\nfail_mode = \"{fail_mode}\"\n\n\
             [[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n",
            heartbeat_ms()
        ),
    );
    expect_lsm(&d);
    d
}

/// The first line `out` prints, read on a thread so a silent process
/// fails the test after `limit` instead of blocking it.
fn first_line(out: std::process::ChildStdout, limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no line within {limit:?}"))
}

/// Waits until `path` exists (a script's way of saying it got there).
fn wait_file(path: &Path) {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The session ids in the store.
fn sessions(d: &Daemon) -> Vec<u64> {
    let out = d.airlock(&["sessions", "--json"]);
    assert!(out.status.success(), "airlock sessions: {out:?}");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter().filter_map(|s| s["id"].as_u64()).collect()
}

/// Waits until the session's record holds an event `pred` accepts.
fn wait_event(
    d: &Daemon,
    session: u64,
    what: &str,
    pred: impl Fn(&airlock::store::EventRow) -> bool,
) -> airlock::store::EventRow {
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let events = d.store().events(session).expect("events");
        if let Some(e) = events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in session {session}: {events:#?}\ndaemon log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A session blocked until `go` exists, then runs a held exec and a held
/// connect. The daemon is killed (as by a crash) and stays dead past the
/// heartbeat timeout; then the session goes on and meets the fail mode.
fn daemon_killed(fail_mode: &str) -> (String, Vec<airlock::store::EventRow>) {
    let mut d = daemon(fail_mode);
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let go = d.dir.path().join("go");
    let started = d.dir.path().join("started");
    let script = format!(
        "touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; {ACTOR} run-timed /usr/bin/id -u; {ACTOR} connect-timed {target}",
        started = started.display(),
        go = go.display()
    );
    let run = d.spawn_run(&["user=bob"], &["/bin/sh", "-c", &script]);
    wait_file(&started);
    let session = sessions(&d)[0];
    d.kill();
    std::thread::sleep(stale());
    std::fs::write(&go, "").unwrap();
    let out = finish_within(run, scaled(Duration::from_secs(20)));
    // What happened while no daemon ran is in the pinned ring buffer: the
    // next daemon records it.
    d.start_again();
    let exec = wait_event(&d, session, "exec of /usr/bin/id", |e| {
        e.kind == "exec" && e.detail["path"] == "/usr/bin/id"
    });
    let connect = wait_event(&d, session, "connect to the held address", |e| {
        e.kind == "connect"
            && e.detail["port"].as_u64() == Some(listener.local_addr().unwrap().port() as u64)
    });
    assert_eq!(
        d.requests(ALICE, true).len(),
        0,
        "the fail mode decided: no request was made"
    );
    (out, vec![exec, connect])
}

#[test]
fn a_dead_daemon_fails_closed() {
    if !can_run("a_dead_daemon_fails_closed") {
        return;
    }
    let (out, records) = daemon_killed("closed");
    let lines: Vec<&str> = out.lines().collect();
    let exec = lines
        .iter()
        .find(|l| l.contains("error:") || l.contains("exit:") || l.contains("signal:"));
    let exec = exec.unwrap_or_else(|| panic!("no exec outcome in {out:?}"));
    assert!(
        exec.ends_with(refused_exec()),
        "refused: EPERM from execve (BPF LSM) or killed before its first instruction: {out}"
    );
    let connect = lines.last().unwrap().split_whitespace().last().unwrap();
    assert_eq!(connect, libc::EPERM.to_string(), "connect refused: {out}");
    for r in &records {
        assert_eq!(
            r.detail["enforcement"], "denied: no daemon (fail closed)",
            "{r:?}"
        );
    }
}

#[test]
fn a_dead_daemon_fails_open_when_configured() {
    if !can_run("a_dead_daemon_fails_open_when_configured") {
        return;
    }
    let (out, records) = daemon_killed("open");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.iter().any(|l| l.ends_with("exit:0")), "id ran: {out}");
    let connect = lines.last().unwrap().split_whitespace().last().unwrap();
    assert_eq!(connect, "0", "connected: {out}");
    for r in &records {
        assert_eq!(
            r.detail["enforcement"], "allowed: no daemon (fail open)",
            "{r:?}"
        );
    }
}

#[test]
fn a_task_held_when_the_daemon_died_meets_the_fail_mode_once_resumed() {
    if !can_run("a_task_held_when_the_daemon_died_meets_the_fail_mode_once_resumed") {
        return;
    }
    let mut d = daemon("closed");
    if !connects_held("a_task_held_when_the_daemon_died_meets_the_fail_mode_once_resumed") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    // The actor lives on for a while after its connect returns.
    let mut run = d.spawn_run(&["user=bob"], &[ACTOR, "connect-timed", &target, "600000"]);
    let held = d.wait_pending(ALICE, 1);
    let session = held[0]["session_id"].as_u64().unwrap();
    let tgid = held[0]["tgid"].as_u64().unwrap() as i32;
    d.kill();
    std::thread::sleep(stale());
    // Still stopped: nobody answered. A SIGCONT (here by hand) re-issues
    // the connect, which now meets the fail mode instead of a new hold.
    // SAFETY: kill(2) on the held actor's pid.
    assert_eq!(unsafe { libc::kill(tgid, libc::SIGCONT) }, 0);
    let line = first_line(run.stdout.take().unwrap(), scaled(Duration::from_secs(20)));
    let errno = line.split_whitespace().last().unwrap_or_default();
    assert_eq!(errno, libc::EPERM.to_string(), "refused: {line}");
    // The restarted daemon finds the process alive but no longer held: it
    // closes the request, which can no longer be decided.
    d.start_again();
    let all = d.requests(ALICE, false);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["state"], "failed", "{all:#?}");
    assert!(
        all[0]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("the hold ended while no daemon ran"),
        "{all:#?}"
    );
    let connect = wait_event(&d, session, "the refused connect", |e| {
        e.kind == "connect" && e.detail["enforcement"] == "denied: no daemon (fail closed)"
    });
    assert_eq!(connect.process.tgid as i32, tgid);
    // SAFETY: kill(2) on the lingering actor's pid.
    unsafe { libc::kill(tgid, libc::SIGKILL) };
    let _ = run.wait();
}

#[test]
fn unload_releases_held_tasks_and_detaches_everything() {
    if !can_run("unload_releases_held_tasks_and_detaches_everything") {
        return;
    }
    let mut d = daemon("closed");
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let run = d.spawn_run(&["user=bob"], &[ACTOR, "connect-timed", &target]);
    d.wait_pending(ALICE, 1);
    let exec = d.spawn_run(&["user=bob"], &[ACTOR, "run-timed", "/usr/bin/id", "-u"]);
    d.wait_pending(ALICE, 2);
    let refused = d.airlock(&["unload"]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("stop it before unloading"),
        "refused while the daemon runs: {refused:?}"
    );
    d.kill();
    let out = d.airlock(&["unload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("closed 2 pending request(s)"), "{text}");
    // Unloading does not wait out the heartbeat: the held connect fails now,
    // and so does the held exec (EPERM inside execve with BPF LSM, SIGKILL
    // before its first instruction without).
    let out = finish_within(run, scaled(Duration::from_secs(10)));
    assert_eq!(
        out.split_whitespace().last().unwrap_or_default(),
        libc::EPERM.to_string(),
        "{out}"
    );
    let out = finish_within(exec, scaled(Duration::from_secs(10)));
    assert!(out.trim().ends_with(refused_exec()), "{out}");
    let requests = d.store().requests(None).unwrap();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(
            (r.state.name(), r.decided_by.as_deref()),
            ("failed", Some("unload")),
            "{r:?}"
        );
    }
    let config = std::fs::read_to_string(&d.config).unwrap();
    let pin_dir = config
        .lines()
        .find_map(|l| l.strip_prefix("pin_dir = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(!Path::new(&pin_dir).exists(), "{pin_dir} removed");
    // Nothing is held any more: the same connect, unwatched, goes through.
    let out = std::process::Command::new(ACTOR)
        .args(["connect-timed", &target])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().ends_with(" 0"));
}

#[test]
fn sessions_and_their_events_survive_a_restart() {
    if !can_run("sessions_and_their_events_survive_a_restart") {
        return;
    }
    let mut d = daemon("closed");
    let dir = d.dir.path().to_path_buf();
    let f = |n: &str| dir.join(n).display().to_string();
    let script = format!(
        "touch {s}; while [ ! -e {a} ]; do sleep 0.05; done; /bin/echo while-down; touch {b}; \
         while [ ! -e {c} ]; do sleep 0.05; done; /bin/echo after",
        s = f("started"),
        a = f("go-a"),
        b = f("did-a"),
        c = f("go-c")
    );
    let run = d.spawn_run(&["user=bob"], &["/bin/sh", "-c", &script]);
    wait_file(&dir.join("started"));
    let session = sessions(&d)[0];
    d.stop();
    // The daemon is down: the session's exec still reaches the pinned ring.
    std::fs::write(dir.join("go-a"), "").unwrap();
    wait_file(&dir.join("did-a"));
    d.start_again();
    std::fs::write(dir.join("go-c"), "").unwrap();
    let out = finish_within(run, scaled(Duration::from_secs(20)));
    assert_eq!(out, "while-down\nafter\n");
    let events = d.events(session);
    let echoes: Vec<String> = airlock_tests::execs(&events)
        .into_iter()
        .filter(|e| e.2 == "/bin/echo")
        .map(|e| e.3.join(" "))
        .collect();
    assert_eq!(echoes, ["/bin/echo while-down", "/bin/echo after"]);
    assert!(
        d.log()
            .contains("still watching sessions from an earlier daemon"),
        "{}",
        d.log()
    );
}

/// A deny rule that names only executables is in the kernel's own map:
/// with the daemon dead (and fail_mode open, so the fail mode would let a
/// hold through) the exec is still refused, and recorded as denied.
#[test]
fn a_kernel_deny_rule_holds_with_no_daemon() {
    if !can_run("a_kernel_deny_rule_holds_with_no_daemon") {
        return;
    }
    let mut d = Daemon::start_with_policy(
        &[(
            "test.yaml",
            "pack: test\nrules:\n- {name: no-whoami, on: exec, when: {exe: /usr/bin/whoami}, decision: deny}\n",
        )],
        &format!(
            "heartbeat_timeout_ms = {}\nfail_mode = \"open\"\n",
            heartbeat_ms()
        ),
    );
    expect_lsm(&d);
    let go = d.dir.path().join("go");
    let started = d.dir.path().join("started");
    let script = format!(
        "touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; {ACTOR} run-timed /usr/bin/whoami",
        started = started.display(),
        go = go.display()
    );
    let run = d.spawn_run(&[], &["/bin/sh", "-c", &script]);
    wait_file(&started);
    let session = sessions(&d)[0];
    d.kill();
    std::thread::sleep(stale());
    std::fs::write(&go, "").unwrap();
    let out = finish_within(run, scaled(Duration::from_secs(20)));
    assert!(
        out.trim().ends_with(refused_exec()),
        "refused by the kernel with no daemon: {out}"
    );
    d.start_again();
    let exec = wait_event(&d, session, "the refused exec", |e| {
        e.kind == "exec" && e.detail["path"] == "/usr/bin/whoami"
    });
    assert_eq!(exec.detail["enforcement"], "denied", "{exec:?}");
}

/// The programs exempt no pid: a watched process that gets the pid a dead
/// daemon had (pids are reused) is watched as any other, so a deny rule
/// refuses its exec.
#[test]
fn a_process_with_a_dead_daemons_pid_is_still_watched() {
    if !can_run("a_process_with_a_dead_daemons_pid_is_still_watched") {
        return;
    }
    let mut d = Daemon::start_with_policy(
        &[(
            "test.yaml",
            "pack: test\nrules:\n- {name: no-whoami, on: exec, when: {exe: /usr/bin/whoami}, decision: deny}\n",
        )],
        &format!(
            "heartbeat_timeout_ms = {}\nfail_mode = \"open\"\n",
            heartbeat_ms()
        ),
    );
    expect_lsm(&d);
    let pid = d.pid().expect("the daemon runs");
    let go = d.dir.path().join("go");
    let started = d.dir.path().join("started");
    // Then a daemon started from inside the session refuses to run (it
    // would watch, and hold, itself).
    let script = format!(
        "touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; {ACTOR} run-as-pid {pid} /usr/bin/whoami; {airlock} --config {config} daemon 2>&1 | tail -n 1",
        started = started.display(),
        go = go.display(),
        airlock = airlock_tests::airlock_bin().display(),
        config = d.config.display(),
    );
    let run = d.spawn_run(&[], &["/bin/sh", "-c", &script]);
    wait_file(&started);
    d.kill();
    std::fs::write(&go, "").unwrap();
    let all = finish_within(run, scaled(Duration::from_secs(20)));
    let mut lines = all.lines();
    let out = lines.next().unwrap_or_default().trim();
    let inside = lines.next().unwrap_or_default();
    assert!(
        inside.contains("inside watched session"),
        "a daemon started inside a session: {all}"
    );
    assert_ne!(
        out, "busy",
        "pid {pid} was taken again before the test could"
    );
    let refused = if airlock_tests::held::exec_held_in_syscall() {
        "error:1"
    } else {
        "signal:9"
    };
    assert_eq!(
        out, refused,
        "whoami with the dead daemon's pid {pid}: refused as any watched exec"
    );
}

/// One daemon per data directory, and one per pin directory: a second
/// one is refused with a message that says which daemon is in the way.
#[test]
fn one_daemon_per_data_dir_and_per_pin_dir() {
    if !can_run("one_daemon_per_data_dir_and_per_pin_dir") {
        return;
    }
    let d = daemon("closed");
    let second = |config: &Path| {
        let out = std::process::Command::new(airlock_tests::airlock_bin())
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .output()
            .unwrap();
        assert!(!out.status.success(), "a second daemon started: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The same configuration: the same data directory.
    let err = second(&d.config);
    assert!(
        err.contains("another airlock daemon is running on") && err.contains("stop it first"),
        "{err}"
    );
    // Another data directory and socket, the same pins.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let other = d.dir.path().join("other");
    let moved: String = text
        .lines()
        .map(|l| {
            if l.starts_with("data_dir") {
                format!("data_dir = \"{}/data\"", other.display())
            } else if l.starts_with("socket_path") {
                format!("socket_path = \"{}/airlock.sock\"", other.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = d.dir.path().join("other.toml");
    std::fs::write(&config, moved).unwrap();
    let err = second(&config);
    let pid = d.status()["pid"].as_u64().unwrap();
    assert!(
        err.contains(&format!(
            "another airlock daemon (pid {pid}) is running on the pins"
        )),
        "{err}"
    );
    // The first one is unharmed.
    assert_eq!(d.status()["pid"].as_u64(), Some(pid));
}

/// The sensor never waits on the broker while the broker waits on it: a
/// broker stuck behind a locked store (its request cannot be stored, so it
/// refuses the hold through the sensor) while a flood of exits fills its
/// queue once deadlocked the daemon for good. Once the store is free the
/// daemon answers and records again.
#[test]
fn a_stuck_broker_and_a_flood_of_exits_do_not_wedge_the_daemon() {
    if !can_run("a_stuck_broker_and_a_flood_of_exits_do_not_wedge_the_daemon") {
        return;
    }
    if !connects_held("a_stuck_broker_and_a_flood_of_exits_do_not_wedge_the_daemon") {
        return;
    }
    let d = daemon("closed");
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    // SQLite's WAL write lock is byte 120 of the -shm file: with a read
    // lock on it, every write waits out the busy timeout and fails.
    let shm = std::fs::File::open(d.dir.path().join("data/airlock.db-shm")).unwrap();
    let lock = |kind: i32| {
        let fl = libc::flock {
            l_type: kind as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 120,
            l_len: 1,
            l_pid: 0,
        };
        // SAFETY: fcntl(F_SETLK) with a valid flock on our own fd.
        let rc = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&shm), libc::F_SETLK, &fl) };
        assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
    };
    // Both sessions exist before the store is locked (a new session needs
    // a write), and wait for `go`.
    let go = d.dir.path().join("go");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", go.display());
    let held = d.spawn_run(
        &["user=bob"],
        &[
            "/bin/sh",
            "-c",
            &format!("{wait}; {ACTOR} connect-timed {target}"),
        ],
    );
    let flood = d.spawn_run(
        &["user=bob"],
        &[
            "/bin/sh",
            "-c",
            &format!("{wait}; {ACTOR} spawn 1300 /bin/true"),
        ],
    );
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while sessions(&d).len() < 2 {
        assert!(Instant::now() < deadline, "two sessions registered");
        std::thread::sleep(Duration::from_millis(50));
    }
    lock(libc::F_RDLCK);
    std::fs::write(&go, "").unwrap();
    let _ = finish_within(flood, scaled(Duration::from_secs(120)));
    // Long enough for the held connect's request to fail (the recorder
    // waits out SQLite's 5 s busy timeout for the batch before it, then for
    // the request): the broker then refuses it through the sensor.
    std::thread::sleep(Duration::from_secs(15));
    lock(libc::F_UNLCK);
    // The daemon answers again, and a new session is recorded.
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    let ok = loop {
        let out = std::process::Command::new(airlock_tests::airlock_bin())
            .arg("--config")
            .arg(&d.config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "the daemon answers again; log:\n{}", d.log());
    let (id, out) = d.run(&[], &["/bin/echo", "after"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");
    let events = d.events(id);
    assert!(
        events
            .iter()
            .any(|e| e.kind == "exec" && e.detail["path"] == "/bin/echo"),
        "recorded again: {events:#?}"
    );
    // The held connect was refused when its request could not be stored,
    // or its request was stored once the store was free and waits: deny
    // it. Either way it ends refused, not wedged.
    for r in d.requests(ALICE, true) {
        let out = d.approvals(ALICE, &["deny", &r["id"].to_string()]);
        assert!(out.status.success(), "{out:?}");
    }
    let out = finish_within(held, scaled(Duration::from_secs(30)));
    assert!(out.trim().ends_with(&libc::EPERM.to_string()), "{out}");
}

/// The pinned verdict and loss maps cannot fill up for good: verdicts of
/// threads that are gone make room when the map is full, and the loss
/// counters of ended sessions are removed once recorded. Both maps are
/// filled to the brim (verdicts of pids no thread has, counters of
/// sessions that have no member), and a held connect is still decided.
#[test]
fn full_verdict_and_loss_maps_are_cleaned_and_holds_still_decided() {
    use airlock_common::{LossKey, VerdictEntry};
    use aya::maps::{HashMap, PerCpuHashMap, PerCpuValues};
    let test = "full_verdict_and_loss_maps_are_cleaned_and_holds_still_decided";
    if !can_run(test) || !connects_held(test) {
        return;
    }
    let d = daemon("closed");
    expect_lsm(&d);

    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut verdicts: HashMap<_, u32, VerdictEntry> =
        HashMap::try_from(d.pinned_map("VERDICTS")).unwrap();
    let stale = VerdictEntry {
        digest: 1,
        verdict: 1,
        kind: 2,
        tgid: 1,
        env_hash: 0,
        env_len: 0,
        env_flags: 0,
    };
    let mut filled = 0u32;
    while verdicts.insert(pid_max + 1 + filled, stale, 0).is_ok() {
        filled += 1;
    }
    assert!(filled >= 8000, "the verdict map took {filled} entries");

    let mut losses: PerCpuHashMap<_, LossKey, u64> =
        PerCpuHashMap::try_from(d.pinned_map("LOSSES")).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let zeros = || PerCpuValues::try_from(vec![0u64; cpus]).unwrap();
    let mut counters = 0u64;
    loop {
        let key = LossKey {
            session_id: (1 << 40) + counters,
            kind: 2,
            reason: 1,
        };
        if losses.insert(key, zeros(), 0).is_err() {
            break;
        }
        counters += 1;
    }
    assert!(counters >= 4000, "the loss map took {counters} entries");

    // A held connect is decided and goes through.
    let listener = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let run = d.spawn_run(&[], &[ACTOR, "connect", &target]);
    let pending = d.wait_pending(ALICE, 1);
    let id = pending[0]["id"].as_u64().unwrap().to_string();
    let out = d.approvals(ALICE, &["approve", &id, "--reason", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let out = finish_within(run, scaled(Duration::from_secs(30)));
    assert_eq!(
        out.trim(),
        "0",
        "approved with the verdict map full: {out}\n{}",
        d.log()
    );

    // The ended sessions' counters are gone within a few polls.
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let left = losses.keys().count();
        if left < 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} loss counters of ended sessions are still there\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A full session map never lets a watched process's child run unseen:
/// with BPF LSM the fork fails (EAGAIN) and is counted as `fork_refused`;
/// without it the child runs unwatched and is counted as
/// `session_map_full`. Either way the daemon then removes the entries of
/// processes that are gone, and the next fork is watched again.
#[test]
fn a_full_session_map_refuses_the_fork_or_counts_it_and_makes_room() {
    use airlock_common::SessionEntry;
    use aya::maps::HashMap;
    let test = "a_full_session_map_refuses_the_fork_or_counts_it_and_makes_room";
    if !can_run(test) {
        return;
    }
    let d = daemon("closed");
    let gate = d.dir.path().join("gate");
    let gate_s = gate.display().to_string();
    let run = d.spawn_run(&[], &[ACTOR, "gated-spawns", &gate_s, "2", "/bin/true"]);
    wait_file(Path::new(&format!("{gate_s}.ready")));

    // Entries for pids no process has, until the map takes no more.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut sessions: HashMap<_, u32, SessionEntry> =
        HashMap::try_from(d.pinned_map("SESSIONS")).unwrap();
    let mut filled = 0u32;
    while sessions
        .insert(
            pid_max + 1 + filled,
            SessionEntry {
                session_id: 1 << 40,
            },
            0,
        )
        .is_ok()
    {
        filled += 1;
    }
    assert!(filled > 60_000, "the session map took {filled} entries");

    std::fs::write(format!("{gate_s}.1"), "").unwrap();
    // The daemon sees the loss and makes room again.
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while sessions.keys().count() > 1000 {
        assert!(
            Instant::now() < deadline,
            "the entries of processes that are gone were not removed\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(format!("{gate_s}.2"), "").unwrap();
    let out = finish_within(run, scaled(Duration::from_secs(30)));
    let lines: Vec<&str> = out.lines().collect();
    let lsm = airlock_tests::held::lsm_expected();
    let (first, reason) = if lsm {
        ("error:11", "fork_refused")
    } else {
        ("exit:0", "session_map_full")
    };
    assert_eq!(
        lines,
        [first, "exit:0"],
        "the fork with the map full, then one with room: {out}\n{}",
        d.log()
    );
    let session = d.last_session();
    let losses: Vec<String> = d
        .events(session)
        .iter()
        .filter(|e| e.kind == "loss")
        .map(|e| e.detail["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        losses.iter().any(|r| r == reason),
        "the {reason} was recorded in the session: {losses:?}"
    );
}
