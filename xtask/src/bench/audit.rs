//! The Linux audit state of the benchmark, and auditd as the stock peer.
//!
//! Once audit has been enabled, the kernel gives every task created later
//! an audit context (`audit_alloc()` in kernel/auditsc.c, called from
//! `copy_process()`), even after `auditctl -e 0`, until reboot: each of
//! their syscalls then takes the audit slow path. A no-agent round run
//! after an auditd round would pay that and drift towards auditd. The one
//! thing that spares a new task is a task-list rule whose action is
//! `never` (`-a never,task`): `audit_filter_task()` answers
//! `AUDIT_STATE_DISABLED`, `audit_alloc()` allocates no context and clears
//! the task's `SYSCALL_AUDIT` work flag, so its syscalls run as if audit
//! had never been on. So auditd runs for the whole benchmark and audit stays
//! enabled; every round but auditd's runs with `-a never,task` as the only
//! rule, and auditd's rounds swap it for the execve/connect rule. At the
//! end audit is disabled with `-a never,task` left loaded, so the rest of
//! the machine's tasks are spared too.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The filter key of the bench's rule; its records carry it.
pub const KEY: &str = "airlock-bench";

/// The rule Debian users add to record program starts and connections.
const RECORD: &[&str] = &[
    "-a",
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "execve,execveat,connect",
    "-k",
    KEY,
];

/// x86-64 syscall numbers in the records.
const SYS_CONNECT: u32 = 42;
const SYS_EXECVE: u32 = 59;

/// auditd, started by the bench with its own configuration and log.
pub struct Audit {
    log: PathBuf,
    pid: u32,
    lost_at_start: u64,
}

impl Audit {
    /// Starts auditd with audit enabled and every new task spared.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let s = status()?;
        if s.pid != 0 {
            bail!(
                "an auditd (pid {0}) is already running: the bench sets the audit rules itself; stop it first (kill {0})",
                s.pid
            );
        }
        let rules = auditctl(&["-l"])?;
        if !matches!(rules.trim(), "No rules" | "-a never,task") {
            bail!(
                "audit rules are loaded; the bench replaces them, so remove them first:\n{rules}"
            );
        }
        // Debian's configuration, writing to a log of the bench's own that
        // is never rotated (so every record can be counted).
        let conf_dir = dir.join("audit");
        std::fs::create_dir_all(&conf_dir)?;
        let log = conf_dir.join("audit.log");
        let stock = std::fs::read_to_string("/etc/audit/auditd.conf")
            .context("reading /etc/audit/auditd.conf")?;
        let mut conf: Vec<String> = stock
            .lines()
            .filter(|l| {
                let k = l.split('=').next().unwrap_or("").trim();
                !matches!(k, "log_file" | "max_log_file_action")
            })
            .map(str::to_string)
            .collect();
        conf.push(format!("log_file = {}", log.display()));
        conf.push("max_log_file_action = ignore".into());
        let conf_file = conf_dir.join("auditd.conf");
        std::fs::write(&conf_file, conf.join("\n") + "\n")?;
        // auditd refuses a configuration others may write.
        std::fs::set_permissions(
            &conf_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )?;
        // Spared before audit is enabled, so no task ever gets a context
        // in between.
        spare()?;
        crate::util::run(Command::new("auditd").arg("-c").arg(&conf_dir))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            let s = status()?;
            if s.pid != 0 {
                break s.pid;
            }
            if Instant::now() > deadline {
                bail!("auditd did not register with the kernel within 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let audit = Self {
            log,
            pid,
            lost_at_start: status()?.lost,
        };
        auditctl(&["-b", "8192"])?;
        auditctl(&["-e", "1"])?;
        Ok(audit)
    }

    /// `-a never,task` as the only rule: tasks created from now on get no
    /// audit context.
    pub fn spare(&self) -> anyhow::Result<()> {
        spare()
    }

    /// The execve/connect rule as the only rule: tasks created from now on
    /// are audited.
    pub fn record(&self) -> anyhow::Result<()> {
        auditctl(&["-D"])?;
        auditctl(RECORD)?;
        Ok(())
    }

