//! The shipped policy packs against a realistic agent session (real git,
//! make, tar, curl and sudo), and policy reloads: on the host and, for the
//! session, in the VMs with BPF LSM.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use airlock_tests::{
    Daemon, can_run,
    held::{expect_lsm, lsm_expected},
    scaled, skip,
};

const ALICE: &str = "alice-token-0123456789";
const APPROVER: &str = "[[approver]]\nname = \"alice\"\ntoken = \"alice-token-0123456789\"\n";

/// The shipped packs, as (file name, text).
fn shipped() -> Vec<(String, String)> {
    // Without `..`: in the VM only the packs sit at the checkout's path.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"))
        .join("policies");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            (
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 7, "shipped packs in {}", dir.display());
    files
}

/// The path of `tool` on PATH.
fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Answers every HTTP request with 200 until the listener is dropped.
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    port
}

#[test]
fn an_agent_session_under_the_shipped_packs_holds_exactly_the_intended_actions() {
    let test = "an_agent_session_under_the_shipped_packs_holds_exactly_the_intended_actions";
    if !can_run(test) {
        return;
    }
    let tools = ["git", "make", "tar", "curl", "sudo"];
    if let Some(missing) = tools.iter().find(|t| which(t).is_none()) {
        skip(
            test,
            &format!("{missing} is not installed (the workload needs {tools:?})"),
        );
        return;
    }
    let packs = shipped();
    let packs: Vec<(&str, &str)> = packs
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let d = Daemon::start_with_policy(&packs, APPROVER);
    expect_lsm(&d);

    let work = tempfile::tempdir().expect("workdir");
    let w = work.path();
    std::fs::create_dir_all(w.join("src")).expect("src");
    std::fs::write(w.join("src/main.txt"), "hello\n").expect("src file");
    std::fs::write(w.join("dump.sql"), "INSERT INTO users VALUES ('secret');\n").expect("dump");
    std::fs::write(
        w.join("Makefile"),
        "dist:\n\tmkdir -p build && tar czf build/pkg.tgz src\n",
    )
    .expect("Makefile");
    let port = http_server();
    let url = format!("http://127.0.0.1:{port}");
    // What an agent does: commit, build a package, fetch, try to upload a
    // database dump, try sudo, write a .env file and read it back (held
    // where BPF LSM sees file opens), clean up its build tree.
    let script = format!(
        "cd {w} || exit 99
git init -q . && git add -A && git -c user.name=agent -c user.email=agent@example.com commit -qm init; echo git=$?
make -s dist; echo make=$?
curl -s -o /dev/null {url}/index.html; echo download=$?
curl -s -o /dev/null -T dump.sql {url}/upload; echo upload=$?
sudo -n true; echo sudo=$?
echo KEY=1 > .env; echo write_env=$?
cat .env >/dev/null; echo read_env=$?
/bin/rm -rf build; echo rm=$?",
        w = w.display()
    );
    let workdir = format!("workdir={}", w.display());
    let mut run = d.spawn_run(
        &["agent=coder", "model=test-1", "user=bob", &workdir],
        &["/bin/sh", "-c", &script],
    );
    // The approver denies every hold as it comes.
    let mut held = Vec::new();
    let deadline = Instant::now() + scaled(Duration::from_secs(120));
    let status = loop {
        for r in d.requests(ALICE, true) {
            let id = r["id"].as_u64().unwrap_or(0);
            held.push((
                r["rule"].as_str().unwrap_or("").to_string(),
                r["action"]["argv"].clone(),
            ));
            let out = d.approvals(
                ALICE,
                &["deny", &id.to_string(), "--reason", "not from an agent"],
            );
            assert!(out.status.success(), "deny {id}: {out:?}");
        }
        if let Some(s) = run.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the session did not finish; held so far: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let _ = run.stdout.take().map(|mut s| s.read_to_string(&mut out));
    assert!(status.success(), "{out}");
    let value = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {out}"))
            .to_string()
    };
    assert_eq!(
        (value("git"), value("make"), value("download"), value("rm")),
        ("0".into(), "0".into(), "0".into(), "0".into()),
        "{out}"
    );
    assert_ne!(value("upload"), "0", "the upload was denied: {out}");
    assert_ne!(value("sudo"), "0", "sudo was denied: {out}");
    let rules: Vec<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
    // File opens are seen where BPF LSM runs (expect_lsm checked the
    // daemon agrees).
    let opens = lsm_expected();
    let mut want = vec!["exfiltration/curl-upload", "privilege/escalate"];
    if opens {
        want.push("secrets/dotenv");
        assert_ne!(value("read_env"), "0", "reading .env was denied: {out}");
    } else {
        assert_eq!(value("read_env"), "0", "no file hook here: {out}");
    }
    assert_eq!(
        value("write_env"),
        "0",
        "writing .env is let through: {out}"
    );
    assert_eq!(rules, want, "exactly these were held: {held:?}");
    assert!(
        !w.join("build").exists(),
        "rm removed the build tree: {out}"
    );

    // Candidates no hold rule matched were resumed without a human, with
    // their decision recorded; git, make and tar were never candidates.
    // (rm by its path: busybox's sh, in the VM, runs a bare `rm` itself.)
    let sessions = d.store().sessions().expect("sessions");
    let id = sessions.iter().map(|s| s.id).max().expect("a session");
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    let decisions = loop {
        let v: Vec<(String, String, String)> = d
            .events(id)
            .iter()
            .filter(|e| e.kind == "decision")
            .map(|e| {
                (
                    e.detail["target"].as_str().unwrap_or("").to_string(),
                    e.detail["decision"].as_str().unwrap_or("").to_string(),
                    e.detail["rule"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect();
        if v.len() >= 4 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let find = |prefix: &str| {
        decisions
            .iter()
            .find(|(t, _, _)| t.starts_with(prefix))
            .unwrap_or_else(|| panic!("no decision for {prefix}: {decisions:?}"))
    };
    assert_eq!(find("curl -s -o /dev/null http").1, "record");
    assert_eq!(find("curl -s -o /dev/null -T").1, "hold");
    assert_eq!(find("sudo").1, "hold");
    assert_eq!(find("/bin/rm -rf build").1, "record");
    // (A multi-call binary's applet, such as the VMs' busybox tar, is
    // always a candidate: its argv says what runs.)
    let multicall = |tool: &str| {
        which(tool)
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .is_some_and(|n| ["busybox", "toybox", "coreutils"].contains(&n.as_str()))
    };
    let never: Vec<&str> = ["git", "make", "tar"]
        .into_iter()
        .filter(|t| !multicall(t))
        .collect();
    assert!(
        decisions
            .iter()
            .all(|(t, _, _)| never.iter().all(|n| !t.starts_with(n))),
        "{never:?} are not candidates: {decisions:?}"
    );
}

#[test]
fn policy_reloads_on_file_change_and_sighup_and_a_bad_file_keeps_the_old_one() {
    if !can_run("policy_reloads_on_file_change_and_sighup_and_a_bad_file_keeps_the_old_one") {
        return;
    }
    let hold_id = "pack: t\nrules:\n  - {name: hold-id, on: exec, when: {exe: /usr/bin/id}, decision: deny}\n";
    let d = Daemon::start_with_policy(&[("t.yaml", hold_id)], APPROVER);
    let refused = |d: &Daemon| {
        let (_, out) = d.run(&["agent=t"], &["/usr/bin/id", "-u"]);
        !out.status.success()
    };
    assert!(refused(&d), "the first policy denies id");
    let file = d.policy_dir().join("t.yaml");

    // A broken file: the old policy stays in force, the failure is stored.
    std::fs::write(
        &file,
        "pack: t\nrules:\n  - {name: x, on: exec, when: {exe: id}, decision: maybe}\n",
    )
    .expect("write");
    let loads = wait_loads(&d, 2);
    let bad = &loads[1];
    assert_eq!((bad.ok, bad.trigger.as_str()), (false, "file change"));
    let err = bad.error.clone().unwrap_or_default();
    assert!(
        err.contains("t.yaml:3:") && err.contains("unknown variant `maybe`"),
        "{err}"
    );
    assert!(refused(&d), "the old policy still denies id");
    let status = d.status();
    assert!(
        status["policy"]
            .as_str()
            .unwrap_or("")
            .contains("last reload refused"),
        "{status}"
    );

    // A good file, then SIGHUP: the new policy is in force at once.
    std::fs::write(&file, "pack: t\nrules: []\n").expect("write");
    let loads = wait_loads(&d, 3);
    assert!(loads[2].ok, "{loads:?}");
    assert!(!refused(&d), "the new policy lets id run");
    let pid = status["pid"].as_u64().expect("pid") as i32;
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let loads = wait_loads(&d, 4);
    assert_eq!((loads[3].ok, loads[3].trigger.as_str()), (true, "SIGHUP"));
}

/// Waits until the store holds `n` policy loads.
fn wait_loads(d: &Daemon, n: usize) -> Vec<airlock::model::PolicyLoad> {
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let loads = d.store().policy_loads().expect("policy loads");
        if loads.len() >= n {
            return loads;
        }
        assert!(
            Instant::now() < deadline,
            "{} policy loads, wanted {n}: {loads:?}",
            loads.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cargo xtask run`, the README's first command, starts the daemon with
/// the checkout's shipped packs: all of them are in force (the status line
/// names what the packs hold), and a sudo in a session is held by them.
#[test]
fn the_daemon_as_xtask_run_starts_it_enforces_the_shipped_packs() {
    let test = "the_daemon_as_xtask_run_starts_it_enforces_the_shipped_packs";
    if !can_run(test) {
        return;
    }
    let Some(sudo) = which("sudo") else {
        skip(test, "sudo is not installed (the session runs it)");
        return;
    };
    let d = Daemon::start_as_xtask_run(APPROVER);
    let dirs = [airlock_tests::checkout().join("policies")];
    let packs = airlock::policy::Policy::load_dirs(&dirs).expect("the shipped packs load");
    let status = d.status();
    let policy = status["policy"].as_str().unwrap_or_default();
    assert!(
        policy.starts_with(&packs.describe()),
        "the shipped packs ({}) are in force: {status:#}",
        packs.describe()
    );
    assert_eq!(packs.files.len(), shipped().len(), "every shipped pack");
    let mut run = d.spawn_run(
        &["agent=coder"],
        &[sudo.to_str().unwrap_or("sudo"), "-n", "true"],
    );
    let held = d.wait_pending(ALICE, 1);
    assert_eq!(held[0]["rule"], "privilege/escalate", "{held:#?}");
    let out = d.approvals(
        ALICE,
        &["deny", &held[0]["id"].to_string(), "--reason", "test"],
    );
    assert!(out.status.success(), "{out:?}");
    let st = run.wait().expect("wait");
    assert!(!st.success(), "the denied sudo failed");
}
