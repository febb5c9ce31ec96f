//! A rule that names a program holds it however the agent names it: the
//! kernel reports the file it opened (device, inode, mode, its own name)
//! and the daemon decides on that file, not on the string the caller
//! wrote. Each trick below is refused as the plain form is, on the host
//! (execs stopped after the fact) and in the VMs (BPF LSM: execve fails).
use std::{os::unix::fs::PermissionsExt, path::Path};

use airlock_tests::{
    Daemon, can_run,
    held::{expect_lsm, lsm_expected},
};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");

/// The dynamic loaders this test knows, by architecture.
const LOADERS: &[&str] = &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"];

/// What `run-timed` (or `fexec`) prints for an exec refused here: EPERM
/// from execve itself with BPF LSM (`fexec` then exits 126; a script's
/// interpreter, known only once the exec is done, is killed), SIGKILL
/// before the first instruction without it.
fn refused(line: &str) -> bool {
    if lsm_expected() {
        line.ends_with("error:1") || line.ends_with("exit:126") || line.ends_with("signal:9")
    } else {
        line.ends_with("signal:9")
    }
}

/// A fresh directory with a copy of the actor in it, `probe`, the program
/// the test's policy flags (made before the daemon starts: it looks the
/// files a policy names up when it loads): the directory, its path, the
/// probe's path.
fn probe_dir() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let probe = format!("{d}/probe");
    std::fs::copy(ACTOR, &probe).expect("a copy of the actor");
    (dir, d, probe)
}

/// One line of the script: `NAME <run-timed's last line>`.
fn trick(name: &str, cmd: &str) -> String {
    format!("printf '{name} '; {cmd} | tail -n 1\n")
}