    /// Where the log ends now: records after it belong to what follows.
    pub fn mark(&self) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0))
    }

    /// The kernel's count of records it dropped since the bench started.
    pub fn lost(&self) -> anyhow::Result<u64> {
        Ok(status()?.lost.saturating_sub(self.lost_at_start))
    }

    /// Waits until the log holds, after `from`, exactly `execs` execve
    /// records of children of `exec_loop` and `connects` connect records
    /// of `connect_loop`; fails after 60 s or on more records than that.
    pub fn expect(
        &self,
        from: u64,
        (exec_loop, execs): (u32, u64),
        (connect_loop, connects): (u32, u64),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (mut e, mut c) = (0u64, 0u64);
            for r in self.records(from)? {
                if r.syscall == SYS_EXECVE && r.ppid == exec_loop {
                    e += 1;
                } else if r.syscall == SYS_CONNECT && r.pid == connect_loop {
                    c += 1;
                }
            }
            if (e, c) == (execs, connects) {
                return Ok(());
            }
            if e > execs || c > connects || Instant::now() > deadline {
                bail!(
                    "auditd recorded {e} of {execs} execs and {c} of {connects} connects of its round (kernel lost counter +{} since the start)",
                    self.lost()?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The bench's SYSCALL records written after byte `from` of the log.
    fn records(&self, from: u64) -> anyhow::Result<Vec<Record>> {
        let text = std::fs::read(&self.log).with_context(|| self.log.display().to_string())?;
        let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
        let key = format!("key=\"{KEY}\"");
        Ok(text
            .lines()
            .filter(|l| l.starts_with("type=SYSCALL ") && l.contains(&key))
            .filter_map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                };
                Some(Record {
                    syscall: field("syscall")?,
                    pid: field("pid")?,
                    ppid: field("ppid")?,
                })
            })
            .collect())
    }

    /// CPU time of one bare syscall (`dd bs=1`, a read and a write per
    /// byte) in tasks spared by `-a never,task` and in tasks with an audit
    /// context and no rule: what the spared state saves, on this kernel.
    pub fn syscall_cost(&self, reps: usize) -> anyhow::Result<(f64, f64)> {
        let (mut spared, mut context) = (Vec::new(), Vec::new());
        for i in 0..2 * reps {
            // S C C S S C ...: neither state always goes first.
            let with_context = (i + i / 2) % 2 == 1;
            if with_context {
                auditctl(&["-D"])?;
            } else {
                self.spare()?;
            }
            let ns = dd_syscall_ns()?;
            if with_context {
                context.push(ns);
            } else {
                spared.push(ns);
            }
        }
        self.spare()?;
        Ok((super::median(&spared), super::median(&context)))
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let _ = auditctl(&["-e", "0"]);
        let _ = self.spare();
        // SAFETY: kill(2) on the pid auditd registered with the kernel.
        unsafe { libc_kill(self.pid as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while status().is_ok_and(|s| s.pid != 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn spare() -> anyhow::Result<()> {
    auditctl(&["-D"])?;
    auditctl(&["-a", "never,task"])?;
    let rules = auditctl(&["-l"])?;
    if rules.trim() != "-a never,task" {
        bail!("audit rules are {rules:?}, expected only -a never,task");
    }
    Ok(())
}

struct Record {
    syscall: u32,
    pid: u32,
    ppid: u32,
}

/// What `auditctl -s` says.
struct Status {
    pid: u32,
    lost: u64,
}

fn status() -> anyhow::Result<Status> {
    let out = auditctl(&["-s"])?;
    let field = |k: &str| -> anyhow::Result<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {k} in auditctl -s: {out}"))
    };
    Ok(Status {
        pid: field("pid")? as u32,
        lost: field("lost")?,
    })
}

fn auditctl(args: &[&str]) -> anyhow::Result<String> {
    crate::util::output(Command::new("auditctl").args(args))
}

/// User + system CPU ns per syscall of `dd bs=1 count=1000000` (two
/// syscalls a byte), as bash's `time` reports it.
fn dd_syscall_ns() -> anyhow::Result<f64> {
    let out = Command::new("bash")
        .args([
            "-c",
            "TIMEFORMAT='%3U %3S'; time dd if=/dev/zero of=/dev/null bs=1 count=1000000 2>/dev/null",
        ])
        .output()
        .context("starting bash")?;
    let text = String::from_utf8_lossy(&out.stderr);
    let secs: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if !out.status.success() || secs.len() != 2 {
        bail!("timing dd: {text}");
    }
    Ok((secs[0] + secs[1]) * 1e9 / 2e6)
}
