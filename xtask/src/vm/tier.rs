//! The VM test tier: the end-to-end tests on Debian's kernels under QEMU,
//! with BPF LSM active (6.12, 6.1) and without it (6.12 booted with `bpf`
//! left out of `lsm=`, as stock distribution kernels run), from one
//! initramfs holding the `airlock` binary, the test actor and the compiled
//! tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::bail;

use super::{Guest, Image, Machine, boot_guest, initramfs, kernel, lock, tools};
use crate::util::{output, workspace_root};

/// Kernel series tested, newest package of each from Debian's archive.
pub const KERNELS: &[&str] = &["6.12", "6.1"];

/// One boot of the tier.
#[derive(Clone, Copy, Debug)]
struct Boot {
    /// What [`BOOTS_ENV`] calls it.
    id: &'static str,
    series: &'static str,
    bpf_lsm: bool,
}

const BOOTS: &[Boot] = &[
    Boot {
        id: "6.12",
        series: "6.12",
        bpf_lsm: true,
    },
    Boot {
        id: "6.1",
        series: "6.1",
        bpf_lsm: true,
    },
    Boot {
        id: "6.12-nolsm",
        series: "6.12",
        bpf_lsm: false,
    },
];

/// Restricts the tier to some boots (comma-separated ids: 6.12, 6.1,
/// 6.12-nolsm).
pub const BOOTS_ENV: &str = "AIRLOCK_VM_KERNELS";
/// Runs only the tests whose name contains this (each test binary's name
/// filter), to try one test without the whole tier.
pub const TESTS_ENV: &str = "AIRLOCK_VM_TESTS";

/// The boots to run: [`BOOTS`], or those [`BOOTS_ENV`] names.
fn boots() -> anyhow::Result<Vec<Boot>> {
    let Ok(want) = std::env::var(BOOTS_ENV) else {
        return Ok(BOOTS.to_vec());
    };
    let want: Vec<&str> = want
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let ids: Vec<&str> = BOOTS.iter().map(|b| b.id).collect();
    if let Some(bad) = want.iter().find(|w| !ids.contains(w)) {
        bail!("{BOOTS_ENV}: {bad} is not one of {}", ids.join(", "));
    }
    Ok(BOOTS
        .iter()
        .copied()
        .filter(|b| want.contains(&b.id))
        .collect())
}

/// The name filter of [`TESTS_ENV`], if set: letters, digits and `_` only,
/// as it goes into the VM's shell script.
fn test_filter() -> anyhow::Result<Option<String>> {
    let Ok(f) = std::env::var(TESTS_ENV) else {
        return Ok(None);
    };
    if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("{TESTS_ENV}: {f:?} must be a non-empty test name part (letters, digits, _)");
    }
    Ok(Some(f))
}

/// Tests too slow under TCG emulation or measured on the host instead
/// (storms and exec-rate thresholds), or that touch no kernel program
/// (policy reloads, the control socket's permissions).
const SKIP: &[&str] = &[
    "storm",
    "tiny_ring",
    "a_thousand_execs",
    "policy_reloads",
    "control_socket_is_for_root",
];

/// Test binaries (by name prefix) not run on a kernel series with BPF LSM,
/// to keep the tier's time down: 6.1 runs the hold, survive, packs and
/// files suites, which record on it throughout; the record suite runs on
/// 6.12 and the host.
const NOT_ON: &[(&str, &str)] = &[("6.1", "record-")];

/// Without BPF LSM: the suites that prove the fallbacks (execs held at
/// sched_process_exec, flagged connects refused, opens not held, and
/// execs identified by file)...
const FALLBACK_SUITES: &[&str] = &["hold-", "files-", "identity-", "egress-"];
/// ...but not the tests of a connect held inside the syscall, which these
/// kernels (no BPF LSM, cgroup hook before 6.18) cannot do.
const FALLBACK_SKIP: &[&str] = &[
    "multi_threaded_process_is_held_and_resumed_whole",
    "connect_rewritten_while_held_is_held_again",
    "approval_of_an_attempt_never_made_does_not_cover_a_later_one",
    "a_held_datagram_flow_waits_for_one_approval",
    "a_reload_revokes_an_approved_datagram_flow",
    "a_flow_decision_is_not_inherited_by_a_reused_pid",
];

