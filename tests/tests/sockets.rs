//! Connects to Unix-domain sockets: how an agent hands work to a process
//! outside its session (a container engine, a terminal multiplexer, a
//! desktop bus). With BPF LSM every one is recorded, and a rule holds or
//! refuses the socket itself, whatever name the caller reaches it by.
//! Without BPF LSM (this project's host) nothing is seen, and the daemon
//! says so.
use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram, UnixListener},
    },
    path::Path,
};

use airlock_tests::{
    Daemon, can_run,
    held::{expect_lsm, finish, lsm_expected},
};

const ACTOR: &str = env!("CARGO_BIN_EXE_actor");
const ALICE: &str = "alice-token-0123456789";

/// True where Unix socket connects are recorded and held (BPF LSM, from
/// the environment); the daemon must say the same. Where they are not, it
/// must say that instead.
fn sockets_seen(d: &Daemon) -> bool {
    let status = d.status();
    let says = |prefix: &str| {
        status["can_enforce"].as_array().is_some_and(|a| {
            a.iter()
                .any(|s| s.as_str().unwrap_or("").starts_with(prefix))
        })
    };
    let seen = says("unix: connects to Unix sockets are recorded");
    assert_eq!(
        seen,
        lsm_expected(),
        "Unix socket hooks attached where BPF LSM is active, and only there: {status:#}\n{}",
        d.log()
    );
    if !seen {
        assert!(says("unix: not possible without BPF LSM"), "{status:#}");
    }
    seen
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A deny rule names a stream socket, a datagram socket and an abstract
/// address; an agent reaches them by every other name it can make: a
/// symlink, a hard link, a relative path, a directory symlink, `..` and
/// `//`, `/proc/self/root`. Each is refused as the plain path is, and the
/// record names the socket itself.
#[test]
fn every_name_for_a_denied_socket_is_refused_and_recorded() {
    let test = "every_name_for_a_denied_socket_is_refused_and_recorded";
    if !can_run(test) {
        return;
    }
    // The sockets exist before the daemon looks the policy's paths up.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let engine = d.join("engine.sock");
    let _engine = UnixListener::bind(&engine).unwrap();
    let dgram = d.join("dgram.sock");
    let dgram_sock = UnixDatagram::bind(&dgram).unwrap();
    let ok = d.join("ok.sock");
    let _ok = UnixListener::bind(&ok).unwrap();
    let abs = format!("airlock-test-{}", std::process::id());
    let _abs = UnixListener::bind_addr(&SocketAddr::from_abstract_name(&abs).unwrap()).unwrap();
    std::os::unix::fs::symlink(&engine, d.join("alias.sock")).unwrap();
    std::os::unix::fs::symlink(&dgram, d.join("dgram-alias.sock")).unwrap();
    std::fs::create_dir(d.join("hard")).unwrap();
    std::fs::hard_link(&engine, d.join("hard/h.sock")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    // A socket a rule names by a pattern, found on the host by the daemon.
    std::fs::create_dir(d.join("g1")).unwrap();
    let globbed = d.join("g1/s.sock");
    let _globbed = UnixListener::bind(&globbed).unwrap();
    std::os::unix::fs::symlink(&globbed, d.join("g-alias.sock")).unwrap();
    std::os::unix::fs::symlink(d, d.join("via")).unwrap();

    let policy = format!(
        "pack: t\nrules:\n\
         - {{name: no-engine, on: connect, when: {{socket: [\"{}\", \"{}\", \"@{abs}\", \"{}/g*/s.sock\"]}}, decision: deny}}\n",
        s(&engine),
        s(&dgram),
        s(d)
    );
    let daemon = Daemon::start_with_policy(&[("t.yaml", &policy)], "");
    expect_lsm(&daemon);
    let seen = sockets_seen(&daemon);

    let tricks = [
        ("path", format!("{ACTOR} unix-connect {}", s(&engine))),
        (
            "symlink",
            format!("{ACTOR} unix-connect {}", s(&d.join("alias.sock"))),
        ),
        (
            "hard-link",
            format!("{ACTOR} unix-connect {}", s(&d.join("hard/h.sock"))),
        ),
        (
            "relative",
            format!("(cd {} && {ACTOR} unix-connect engine.sock)", s(d)),
        ),
        (
            "dir-symlink",
            format!("{ACTOR} unix-connect {}", s(&d.join("via/engine.sock"))),
        ),
        (
            "dotdot-slashes",
            format!("{ACTOR} unix-connect {}//./sub/../engine.sock", s(d)),
        ),
        (
            "proc-root",
            format!("{ACTOR} unix-connect /proc/self/root{}", s(&engine)),
        ),
        ("abstract", format!("{ACTOR} unix-connect @{abs}")),
        (
            "pattern-symlink",
            format!("{ACTOR} unix-connect {}", s(&d.join("g-alias.sock"))),
        ),
        ("datagram", format!("{ACTOR} unix-send {}", s(&dgram))),
        (
            "datagram-symlink",
            format!("{ACTOR} unix-send {}", s(&d.join("dgram-alias.sock"))),
        ),
    ];
    let controls = [
        ("control", format!("{ACTOR} unix-connect {}", s(&ok))),
        (
            "control-own",
            format!("{ACTOR} unix-self {}", s(&d.join("own.sock"))),
        ),
    ];
    let all: Vec<(&str, String)> = tricks.iter().chain(&controls).cloned().collect();
    let (session, out) = daemon.run_named("agent=sockets-test", &all);
    let errno = |name: &str| daemon.named_errno(&out, name);
    for (name, _) in &controls {
        assert_eq!(errno(name), 0, "{name} is not flagged and goes: {out}");
    }
    let events = daemon.events(session);
    let unix: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == "unix_connect")
        .map(|e| &e.detail)
        .collect();
    if !seen {
        // Without BPF LSM nothing is held or recorded, as the daemon said.
        assert!(unix.is_empty(), "{unix:#?}");
        return;
    }
    let escaped: Vec<String> = tricks
        .iter()
        .filter(|(name, _)| errno(name) != libc::EPERM)
        .map(|(name, _)| format!("{name}: errno {}", errno(name)))
        .collect();
    assert!(
        escaped.is_empty(),
        "these reached a denied socket (or failed otherwise than EPERM):\n{}\nall:\n{out}\ndaemon log:\n{}",
        escaped.join("\n"),
        daemon.log()
    );
    dgram_sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        dgram_sock.recv(&mut buf).is_err(),
        "a datagram reached the denied socket"
    );

    // Every refusal is recorded under the socket's own name, and the
    // control connect is recorded too.
    let named = [s(&engine), s(&dgram), format!("@{abs}"), s(&globbed)];
    let refused: Vec<&str> = unix
        .iter()
        .filter(|e| e["enforcement"] == "refused")
        .map(|e| e["socket"].as_str().unwrap_or(""))
        .collect();
    assert!(
        refused.len() >= tricks.len() && refused.iter().all(|s| named.iter().any(|n| n == s)),
        "refusals recorded: {refused:?}\nall: {unix:#?}"
    );
    assert!(
        unix.iter()
            .any(|e| e["socket"] == s(&ok) && e["enforcement"].is_null()),
        "the control connect is recorded: {unix:#?}"
    );
}

