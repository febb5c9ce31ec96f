//! The policy engine: decisions per second with the shipped packs, and
//! what a watched session's execs pay when the daemon resolves them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use super::{daemon::Daemon, pct};
use crate::util::output;

/// The policy engine: rule evaluations per second with every shipped pack
/// loaded, and the exec latency a watched session pays when all its execs
/// are candidates the daemon resolves without a human, against the same
/// execs when they are not candidates (rounds interleaved).
pub fn run(bin: &Path, actor: &Path, dir: &Path) -> anyhow::Result<()> {
    // Even, so each setup goes first equally often.
    const ROUNDS: usize = 6;
    const N: usize = 400;
    let packs: Vec<PathBuf> = std::fs::read_dir(crate::util::workspace_root().join("policies"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    let out = output(
        Command::new(bin)
            .args(["policy", "bench", "--iterations", "3000000"])
            .args(&packs),
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("policy bench output")?;
    let f = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("no {k} in the policy bench's output: {out}"))
    };
    println!(
        "\npolicy evaluation ({} rules of the {} shipped packs, {} agent commands): {:.0} exec decisions/s ({:.0} ns each); {:.0}/s ({:.0} ns) counting the action's preparation from a record (target >= 1,000,000/s)",
        v["rules"],
        packs.len(),
        v["commands"],
        f("evals_per_s")?,
        f("ns_per_eval")?,
        f("evals_per_s_with_prepare")?,
        f("ns_per_eval_with_prepare")?,
    );

    // The program every exec runs: a copy of /bin/true under its own name,
    // a candidate only under the first policy.
    let prog = dir.join("agent-step");
    std::fs::copy("/bin/true", &prog)?;
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    let write = |exe: &str| {
        std::fs::write(
            policies.join("bench.yaml"),
            format!(
                "pack: bench\nrules:\n  - {{name: never-held, on: exec, when: {{exe: \"{exe}\", args: --never-given}}, decision: hold}}\n"
            ),
        )
    };
    let extra = format!("policy_dirs = [\"{}\"]\n", policies.display());
    let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for k in 0..2 {
            let i = (k + round) % 2;
            write(if i == 0 { "agent-step" } else { "not-this-one" })?;
            let d = Daemon::start_with(bin, dir, &extra)?;
            let out = output(
                d.session(actor)
                    .args(["spawn-each", &N.to_string()])
                    .arg(&prog),
            )?;
            lat[i].extend(
                out.split_whitespace()
                    .filter_map(|t| t.parse::<f64>().ok())
                    .map(|ns| ns / 1e6),
            );
        }
    }
    for l in &mut lat {
        l.sort_by(|a, b| a.total_cmp(b));
        if l.len() < ROUNDS * N {
            bail!("only {} exec timings", l.len());
        }
    }
    println!(
        "exec in a watched session, fork+exec+exit, {} each, {ROUNDS} interleaved rounds:",
        ROUNDS * N
    );
    for (name, l) in [
        ("candidates resolved by the policy", &lat[0]),
        ("not candidates", &lat[1]),
    ] {
        println!(
            "  {name:<34} p50 {:.3} ms  p99 {:.3} ms",
            pct(l, 0.5),
            pct(l, 0.99)
        );
    }
    println!(
        "  added by the round trip to the daemon: p50 {:.3} ms, p99 {:.3} ms (target p99 <= 1 ms)",
        pct(&lat[0], 0.5) - pct(&lat[1], 0.5),
        pct(&lat[0], 0.99) - pct(&lat[1], 0.99)
    );
    Ok(())
}
