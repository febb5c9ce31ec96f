//! `cargo xtask bench`: overhead and ingest, measured side by side in one
//! run. Configurations are interleaved round by round (the machines are
//! noisy) in a balanced order, medians and ratios are reported, never a
//! single time, and every figure is checked against what was recorded:
//! auditd's log and airlock's store must hold exactly the loops' execs and
//! connects, or nothing for the unwatched loop; a loss fails the bench.

mod audit;
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
use daemon::{Daemon, kind};

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
            Self::Auditd => "auditd (execve+connect rule)",
        }
    }
}

const SETUPS: [Setup; 4] = [
    Setup::NoAgent,
    Setup::Unwatched,
    Setup::Watched,
    Setup::Auditd,
];

/// Tries of a connect loop before the bench gives up on the machine.
const CONNECT_TRIES: u32 = 3;

pub fn run(p: Params) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads kernel programs and starts auditd: run it as root");
    }
    crate::bootstrap::apt(&["auditd"])?;
    let (bin, actor) = crate::util::build_binaries(true)?;
    let dir = tempfile_dir()?;
    let r = if p.resume_only {
        resume::run(&bin, &actor, &dir)
    } else if p.policy_only {
        policy::run(&bin, &actor, &dir)
    } else {
        overhead(&p, &bin, &actor, &dir)
            .and_then(|()| ingest::run(&bin, &actor, &dir))
            .and_then(|()| resume::run(&bin, &actor, &dir))
            .and_then(|()| policy::run(&bin, &actor, &dir))
    };
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("bench: its files stay in {}", dir.display());
    }
    r
}

/// Per setup, one value per round.
type Samples = [Vec<f64>; SETUPS.len()];

