//! The CLI's answers to bad input and a missing daemon (no root needed).

use std::process::Command;

fn airlock(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .expect("run airlock")
}

#[test]
fn bad_config_exits_64_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "data_dir = \"/tmp\"\nsocket_pth = \"/tmp/x\"\n").unwrap();
    let out = airlock(&["--config", cfg.to_str().unwrap(), "sessions"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "airlock: {}: at byte 18: unknown field `socket_pth`",
            cfg.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn run_without_a_daemon_says_so_and_exits_125() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!("socket_path = \"{}/none.sock\"\n", dir.path().display()),
    )
    .unwrap();
    let out = airlock(&["--config", cfg.to_str().unwrap(), "run", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the airlock daemon at")
            && err.contains("is `airlock daemon` running?"),
        "{err}"
    );
}

#[test]
fn sessions_without_a_store_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = \"{}/data\"\n", dir.path().display()),
    )
    .unwrap();
    let out = airlock(&["--config", cfg.to_str().unwrap(), "sessions"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist: start the daemon (`airlock daemon`) first"),
        "{err}"
    );
}

#[test]
fn run_needs_a_command() {
    let out = airlock(&["run", "--label", "agent=x"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
}

/// A policy that does not load stops the daemon with 64 and the file's
/// errors, before it locks or creates anything (the data directory, the
/// store, the socket stay absent).
#[test]
fn daemon_with_a_bad_policy_exits_64_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("bad.yaml"),
        "pack: p\nrules:\n  - name: r\n    on: exec\n    when: {exe: curl}\n    decision: maybe\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let sock = dir.path().join("run/airlock.sock");
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nsocket_path = \"{}\"\npolicy_dirs = [\"{}\"]\napi_listen = \"127.0.0.1:0\"\n",
            data.display(),
            sock.display(),
            policies.display()
        ),
    )
    .unwrap();
    let out = airlock(&["--config", cfg.to_str().unwrap(), "daemon"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the policy does not load"), "{err}");
    assert!(
        err.contains("bad.yaml:6:15: rules[0].decision: unknown variant `maybe`"),
        "{err}"
    );
    assert!(!data.exists(), "no data directory, lock or store");
    assert!(
        !sock.exists() && !dir.path().join("run").exists(),
        "no socket"
    );
}
