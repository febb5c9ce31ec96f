//! Helpers for the end-to-end tests: they drive the real `airlock` binary
//! against the real kernel. They need root; in CI (`CI=true`) a test that
//! cannot run fails instead of skipping.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use airlock::store::{EventRow, SessionRow, Store};

pub mod held;

/// True when a skipped kernel test must fail instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// How much slower than this host the machine under test is: the VM tier
/// sets `AIRLOCK_TIME_SCALE` (emulated CPUs), the host leaves it unset (1).
/// Every deadline and timeout the tests set goes through [`scaled`].
pub fn time_scale() -> u32 {
    std::env::var("AIRLOCK_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `d` on this host, longer under emulation (see [`time_scale`]).
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Where skipped tests are listed, one line each (`AIRLOCK_SKIP_LOG`,
/// set by `cargo xtask test`, which counts and shows them).
pub const SKIP_LOG: &str = "AIRLOCK_SKIP_LOG";

/// Records that `test` cannot run here and why: loudly, in the skip log;
/// panics instead in CI, where nothing passes by skipping.
pub fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test}: cannot run and CI=true forbids skipping: {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os(SKIP_LOG) {
        use std::io::Write as _;
        let line = format!("{test}: {why}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// Returns false (and says why, loudly) when this test cannot run here;
/// panics instead in CI.
pub fn can_run(test: &str) -> bool {
    match airlock::features::detect().missing() {
        None => true,
        Some(why) => {
            skip(test, &why);
            false
        }
    }
}

/// The checkout's root (the tests crate's parent), by name: in the VM
/// only some of the checkout's files exist, so `tests/..` would not
/// resolve there.
pub fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// The airlock binary under test: $AIRLOCK_BIN, else the newest of
/// target/{release,debug}/airlock.
pub fn airlock_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_BIN") {
        return PathBuf::from(p);
    }
    // The newer of the release and debug builds, so a stale one is not used.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["release", "debug"]
        .iter()
        .map(|profile| root.join("target").join(profile).join("airlock"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!("no airlock binary: build it (cargo build -p airlock) or set AIRLOCK_BIN")
        })
}

/// A daemon with its own store and socket in a temporary directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    /// The API's address, asked once per daemon start (every CLI call
    /// costs milliseconds, tens of them in an emulated VM).
    api: std::sync::Mutex<Option<String>>,
    /// Arguments after `airlock daemon`.
    daemon_args: Vec<String>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a daemon with extra config lines and no policy.
    pub fn start_with(extra: &str) -> Self {
        Self::start_with_policy(&[], extra)
    }

    /// Starts a daemon whose policy directory holds `policies` (file name,
    /// YAML), with extra config lines.
    pub fn start_with_policy(policies: &[(&str, &str)], extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).expect("policy dir");
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).expect("write policy");
        }
        let extra = format!("policy_dirs = [\"{}\"]\n{extra}", policy_dir.display());
        Self::start_in(dir, &extra, Vec::new())
    }

    /// Starts a daemon as `cargo xtask run` does (`airlock daemon
    /// --policy-dir <checkout>/policies`, the default `policy_dirs`), only
    /// its store, socket, pins and API moved into a temporary directory.
    pub fn start_as_xtask_run(extra: &str) -> Self {
        let packs = checkout().join("policies");
        let args = vec!["--policy-dir".into(), packs.display().to_string()];
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra, args)
    }

    fn start_in(dir: tempfile::TempDir, extra: &str, daemon_args: Vec<String>) -> Self {
        let config = dir.path().join("airlock.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{0}/data\"\nsocket_path = \"{0}/airlock.sock\"\npin_dir = \"{1}\"\nloss_poll_ms = 200\napi_listen = \"127.0.0.1:0\"\n{extra}\n",
                dir.path().display(),
                pin_dir(dir.path()).display(),
            ),
        )
        .expect("write config");
        std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let mut d = Self {
            dir,
            config,
            child: None,
            api: std::sync::Mutex::new(None),
            daemon_args,
        };
        d.start_again();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        while Instant::now() < deadline {
            if self.airlock(&["status"]).status.success() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "daemon exited with {st} before it was ready:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "daemon not ready within {:?}:\n{}",
            scaled(Duration::from_secs(30)),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The directory the daemon reads its policy files from.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Runs `airlock ARGS` with this daemon's config.
    pub fn airlock(&self, args: &[&str]) -> Output {
        Command::new(airlock_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run airlock")
    }

    /// `airlock run --label ... -- CMD...`: returns the session id and output.
    pub fn run(&self, labels: &[&str], cmd: &[&str]) -> (u64, Output) {
        let mut args = vec!["run"];
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.push("--");
        args.extend_from_slice(cmd);
        let out = self.airlock(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let id = stderr
            .lines()
            .find_map(|l| l.strip_prefix("airlock: session "))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no session id in stderr: {stderr}\ndaemon log:\n{}",
                    self.log()
                )
            });
        (id, out)
    }

    /// Starts `airlock run --label ... -- CMD` without waiting for it.
    pub fn spawn_run(&self, labels: &[&str], cmd: &[&str]) -> Child {
        let mut c = Command::new(airlock_bin());
        c.arg("--config").arg(&self.config).arg("run");
        for l in labels {
            c.args(["--label", l]);
        }
        c.arg("--")
            .args(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn airlock run")
    }

    /// `airlock status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.airlock(&["status", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status json: {e}: {out:?}\n{}", self.log()))
    }

    /// The approval API's base URL, as the daemon bound it.
    pub fn api(&self) -> String {
        let mut cached = self.api.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .get_or_insert_with(|| {
                self.status()["api"]
                    .as_str()
                    .expect("api in status")
                    .to_string()
            })
            .clone()
    }

    /// `airlock approvals|approve|deny ...` with a token, against this daemon's API.
    pub fn approvals(&self, token: &str, args: &[&str]) -> Output {
        let api = self.api();
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&["--api", &api, "--token", token]);
        self.airlock(&full)
    }

    /// The requests (all, or only the pending ones) as the CLI lists
    /// them. A CLI that fails, or prints no JSON list, fails the test: it
    /// never reads as "none".
    pub fn requests(&self, token: &str, pending: bool) -> Vec<serde_json::Value> {
        let mut args = vec!["approvals", "--json"];
        if pending {
            args.push("--pending");
        }
        let out = self.approvals(token, &args);
        assert!(
            out.status.success(),
            "airlock approvals failed: {out:?}\ndaemon log:\n{}",
            self.log()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("airlock approvals printed no JSON list ({e}): {out:?}"))
    }

    /// Waits until at least `n` requests are pending and returns them.
    pub fn wait_pending(&self, token: &str, n: usize) -> Vec<serde_json::Value> {
        let limit = scaled(Duration::from_secs(30));
        let deadline = Instant::now() + limit;
        loop {
            let v = self.requests(token, true);
            if v.len() >= n {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} of {n} requests pending after {limit:?}: {v:#?}\ndaemon log:\n{}",
                    v.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts the daemon on the same store and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL, as a crash would: nothing is drained,
    /// its pinned programs stay attached.
    pub fn kill(&mut self) {
        self.forget_api();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn forget_api(&self) {
        *self.api.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Starts a daemon again on this store, socket and pins.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon still runs");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log");
        let child = Command::new(airlock_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .args(&self.daemon_args)
            .stderr(log)
            .spawn()
            .expect("spawn airlock daemon");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn store(&self) -> Store {
        Store::open_read_only(&self.dir.path().join("data/airlock.db")).expect("open store")
    }

    /// Waits until the session has ended in the store (its root's exit was
    /// recorded) and returns its events.
    pub fn events(&self, session: u64) -> Vec<EventRow> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            let s = self.session(session);
            if s.ended_at.is_some() {
                return self.store().events(session).expect("events");
            }
            if Instant::now() > deadline {
                panic!(
                    "session {session} never ended in the store; daemon log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn session(&self, session: u64) -> SessionRow {
        self.store().session(session).expect("session")
    }

    /// SIGTERM and wait: the daemon drains and flushes before it exits.
    pub fn stop(&mut self) {
        self.forget_api();
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().expect("wait daemon");
            assert!(st.success(), "daemon exited with {st}:\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // The programs outlive the daemon (pinned): detach them.
        let _ = self.airlock(&["unload"]);
    }
}

impl Daemon {
    /// Runs the named commands one after another in one session (`sh
    /// -c`, labelled `label`), each one's output line led by its name:
    /// the session and what it printed (see [`Self::named_line`]).
    pub fn run_named(&self, label: &str, cmds: &[(&str, String)]) -> (u64, String) {
        let script: String = cmds
            .iter()
            .map(|(name, cmd)| format!("printf '{name} '; {cmd}\n"))
            .collect();
        let (session, out) = self.run(&[label], &["/bin/sh", "-c", &script]);
        (session, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What [`Self::run_named`] printed after `name` (a panic, with the
    /// daemon's log, if it printed nothing for it).
    pub fn named_line(&self, out: &str, name: &str) -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{out}\n{}", self.log()))
            .to_string()
    }

    /// The errno [`Self::run_named`] printed after `name`.
    pub fn named_errno(&self, out: &str, name: &str) -> i32 {
        let line = self.named_line(out, name);
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no errno for {name}: {line:?}\n{out}"))
    }

    /// The newest session in the store.
    pub fn last_session(&self) -> u64 {
        self.store()
            .sessions()
            .expect("sessions")
            .last()
            .map(|s| s.id)
            .expect("a session")
    }

    /// One of the daemon's pinned maps (`PINNED` in agent/src/bpf/pins.rs).
    pub fn pinned_map(&self, name: &str) -> aya::maps::Map {
        let path = pin_dir(self.dir.path()).join("maps").join(name);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("pinned map {}: {e}", path.display()));
        aya::maps::Map::from_map_data(data).expect("a map of a known type")
    }
}

/// Each test daemon pins under its own bpffs directory.
fn pin_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().replace('.', "-"))
        .unwrap_or_default();
    PathBuf::from(format!("/sys/fs/bpf/airlock-test{name}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exec events of a session, as (tgid, ppid, path, argv).
pub fn execs(events: &[EventRow]) -> Vec<(u32, u32, String, Vec<String>)> {
    events
        .iter()
        .filter(|e| e.kind == "exec")
        .map(|e| {
            let argv = e.detail["argv"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            (
                e.process.tgid,
                e.process.ppid,
                e.detail["path"].as_str().unwrap_or("").to_string(),
                argv,
            )
        })
        .collect()
}