#[test]
fn other_names_for_a_flagged_program_are_refused_as_the_program_is() {
    let test = "other_names_for_a_flagged_program_are_refused_as_the_program_is";
    if !can_run(test) {
        return;
    }
    let Some(loader) = LOADERS.iter().find(|l| Path::new(l).exists()) else {
        airlock_tests::skip(test, "no dynamic loader this test knows on this machine");
        return;
    };
    let (_dir, d, probe) = probe_dir();
    let suid = format!("{d}/suid");
    std::fs::copy(ACTOR, &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink(&probe, format!("{d}/alias")).unwrap();
    std::fs::hard_link(&probe, format!("{d}/other")).unwrap();
    std::os::unix::fs::symlink(&suid, format!("{d}/suid-alias")).unwrap();
    // A script whose interpreter is the flagged program, with the flagged
    // argument on its `#!` line.
    let script = format!("{d}/script");
    std::fs::write(&script, format!("#!{probe} now\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = format!(
        "pack: t\nrules:\n\
         - {{name: no-probe-now, on: exec, when: {{exe: {probe}, args: now}}, decision: deny}}\n\
         - {{name: no-setuid, on: exec, when: {{setuid: true}}, decision: deny}}\n\
         - {{name: no-whoami, on: exec, when: {{exe: whoami}}, decision: deny}}\n"
    );
    let daemon = Daemon::start_with_policy(&[("t.yaml", &policy)], "");
    expect_lsm(&daemon);

    let base = Path::new(&d).file_name().unwrap().to_string_lossy();
    let parent = Path::new(&d).parent().unwrap().display().to_string();
    let padded = format!("{d}{}/probe", "/.".repeat(300));
    let run = |cmd: &str| format!("{ACTOR} run-timed {cmd}");
    let mut tricks = vec![
        ("plain", run(&format!("{probe} now"))),
        ("relative", format!("(cd {d} && {})", run("./probe now"))),
        (
            "dot-dot",
            run(&format!("{parent}/{base}/../{base}/probe now")),
        ),
        ("double-slash", run(&format!("{d}//probe now"))),
        ("padded-past-512", run(&format!("{padded} now"))),
        ("symlink", run(&format!("{d}/alias now"))),
        ("hard-link", run(&format!("{d}/other now"))),
        ("fexecve", run(&format!("{ACTOR} fexec {probe} now"))),
        ("loader", run(&format!("{loader} {probe} now"))),
        (
            "loader-with-options",
            run(&format!("{loader} --inhibit-cache --argv0 x {d}/alias now")),
        ),
        ("setuid", run(&format!("{suid} now"))),
        ("setuid-fexecve", run(&format!("{ACTOR} fexec {suid} now"))),
        ("setuid-symlink", run(&format!("{d}/suid-alias now"))),
        ("whoami", run("whoami")),
        ("script-interpreter", run(&script)),
        // The argument a rule looks for past the kernel's copy of argv at
        // the syscall's entry (64 words): the copy is cut, so it fails
        // closed.
        (
            "argument-65",
            run(&format!("{probe} {}now", "x ".repeat(70))),
        ),
    ];
    // A 32-bit execve fires no syscall tracepoint: where this kernel runs
    // them at all (IA-32 emulation), it must not run on a stale argv.
    let compat = std::process::Command::new(ACTOR)
        .args(["exec32", "/bin/true"])
        .status()
        .is_ok_and(|s| s.success());
    let mut controls = vec![
        ("control-alias", run(&format!("{d}/alias seq 1 /bin/true"))),
        (
            "control-loader",
            run(&format!("{loader} {probe} seq 1 /bin/true")),
        ),
    ];
    if compat {
        tricks.push(("compat-execve", run(&format!("{ACTOR} exec32 {probe} now"))));
        // Its argv is read too (not refused for being unreadable).
        controls.push((
            "control-compat-execve",
            run(&format!("{ACTOR} exec32 {probe} seq 1 /bin/true")),
        ));
    } else {
        eprintln!("{test}: no 32-bit execve here (IA-32 emulation off): its trick is not tried");
    }
    let (more, more_controls) = busybox_tricks(test, &d);
    tricks.extend(more);
    controls.extend(more_controls);
    let (session, out) = run_all(&daemon, &tricks, &controls);
    assert_refused(&daemon, &out, &tricks, &controls);

    assert_recorded_by_file(&daemon, session, &probe);
}

/// A package upgrade replaces a program with a new file (a new inode): the
/// daemon looks the policy's executables up again, so a hard link made to
/// the new file afterwards is refused as the program is.
#[test]
fn a_replaced_program_is_found_again_by_its_new_file() {
    let test = "a_replaced_program_is_found_again_by_its_new_file";
    if !can_run(test) {
        return;
    }
    let (_dir, d, probe) = probe_dir();
    let policy = format!(
        "pack: t\nrules:\n\
         - {{name: no-probe-now, on: exec, when: {{exe: {probe}, args: now}}, decision: deny}}\n"
    );
    let daemon = Daemon::start_with_policy(&[("t.yaml", &policy)], "");
    expect_lsm(&daemon);
    // The upgrade: a new file renamed over the old one, then another name
    // for it (neither is a name the policy gives).
    std::fs::copy(ACTOR, format!("{d}/.probe.new")).unwrap();
    std::fs::rename(format!("{d}/.probe.new"), &probe).unwrap();
    std::fs::hard_link(&probe, format!("{d}/other")).unwrap();
    let deadline =
        std::time::Instant::now() + airlock_tests::scaled(std::time::Duration::from_secs(30));
    while !daemon.log().contains("changed on disk") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not look the policy's files up again in time:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let script = trick(
        "upgraded-hard-link",
        &format!("{ACTOR} run-timed {d}/other now"),
    ) + &trick(
        "control",
        &format!("{ACTOR} run-timed {d}/other seq 1 /bin/true"),
    );
    let (_, out) = daemon.run(&["agent=identity-test"], &["/bin/sh", "-c", &script]);
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{out}\n{}", daemon.log()))
            .to_string()
    };
    assert!(
        refused(&line("upgraded-hard-link")),
        "a hard link of the replaced program ran: {out}\n{}",
        daemon.log()
    );
    assert!(line("control").ends_with("exit:0"), "{out}");
}

/// A second thread of the caller rewrites an argument between the moment
/// the rules see argv and the moment execve copies it for the new image:
/// whatever the timing, a program never runs with the argument a deny rule
/// names. With BPF LSM the new image's argv is compared with the one
/// decided on and killed before its first instruction when they differ;
/// without it the rules see the new image's argv itself.
#[test]
fn an_argv_rewritten_while_execve_copies_it_never_runs() {
    let test = "an_argv_rewritten_while_execve_copies_it_never_runs";
    if !can_run(test) {
        return;
    }
    let r = Race::run(test, "argv-race", "args: evil", 200);
    let (daemon, counts, probe) = (&r.daemon, &r.counts, &r.probe);
    // Each child killed or refused was recorded as an exec of the probe
    // that was stopped or refused, and none with the argument ran unflagged
    // (without BPF LSM a deny is a hold the daemon answers with a kill).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(probe).unwrap());
    let events = daemon.events(r.session);
    let probe_execs: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "exec" && e.detail["file"]["ino"].as_u64() == Some(ino))
        .map(|e| &e.detail)
        .collect();
    let flagged = probe_execs
        .iter()
        .filter(|d| d["enforcement"].is_string())
        .count() as u64;
    assert!(
        flagged >= r.count("killed") + r.count("refused"),
        "{flagged} flagged execs of the probe recorded, for {counts}"
    );
    let unflagged_evil: Vec<_> = probe_execs
        .iter()
        .filter(|d| !d["enforcement"].is_string() && d["argv"][3] == "evil")
        .collect();
    assert!(unflagged_evil.is_empty(), "{unflagged_evil:#?}");
}

