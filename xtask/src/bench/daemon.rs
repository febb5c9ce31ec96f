//! One `airlock daemon` for a benchmark, with a fresh store, and what the
//! benchmarks read back from it: its status, and the store itself, counted
//! with SQL on the file (never through the daemon's own store code).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags};

/// Event kind ids as the store keeps them (stable, see the README).
pub mod kind {
    pub const FORK: u32 = 1;
    pub const EXEC: u32 = 2;
    pub const EXIT: u32 = 3;
    pub const CONNECT: u32 = 100;
    pub const LOSS: u32 = 900;
}

pub struct Daemon {
    child: Child,
    config: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// A daemon with no policy: it records sessions and holds nothing.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin, dir, "policy_dirs = []\n")
    }

    /// A daemon whose configuration ends with `extra` (policy directories,
    /// approvers), on an empty data directory.
    pub fn start_with(bin: &Path, dir: &Path, extra: &str) -> anyhow::Result<Self> {
        let config = dir.join("airlock.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{0}/data\"\nsocket_path = \"{0}/airlock.sock\"\npin_dir = \"/sys/fs/bpf/airlock-bench\"\napi_listen = \"127.0.0.1:0\"\n{extra}",
                dir.display()
            ),
        )?;
        let data = dir.join("data");
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| data.display().to_string())?;
        }
        let log = dir.join("daemon.log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("daemon")
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut d = Self {
            child,
            config,
            bin: bin.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.status().is_err() {
            if Instant::now() > deadline || d.child.try_wait()?.is_some() {
                bail!("the daemon did not start:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("({}: {e})", self.log.display()))
    }

    /// `airlock run -q -- ACTOR` in a new session of this daemon; the
    /// caller adds the actor's arguments.
    pub fn session(&self, actor: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg(&self.config)
            .args(["run", "-q", "--"])
            .arg(actor);
        c
    }

    /// `airlock status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"])
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("airlock status failed with {}", out.status);
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The store, opened read-only with SQLite directly.
    pub fn store(&self) -> anyhow::Result<Connection> {
        let status = self.status()?;
        let path = status["store"]
            .as_str()
            .context("airlock status names no store")?;
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {path}"))?;
        db.busy_timeout(Duration::from_secs(5))?;
        Ok(db)
    }

    /// Fails when the daemon lost, could not decode or could not store
    /// anything so far (its own counters).
    pub fn check_counters(&self) -> anyhow::Result<()> {
        let s = self.status()?;
        let number = |k: &str| {
            s[k].as_u64()
                .with_context(|| format!("airlock status has no number {k}"))
        };
        let losses: Vec<String> = s["losses"]
            .as_array()
            .context("airlock status has no losses")?
            .iter()
            .filter(|l| l["count"].as_u64() != Some(0))
            .map(|l| format!("{}: {}", l["kind"], l["count"]))
            .collect();
        let (store, decode) = (number("store_errors")?, number("decode_errors")?);
        if !losses.is_empty() || store != 0 || decode != 0 {
            bail!(
                "the daemon lost events: losses [{}], store_errors {store}, decode_errors {decode}\n{}",
                losses.join(", "),
                self.log_text()
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let _ = self.child.wait();
        // The programs outlive the daemon (pinned): detach them, so the
        // next setup starts from a clean kernel.
        let _ = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("unload")
            .stdout(Stdio::null())
            .status();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `SELECT count(*)` of all events.
pub fn count_all(db: &Connection) -> anyhow::Result<u64> {
    let n: i64 = db.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// Rows by (session, kind), sorted.
pub fn by_kind(db: &Connection) -> anyhow::Result<Vec<(u64, u32, u64)>> {
    let mut stmt = db.prepare(
        "SELECT session_id, kind, count(*) FROM events GROUP BY session_id, kind ORDER BY 1, 2",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, u32>(1)?,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Session ids, oldest first.
pub fn sessions(db: &Connection) -> anyhow::Result<Vec<u64>> {
    let mut stmt = db.prepare("SELECT id FROM sessions ORDER BY id")?;
    let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
    Ok(rows
        .map(|r| r.map(|id| id as u64))
        .collect::<Result<_, _>>()?)
}

/// Waits until the store holds exactly `want` rows of each (session,
/// kind) listed, and with `only`, no other rows. Fails on any loss record,
/// on more rows than wanted, or after `limit`.
pub fn wait_rows(
    db: &Connection,
    want: &[(u64, u32, u64)],
    only: bool,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let got = by_kind(db)?;
        let rows = |s: u64, k: u32| got.iter().find(|g| (g.0, g.1) == (s, k)).map_or(0, |g| g.2);
        let listed = |g: &(u64, u32, u64)| want.iter().any(|w| (w.0, w.1) == (g.0, g.1));
        let over = want.iter().any(|w| rows(w.0, w.1) > w.2)
            || got.iter().any(|g| g.1 == kind::LOSS)
            || (only && got.iter().any(|g| !listed(g)));
        if !over && want.iter().all(|w| rows(w.0, w.1) == w.2) {
            return Ok(());
        }
        if over || Instant::now() > deadline {
            bail!(
                "the store holds {got:?} (session, kind, rows), expected {}{want:?}",
                if only { "exactly " } else { "" }
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
