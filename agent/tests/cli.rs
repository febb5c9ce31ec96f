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