/// Rules look at the environment a program gets and where it runs; an
/// approver sees both (the values of variables that change what programs
/// do, the others by name); and the environment approved is the one the
/// program gets.
#[test]
fn the_environment_a_program_gets_is_ruled_on_and_shown() {
    let test = "the_environment_a_program_gets_is_ruled_on_and_shown";
    if !can_run(test) {
        return;
    }
    const ALICE: &str = "alice-token-0123456789";
    let (_dir, _, probe) = probe_dir();
    let policy = format!(
        "pack: t\nrules:\n\
         - {{name: no-preload, on: exec, when: {{exe: {probe}, env: {{LD_PRELOAD: \"*\"}}}}, decision: deny}}\n\
         - {{name: proxied, on: exec, when: {{exe: {probe}, env: {{HTTPS_PROXY: \"*\"}}}}, decision: hold, hold: {{timeout: 120}}}}\n"
    );
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", &policy)],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    let run = |cmd: &str| format!("{ACTOR} run-timed {cmd}");
    let tricks: Tricks = vec![
        (
            "preload",
            run(&format!("/usr/bin/env LD_PRELOAD= {probe} now")),
        ),
        (
            "preload-among-many",
            run(&format!(
                "/usr/bin/env A=1 B=2 LD_PRELOAD=/x.so C=3 {probe} now"
            )),
        ),
    ];
    let controls: Tricks = vec![("control", run(&format!("{probe} seq 1 /bin/true")))];
    let (_, out) = run_all(&daemon, &tricks, &controls);
    assert_refused(&daemon, &out, &tricks, &controls);

    // A hold: the approver sees where and with what it runs.
    let child = daemon.spawn_run(
        &["agent=identity-test"],
        &[
            "/usr/bin/env",
            "HTTPS_PROXY=http://proxy.invalid:3128",
            "SECRET_TOKEN=s3cr3t",
            &probe,
            "seq",
            "1",
            "/bin/true",
        ],
    );
    let reqs = daemon.wait_pending(ALICE, 1);
    let r = &reqs[0];
    let env: Vec<(String, String)> =
        serde_json::from_value(r["context"]["env"].clone()).unwrap_or_default();
    assert!(
        env.contains(&("HTTPS_PROXY".into(), "http://proxy.invalid:3128".into()))
            && env.contains(&("SECRET_TOKEN".into(), "(set)".into()))
            && r["context"]["env_complete"] == true
            && r["context"]["cwd"].is_string(),
        "the request shows the environment and working directory: {r:#}"
    );
    let out = daemon.approvals(
        ALICE,
        &["approve", &r["id"].as_u64().unwrap().to_string(), "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    // It ran (finish_within insists the session exited 0).
    airlock_tests::held::finish_within(
        child,
        airlock_tests::scaled(std::time::Duration::from_secs(30)),
    );
}

/// A second thread flips an environment variable while the first execs a
/// program a rule holds on that variable: the program never gets the
/// value the rule denies, whatever the timing (with BPF LSM the new
/// image's environment is compared with the one decided on).
#[test]
fn an_environment_rewritten_while_execve_copies_it_never_runs() {
    let test = "an_environment_rewritten_while_execve_copies_it_never_runs";
    if !can_run(test) {
        return;
    }
    Race::run(test, "env-race", "env: {XYZ: evil}", 100);
}

/// A race of a second thread against execve (the actor's `argv-race` or
/// `env-race`) in a session whose policy denies the probe when `when`
/// holds (the value "evil"), run `tries` times: it never ran with "evil",
/// every child ended as ran, refused or killed, and each one that ran
/// wrote its line.
struct Race {
    daemon: Daemon,
    session: u64,
    counts: String,
    probe: String,
    _dir: tempfile::TempDir,
}

impl Race {
    fn run(test: &str, mode: &str, when: &str, tries: u32) -> Self {
        let (dir, d, probe) = probe_dir();
        let ran = format!("{d}/ran");
        let policy = format!(
            "pack: t\nrules:\n\
             - {{name: no-evil, on: exec, when: {{exe: {probe}, {when}}}, decision: deny}}\n"
        );
        let daemon = Daemon::start_with_policy(&[("t.yaml", &policy)], "");
        expect_lsm(&daemon);
        let (session, out) = daemon.run_named(
            "agent=identity-test",
            &[("race", format!("{ACTOR} {mode} {tries} {probe} {ran}"))],
        );
        let counts = daemon.named_line(&out, "race");
        eprintln!("{test}: {counts}");
        let lines = std::fs::read_to_string(&ran).unwrap_or_default();
        let evil = lines.lines().filter(|l| l.contains("evil")).count();
        assert_eq!(
            evil,
            0,
            "the probe ran with the denied value {evil} times ({counts}):\n{}",
            daemon.log()
        );
        let race = Self {
            daemon,
            session,
            counts,
            probe,
            _dir: dir,
        };
        assert_eq!(
            race.count("other"),
            0,
            "children ended another way: {}",
            race.counts
        );
        assert_eq!(
            race.count("ran") as usize,
            lines.lines().count(),
            "{}",
            race.counts
        );
        race
    }

    /// One of the actor's counts (`ran`, `refused`, `killed`, `other`).
    fn count(&self, key: &str) -> u64 {
        self.counts
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}:")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.counts))
    }
}

type Tricks = Vec<(&'static str, String)>;

/// The multi-call tricks and their controls (busybox is in every VM
/// image; on a host only where it is installed).
fn busybox_tricks(test: &str, d: &str) -> (Tricks, Tricks) {
    let run = |cmd: &str| format!("{ACTOR} run-timed {cmd}");
    let Some(b) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|b| Path::new(b).exists())
    else {
        eprintln!("{test}: no busybox here, its tricks are tried in the VMs only");
        return (Vec::new(), Vec::new());
    };
    // An applet link by another name: busybox runs what argv[0] says,
    // whatever the file is called.
    let ls = format!("{d}/ls");
    std::os::unix::fs::symlink(b, &ls).expect("a link to busybox");
    let tricks = vec![
        ("busybox-applet", run(&format!("{b} whoami"))),
        ("busybox-argv0", run(&format!("{ACTOR} argv0 whoami {ls}"))),
        ("busybox-twice", run(&format!("{b} busybox whoami"))),
        (
            "busybox-prefixed-argv0",
            run(&format!("{ACTOR} argv0 busybox.x {ls} whoami")),
        ),
        (
            "busybox-named-twice-otherwise",
            run(&format!("{ACTOR} argv0 busyboxA {ls} busyboxB whoami")),
        ),
        (
            "busybox-login-argv0",
            run(&format!("{ACTOR} argv0 -whoami {ls}")),
        ),
    ];
    let controls = vec![
        ("control-busybox", run(&format!("{b} true"))),
        ("control-busybox-link", run(&format!("{ls} /"))),
        (
            "control-busybox-argv0",
            run(&format!("{ACTOR} argv0 true {ls} whoami")),
        ),
    ];
    (tricks, controls)
}

/// Runs every trick and control in one session: its id, and the lines
/// `NAME <run-timed's last line>`.
fn run_all(daemon: &Daemon, tricks: &Tricks, controls: &Tricks) -> (u64, String) {
    let cmds: Tricks = tricks
        .iter()
        .chain(controls)
        .map(|(name, cmd)| (*name, format!("{cmd} | tail -n 1")))
        .collect();
    daemon.run_named("agent=identity-test", &cmds)
}

/// The line `run_all` printed for `name`.
fn line(daemon: &Daemon, out: &str, name: &str) -> String {
    daemon.named_line(out, name)
}

/// Every trick was refused, every control ran.
fn assert_refused(daemon: &Daemon, out: &str, tricks: &Tricks, controls: &Tricks) {
    let escaped: Vec<String> = tricks
        .iter()
        .filter(|(name, _)| !refused(&line(daemon, out, name)))
        .map(|(name, _)| format!("{name}: {}", line(daemon, out, name)))
        .collect();
    assert!(
        escaped.is_empty(),
        "these ran although a rule names what they run:\n{}\nall:\n{out}\ndaemon log:\n{}",
        escaped.join("\n"),
        daemon.log()
    );
    for (name, _) in controls {
        assert!(
            line(daemon, out, name).ends_with("exit:0"),
            "{name} is not flagged and runs: {out}"
        );
    }
}

/// The probe's execs were recorded as its file, whatever name the caller
/// used, and the daemon decided one per trick on it.
fn assert_recorded_by_file(daemon: &Daemon, session: u64, probe: &str) {
    // (The loader's own file is the loader's.)
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(probe).expect("the probe"));
    let events = daemon.events(session);
    let probe_execs = events
        .iter()
        .filter(|e| e.kind == "exec" && e.detail["file"]["ino"].as_u64() == Some(ino))
        .count();
    // plain, relative, dot-dot, double-slash, padded, symlink, hard link,
    // fexecve, and the alias control.
    assert!(
        probe_execs >= 9,
        "{probe_execs} execs of the probe's file recorded: {:#?}",
        events
            .iter()
            .filter(|e| e.kind == "exec")
            .map(|e| &e.detail)
            .collect::<Vec<_>>()
    );
    let decided = events
        .iter()
        .filter(|e| e.kind == "decision" && e.detail["rule"] == "t/no-probe-now")
        .count();
    assert!(
        decided >= 10,
        "the daemon's decisions by the probe rule: {decided} (one per trick on the probe)"
    );
}
