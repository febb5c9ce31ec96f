//! `cargo xtask bench`: overhead and ingest, measured side by side in one
//! run. Configurations are interleaved round by round (the machines are
//! noisy) and medians and ratios are reported, never a single time.

mod daemon;
pub mod in_vm;
mod ingest;
mod policy;
mod resume;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::util::is_root;
use daemon::Daemon;

pub struct Params {
    pub execs: u32,
    pub connects: u32,
    pub rounds: u32,
    pub resume_only: bool,
    pub policy_only: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    NoAgent,
    Unwatched,
    Watched,
    Auditd,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Self::NoAgent => "no agent",
            Self::Unwatched => "airlock, unwatched",
            Self::Watched => "airlock, watched session",
            Self::Auditd => "auditd (execve+connect rules)",
        }
    }
}

const SETUPS: [Setup; 4] = [
    Setup::NoAgent,
    Setup::Unwatched,
    Setup::Watched,
    Setup::Auditd,
];

pub fn run(p: Params) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads kernel programs and starts auditd: run it as root");
    }
    crate::bootstrap::apt(&["auditd"])?;
    let (bin, actor) = crate::util::build_binaries(true)?;
    let dir = tempfile_dir()?;
    if p.resume_only {
        resume::run(&bin, &actor, &dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    if p.policy_only {
        policy::run(&bin, &actor, &dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }

    // exec and connect samples: setup -> per-round ns.
    let mut exec: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut conn: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    for round in 0..p.rounds {
        eprintln!("bench: round {}/{}", round + 1, p.rounds);
        // Each round visits every setup, in a rotated order.
        for k in 0..SETUPS.len() {
            let i = (k + round as usize) % SETUPS.len();
            let setup = SETUPS[i];
            let guard = start(setup, &bin, &dir)?;
            let e = measure(
                setup,
                &bin,
                &actor,
                &dir,
                &["time-spawn", &p.execs.to_string(), "/bin/true"],
            )?;
            let c = measure(
                setup,
                &bin,
                &actor,
                &dir,
                &["time-connect", &p.connects.to_string()],
            )?;
            drop(guard);
            exec[i].push(e / p.execs as f64);
            conn[i].push(c / p.connects as f64);
        }
    }
    println!(
        "\nairlock bench: {} rounds, {} fork+exec of /bin/true and {} TCP connect+close per round",
        p.rounds, p.execs, p.connects
    );
    println!(
        "{:<32} {:>14} {:>8} {:>16} {:>8}",
        "setup", "exec us (med)", "ratio", "connect us (med)", "ratio"
    );
    let (e0, c0) = (median(&exec[0]), median(&conn[0]));
    for (i, s) in SETUPS.iter().enumerate() {
        let (e, c) = (median(&exec[i]), median(&conn[i]));
        println!(
            "{:<32} {:>14.1} {:>7.3}x {:>16.2} {:>7.3}x",
            s.name(),
            e / 1e3,
            e / e0,
            c / 1e3,
            c / c0
        );
    }
    ingest::run(&bin, &actor, &dir)?;
    resume::run(&bin, &actor, &dir)?;
    policy::run(&bin, &actor, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The `p` quantile of sorted values (nearest rank below).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("airlock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Whatever a setup started; dropping it stops it.
enum Guard {
    None,
    /// Held so that dropping the guard stops the daemon.
    Daemon {
        _daemon: Daemon,
    },
    Auditd,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Auditd = self {
            let _ = Command::new("auditctl")
                .arg("-D")
                .stdout(Stdio::null())
                .status();
            let _ = Command::new("auditctl")
                .args(["-e", "0"])
                .stdout(Stdio::null())
                .status();
            if let Ok(pid) = std::fs::read_to_string("/var/run/auditd.pid") {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn start(setup: Setup, bin: &Path, dir: &Path) -> anyhow::Result<Guard> {
    Ok(match setup {
        Setup::NoAgent => Guard::None,
        Setup::Unwatched | Setup::Watched => Guard::Daemon {
            _daemon: Daemon::start(bin, dir)?,
        },
        Setup::Auditd => {
            crate::util::run(&mut Command::new("auditd"))?;
            std::thread::sleep(Duration::from_millis(300));
            crate::util::run(
                Command::new("auditctl")
                    .args(["-b", "8192"])
                    .stdout(Stdio::null()),
            )?;
            crate::util::run(
                Command::new("auditctl")
                    .args(["-e", "1"])
                    .stdout(Stdio::null()),
            )?;
            crate::util::run(
                Command::new("auditctl")
                    .args([
                        "-a",
                        "always,exit",
                        "-F",
                        "arch=b64",
                        "-S",
                        "execve,execveat,connect",
                    ])
                    .stdout(Stdio::null()),
            )?;
            Guard::Auditd
        }
    })
}

/// Runs one timed actor workload (the actor prints its elapsed ns).
fn measure(
    setup: Setup,
    bin: &Path,
    actor: &Path,
    dir: &Path,
    args: &[&str],
) -> anyhow::Result<f64> {
    let mut cmd = if setup == Setup::Watched {
        let mut c = Command::new(bin);
        c.arg("--config")
            .arg(dir.join("airlock.toml"))
            .args(["run", "-q", "--"])
            .arg(actor);
        c
    } else {
        Command::new(actor)
    };
    let out = crate::util::output(cmd.args(args))?;
    out.trim()
        .parse()
        .with_context(|| format!("actor printed {out:?}"))
}
