//! `airlock daemon`

use std::process::ExitCode;

use clap::Args;

use crate::config::Config;

/// Run the recorder: load the kernel programs, serve the control socket,
/// write every watched action to the store. Stops cleanly on SIGTERM/SIGINT.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug`. Default: info,
    /// or RUST_LOG when set.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,

    /// A directory of policy files read before the configured
    /// `policy_dirs` (so theirs replace its files of the same name).
    /// Repeatable. `cargo xtask run` passes the checkout's `policies/`.
    #[arg(long = "policy-dir", value_name = "DIR")]
    pub policy_dirs: Vec<std::path::PathBuf>,
}

pub fn run(args: DaemonArgs, mut config: Config) -> ExitCode {
    if !args.policy_dirs.is_empty() {
        let configured = std::mem::take(&mut config.policy_dirs);
        config.policy_dirs = args.policy_dirs.iter().cloned().chain(configured).collect();
    }
    let filter = args
        .log
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("airlock: --log {filter:?}: {e}");
            return ExitCode::from(super::EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match crate::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock daemon: {e}");
            ExitCode::from(if e.is_usage() { super::EXIT_USAGE } else { 1 })
        }
    }
}