/// The exec and connect loops under each setup, rounds in the order of a
/// Williams square.
fn overhead(p: &Params, bin: &Path, actor: &Path, dir: &Path) -> anyhow::Result<()> {
    let n = SETUPS.len() as u32;
    let rounds = p.rounds.max(1).div_ceil(n) * n;
    if rounds != p.rounds {
        eprintln!(
            "bench: {rounds} rounds instead of {}, so that each configuration runs equally often in each position",
            p.rounds
        );
    }
    if p.connects < 2 {
        bail!("the connect loop needs at least 2 connects");
    }
    let sink = sink()?;
    let audit = audit::Audit::start(dir)?;
    let (spared, context) = audit.syscall_cost(6)?;
    let mut exec: Samples = Default::default();
    let mut conn: Samples = Default::default();
    let mut discarded = [0u32; SETUPS.len()];
    for round in 0..rounds as usize {
        let order = williams(round, SETUPS.len());
        let names: Vec<&str> = order.iter().map(|&i| SETUPS[i].name()).collect();
        eprintln!("bench: round {}/{rounds}: {}", round + 1, names.join(", "));
        for i in order {
            let setup = SETUPS[i];
            let daemon = match setup {
                Setup::Unwatched | Setup::Watched => Some(Daemon::start(bin, dir)?),
                Setup::NoAgent | Setup::Auditd => None,
            };
            if setup == Setup::Auditd {
                audit.record()?;
            }
            let mark = audit.mark()?;
            // The same pause in every setup: a daemon's start-up is not
            // what the loops should pay.
            std::thread::sleep(Duration::from_secs(1));
            let loop_cmd = |args: &[&str]| {
                let mut c = match (&daemon, setup) {
                    (Some(d), Setup::Watched) => d.session(actor),
                    _ => Command::new(actor),
                };
                c.args(args);
                c
            };
            let (e, exec_pid) = timed(&mut loop_cmd(&[
                "time-spawn",
                &p.execs.to_string(),
                "/bin/true",
            ]))?;
            let (c, connect_pid, tries) = connect_loop(|| {
                stamped(&mut loop_cmd(&[
                    "connect-stamps",
                    &p.connects.to_string(),
                    &sink,
                ]))
            })?;
            discarded[i] += tries - 1;
            match (setup, &daemon) {
                (Setup::Auditd, _) => {
                    audit.expect(
                        mark,
                        (exec_pid, p.execs.into()),
                        (connect_pid, p.connects.into()),
                    )?;
                    audit.spare()?;
                }
                (Setup::Watched, Some(d)) => recorded_all(d, p, tries)?,
                (Setup::Unwatched, Some(d)) => recorded_nothing(d)?,
                _ => {}
            }
            drop(daemon);
            exec[i].push(e / f64::from(p.execs));
            conn[i].push(c);
        }
    }
    let lost = audit.lost()?;
    drop(audit);

    println!(
        "\nairlock bench: {rounds} rounds (each configuration equally often in each position, and after each other one), {} fork+exec of /bin/true and {} TCP connect+close per round",
        p.execs, p.connects
    );
    println!(
        "audit on in every round; outside auditd's rounds `-a never,task` gives new tasks no audit context: a bare syscall costs {spared:.0} ns of CPU so, {context:.0} ns with a context and no rule (what any task created after audit was first enabled pays without that rule)"
    );
    println!(
        "ratio: median over the rounds of (this setup / no agent in the same round), with the lowest and highest; us: median per operation\n"
    );
    println!(
        "{:<30} {:>9} {:>8} {:>16}   {:>10} {:>8} {:>16}",
        "setup", "exec us", "ratio", "rounds", "connect us", "ratio", "rounds"
    );
    for (i, s) in SETUPS.iter().enumerate() {
        let (er, cr) = (ratios(&exec, i), ratios(&conn, i));
        println!(
            "{:<30} {:>9.1} {:>7.3}x {:>16}   {:>10.2} {:>7.3}x {:>16}",
            s.name(),
            median(&exec[i]) / 1e3,
            median(&er),
            range(&er),
            median(&conn[i]) / 1e3,
            median(&cr),
            range(&cr),
        );
    }
    println!(
        "\nchecked in every round: auditd's log holds exactly the {} execs and {} connects of its loops (kernel lost counter +{lost} over the bench); the watched session's store holds exactly its execs and connects; the unwatched loops left no row; no airlock loss or store error",
        p.execs, p.connects
    );
    let runs: Vec<String> = SETUPS
        .iter()
        .zip(discarded)
        .filter(|(_, d)| *d > 0)
        .map(|(s, d)| format!("{} {d}", s.name()))
        .collect();
    if !runs.is_empty() {
        println!(
            "connect loops run again because their listener's accept queue overflowed (a dropped SYN costs a 1 s retransmit): {}",
            runs.join(", ")
        );
    }
    Ok(())
}

/// Row `round` of a Williams square of order `n` (even): over `n` rounds
/// each setup runs once in each position and right after each other setup
/// once, so neither position nor what ran before favours one.
fn williams(round: usize, n: usize) -> Vec<usize> {
    // 0, 1, n-1, 2, n-2, ...
    let first = (0..n).map(|j| match j {
        0 => 0,
        j if j % 2 == 1 => j.div_ceil(2),
        j => n - j / 2,
    });
    first.map(|s| (s + round) % n).collect()
}

/// Runs one timed actor loop (the actor prints its elapsed ns); returns
/// the time and the pid of the process started.
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, u32)> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ns = text
        .trim()
        .parse()
        .with_context(|| format!("actor printed {text:?}"))?;
    Ok((ns, pid))
}

/// Runs `actor connect-stamps N ADDR` (it prints the wall-clock ns and
/// the errno as each connect returns); every connect must succeed. Returns
/// the ns per connect+close between the first and the last, and the pid.
fn stamped(cmd: &mut Command) -> anyhow::Result<(f64, u32)> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    let mut stamps = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [ns, "0"] => stamps.push(ns.parse::<u128>().context("a connect stamp")?),
            _ => bail!("a connect of the loop failed: {line:?}"),
        }
    }
    let (Some(first), Some(last)) = (stamps.first(), stamps.last()) else {
        bail!("the connect loop printed nothing");
    };
    if stamps.len() < 2 {
        bail!("the connect loop made {} connects", stamps.len());
    }
    Ok(((last - first) as f64 / (stamps.len() - 1) as f64, pid))
}

