//! Resume latency: the time from the approving API call to the held action
//! going on. Requests come from the API's event stream (`GET /v1/stream`,
//! event `request`), which the approver reads like any client, and each
//! held process prints its pid with its stamp, so every latency pairs one
//! request with its own process.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{daemon::Daemon, pct, wall_ns};

/// Held actions per kind.
const N: usize = 100;
const TOKEN: &str = "bench-token-0123456789";

/// One request as the stream announced it, approved at once.
struct Approved {
    id: u64,
    pid: u32,
    kind: String,
    action: serde_json::Value,
    /// The daemon's filing time and when the stream delivered it.
    requested_at: i64,
    seen: u128,
    /// Just before the approving call.
    approved_at: u128,
}

pub fn run(bin: &Path, actor: &Path, dir: &Path) -> anyhow::Result<()> {
    let stamp = dir.join("stamp");
    std::fs::copy(actor, &stamp)?;
    let listener = std::net::TcpListener::bind("127.0.0.3:0")?;
    let target = listener.local_addr()?.to_string();
    // Accept (and drop) the approved connections, so none waits on a full
    // accept queue.
    std::thread::spawn(move || for _ in listener.incoming() {});
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("bench.yaml"),
        format!(
            "pack: bench\nrules:\n  - {{name: exec, on: exec, when: {{exe: \"{}\"}}, decision: hold}}\n  - {{name: connect, on: connect, when: {{dest: 127.0.0.3/32}}, decision: hold}}\n",
            stamp.display()
        ),
    )?;
    // Each held process is a `sh -c` that prints its own pid, then execs
    // the stamp (held at exec; its first act prints the time) or the actor
    // making one connect (held in connect; it prints the time it returned
    // and the errno). One line per hold: "PID NS [ERRNO]".
    let script = dir.join("resume.sh");
    std::fs::write(
        &script,
        "n=$1\nshift\ni=0\nwhile [ \"$i\" -lt \"$n\" ]; do\n    sh -c 'printf \"%s \" \"$$\"; exec \"$@\"' sh \"$@\"\n    i=$((i + 1))\ndone\n",
    )?;
    let extra = format!(
        "policy_dirs = [\"{}\"]\n\n[[approver]]\nname = \"bench\"\ntoken = \"{TOKEN}\"\n",
        policies.display()
    );
    let d = Daemon::start_with(bin, dir, &extra)?;
    let status = d.status()?;
    let api = status["api"]
        .as_str()
        .context("airlock status names no API address")?
        .to_string();
    let rx = approver(&api, 2 * N)?;

    let actor = actor.display().to_string();
    let stamp = stamp.display().to_string();
    let mut report = Vec::new();
    let port = target.rsplit(':').next().unwrap_or_default().to_string();
    for (what, args, needle) in [
        ("exec", vec![stamp.as_str(), "now"], &stamp),
        (
            "connect",
            vec![actor.as_str(), "connect-stamps", "1", &target],
            &port,
        ),
    ] {
        let mut cmd = d.session(Path::new("/bin/sh"));
        cmd.arg(&script).arg(N.to_string()).args(&args);
        let child = cmd.stdout(Stdio::piped()).spawn()?;
        let stamps = stamps(child, what)?;
        let mut approved = Vec::new();
        while approved.len() < N {
            let a = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
                anyhow::anyhow!(
                    "{what}: the stream ended or went quiet after {} of {N} requests",
                    approved.len()
                )
            })??;
            approved.push(a);
        }
        let mut lat = Vec::new();
        let mut delivery = Vec::new();
        for a in &approved {
            if a.kind != what {
                bail!(
                    "request {} is a {} request during the {what} holds",
                    a.id,
                    a.kind
                );
            }
            if !a.action.to_string().contains(needle.as_str()) {
                bail!(
                    "request {} holds {}, not the bench's {what}",
                    a.id,
                    a.action
                );
            }
            let Some(s) = stamps.get(&a.pid) else {
                bail!(
                    "request {} (pid {}) has no stamp: its process never went on",
                    a.id,
                    a.pid
                );
            };
            lat.push((*s as f64 - a.approved_at as f64) / 1e6);
            delivery.push((a.seen as f64 - a.requested_at as f64) / 1e6);
        }
        if stamps.len() != N {
            bail!("{what}: {} stamps for {N} approved requests", stamps.len());
        }
        lat.sort_by(f64::total_cmp);
        delivery.sort_by(f64::total_cmp);
        report.push(format!(
            "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {N} holds (request filed -> on the stream: p50 {:.2} ms)",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
            pct(&delivery, 0.5)
        ));
    }
    println!(
        "\nresume latency, approving API call -> held action proceeds (requests from GET /v1/stream, paired by pid):"
    );
    for r in report {
        println!("  {r}");
    }
    let holds: Vec<&str> = status["can_enforce"]
        .as_array()
        .context("airlock status has no can_enforce")?
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| m.starts_with("exec hold") || m.starts_with("connect hold"))
        .collect();
    println!("  (mechanisms: {})", holds.join("; "));
    Ok(())
}

/// Reads the event stream on a thread and approves each `request` as it
/// arrives; stops after `n` of them (so its connection closes).
fn approver(api: &str, n: usize) -> anyhow::Result<mpsc::Receiver<anyhow::Result<Approved>>> {
    let stream = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()?
        .get(format!("{api}/v1/stream"))
        .bearer_auth(TOKEN)
        .send()?
        .error_for_status()?;
    let client = reqwest::blocking::Client::new();
    let api = api.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut approved = 0;
        let (mut event, mut data) = (String::new(), String::new());
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() {
                if event == "request" {
                    let r = approve(&client, &api, &data);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    approved += 1;
                    if approved == n {
                        return;
                    }
                }
                event.clear();
                data.clear();
            }
        }
    });
    Ok(rx)
}

fn approve(client: &reqwest::blocking::Client, api: &str, data: &str) -> anyhow::Result<Approved> {
    let seen = wall_ns();
    let r: serde_json::Value = serde_json::from_str(data).context("a request event's data")?;
    let number = |k: &str| r[k].as_u64().with_context(|| format!("no {k} in {data}"));
    let id = number("id")?;
    let approved_at = wall_ns();
    let answer = client
        .post(format!("{api}/v1/requests/{id}/approve"))
        .bearer_auth(TOKEN)
        .send()?;
    if !answer.status().is_success() {
        bail!("approving request {id}: {}", answer.status());
    }
    Ok(Approved {
        id,
        pid: number("pid")? as u32,
        kind: r["kind"].as_str().unwrap_or_default().to_string(),
        action: r["action"].clone(),
        requested_at: r["requested_at"]
            .as_i64()
            .with_context(|| format!("no requested_at in {data}"))?,
        seen,
        approved_at,
    })
}

/// The loop's output: pid -> the wall-clock ns its held action went on;
/// a connect must have succeeded.
fn stamps(child: Child, what: &str) -> anyhow::Result<HashMap<u32, u128>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut child = child;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{what}: the holds did not all resolve within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: the loop failed with {}", out.status);
    }
    let mut stamps = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (pid, ns) = match w.as_slice() {
            [pid, ns] | [pid, ns, "0"] => (pid.parse()?, ns.parse()?),
            _ => bail!(
                "{what}: unexpected output {line:?}: each held process prints its pid, then its stamp once it goes on (a pid without a stamp was killed instead of resumed), and a connect must return 0"
            ),
        };
        if stamps.insert(pid, ns).is_some() {
            bail!("{what}: pid {pid} stamped twice");
        }
    }
    Ok(stamps)
}
