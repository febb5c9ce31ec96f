//! `cargo xtask demo`: the whole loop on one screen, inside a Linux 6.12 VM
//! with BPF LSM. The daemon starts with one hold rule and one approver; a
//! scripted agent session runs a deploy; the kernel holds the exec; the
//! approver lists the pending request and approves it over the HTTP API;
//! the deploy runs; the session's record and the decision are printed.
//! It fails unless xtask finds, in what the VM printed, that the held
//! command ran after the approval and the request was recorded approved.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::Value;

use crate::vm::{self, Image};

/// The kernel series the demo boots.
const KERNEL: &str = "6.12";

/// How long the VM may run (it needs about a minute under TCG).
const LIMIT: Duration = Duration::from_secs(300);

/// Bob's approver token, as the demo's config defines it.
const TOKEN: &str = "bob-demo-token-7f3a9c2e51";

/// The daemon's config in the VM, at the default path so every command in
/// the script reads it without `--config`.
const CONFIG: &str = r#"# /etc/airlock/airlock.toml in the demo VM
api_listen = "127.0.0.1:7070"

[[approver]]
name = "bob"
token = "@TOKEN@"
"#;

/// The demo's policy, in the default policy directory.
const POLICY: &str = r#"# /etc/airlock/policies/demo.yaml in the demo VM
pack: demo
description: Production deploys by agents wait for a human.
rules:
  - name: deploys-need-a-human
    on: exec
    when: {exe: /usr/local/bin/deploy}
    decision: hold
    hold:
      timeout: 2m
      on_timeout: deny
      message: "{agent} ({model}) wants to run: {command}"
"#;

/// The command the rule holds: a stand-in for a production deploy.
const DEPLOY: &str = r#"#!/bin/sh
echo "deploy: shipping $1 to production ... done"
"#;

/// The version the agent deploys; its line proves the held exec ran.
const VERSION: &str = "v1.4.2";

/// Runs in the VM. Lines starting `AIRLOCK-DATA TAG ` are machine-readable
/// copies for xtask's checks and are not shown.
const SCRIPT: &str = r##"#!/bin/sh
# The demo, step by step; xtask shows this console.
step() { echo; echo "=== $*"; echo; }
show() { echo "# $*"; "$@"; }
die() {
    echo
    echo "DEMO FAILED: $*"
    echo "--- daemon log (/var/log/airlock.log), last lines:"
    tail -40 /var/log/airlock.log
    exit 1
}
# waits up to $1 seconds for the command after it to succeed
until_ok() {
    end=$(($(date +%s) + $1)); shift
    while ! "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.1
    done
}
data() { sed "s/^/AIRLOCK-DATA $1 /"; }

step "1/5  The airlock daemon starts with one hold rule and one approver"
show cat /etc/airlock/airlock.toml
echo
show cat /etc/airlock/policies/demo.yaml
echo
echo "# airlock daemon &"
airlock daemon >/var/log/airlock.log 2>&1 &
DAEMON=$!
until_ok 60 airlock status || die "the daemon did not answer within 60 s"
echo "# airlock status | grep -E '^(mode|enforces|policy|api):'"
airlock status | grep -E '^(mode|enforces|policy|api):'
show airlock policy explain --exec '/usr/local/bin/deploy @VERSION@' --label agent=demo-agent

step "2/5  An AI agent starts as a watched session: demo-agent, working for alice"
AGENT='echo "agent: reading the repository"; ls /etc >/dev/null; echo "agent: tests pass, deploying @VERSION@"; /usr/local/bin/deploy @VERSION@; echo "agent: deploy exited with status $?"'
echo "# airlock run --label agent=demo-agent --label model=opus-4 --label user=alice -- sh -c '$AGENT' &"
(
    airlock run --label agent=demo-agent --label model=opus-4 --label user=alice -- sh -c "$AGENT" 2>&1
    echo "airlock: run exited with status $?"
) | while IFS= read -r line; do
    echo "$line" >>/tmp/agent.out
    echo "    agent | $line"
done &
RUNNING=$!

# Something waits; or the agent ended without being held (nothing will).
pending() { airlock approvals --pending | grep -q '^ *[0-9]' || ! kill -0 "$RUNNING" 2>/dev/null; }
export AIRLOCK_TOKEN=@TOKEN@
until_ok 60 pending || die "no request was held within 60 s"
kill -0 "$RUNNING" 2>/dev/null || die "the agent ran to its end and nothing was held"

