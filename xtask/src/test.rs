//! Every test tier: lint, unit (no root), root tests on this host.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::bail;

use crate::util::{cargo, cargo_bin, in_ci, is_root, workspace_root};

/// Totals over every `cargo test` run, for the closing line.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Tests that said they cannot run here (see `airlock_tests::skip`).
    skipped: Vec<String>,
}

pub fn all(lint: bool) -> anyhow::Result<()> {
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    // Tests list their skips here; the closing line counts them.
    let skip_log = workspace_root().join("target/skipped-tests.log");
    let _ = std::fs::remove_file(&skip_log);
    let skip_env = ("AIRLOCK_SKIP_LOG", skip_log.display().to_string());
    // How long each tier took, for the closing lines.
    let mut times: Vec<(&str, std::time::Duration)> = Vec::new();
    let mut clock = std::time::Instant::now();
    let mut lap = |name: &'static str, times: &mut Vec<(&str, std::time::Duration)>| {
        times.push((name, clock.elapsed()));
        clock = std::time::Instant::now();
    };
    if lint {
        eprintln!("\n== tier: lint (fmt, clippy)");
        if let Err(e) = crate::lint::run() {
            failures.push(format!("lint: {e:#}"));
        }
        lap("lint", &mut times);
    }

    eprintln!("\n== tier: unit (no root)");
    if let Err(e) = cargo_test(
        &[
            "--workspace",
            "--exclude",
            "airlock-ebpf",
            "--exclude",
            "airlock-tests",
        ],
        std::slice::from_ref(&skip_env),
        &mut totals,
    ) {
        failures.push(format!("unit: {e:#}"));
    }
    lap("unit", &mut times);

    eprintln!("\n== tier: root tests on this host (real kernel)");
    if is_root() {
        crate::bootstrap::workload_tools()?;
        cargo(&["build", "-p", "airlock", "-p", "airlock-tests", "--bins"])?;
        let bin = workspace_root().join("target/debug/airlock");
        let env = [("AIRLOCK_BIN", bin.display().to_string()), skip_env.clone()];
        if let Err(e) = cargo_test(
            &["-p", "airlock-tests", "--", "--test-threads", "2"],
            &env,
            &mut totals,
        ) {
            failures.push(format!("root: {e:#}"));
        }
    } else if in_ci() {
        failures.push("root: the root tests need root and CI=true forbids skipping them".into());
    } else {
        eprintln!("SKIPPED root tier: not root (run `sudo -E cargo xtask test`)");
    }

    lap("root", &mut times);
    eprintln!(
        "\n== tier: VM tests (Debian kernels {} with BPF LSM, and 6.12 without, under QEMU)",
        crate::vm::KERNELS.join(", ")
    );
    if is_root() {
        match crate::vm::tier() {
            Ok(results) => {
                for r in results {
                    totals.passed += r.passed;
                    totals.failed += r.failed;
                    totals
                        .skipped
                        .extend(r.skipped.iter().map(|s| format!("vm {}: {s}", r.kernel)));
                    if !r.ok {
                        failures.push(format!("vm: Linux {} failed", r.kernel));
                    }
                }
            }
            Err(e) => failures.push(format!("vm: {e:#}")),
        }
    } else if in_ci() {
        failures.push(
            "vm: the VM tier installs QEMU and needs root; CI=true forbids skipping it".into(),
        );
    } else {
        eprintln!("SKIPPED VM tier: not root");
    }

    lap("vm", &mut times);
    let times: Vec<String> = times
        .iter()
        .map(|(t, d)| format!("{t} {:.0} s", d.as_secs_f64()))
        .collect();
    eprintln!("tier times: {}", times.join(", "));
    if let Ok(text) = std::fs::read_to_string(&skip_log) {
        totals.skipped.extend(text.lines().map(String::from));
    }
    eprintln!();
    for s in &totals.skipped {
        eprintln!("SKIPPED {s}");
    }
    if in_ci() && !totals.skipped.is_empty() {
        failures.push(format!(
            "{} test(s) skipped, and CI=true forbids skipping",
            totals.skipped.len()
        ));
    }
    for f in &failures {
        eprintln!("FAILED {f}");
    }
    println!(
        "tests: {} passed, {} failed, {} skipped, {} ignored",
        totals.passed,
        totals.failed,
        totals.skipped.len(),
        totals.ignored
    );
    if !failures.is_empty() {
        bail!("{} tier(s) failed", failures.len());
    }
    Ok(())
}

/// Runs `cargo test ARGS`, echoing its output and adding up its results.
fn cargo_test(args: &[&str], env: &[(&str, String)], totals: &mut Totals) -> anyhow::Result<()> {
    let mut cmd = Command::new(cargo_bin());
    cmd.arg("test")
        .args(args)
        .current_dir(workspace_root())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |word: &str| {
                    rest.split(';')
                        .find_map(|p| {
                            p.trim().strip_suffix(word).map(|n| {
                                n.trim()
                                    .trim_start_matches("ok. ")
                                    .trim_start_matches("FAILED. ")
                                    .parse::<u64>()
                                    .unwrap_or(0)
                            })
                        })
                        .unwrap_or(0)
                };
                totals.passed += num(" passed");
                totals.failed += num(" failed");
                totals.ignored += num(" ignored");
            }
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cargo test {} failed with {st}", args.join(" "));
    }
    Ok(())
}