/// A rule that holds connects to servers outside the session: a socket
/// the session serves itself goes through unasked; one the test (outside
/// the session) serves waits for an approver and then connects.
#[test]
fn a_socket_served_outside_the_session_waits_for_approval() {
    let test = "a_socket_served_outside_the_session_waits_for_approval";
    if !can_run(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.sock");
    let _outside = UnixListener::bind(&outside).unwrap();
    let own = dir.path().join("own.sock");
    let policy = "pack: t\nrules:\n\
         - {name: out, on: connect, when: {outside_session: true}, decision: hold, hold: {timeout: 120}}\n";
    let daemon = Daemon::start_with_policy(
        &[("t.yaml", policy)],
        &format!("[[approver]]\nname = \"alice\"\ntoken = \"{ALICE}\"\n"),
    );
    expect_lsm(&daemon);
    if !sockets_seen(&daemon) {
        return;
    }
    let script = format!(
        "{ACTOR} unix-self {}; {ACTOR} unix-connect {}",
        s(&own),
        s(&outside)
    );
    let run = daemon.spawn_run(&[], &["/bin/sh", "-c", &script]);
    let pending = daemon.wait_pending(ALICE, 1);
    assert_eq!(pending[0]["kind"], "connect", "{pending:#?}");
    assert_eq!(pending[0]["action"]["socket"], s(&outside), "{pending:#?}");
    assert_eq!(
        pending[0]["action"]["peer_tgid"],
        std::process::id(),
        "{pending:#?}"
    );
    let id = pending[0]["id"].as_u64().unwrap().to_string();
    let out = daemon.approvals(ALICE, &["approve", &id, "--reason", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let out = finish(run);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["0", "0"],
        "its own socket unasked, the outside one once approved: {out}\n{}",
        daemon.log()
    );
    assert_eq!(
        daemon.requests(ALICE, false).len(),
        1,
        "only the outside server was asked about"
    );
}
