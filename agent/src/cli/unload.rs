//! `airlock unload`

use clap::Args;

use crate::{
    bpf::pins::PinDir,
    config::{Config, FailMode},
    model::{ApprovalRequest, State, wall_now_ns},
    procfs,
    store::Store,
};

/// End enforcement left behind by a stopped daemon: the kernel programs
/// stay attached (pinned) when the daemon exits, so watched sessions keep
/// their rules and, past the heartbeat timeout, the fail mode. This marks
/// the daemon gone, lets every task held inside a syscall re-issue it (it
/// gets the fail mode's answer at once), and removes the pins, which
/// detaches the programs. Refused while a daemon runs.
#[derive(Debug, Args)]
pub struct UnloadArgs {}

pub fn run(_args: UnloadArgs, config: &Config) -> anyhow::Result<()> {
    let _lock = match crate::store::lock_data_dir(&config.data_dir, &config.lock_path()) {
        Ok(l) => l,
        Err(e @ crate::store::LockError::Held { .. }) => {
            anyhow::bail!("{e}: stop it before unloading")
        }
        Err(e) => return Err(e.into()),
    };
    // Which held processes are still there, before resuming any of them.
    let mut store = if config.db_path().exists() {
        Some(Store::open(&config.db_path())?)
    } else {
        None
    };
    let pending = match &store {
        Some(s) => s.requests(Some(State::Pending))?,
        None => Vec::new(),
    };
    let alive: Vec<bool> = pending
        .iter()
        .map(|r| procfs::is_same(r.tgid, r.start_time))
        .collect();
    let pins = PinDir::new(&config.pin_dir);
    if pins.root().exists() {
        let resumed = pins.unload()?;
        println!(
            "removed {} (programs detached); resumed {resumed} held task(s) with fail mode {}",
            config.pin_dir.display(),
            config.fail_mode.name()
        );
    } else {
        println!("nothing pinned at {}", config.pin_dir.display());
    }
    if let Some(store) = store.as_mut() {
        close_pending(config, store, pending, &alive)?;
    }
    Ok(())
}

/// Ends the requests still pending: nobody can decide them any more. An
/// exec held at sched_process_exec (no BPF LSM) is only stopped, so the
/// fail mode is applied here (closed: SIGKILL, open: SIGCONT); holds inside
/// a syscall were resumed above and met the fail mode in the kernel.
fn close_pending(
    config: &Config,
    store: &mut Store,
    pending: Vec<ApprovalRequest>,
    alive: &[bool],
) -> anyhow::Result<()> {
    let open = config.fail_mode == FailMode::Open;
    let closed = pending.len();
    for (mut req, alive) in pending.into_iter().zip(alive.iter().copied()) {
        let outcome = if !alive {
            req.state = State::Abandoned;
            "the process ended while no daemon ran".to_string()
        } else if req.stopped_after_exec() {
            req.state = State::Failed;
            match procfs::release_new_image(req.tgid, req.start_time, open) {
                Ok(seen) => format!("airlock unload, fail {}: {seen}", config.fail_mode.name()),
                Err(e) => format!("airlock unload: {e}"),
            }
        } else {
            req.state = State::Failed;
            format!(
                "airlock unload, fail {}: resumed; the fail mode answered in the kernel (see the action's record)",
                config.fail_mode.name()
            )
        };
        req.outcome = Some(outcome);
        req.decided_at = Some(wall_now_ns());
        req.decided_by = Some("unload".into());
        store.update_request(&req)?;
    }
    if closed > 0 {
        println!("closed {closed} pending request(s): nobody is left to decide them");
    }
    Ok(())
}