/// A loopback listener for the connect loops, with an accept queue as deep
/// as the kernel allows (std listens with 128), drained on a thread of
/// its own; returns its address.
fn sink() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    // SAFETY: listen(2) again on our own listening socket only sets its
    // backlog (capped by net.core.somaxconn).
    if unsafe { libc_listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

unsafe extern "C" {
    #[link_name = "listen"]
    fn libc_listen(fd: i32, backlog: i32) -> i32;
}

/// A connect loop, run again when the kernel dropped a SYN on a full
/// accept queue meanwhile (the listener's thread did not get the CPU in
/// time): such a loop measures TCP's one-second retransmit, not connect. Returns the time, the pid and the tries it took.
fn connect_loop(
    mut run: impl FnMut() -> anyhow::Result<(f64, u32)>,
) -> anyhow::Result<(f64, u32, u32)> {
    for tries in 1..=CONNECT_TRIES {
        let before = listen_overflows()?;
        let (ns, pid) = run()?;
        if listen_overflows()? == before {
            return Ok((ns, pid, tries));
        }
    }
    bail!(
        "the connect loop's listener overflowed its accept queue in {CONNECT_TRIES} tries (TcpExt ListenOverflows): the machine is too busy for this figure"
    )
}

/// TcpExt ListenOverflows of /proc/net/netstat: SYNs dropped because an
/// accept queue was full.
fn listen_overflows() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    let mut tcp = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        bail!("no TcpExt in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .context("no ListenOverflows in /proc/net/netstat")?
        .1
        .parse()
        .context("ListenOverflows")
}

/// The watched sessions' store holds every exec (the actor's and its
/// children's) and every connect of the two loops, nothing lost. A connect
/// loop run again (`tries`) made one session per try; the last one counts.
fn recorded_all(d: &Daemon, p: &Params, tries: u32) -> anyhow::Result<()> {
    let db = d.store()?;
    let sessions = daemon::sessions(&db)?;
    let (Some(&execs), Some(&connects)) = (sessions.first(), sessions.last()) else {
        bail!("the watched loops made no session");
    };
    if sessions.len() != 1 + tries as usize {
        bail!(
            "the watched loops made sessions {sessions:?}, expected {}",
            1 + tries
        );
    }
    daemon::wait_rows(
        &db,
        &[
            (execs, kind::EXEC, u64::from(p.execs) + 1),
            (execs, kind::CONNECT, 0),
            (connects, kind::EXEC, 1),
            (connects, kind::CONNECT, p.connects.into()),
        ],
        false,
        Duration::from_secs(60),
    )
    .context("the watched loops' records")?;
    d.check_counters()
}

/// The unwatched loops left no session and no row in the store.
fn recorded_nothing(d: &Daemon) -> anyhow::Result<()> {
    std::thread::sleep(Duration::from_millis(500));
    let db = d.store()?;
    let (sessions, rows) = (daemon::sessions(&db)?, daemon::count_all(&db)?);
    if !sessions.is_empty() || rows != 0 {
        bail!(
            "the unwatched loops were recorded: sessions {sessions:?}, {rows} events {:?}",
            daemon::by_kind(&db)?
        );
    }
    d.check_counters()
}

/// Per-round ratios of setup `i` to no agent.
fn ratios(s: &Samples, i: usize) -> Vec<f64> {
    s[i].iter().zip(&s[0]).map(|(x, base)| x / base).collect()
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}x-{hi:.2}x")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `p` quantile of sorted values (nearest rank below).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("airlock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::williams;

    #[test]
    fn the_rotation_is_balanced() {
        let n = 4;
        let rows: Vec<Vec<usize>> = (0..n).map(|r| williams(r, n)).collect();
        for pos in 0..n {
            let mut seen: Vec<usize> = rows.iter().map(|r| r[pos]).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "position {pos}");
        }
        let mut pairs: Vec<(usize, usize)> = rows
            .iter()
            .flat_map(|r| r.windows(2).map(|w| (w[0], w[1])))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        assert_eq!(
            pairs.len(),
            n * (n - 1),
            "each setup follows each other once"
        );
    }
}
