//! The command line: one file per subcommand, help text from doc comments.

mod approvals;
mod daemon;
mod events;
mod policy;
mod run;
mod sessions;
mod status;
mod unload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Exit status for a bad command line or configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Airlock records what AI-agent processes do on this host: every exec and
/// network action of a watched session, into a local SQLite store.
#[derive(Debug, Parser)]
#[command(name = "airlock", version)]
pub struct Cli {
    /// Configuration file (TOML). Default: /etc/airlock/airlock.toml if it
    /// exists, else built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Daemon(daemon::DaemonArgs),
    Run(run::RunArgs),
    Sessions(sessions::SessionsArgs),
    Events(events::EventsArgs),
    Status(status::StatusArgs),
    Approvals(approvals::ApprovalsArgs),
    Approve(approvals::DecideArgs),
    Deny(approvals::DecideArgs),
    Unload(unload::UnloadArgs),
    Policy(policy::PolicyArgs),
}

pub fn main(cli: Cli) -> ExitCode {
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !matches!(cli.command, Command::Daemon(_)) {
        // A CLI piped into `head` should end quietly, as Unix tools do,
        // instead of panicking on EPIPE (Rust ignores SIGPIPE by default).
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Daemon(a) => daemon::run(a, config),
        Command::Run(a) => run::run(a, &config),
        Command::Sessions(a) => report(sessions::run(a, &config)),
        Command::Events(a) => report(events::run(a, &config)),
        Command::Status(a) => report(status::run(a, &config)),
        Command::Approvals(a) => report(approvals::list(a, &config)),
        Command::Approve(a) => report(approvals::decide(a, &config, true)),
        Command::Deny(a) => report(approvals::decide(a, &config, false)),
        Command::Unload(a) => report(unload::run(a, &config)),
        Command::Policy(a) => policy::run(a, &config),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Formats ns since the epoch as UTC with milliseconds.
pub fn time(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_labels_and_command() {
        let cli = Cli::try_parse_from([
            "airlock",
            "run",
            "--label",
            "agent=codex",
            "--label",
            "user=bob",
            "--",
            "sh",
            "-c",
            "echo --label",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            a.labels,
            vec![
                ("agent".to_string(), "codex".to_string()),
                ("user".to_string(), "bob".to_string())
            ]
        );
        assert_eq!(a.command, vec!["sh", "-c", "echo --label"]);
    }

    #[test]
    fn run_rejects_bad_label_and_missing_command() {
        let e = Cli::try_parse_from(["airlock", "run", "--label", "novalue", "--", "true"])
            .unwrap_err();
        assert!(e.to_string().contains("label must be KEY=VALUE"), "{e}");
        assert!(Cli::try_parse_from(["airlock", "run", "--label", "a=b"]).is_err());
    }

    #[test]
    fn events_needs_a_numeric_session() {
        let cli = Cli::try_parse_from(["airlock", "events", "12", "--json"]).unwrap();
        let Command::Events(a) = cli.command else {
            panic!("not events")
        };
        assert_eq!((a.session, a.json), (12, true));
        assert!(Cli::try_parse_from(["airlock", "events", "abc"]).is_err());
    }

    #[test]
    fn time_is_utc_millis() {
        assert_eq!(time(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123Z");
    }
}