step "3/5  The deploy is held inside execve(2); bob, the approver, looks at what waits"
echo "# export AIRLOCK_TOKEN=...     (bob's token from the config)"
show airlock approvals --pending
ID=$(airlock approvals --pending | awk 'NR == 2 { print $1 }')
PID=$(airlock approvals --pending | awk 'NR == 2 { print $5 }')
echo
echo "# grep State /proc/$PID/status     (the held process)"
grep State "/proc/$PID/status"
sleep 2
grep -q "deploy:" /tmp/agent.out && die "the deploy ran before anyone approved it"
echo "(2 s later the deploy still has not run: it waits for a human)"

step "4/5  Bob approves request $ID over the HTTP API (he is not alice, whose session it is)"
echo "# airlock approve $ID --reason '@VERSION@ passed review'"
airlock approve "$ID" --reason "@VERSION@ passed review"
wait "$RUNNING"

step "5/5  The record: the session, its events, and the decision"
SESSION=$(sed -n 's/^airlock: session //p' /tmp/agent.out | head -1)
[ -n "$SESSION" ] || die "airlock run printed no session id"
ended() { airlock sessions | awk -v s="$SESSION" '$1 == s' | grep -vq running; }
until_ok 10 ended || die "session $SESSION did not end in the store within 10 s"
show airlock sessions
echo
show airlock events "$SESSION"
echo
show airlock approvals
echo
echo "# airlock approvals --json | grep -E '^    \"(id|state|rule|decided_by|reason|outcome)\"'"
airlock approvals --json | grep -E '^    "(id|state|rule|decided_by|reason|outcome)"'
airlock approvals --json | data approvals
airlock events "$SESSION" --json | data events
data agent </tmp/agent.out

grep -q "deploy: shipping @VERSION@" /tmp/agent.out || die "the held deploy never printed its line"
airlock approvals --json | grep -q '"state": "approved"' || die "no request is recorded approved"
kill -TERM "$DAEMON"
wait "$DAEMON"
"##;

