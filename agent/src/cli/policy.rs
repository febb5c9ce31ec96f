//! `airlock policy check` and `airlock policy explain`

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    config::Config,
    policy::{
        Action, Decision, Policy, Subject,
        check::{self, connect_action, exec_action},
    },
};

/// Check policy files, or ask which rule decides an action.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files: errors with file, line and column, warnings for
    /// rules that never match or never decide, and every file's examples
    /// run against all the files given. Exit 1 on any error or failing
    /// example.
    Check {
        /// Policy files (YAML), read in the order given.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Measure how fast the policy decides execs: a corpus of agent
    /// commands (the files' exec examples and everyday commands), each
    /// evaluated as the daemon does (action prepared, rules matched).
    Bench {
        /// Policy files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Evaluations to time.
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u64,
    },
    /// Show which rule decides an action and why. Uses the config's
    /// `policy_dirs` unless `--policy` names files.
    Explain(Box<ExplainArgs>),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// A command line, as an agent would run it.
    #[arg(long, group = "action", value_name = "COMMAND")]
    pub exec: Option<String>,
    /// A destination ADDR:PORT ([v6]:port for IPv6).
    #[arg(long, group = "action", value_name = "ADDR:PORT")]
    pub connect: Option<String>,
    /// A file opened.
    #[arg(long, group = "action", value_name = "PATH")]
    pub open: Option<PathBuf>,
    /// With --open: read or write.
    #[arg(long, default_value = "read", value_parser = ["read", "write"])]
    pub access: String,
    /// With --connect: tcp or udp.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    pub protocol: String,
    /// A session label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = super::run::parse_label)]
    pub labels: Vec<(String, String)>,
    /// The acting user id.
    #[arg(long, default_value_t = 1000)]
    pub uid: u32,
    /// The acting group id.
    #[arg(long, default_value_t = 1000)]
    pub gid: u32,
    /// With --exec: the executable's path (default: the program as given,
    /// or /usr/bin/NAME for a bare name).
    #[arg(long)]
    pub exe: Option<String>,
    /// With --exec: the parent's executable.
    #[arg(long)]
    pub parent: Option<String>,
    /// With --exec: the working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// With --exec: the executable is set-user-ID.
    #[arg(long)]
    pub setuid: bool,
    /// Policy files to use instead of the config's policy_dirs.
    #[arg(long, num_args = 1..)]
    pub policy: Vec<PathBuf>,
}

pub fn run(args: PolicyArgs, config: &Config) -> ExitCode {
    match args.command {
        PolicyCommand::Check { files } => check_files(&files, config),
        PolicyCommand::Bench { files, iterations } => match bench(&files, iterations) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("airlock: {e:#}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Explain(a) => match explain(*a, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("airlock: {e:#}");
                ExitCode::from(super::EXIT_USAGE)
            }
        },
    }
}

