//! `cargo xtask ...`: tool bootstrap, running the daemon, every test tier,
//! benchmarks and lint. It orchestrates; agent/build.rs builds the eBPF object.

mod bench;
mod bootstrap;
mod demo;
mod lint;
mod test;
mod util;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build, and run the daemon in the foreground
    /// (root). Arguments after `--` go to `airlock daemon`.
    Run {
        /// Configuration file for the daemon.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run every test tier: lint, unit, root.
    /// With CI=true a kernel test that cannot run fails instead of skipping.
    Test {
        /// Skip the lint tier (fmt, clippy).
        #[arg(long)]
        no_lint: bool,
    },
    /// Measure overhead and ingest rate (root; installs auditd to compare).
    Bench {
        /// fork+exec iterations per measured round.
        #[arg(long, default_value_t = 2000)]
        execs: u32,
        /// connect/close iterations per measured round.
        #[arg(long, default_value_t = 5000)]
        connects: u32,
        /// Interleaved rounds per configuration (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Only the approval resume latency.
        #[arg(long)]
        resume_only: bool,
    },
    /// Only the VM tier: Debian kernels with BPF LSM under QEMU.
    Vm,
    /// Show the whole loop in a Linux 6.12 VM with BPF LSM: an agent session
    /// is held, an approver approves over the API, the action completes, the
    /// record is printed. About two minutes (QEMU without KVM).
    Demo,
    /// cargo fmt --check and clippy (userspace and the eBPF crate).
    Lint,
    /// Only install the tools (nightly rust-src, bpf-linker).
    Bootstrap,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run { config, args } => {
            bootstrap::toolchain()?;
            util::cargo(&["build", "--release", "-p", "airlock"])?;
            run_daemon(config, &args)
        }
        Cmd::Test { no_lint } => {
            bootstrap::toolchain()?;
            test::all(!no_lint)
        }
        Cmd::Bench {
            execs,
            connects,
            rounds,
            resume_only,
        } => {
            bootstrap::toolchain()?;
            bench::run(bench::Params {
                execs,
                connects,
                rounds,
                resume_only,
            })
        }
        Cmd::Vm => {
            bootstrap::toolchain()?;
            let results = vm::tier()?;
            if results.iter().any(|r| !r.ok) {
                anyhow::bail!("the VM tier failed");
            }
            Ok(())
        }
        Cmd::Demo => {
            bootstrap::toolchain()?;
            demo::run()
        }
        Cmd::Lint => {
            bootstrap::toolchain()?;
            lint::run()
        }
        Cmd::Bootstrap => bootstrap::toolchain(),
    }
}

fn run_daemon(config: Option<std::path::PathBuf>, args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    if !util::is_root() {
        anyhow::bail!(
            "the daemon loads kernel programs and needs root: run `sudo -E cargo xtask run`"
        );
    }
    let bin = util::workspace_root().join("target/release/airlock");
    let mut cmd = std::process::Command::new(&bin);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("daemon").args(args);
    eprintln!("xtask: exec {cmd:?}");
    Err(anyhow::anyhow!("exec {}: {}", bin.display(), cmd.exec()))
}