pub fn run() -> anyhow::Result<()> {
    let t0 = Instant::now();
    vm::tools()?;
    let _lock = vm::lock()?;
    let (airlock, _actor) = crate::util::build_binaries(false)?;
    let vmlinuz = vm::kernel(KERNEL)?;
    let fill = |s: &str| s.replace("@TOKEN@", TOKEN).replace("@VERSION@", VERSION);
    let initrd = vm::initramfs(&Image {
        name: "demo",
        files: vec![(airlock, PathBuf::from("/bin/airlock"))],
        texts: vec![
            (
                PathBuf::from("/etc/airlock/airlock.toml"),
                fill(CONFIG),
                0o600,
            ),
            (
                PathBuf::from("/etc/airlock/policies/demo.yaml"),
                POLICY.into(),
                0o644,
            ),
            (PathBuf::from("/usr/local/bin/deploy"), DEPLOY.into(), 0o755),
            (PathBuf::from("/demo.sh"), fill(SCRIPT), 0o755),
        ],
        script: "sh /demo.sh\necho \"AIRLOCK-VM: demo rc=$?\"".into(),
    })?;
    eprintln!(
        "\n== demo: booting Debian's Linux {KERNEL} with BPF LSM under QEMU (emulated, about a minute)"
    );
    // Shown: what the script prints, not the firmware before it or the
    // power-off after it (both are in the log, and shown on failure).
    let mut showing = false;
    let mut show = |line: &str| {
        if let Some(k) = line.strip_prefix("AIRLOCK-VM: kernel ") {
            println!("== demo: Linux {k} is up; /init runs the demo");
            showing = true;
        } else if line.starts_with("AIRLOCK-VM: demo rc=") {
            showing = false;
        } else if showing && !line.starts_with("AIRLOCK-DATA ") {
            println!("{line}");
        }
    };
    let console = vm::boot_guest(
        "demo",
        &vm::Guest::with_bpf_lsm(KERNEL),
        &vmlinuz,
        &initrd,
        vm::Machine::default(),
        LIMIT,
        &mut show,
    )?;
    let problems = check(&console);
    if !problems.is_empty() {
        eprintln!("\n== demo: the whole console:");
        console.print_tail(usize::MAX);
        for p in &problems {
            eprintln!("demo: FAILED: {p}");
        }
        bail!(
            "the demo did not complete the loop (console log: {})",
            console.log.display()
        );
    }
    println!(
        "\n== demo: the loop ran: held, approved by bob over the API, completed, recorded ({:.0} s in the VM, {:.0} s in all)",
        console.elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What is wrong with the run, judged from the VM's console; empty if the
/// loop really happened.
fn check(console: &vm::Console) -> Vec<String> {
    let mut problems = Vec::new();
    if !console.finished {
        problems.push("the VM did not reach the end of /init".into());
    }
    if !console.lines.iter().any(|l| l == "AIRLOCK-VM: demo rc=0") {
        problems.push("the script in the VM failed (see DEMO FAILED above)".into());
    }
    let data = |tag: &str| -> String {
        let prefix = format!("AIRLOCK-DATA {tag} ");
        console
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if !problems.is_empty() && !console.lines.iter().any(|l| l.starts_with("AIRLOCK-DATA ")) {
        // The script stopped before its record: nothing more to judge.
        return problems;
    }
    let agent = data("agent");
    let ran = format!("deploy: shipping {VERSION} to production");
    if !agent.lines().any(|l| l.starts_with(&ran)) {
        problems.push(format!(
            "the agent's output lacks the held deploy's {ran:?}"
        ));
    }
    if !agent
        .lines()
        .any(|l| l == "airlock: run exited with status 0")
    {
        problems.push("the agent session did not exit 0".into());
    }
    match serde_json::from_str::<Vec<Value>>(&data("approvals")) {
        Ok(reqs) => {
            let approved = reqs.iter().any(|r| {
                r["state"] == "approved"
                    && r["decided_by"] == "bob"
                    && r["kind"] == "exec"
                    && r["action"]["path"] == "/usr/local/bin/deploy"
                    && r["labels"]["user"] == "alice"
            });
            if !approved {
                problems.push(format!(
                    "no request for /usr/local/bin/deploy is recorded approved by bob: {reqs:?}"
                ));
            }
        }
        Err(e) => problems.push(format!("the approvals JSON did not parse: {e}")),
    }
    match serde_json::from_str::<Vec<Value>>(&data("events")) {
        Ok(events) => {
            let exec = events
                .iter()
                .any(|e| e["kind"] == "exec" && e["detail"]["path"] == "/usr/local/bin/deploy");
            if !exec {
                problems.push("the session's events have no exec of /usr/local/bin/deploy".into());
            }
        }
        Err(e) => problems.push(format!("the events JSON did not parse: {e}")),
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(lines: &[&str]) -> vm::Console {
        vm::Console {
            lines: lines.iter().map(|l| l.to_string()).collect(),
            finished: lines.contains(&"AIRLOCK-VM: done"),
            elapsed: Duration::from_secs(1),
            log: PathBuf::from("/dev/null"),
        }
    }

    const GOOD: &[&str] = &[
        "AIRLOCK-VM: kernel 6.12.0",
        "AIRLOCK-DATA agent airlock: session 1",
        "AIRLOCK-DATA agent deploy: shipping v1.4.2 to production ... done",
        "AIRLOCK-DATA agent airlock: run exited with status 0",
        r#"AIRLOCK-DATA approvals [{"state": "approved", "decided_by": "bob", "kind": "exec","#,
        r#"AIRLOCK-DATA approvals  "action": {"path": "/usr/local/bin/deploy"}, "labels": {"user": "alice"}}]"#,
        r#"AIRLOCK-DATA events [{"kind": "exec", "detail": {"path": "/usr/local/bin/deploy"}}]"#,
        "AIRLOCK-VM: demo rc=0",
        "AIRLOCK-VM: done",
    ];

    #[test]
    fn the_whole_loop_passes() {
        assert_eq!(check(&console(GOOD)), Vec::<String>::new());
    }

    #[test]
    fn a_missing_step_fails() {
        // The held command never ran.
        let lines: Vec<&str> = GOOD
            .iter()
            .copied()
            .filter(|l| !l.contains("deploy: shipping"))
            .collect();
        let p = check(&console(&lines));
        assert!(p.iter().any(|p| p.contains("held deploy")), "{p:?}");
        // Denied instead of approved, and the script said so.
        let denied: Vec<String> = GOOD
            .iter()
            .map(|l| {
                l.replace("\"approved\"", "\"denied\"")
                    .replace("demo rc=0", "demo rc=1")
            })
            .collect();
        let lines: Vec<&str> = denied.iter().map(String::as_str).collect();
        let p = check(&console(&lines));
        assert_eq!(p.len(), 2, "{p:?}");
        // The VM died before the end.
        let p = check(&console(&GOOD[..3]));
        assert!(p.iter().any(|p| p.contains("end of /init")), "{p:?}");
    }
}