fn check_files(files: &[PathBuf], config: &Config) -> ExitCode {
    let policy = match Policy::load_files(files) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "{} error(s): the policy would not load (a running daemon keeps its old one)",
                errors.0.len()
            );
            return ExitCode::FAILURE;
        }
    };
    let approvers: Vec<(String, Vec<String>)> = config
        .approvers
        .iter()
        .map(|a| (a.name.clone(), a.groups.clone()))
        .collect();
    for w in check::warnings(&policy, Some(&approvers)) {
        eprintln!("{w}");
    }
    let (n, failures) = check::examples(&policy);
    for f in &failures {
        eprintln!("{f}");
    }
    let c = policy.candidates();
    println!("{}", policy.describe());
    println!(
        "kernel candidates: {} executables by path, {} by name{}{}; {} network prefixes; {} file or directory names; {}",
        c.exec_paths.len(),
        c.exec_names.len(),
        if c.exec_setuid {
            ", set-user-ID executables"
        } else {
            ""
        },
        if c.exec_all {
            ", every exec (see warnings)"
        } else {
            ""
        },
        c.net.len(),
        c.files.len(),
        if c.unix.all {
            "every Unix socket (see warnings)".to_string()
        } else {
            format!(
                "{} Unix sockets by path, {} abstract, {} socket patterns looked up on this host{}",
                c.unix.paths.len(),
                c.unix.abstracts.len(),
                c.unix.globs.len(),
                if c.unix.outside {
                    ", every server outside the session"
                } else {
                    ""
                }
            )
        }
    );
    println!("examples: {n} run, {} failed", failures.len());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(a: ExplainArgs, config: &Config) -> anyhow::Result<()> {
    let policy = if a.policy.is_empty() {
        Policy::load_dirs(&config.policy_dirs)
    } else {
        Policy::load_files(&a.policy)
    }
    .map_err(|e| anyhow::anyhow!("the policy does not load:\n{e}"))?;
    let action = if let Some(cmd) = &a.exec {
        exec_action(
            cmd,
            a.exe.as_deref(),
            a.parent.clone(),
            a.setuid,
            a.cwd.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?
    } else if let Some(dest) = &a.connect {
        let protocol = if a.protocol == "udp" {
            crate::policy::Protocol::Udp
        } else {
            crate::policy::Protocol::Tcp
        };
        connect_action(dest, protocol).map_err(|e| anyhow::anyhow!("--{e}"))?
    } else if let Some(p) = &a.open {
        Action::File {
            path: p.display().to_string(),
            aliases: Vec::new(),
            write: a.access == "write",
        }
    } else {
        anyhow::bail!("give the action: --exec COMMAND, --connect ADDR:PORT or --open PATH");
    };
    let labels: BTreeMap<String, String> = a.labels.into_iter().collect();
    let subject = Subject {
        labels: &labels,
        uid: a.uid,
        gid: a.gid,
    };
    let out = policy.evaluate(&action, &subject);
    let matched = policy.explain(&action, &subject);
    println!("action:    {} {}", action.kind().name(), action.summary());
    match out.rule {
        Some(r) => {
            println!(
                "decision:  {} by {} (priority {}, {})",
                out.decision.name(),
                r.id,
                r.priority,
                r.file.display()
            );
            if let Some((_, why)) = matched.iter().find(|(m, _)| m.id == r.id) {
                println!("because:   {}", why.join("; "));
            }
            if !r.description.is_empty() {
                println!("rule:      {}", r.description);
            }
            if out.decision == Decision::Hold {
                let h = &r.hold;
                let who = if h.approvers.is_empty() && h.groups.is_empty() {
                    "any approver".to_string()
                } else {
                    [
                        h.approvers.join(", "),
                        h.groups
                            .iter()
                            .map(|g| format!("group {g}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ")
                };
                println!(
                    "hold:      {} approval(s) from {who}; after {} s: {}",
                    h.approvals,
                    h.timeout_s,
                    if h.on_timeout == crate::model::OnTimeout::Allow {
                        "allow"
                    } else {
                        "deny"
                    }
                );
            }
        }
        None => println!("decision:  record (no rule matches: the default)"),
    }
    if let Some(m) = out.monitor {
        println!(
            "monitor:   would {} by {} (monitor mode: recorded only)",
            m.decision.name(),
            m.id
        );
    }
    for (r, why) in &matched {
        if Some(r.id.as_str()) != out.rule.map(|d| d.id.as_str())
            && Some(r.id.as_str()) != out.monitor.map(|d| d.id.as_str())
        {
            println!(
                "also:      {} ({}{}) matches but does not decide: {}",
                r.id,
                r.decision.name(),
                if r.mode == crate::policy::Mode::Monitor {
                    ", monitor"
                } else {
                    ""
                },
                why.join("; ")
            );
        }
    }
    let c = policy.candidates();
    println!("kernel:    {}", c.explain(&action));
    Ok(())
}

/// Everyday commands of a coding agent, besides the files' examples.
const EVERYDAY: &[&str] = &[
    "git status --short",
    "git diff HEAD~1 -- src/main.rs",
    "git commit -qm 'fix: handle empty input'",
    "ls -la src",
    "cat README.md",
    "grep -rn TODO src",
    "cargo build --release",
    "cargo test -q",
    "python3 -m pytest -q tests/test_api.py",
    "npm test",
    "make -j4",
    "rm -rf build",
    "curl -s https://api.github.com/repos/rust-lang/rust",
    "sed -i s/foo/bar/ src/lib.rs",
    "find . -name '*.rs' -newer Cargo.toml",
    "kubectl get pods -n staging",
    "terraform plan -out tf.plan",
];

fn bench(files: &[PathBuf], iterations: u64) -> anyhow::Result<()> {
    let policy =
        Policy::load_files(files).map_err(|e| anyhow::anyhow!("the policy does not load:\n{e}"))?;
    let mut corpus: Vec<String> = policy
        .packs
        .iter()
        .flat_map(|p| p.examples.iter().filter_map(|e| e.exec.clone()))
        .collect();
    corpus.extend(EVERYDAY.iter().map(|s| s.to_string()));
    let actions: Vec<(String, Vec<String>)> = corpus
        .iter()
        .filter_map(|c| match exec_action(c, None, None, false, None) {
            Ok(Action::Exec(e)) => Some((e.path, e.argv)),
            _ => None,
        })
        .collect();
    if actions.is_empty() {
        anyhow::bail!("no exec commands to evaluate");
    }
    let labels: BTreeMap<String, String> = [
        ("agent".to_string(), "bench".to_string()),
        ("workdir".to_string(), "/home/dev/project".to_string()),
    ]
    .into();
    let subject = Subject {
        labels: &labels,
        uid: 1000,
        gid: 1000,
    };
    let prepare = |(path, argv): &(String, Vec<String>)| {
        let mut e = crate::policy::ExecAction::new(path.clone(), argv.clone());
        e.cwd = Some("/home/dev/project".into());
        Action::Exec(e)
    };
    // The rules alone, on actions prepared once.
    let prepared: Vec<Action> = actions.iter().map(prepare).collect();
    let mut decided = [0u64; 4];
    let start = std::time::Instant::now();
    for i in 0..iterations {
        let a = &prepared[(i % prepared.len() as u64) as usize];
        let out = policy.evaluate(a, &subject);
        decided[out.decision.severity_rank() as usize] += 1;
    }
    let rules_s = start.elapsed().as_secs_f64();
    // As the daemon does: the action built from a record's path and argv
    // (copies, the command line joined), then decided.
    let start = std::time::Instant::now();
    for i in 0..iterations {
        let a = prepare(&actions[(i % actions.len() as u64) as usize]);
        std::hint::black_box(policy.evaluate(&a, &subject).decision);
    }
    let full_s = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rules": policy.rules.len(),
            "commands": actions.len(),
            "iterations": iterations,
            "evals_per_s": iterations as f64 / rules_s,
            "ns_per_eval": rules_s * 1e9 / iterations as f64,
            "evals_per_s_with_prepare": iterations as f64 / full_s,
            "ns_per_eval_with_prepare": full_s * 1e9 / iterations as f64,
            "decided": {"deny": decided[0], "hold": decided[1], "allow": decided[2], "record": decided[3]},
        })
    );
    Ok(())
}