/// How much slower the emulated guest is than the host, for the tests'
/// deadlines (`AIRLOCK_TIME_SCALE`).
const TIME_SCALE: u32 = 4;

/// How long one VM may run before it is killed.
const VM_LIMIT: Duration = Duration::from_secs(900);

/// The machine every boot runs on: one vCPU, so no vCPU can execute
/// kernel text another is patching (QEMU 7.2's multi-threaded TCG let a
/// guest with two hit a stale int3 while programs attached: 1 crash in 4
/// tier boots measured on 2026-12-02, in `syscall_trace_enter`), and the
/// initramfs unpacked before the initcalls (see [`Guest::sync_initramfs`]).
/// Measured the same day, side by side: the 6.12 boot took 239 s on one
/// vCPU and 253 s on two, so the second buys nothing.
const FIRST: (Machine, bool) = (
    Machine {
        cpus: 1,
        icount_shift: None,
    },
    true,
);
/// The machine a boot whose guest crashed with the known int3 is booted
/// again on (the same: were it seen on one vCPU, it would have another
/// cause worth a second look, and the tier still gets its run).
const RETRY: (Machine, bool) = FIRST;

/// Sets the vCPUs of the first machine (to measure another one).
pub const CPUS_ENV: &str = "AIRLOCK_VM_CPUS";

/// [`FIRST`], or with the vCPUs [`CPUS_ENV`] names.
fn first() -> anyhow::Result<(Machine, bool)> {
    let Ok(n) = std::env::var(CPUS_ENV) else {
        return Ok(FIRST);
    };
    let cpus: u32 = n
        .parse()
        .ok()
        .filter(|c| (1..=2).contains(c))
        .ok_or_else(|| anyhow::anyhow!("{CPUS_ENV}: {n:?} is not 1 or 2"))?;
    Ok((Machine { cpus, ..FIRST.0 }, FIRST.1))
}

/// The outcome of one boot.
pub struct VmResult {
    /// The boot and the guest's kernel release.
    pub kernel: String,
    pub passed: u64,
    pub failed: u64,
    pub ok: bool,
    /// The guest kernel's own crash line (an Oops or a panic), if any.
    pub crashed: Option<String>,
    /// Tests that said they could not run there.
    pub skipped: Vec<String>,
}

/// Whether a crash line is the known one: an int3 trap in kernel text that
/// another vCPU was patching, which QEMU's multi-threaded TCG lets happen
/// (not our code; avoided with one vCPU).
fn known_crash(console: &[String]) -> bool {
    console.iter().any(|l| l.contains("Oops: int3"))
}

/// The compiled end-to-end test binaries (built if needed).
pub fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let out = output(
        Command::new(crate::util::cargo_bin())
            .args([
                "test",
                "-p",
                "airlock-tests",
                "--no-run",
                "--message-format=json",
            ])
            .current_dir(workspace_root()),
    )?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if is_test && let Some(exe) = v["executable"].as_str() {
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        bail!("cargo built no end-to-end test binary");
    }
    Ok(bins)
}

/// The /init script of one suite: a warm-up (one daemon start and unload,
/// so the first test does not pay for cold caches), then every test binary
/// `run` allows, one test at a time (the emulated CPUs are the bottleneck:
/// running binaries side by side made every daemon start slower and the
/// run no shorter), then the skipped tests, the LSM list and the kernel
/// log. With `filter`, only the tests whose name contains it.
fn suite_script(tests: &[String], skip: &[&str], not_on: &str, filter: Option<&str>) -> String {
    let mut args: Vec<String> = skip.iter().map(|s| format!("--skip {s}")).collect();
    args.extend(filter.map(String::from));
    format!(
        r#"export CI=true AIRLOCK_BIN=/bin/airlock RUST_BACKTRACE=0 AIRLOCK_SKIP_LOG=/tmp/skipped AIRLOCK_TIME_SCALE={TIME_SCALE}
echo "AIRLOCK-VM: expect BPF LSM: ${{AIRLOCK_EXPECT_LSM:-unset}}"
{WARM_UP}
for t in {tests}; do
    case "$(uname -r | cut -d. -f1,2)/$t" in
    {not_on}) echo "AIRLOCK-VM: $t not run on this kernel"; continue;;
    esac
    /tests/$t --test-threads 1 {args}
    echo "AIRLOCK-VM: $t rc=$?"
done
if [ -f /tmp/skipped ]; then
    while read -r l; do echo "AIRLOCK-VM: skipped $l"; done < /tmp/skipped
fi
echo "AIRLOCK-VM: lsm $(cat /sys/kernel/security/lsm 2>/dev/null)"
echo "AIRLOCK-VM: dmesg follows"
dmesg | tail -40"#,
        tests = tests.join(" "),
        args = args.join(" "),
    )
}

