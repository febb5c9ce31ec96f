//! Sustained ingest: a watched process makes N connect events as fast as
//! the kernel allows; the time until every one of them is a row in SQLite
//! (counted there with `SELECT count(*)`) gives events per second. Any loss
//! or store error fails the benchmark: a rate over what was not stored
//! would be no rate.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::daemon::{self, Daemon, kind};

/// Connect events the workload makes.
const N: u64 = 500_000;

/// How long the store may take to hold them all.
const LIMIT: Duration = Duration::from_secs(180);

pub fn run(bin: &Path, actor: &Path, dir: &Path) -> anyhow::Result<()> {
    let d = Daemon::start(bin, dir)?;
    let db = d.store()?;
    let before = daemon::count_all(&db)?;
    if before != 0 {
        bail!("the fresh store already holds {before} events");
    }
    // What `airlock run -q -- actor udp-connects N` makes, as measured:
    // airlock run (the session's root) forks the actor, the actor execs
    // and makes N connects, both exit.
    let session = 1;
    let want = [
        (session, kind::FORK, 1),
        (session, kind::EXEC, 1),
        (session, kind::EXIT, 2),
        (session, kind::CONNECT, N),
    ];
    let total: u64 = want.iter().map(|w| w.2).sum();

    let start = Instant::now();
    let child = d
        .session(actor)
        .args(["udp-connects", &N.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the ingest workload")?;
    // Poll the count, leaving the daemon the CPU: each count(*) scans the
    // table, so wait ten times as long as the last one took.
    let mut checked = Instant::now();
    let stored_at = loop {
        let t = Instant::now();
        let n = daemon::count_all(&db)?;
        if n == total {
            break start.elapsed();
        }
        if n > total {
            bail!(
                "the store holds {n} events, the workload made {total}: {:?}",
                daemon::by_kind(&db)?
            );
        }
        if start.elapsed() > LIMIT {
            d.check_counters()?;
            bail!(
                "after {LIMIT:?} the store holds {n} of the {total} events the workload made: {:?}",
                daemon::by_kind(&db)?
            );
        }
        if checked.elapsed() > Duration::from_secs(1) {
            d.check_counters()?;
            checked = Instant::now();
        }
        std::thread::sleep((t.elapsed() * 10).max(Duration::from_millis(20)));
    };
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the ingest workload failed with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let produce_ns: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("the actor printed {text:?}"))?;
    // Nothing more arrives, nothing was lost, every kind is exact.
    std::thread::sleep(Duration::from_secs(1));
    daemon::wait_rows(&db, &want, true, Duration::ZERO)?;
    d.check_counters()?;
    let secs = stored_at.as_secs_f64();
    println!(
        "\ningest: {N} connect events made in {:.2} s ({:.0}/s offered); all {total} events of the session (fork, exec, 2 exits, {N} connects) counted in SQLite {secs:.2} s after the start: {:.0} events/s; no loss, no store error",
        produce_ns / 1e9,
        N as f64 / (produce_ns / 1e9),
        total as f64 / secs,
    );
    Ok(())
}
