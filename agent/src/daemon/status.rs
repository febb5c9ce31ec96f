//! What the daemon says about itself: its mode and what it records and
//! enforces on this kernel (logged at start, served by `airlock status`).

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use super::stats::Stats;
use crate::{
    bpf::{Bpf, Holds},
    config::Config,
    ctl::{KindCount, StatusReport},
    features::Features,
};

/// What can be recorded in every mode today.
const RECORDS: &[&str] = &["fork", "exec", "exit", "connect", "accept", "udp_send"];

/// What rules can do with the programs this load attached.
fn enforces(h: Holds) -> Vec<String> {
    let mut v = if h.lsm_exec {
        vec![
            "exec hold: execve waits and is re-issued (BPF LSM bprm_creds_for_exec; allow runs the program, deny fails execve with EPERM)",
            "exec deny: execve fails with EPERM",
        ]
    } else {
        vec![
            "exec hold: stopped before its first instruction (allow resumes it, deny kills it with SIGKILL)",
            "exec deny: killed with SIGKILL before its first instruction",
        ]
    };
    v.push(if h.lsm_connect {
        "connect hold: the syscall waits and is re-issued (BPF LSM socket_connect; allow connects, deny fails with EPERM)"
    } else if h.connect {
        "connect hold: the syscall waits and is re-issued (cgroup connect hook; allow connects, deny fails with EPERM)"
    } else {
        "connect hold: not possible on this kernel without BPF LSM: flagged connects fail with EPERM"
    });
    v.push("connect deny: EPERM");
    v.push(if h.lsm_file_paths {
        "file: candidate opens (files and directories named by file rules, by name and by inode), truncates, removals (unlink, rmdir, renamed away), and renames, links and symlinks onto their names are recorded and held inside the syscall (BPF LSM file_open, path_truncate, path_rename, path_link, path_symlink, path_unlink, path_rmdir)"
    } else if h.lsm_file {
        "file: candidate opens (files and directories named by file rules, by name and by inode) are recorded and held inside open (BPF LSM file_open); truncate, rename, link, symlink, unlink and rmdir are not seen (no CONFIG_SECURITY_PATH path hooks, see the log)"
    } else if h.lsm_connect {
        "file: BPF LSM is active but file_open could not be attached (see the log): file rules are not enforced and file opens not recorded"
    } else {
        "file: not possible without BPF LSM: file rules are not enforced and file opens not recorded"
    });
    v.push(if h.lsm_fork {
        "fork: with the session map full, a watched process's fork fails with EAGAIN (BPF LSM task_alloc; counted as fork_refused)"
    } else {
        "fork: with the session map full, a watched process's new child runs unwatched (counted as session_map_full)"
    });
    v.push(if h.lsm_unix {
        "unix: connects to Unix sockets are recorded and, where a rule names the socket, held inside connect or sendmsg (BPF LSM unix_stream_connect, unix_may_send)"
    } else if h.lsm_connect {
        "unix: BPF LSM is active but the Unix socket hooks could not be attached (see the log): socket rules are not enforced and Unix socket connects not recorded"
    } else {
        "unix: not possible without BPF LSM: socket rules are not enforced and Unix socket connects not recorded"
    });
    v.into_iter().map(String::from).collect()
}

fn mode(h: Holds, features: &Features) -> &'static str {
    if h.lsm_exec {
        "record and hold with BPF LSM: execve and connect wait inside the syscall"
    } else if h.lsm_connect {
        "record and hold (BPF LSM holds connects; execs are held at sched_process_exec)"
    } else {
        features.mode()
    }
}

/// What does not change while the daemon runs.
#[derive(Debug, Clone)]
pub struct Facts {
    pid: u32,
    mode: &'static str,
    kernel: String,
    bpf_lsm: bool,
    enforces: Vec<String>,
    programs: Vec<String>,
    survival: String,
    store: String,
    api: String,
}

impl Facts {
    pub fn new(config: &Config, features: &Features, bpf: &Bpf, api: String) -> Self {
        let survival = format!(
            "programs pinned at {} (generation {}{}); with no daemon for {} ms, held actions fail {}",
            config.pin_dir.display(),
            bpf.generation,
            if bpf.took_over {
                ", took over from an earlier daemon"
            } else {
                ""
            },
            config.heartbeat_timeout_ms,
            config.fail_mode.name()
        );
        Self {
            pid: std::process::id(),
            mode: mode(bpf.holds, features),
            kernel: features.kernel.clone(),
            bpf_lsm: features.bpf_lsm,
            enforces: enforces(bpf.holds),
            programs: bpf.attached.clone(),
            survival,
            store: config.db_path().display().to_string(),
            api,
        }
    }

    /// The line logged once everything is up.
    pub fn started_line(&self, policy: &str, policy_dirs: &str, socket: &str) -> String {
        format!(
            "airlock daemon {} pid {}: mode {}; records {}; enforces {}; {}; policy {policy} ({policy_dirs}); kernel {}; store {}; socket {socket}; approval API {}",
            env!("CARGO_PKG_VERSION"),
            self.pid,
            self.mode,
            RECORDS.join(", "),
            self.enforces.join("; "),
            self.survival,
            self.kernel,
            self.store,
            self.api
        )
    }

    /// The whole report, with the counters as they are now.
    pub fn report(
        &self,
        stats: &Stats,
        uptime: Duration,
        policy: String,
        losses: Vec<KindCount>,
    ) -> StatusReport {
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            policy,
            pid: self.pid,
            mode: self.mode.into(),
            kernel: self.kernel.clone(),
            bpf_lsm: self.bpf_lsm,
            can_record: RECORDS.iter().map(|s| s.to_string()).collect(),
            can_enforce: self.enforces.clone(),
            programs: self.programs.clone(),
            survival: self.survival.clone(),
            store: self.store.clone(),
            api: self.api.clone(),
            uptime_s: uptime.as_secs(),
            sessions_registered: stats.sessions_registered.load(Relaxed),
            events: stats.events(),
            records_written: stats.records_written.load(Relaxed),
            losses,
            decode_errors: stats.decode_errors.load(Relaxed),
            store_errors: stats.store_errors.load(Relaxed),
        }
    }
}
