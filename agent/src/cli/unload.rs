//! `airlock unload`

use clap::Args;

use crate::{config::Config, sensors::pins::PinDir};

/// End enforcement left behind by a stopped daemon: the kernel programs
/// stay attached (pinned) when the daemon exits, so watched sessions keep
/// their rules and, past the heartbeat timeout, the fail mode. This marks
/// the daemon gone, lets every task held inside a syscall re-issue it (it
/// gets the fail mode's answer at once), and removes the pins, which
/// detaches the programs. Refused while a daemon runs.
#[derive(Debug, Args)]
pub struct UnloadArgs {}

pub fn run(_args: UnloadArgs, config: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.data_dir.display()))?;
    let lock_path = config.lock_path();
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "an airlock daemon is running on {} (it holds {}): stop it before unloading",
            config.data_dir.display(),
            lock_path.display()
        );
    }
    let pins = PinDir::new(&config.pin_dir);
    if !pins.root().exists() {
        println!("nothing pinned at {}", config.pin_dir.display());
        return Ok(());
    }
    let resumed = pins.unload()?;
    println!(
        "removed {} (programs detached); resumed {resumed} held task(s) with fail mode {}",
        config.pin_dir.display(),
        config.fail_mode.name()
    );
    Ok(())
}
