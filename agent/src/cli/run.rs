//! `airlock run`

use std::{os::unix::process::ExitStatusExt, process::ExitCode};

use clap::Args;

use crate::{
    config::Config,
    ctl::{self, Request, Response},
};

/// Run a command as a new watched session: the daemon registers the session
/// first, so the command's very first exec is recorded. Exits with the
/// command's status (128+N if a signal N ended it).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A session label, e.g. `agent=claude-code`, `model=opus-4`, `user=alice`.
    /// Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Do not print the session id on stderr.
    #[arg(long, short)]
    pub quiet: bool,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// airlock's own failure, as env(1) and timeout(1) use it.
const EXIT_OWN_FAILURE: u8 = 125;

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label must be KEY=VALUE, got {s:?}")),
    }
}

pub fn run(args: RunArgs, config: &Config) -> ExitCode {
    let mut labels: std::collections::BTreeMap<String, String> =
        args.labels.iter().cloned().collect();
    // Policies ask whether paths lie inside the session's working tree.
    if let (false, Ok(cwd)) = (labels.contains_key("workdir"), std::env::current_dir()) {
        labels.insert("workdir".into(), cwd.display().to_string());
    }
    let req = Request::Register {
        labels: labels.into_iter().collect(),
        command: args.command.clone(),
    };
    let session_id = match ctl::request(&config.socket_path, &req) {
        Ok(Response::Registered { session_id }) => session_id,
        Ok(other) => {
            eprintln!("airlock: unexpected reply from the daemon: {other:?}");
            return ExitCode::from(EXIT_OWN_FAILURE);
        }
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(EXIT_OWN_FAILURE);
        }
    };
    if !args.quiet {
        eprintln!("airlock: session {session_id}");
    }
    // This process is now the session's first member; the child inherits
    // membership at fork, before it runs anything.
    let mut child = match std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("AIRLOCK_SESSION", session_id.to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {}: {e}", args.command[0]);
            return ExitCode::from(match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => EXIT_OWN_FAILURE,
            });
        }
    };
    // The terminal sends SIGINT/SIGQUIT to the whole foreground group, child
    // included: let the child decide, and forward what is sent to us alone.
    let pid = child.id() as i32;
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGTERM || sig == signal_hook::consts::SIGHUP {
                    // SAFETY: kill has no memory effects; a stale pid fails harmlessly.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        });
    }
    match child.wait() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
            _ => ExitCode::from(EXIT_OWN_FAILURE),
        },
        Err(e) => {
            eprintln!("airlock: waiting for {}: {e}", args.command[0]);
            ExitCode::from(EXIT_OWN_FAILURE)
        }
    }
}
