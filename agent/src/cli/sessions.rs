//! `airlock sessions`

use clap::Args;

use crate::{config::Config, store::Store};

/// List recorded sessions, oldest first, with their labels and counts.
/// Reads the store directly, so it works while the daemon is stopped.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SessionsArgs, config: &Config) -> anyhow::Result<()> {
    let store = Store::open_read_only(&config.db_path())?;
    let sessions = store.sessions()?;
    if args.json {
        return super::print_json(&sessions);
    }
    println!(
        "{:>5}  {:<24}  {:<24}  {:>7}  {:>7}  {:>5}  {:<30}  COMMAND",
        "ID", "STARTED", "ENDED", "PID", "EVENTS", "LOST", "LABELS"
    );
    for s in sessions {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>5}  {:<24}  {:<24}  {:>7}  {:>7}  {:>5}  {:<30}  {}",
            s.id,
            super::time(s.started_at),
            s.ended_at.map_or_else(|| "running".into(), super::time),
            s.root_pid,
            s.events,
            s.lost,
            labels.join(","),
            s.command.join(" ")
        );
    }
    Ok(())
}