/// One daemon start and stop before the tests, timed.
const WARM_UP: &str = r#"mkdir -p /tmp/warm/policies
printf 'data_dir = "/tmp/warm/data"\nsocket_path = "/tmp/warm/airlock.sock"\npin_dir = "/sys/fs/bpf/airlock-warm"\napi_listen = "127.0.0.1:0"\npolicy_dirs = ["/tmp/warm/policies"]\n' > /tmp/warm/airlock.toml
w0=$(date +%s)
/bin/airlock --config /tmp/warm/airlock.toml daemon 2>/tmp/warm/log &
wpid=$!
n=0
until /bin/airlock --config /tmp/warm/airlock.toml status >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 600 ] && break; sleep 0.5
done
kill -TERM $wpid; wait $wpid
/bin/airlock --config /tmp/warm/airlock.toml unload >/dev/null 2>&1
if [ $n -gt 600 ]; then echo "AIRLOCK-VM: warm-up failed"; cat /tmp/warm/log; else echo "AIRLOCK-VM: warm-up: a daemon started and stopped in $(( $(date +%s) - w0 )) s"; fi"#;

/// Boots one kernel with the test image and adds up the results.
fn run_tests(
    boot: Boot,
    vmlinuz: &Path,
    initrd: &Path,
    (machine, sync_initramfs): (Machine, bool),
) -> anyhow::Result<(VmResult, Vec<String>)> {
    let what = if boot.bpf_lsm {
        "with BPF LSM"
    } else {
        "without BPF LSM"
    };
    eprintln!(
        "\n== VM: Linux {} ({}) {what}, {} vCPU",
        boot.series,
        vmlinuz.display(),
        machine.cpus
    );
    let guest = Guest {
        bpf_lsm: boot.bpf_lsm,
        sync_initramfs,
        env: vec![
            (
                "AIRLOCK_EXPECT_LSM".into(),
                u8::from(boot.bpf_lsm).to_string(),
            ),
            (
                "AIRLOCK_SUITE".into(),
                if boot.bpf_lsm { "lsm" } else { "fallback" }.into(),
            ),
        ],
        log_name: boot.id.into(),
    };
    let mut print = |line: &str| {
        if let Some(rest) = line.strip_prefix("AIRLOCK-VM: ") {
            eprintln!("vm {}: {rest}", boot.id);
        }
    };
    let console = boot_guest(
        "tests", &guest, vmlinuz, initrd, machine, VM_LIMIT, &mut print,
    )?;
    let mut result = VmResult {
        kernel: boot.id.to_string(),
        passed: 0,
        failed: 0,
        ok: console.finished,
        crashed: console
            .lines
            .iter()
            .find(|l| l.contains("Oops:") || l.contains("Kernel panic"))
            .cloned(),
        skipped: Vec::new(),
    };
    let mut runs = 0;
    for line in &console.lines {
        if let Some(rest) = line.strip_prefix("AIRLOCK-VM: ") {
            if let Some(k) = rest.strip_prefix("kernel ") {
                result.kernel = format!("{} ({k} {what})", boot.id);
            }
            if let Some(s) = rest.strip_prefix("skipped ") {
                result.skipped.push(s.to_string());
            }
            if rest == "warm-up failed" {
                result.ok = false;
            }
            if let Some((_, rc)) = rest.split_once(" rc=") {
                runs += 1;
                if rc != "0" {
                    result.ok = false;
                }
            }
        } else if let Some(r) = line.strip_prefix("test result: ") {
            let num = |w: &str| {
                r.split(';')
                    .find_map(|p| p.trim().strip_suffix(w))
                    .and_then(|n| n.rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            result.passed += num(" passed");
            result.failed += num(" failed");
        }
    }
    if runs == 0 || result.crashed.is_some() {
        result.ok = false;
    }
    eprintln!(
        "vm {}: {} passed, {} failed, {} skipped in {:.0} s{}",
        boot.id,
        result.passed,
        result.failed,
        result.skipped.len(),
        console.elapsed.as_secs_f64(),
        if result.ok {
            String::new()
        } else {
            format!(
                " -- FAILED; console log (tests and kernel) at {}",
                console.log.display()
            )
        }
    );
    if !result.ok {
        console.print_tail(200);
    }
    Ok((result, console.lines))
}

/// The whole tier: tools, kernels, one initramfs, one boot per
/// configuration (and one more on [`RETRY`] for a boot whose guest hit
/// the known crash; any other crash fails the tier).
pub fn tier() -> anyhow::Result<Vec<VmResult>> {
    tools()?;
    let boots = boots()?;
    let filter = test_filter()?;
    let _lock = lock()?;
    eprintln!("xtask: {}", super::qemu_version());
    let (initrd, names) = test_image(filter.as_deref())?;
    let (mut crashes, mut retries) = (0, 0);
    let mut results = Vec::new();
    for boot in boots {
        let vmlinuz = kernel(boot.series)?;
        let (mut r, console) = run_tests(boot, &vmlinuz, &initrd, first()?)?;
        if let Some(crash) = r.crashed.clone() {
            crashes += 1;
            if known_crash(&console) {
                eprintln!(
                    "vm {}: the guest kernel crashed ({}): the known int3 of kernel text patching under QEMU's multi-threaded TCG; booting it again on {} vCPU",
                    boot.id,
                    crash.trim(),
                    RETRY.0.cpus
                );
                retries += 1;
                r = run_tests(boot, &vmlinuz, &initrd, RETRY)?.0;
                crashes += usize::from(r.crashed.is_some());
            } else {
                eprintln!(
                    "vm {}: the guest kernel crashed ({}), not the known int3: failing",
                    boot.id,
                    crash.trim()
                );
            }
        }
        results.push(r);
    }
    eprintln!(
        "vm tier: {} boot(s) for {} configuration(s), {crashes} guest crash(es), {retries} retried; test binaries {}",
        results.len() + retries,
        results.len(),
        names.join(" ")
    );
    Ok(results)
}

/// The tier's initramfs: the release `airlock`, the actor, the test
/// binaries, the workload tools, the shipped packs, and one script per
/// suite (`/suite-lsm.sh`, `/suite-fallback.sh`) that /init picks by the
/// kernel's `AIRLOCK_SUITE`.
fn test_image(filter: Option<&str>) -> anyhow::Result<(PathBuf, Vec<String>)> {
    // A release daemon: a debug one took about 30 s to start under
    // emulation, and every test starts at least one.
    let (airlock, _) = crate::util::build_binaries(true)?;
    let tests = test_binaries()?;
    // The tests name the actor by its host path: the debug build's, which
    // `cargo test` built with them (CARGO_BIN_EXE_actor).
    let actor = workspace_root().join("target/debug/actor");
    if !actor.exists() {
        bail!("{} was not built with the tests", actor.display());
    }
    let mut files = vec![
        (airlock, PathBuf::from("/bin/airlock")),
        (actor.clone(), actor),
    ];
    // The shipped-packs session runs real tools and reads the packs where
    // the test binary expects them (the checkout's path).
    for tool in crate::bootstrap::workload_tools()? {
        files.push((tool.clone(), tool));
    }
    let packs = workspace_root().join("policies");
    for e in std::fs::read_dir(&packs)?.filter_map(Result::ok) {
        files.push((e.path(), e.path()));
    }
    // The record suite checks the README's SQL example and kind ids.
    let readme = workspace_root().join("README.md");
    files.push((readme.clone(), readme));
    let mut names = Vec::new();
    for t in tests {
        let name = t
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("test")
            .to_string();
        files.push((t, Path::new("/tests").join(&name)));
        names.push(name);
    }
    let not_on = NOT_ON
        .iter()
        .map(|(k, t)| format!("{k}/{t}*"))
        .collect::<Vec<_>>()
        .join("|");
    let lsm = suite_script(&names, SKIP, &not_on, filter);
    let fallback_tests: Vec<String> = names
        .iter()
        .filter(|n| FALLBACK_SUITES.iter().any(|p| n.starts_with(p)))
        .cloned()
        .collect();
    let fallback_skip: Vec<&str> = SKIP.iter().chain(FALLBACK_SKIP).copied().collect();
    let fallback = suite_script(&fallback_tests, &fallback_skip, "none/none", filter);
    let initrd = initramfs(&Image {
        name: "tests",
        files,
        texts: vec![
            (PathBuf::from("/suite-lsm.sh"), lsm, 0o755),
            (PathBuf::from("/suite-fallback.sh"), fallback, 0o755),
            (PathBuf::from("/suite-soak.sh"), WARM_UP.into(), 0o755),
        ],
        script: "sh /suite-${AIRLOCK_SUITE:-lsm}.sh".into(),
    })?;
    Ok((initrd, names))
}

/// Boots the tier's image `boots` times on `machine` (6.12 with BPF LSM)
/// to an /init that starts and stops one daemon (every program attached,
/// so every static key the programs flip is patched) and powers off;
/// counts the guest crashes. `cargo xtask vm-soak` prints what it measured.
pub fn soak(boots: u32, machine: Machine, sync_initramfs: bool) -> anyhow::Result<()> {
    tools()?;
    let _lock = lock()?;
    let qemu = super::qemu_version();
    let (initrd, _) = test_image(None)?;
    let vmlinuz = kernel("6.12")?;
    let guest = Guest {
        bpf_lsm: true,
        sync_initramfs,
        env: vec![("AIRLOCK_SUITE".into(), "soak".into())],
        log_name: "soak".into(),
    };
    let (mut crashes, mut int3, mut warm) = (0, 0, 0);
    let mut elapsed = Vec::new();
    for i in 1..=boots {
        let console = boot_guest(
            "tests",
            &guest,
            &vmlinuz,
            &initrd,
            machine,
            VM_LIMIT,
            &mut |_| {},
        )?;
        let crash = console
            .lines
            .iter()
            .find(|l| l.contains("Oops:") || l.contains("Kernel panic"));
        let started = console
            .lines
            .iter()
            .any(|l| l.starts_with("AIRLOCK-VM: warm-up: a daemon started"));
        warm += u32::from(started);
        if let Some(c) = crash {
            crashes += 1;
            int3 += u32::from(known_crash(&console.lines));
            let keep = super::work_dir().join(format!("soak-crash-{i}.log"));
            let _ = std::fs::copy(&console.log, &keep);
            eprintln!(
                "soak {i}/{boots}: CRASH {} (console: {})",
                c.trim(),
                keep.display()
            );
        } else {
            eprintln!(
                "soak {i}/{boots}: ok in {:.0} s{}",
                console.elapsed.as_secs_f64(),
                if started {
                    ""
                } else {
                    " (no daemon start seen)"
                }
            );
        }
        elapsed.push(console.elapsed.as_secs_f64());
    }
    elapsed.sort_by(f64::total_cmp);
    println!(
        "vm-soak: {boots} boots of Linux 6.12 with BPF LSM, {} vCPU, initramfs_async={}: {crashes} crashed ({int3} the int3 oops), {warm} started and stopped a daemon; median boot {:.0} s; {qemu}",
        machine.cpus,
        if sync_initramfs { 0 } else { 1 },
        elapsed.get(elapsed.len() / 2).copied().unwrap_or(0.0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_int3_oops_is_retried() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(known_crash(&lines(&[
            "[    5.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
            "[    5.1] RIP: 0010:sched_clock_cpu+0x9/0x40"
        ])));
        assert!(!known_crash(&lines(&[
            "[    9.0] BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "[    9.0] Oops: 0000 [#1] PREEMPT SMP NOPTI"
        ])));
    }

    #[test]
    fn every_boot_has_a_kernel_series_and_a_unique_id() {
        for b in BOOTS {
            assert!(KERNELS.contains(&b.series), "{b:?}");
        }
        let mut ids: Vec<&str> = BOOTS.iter().map(|b| b.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), BOOTS.len());
    }
}
