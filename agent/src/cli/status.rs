//! `airlock status`

use clap::Args;

use crate::{
    config::Config,
    ctl::{self, Request, Response},
};

/// Ask the running daemon for its mode, attached programs and counters.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs, config: &Config) -> anyhow::Result<()> {
    let s = match ctl::request(&config.socket_path, &Request::Status {})? {
        Response::Status(s) => s,
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    };
    if args.json {
        return super::print_json(&s);
    }
    println!("airlock {} (pid {}), up {} s", s.version, s.pid, s.uptime_s);
    println!("mode:        {}", s.mode);
    println!("kernel:      {}", s.kernel);
    println!("records:     {}", s.can_record.join(", "));
    println!(
        "enforces:    {}",
        if s.can_enforce.is_empty() {
            "nothing".into()
        } else {
            s.can_enforce.join(", ")
        }
    );
    println!("survival:    {}", s.survival);
    println!("policy:      {}", s.policy);
    println!(
        "store:       {} ({} records written, {} failed)",
        s.store, s.records_written, s.store_errors
    );
    println!("sessions:    {} registered", s.sessions_registered);
    println!("api:         {}", s.api);
    let events: Vec<String> = s
        .events
        .iter()
        .map(|k| format!("{}={}", k.kind, k.count))
        .collect();
    println!("events:      {}", events.join(" "));
    let losses: Vec<String> = s
        .losses
        .iter()
        .map(|k| format!("{}={}", k.kind, k.count))
        .collect();
    println!(
        "lost:        {} (undecodable: {})",
        losses.join(" "),
        s.decode_errors
    );
    println!("programs:");
    for p in &s.programs {
        println!("  {p}");
    }
    Ok(())
}
