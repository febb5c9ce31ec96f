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
    /// With --vm: the LSM hooks' cost for unwatched processes, in a Linux
    /// 6.12 VM with BPF LSM.
    Bench {
        /// fork+exec iterations per measured round [default: 2000; 300 with --vm,
        /// 100 with --icount].
        #[arg(long)]
        execs: Option<u32>,
        /// connect/close iterations per measured round [default: 5000; 3000 with
        /// --vm, 1000 with --icount].
        #[arg(long)]
        connects: Option<u32>,
        /// Interleaved rounds per configuration (medians are reported)
        /// [default: 5; 8 with --vm].
        #[arg(long)]
        rounds: Option<u32>,
        /// Only the approval resume latency.
        #[arg(long, conflicts_with = "vm")]
        resume_only: bool,
        /// Only the policy engine: evaluations per second with the shipped
        /// packs, and the exec latency of candidates resolved without a
        /// human.
        #[arg(long, conflicts_with_all = ["vm", "resume_only"])]
        policy_only: bool,
        /// Instead of this host: exec and connect loops in one Linux 6.12 VM
        /// with BPF LSM, with and without the daemon's programs attached
        /// (the loops unwatched), rounds alternating.
        #[arg(long)]
        vm: bool,
        /// With --vm: the guest's clock counts instructions (QEMU -icount)
        /// instead of following the host's, so load from other processes
        /// on the host does not move the figures.
        #[arg(long, requires = "vm")]
        icount: bool,
    },
    /// Only the VM tier: Debian kernels with BPF LSM under QEMU.
    Vm,
    /// Boot the VM tier's image N times to a daemon start and stop, and
    /// count guest kernel crashes (the QEMU text-patching int3).
    VmSoak {
        /// Boots.
        #[arg(long, default_value_t = 20)]
        boots: u32,
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Let the kernel unpack the initramfs beside its initcalls (its
        /// default; the tier passes initramfs_async=0).
        #[arg(long)]
        async_initramfs: bool,
    },
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
            policy_only,
            vm,
            icount,
        } => {
            bootstrap::toolchain()?;
            if vm {
                let (e, c, r) = bench::in_vm::defaults(icount);
                return bench::in_vm::run(&bench::in_vm::Params {
                    execs: execs.unwrap_or(e),
                    connects: connects.unwrap_or(c),
                    rounds: rounds.unwrap_or(r),
                    icount,
                });
            }
            bench::run(bench::Params {
                execs: execs.unwrap_or(2000),
                connects: connects.unwrap_or(5000),
                rounds: rounds.unwrap_or(5),
                resume_only,
                policy_only,
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
        Cmd::VmSoak {
            boots,
            cpus,
            async_initramfs,
        } => {
            bootstrap::toolchain()?;
            let machine = vm::Machine {
                cpus,
                icount_shift: None,
            };
            vm::tier::soak(boots, machine, !async_initramfs)
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
    let mut cmd = daemon_command(&bin, config.as_deref(), args);
    eprintln!(
        "xtask: the shipped packs of {} come first, then the configured policy_dirs; the store, socket, pins and API address are in the daemon's first line (defaults: /var/lib/airlock, /run/airlock/airlock.sock, /sys/fs/bpf/airlock, 127.0.0.1:7070)",
        util::workspace_root().join("policies").display()
    );
    eprintln!("xtask: exec {cmd:?}");
    Err(anyhow::anyhow!("exec {}: {}", bin.display(), cmd.exec()))
}

/// `airlock [--config FILE] daemon --policy-dir <checkout>/policies ARGS`:
/// the daemon as `cargo xtask run` starts it, with the shipped packs.
fn daemon_command(
    bin: &std::path::Path,
    config: Option<&std::path::Path>,
    args: &[String],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("daemon")
        .arg("--policy-dir")
        .arg(util::workspace_root().join("policies"))
        .args(args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packs a `cargo xtask run` daemon loads are the checkout's; the
    /// root test `the_daemon_as_xtask_run_starts_it_enforces_the_shipped_packs`
    /// starts `airlock daemon --policy-dir <checkout>/policies` and checks
    /// they are in force.
    #[test]
    fn xtask_run_starts_the_daemon_with_the_shipped_packs() {
        let cmd = daemon_command(std::path::Path::new("/bin/airlock"), None, &[]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let packs = util::workspace_root().join("policies");
        assert_eq!(
            args,
            ["daemon", "--policy-dir", &packs.display().to_string()]
        );
        assert!(packs.join("privilege.yaml").exists(), "{}", packs.display());
    }
}
