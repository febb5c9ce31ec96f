//! Where the time inside the BPF programs goes, from the diagnostic pass
//! with `kernel.bpf_stats_enabled=1`: runs and ns per exec and per connect
//! by program type, from the fdinfo of every program the daemon holds.

use anyhow::Context;

use super::Params;

/// One BPF program's counters at one snapshot.
pub struct Prog {
    snap: u32,
    kind: String,
    id: u64,
    runs: u64,
    ns: u64,
}

pub fn parse(s: &str) -> anyhow::Result<Prog> {
    let field = |k: &str| {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .with_context(|| format!("no {k}"))
    };
    Ok(Prog {
        snap: field("snap")?.parse()?,
        kind: field("type")?.to_string(),
        id: field("id")?.parse()?,
        // Without statistics enabled the kernel omits the counters.
        runs: field("runs")?.parse().unwrap_or(0),
        ns: field("ns")?.parse().unwrap_or(0),
    })
}

/// Runs and time inside the programs per loop operation, by program type,
/// from the pass with BPF statistics on.
pub fn breakdown(progs: &[Prog], diag: &str, p: &Params) -> anyhow::Result<()> {
    let field = |k: &str| -> anyhow::Result<f64> {
        diag.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .with_context(|| format!("no {k} in {diag:?}"))?
            .parse()
            .map_err(anyhow::Error::from)
    };
    println!(
        "\ntime inside the BPF programs, by type (one more pass, daemon on, kernel.bpf_stats_enabled=1; not in the ratios above):"
    );
    println!(
        "  the daemon alone, nothing running, over 5 s: {} clock ticks of 10 ms",
        field("idle_5s_ticks")?
    );
    let overflows = field("connect_overflows")?;
    if overflows > 0.0 {
        println!(
            "  (the connect loop's listener overflowed {overflows} times: its time per connect below includes 1 s SYN retransmits; runs and ns per run do not)"
        );
    }
    for (name, from, ops, loop_ns) in [
        ("exec", 0, p.execs, field("exec_ns")?),
        ("connect", 1, p.connects, field("connect_ns")?),
    ] {
        let ops = f64::from(ops);
        let mut kinds: Vec<&str> = progs.iter().map(|x| x.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let per_op = loop_ns / ops;
        println!(
            "  {name} loop: {:.1} us per {name} with statistics on",
            per_op / 1e3
        );
        let mut total = 0.0;
        for kind in kinds {
            let (mut runs, mut ns) = (0u64, 0u64);
            for a in progs.iter().filter(|x| x.kind == kind && x.snap == from) {
                if let Some(b) = progs.iter().find(|x| x.snap == from + 1 && x.id == a.id) {
                    runs += b.runs.saturating_sub(a.runs);
                    ns += b.ns.saturating_sub(a.ns);
                }
            }
            if runs == 0 {
                continue;
            }
            total += ns as f64 / ops;
            let kind = prog_type(kind);
            println!(
                "    {kind:<18} {:>6.2} runs per {name}, {:>7.0} ns per run, {:>8.2} us per {name}",
                runs as f64 / ops,
                ns as f64 / runs as f64,
                ns as f64 / ops / 1e3
            );
        }
        println!(
            "    {:<18} {:>8.2} us per {name} = {:.2}% of it",
            "all programs",
            total / 1e3,
            100.0 * total / per_op
        );
    }
    Ok(())
}

/// The name of a `bpf_prog_type` number, as fdinfo prints it.
fn prog_type(n: &str) -> String {
    let name = match n {
        "5" => "tracepoint",
        "17" => "raw_tracepoint",
        "18" => "cgroup_sock_addr",
        "26" => "tracing (tp_btf)",
        "29" => "lsm",
        "8" => "cgroup_skb",
        "13" => "sock_ops",
        other => return format!("type {other}"),
    };
    name.to_string()
}
