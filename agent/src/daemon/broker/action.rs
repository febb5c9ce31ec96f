//! The action a held record describes, as the policy sees it (for an
//! exec: the file the kernel ran, by every name the policy has for it),
//! and the rule's message for approvers.

use std::path::{Path, PathBuf};

use airlock_common::FileKey;

use crate::{
    exefile::{self, ExeIndex},
    model::{ApprovalRequest, Detail, ExecFile, Protocol, Record},
    policy::{self, Action, ExecAction},
    procfs,
};

/// The action a held record describes, with what the rules look at that
/// the kernel did not send (parent, working directory, the paths of the
/// file that runs), and why the policy sees less than the action if it
/// does. `in_syscall`: held before the exec (BPF LSM), not after it.
pub(super) fn of(
    record: &Record,
    in_syscall: bool,
    exes: &ExeIndex,
) -> Option<(Action, Option<&'static str>)> {
    let action = match &record.detail {
        Detail::Exec {
            path, argv, file, ..
        } => {
            let (a, unseen) = exec(record, path, argv, file, in_syscall, exes);
            return Some((Action::Exec(a), unseen));
        }
        Detail::File { path, write, .. } => Action::File {
            path: path.clone(),
            write: *write,
        },
        Detail::Net {
            protocol,
            addr: Some(addr),
            port,
            ..
        } => Action::Connect {
            addr: *addr,
            port: *port,
            protocol: match protocol {
                Protocol::Tcp => Some(policy::Protocol::Tcp),
                Protocol::Udp => Some(policy::Protocol::Udp),
                Protocol::Other => None,
            },
        },
        _ => return None,
    };
    Some((action, None))
}

/// An exec as the policy sees it: the file the kernel ran (by device and
/// inode), under the path that names it on this host, never the string
/// the caller wrote unchecked. Its aliases: the other names the policy
/// gives that file, a script's interpreter (held after the exec, the
/// kernel reports the interpreter's file), for a multi-call binary the
/// applet its argv picks (by name, and the policy's paths of that name),
/// and for a dynamic loader the program it runs in its place (with the
/// argv from there on).
fn exec(
    record: &Record,
    said: &str,
    argv: &[String],
    file: &ExecFile,
    in_syscall: bool,
    exes: &ExeIndex,
) -> (ExecAction, Option<&'static str>) {
    let (tgid, pid) = (record.process.tgid, record.process.pid);
    let key = FileKey {
        ino: file.ino,
        dev: file.dev,
        _pad: 0,
    };
    let said_at = exefile::said_path(tgid, pid, said);
    let by_said = (!file.unknown)
        .then(|| exefile::true_name(&said_at, key))
        .flatten();
    // After the exec, /proc says what runs; else a path the policy gave
    // for the file (the caller's string may be cut, or renamed since).
    let by_exe = if file.unknown {
        None
    } else if in_syscall {
        exes.paths_of(&key)
            .find_map(|p| exefile::true_name(Path::new(p), key))
    } else {
        exefile::true_name(&PathBuf::from(format!("/proc/{tgid}/exe")), key)
    };
    let (path, mut aliases, mut unseen) = match (by_said, by_exe) {
        (Some(p), _) => (p, Vec::new(), None),
        (None, Some(known)) if in_syscall => (known, Vec::new(), None),
        // After the exec the kernel reports a script's interpreter: the
        // caller's string names the script. (A descriptor closed on exec
        // names nothing now: fexecve.)
        (None, Some(interp)) => match std::fs::canonicalize(&said_at) {
            Ok(script) => (script.display().to_string(), vec![interp], None),
            Err(_) if exefile::is_descriptor(said) => (interp, Vec::new(), None),
            Err(_) => (interp, Vec::new(), Some(GONE)),
        },
        (None, None) if file.unknown => (said.to_string(), Vec::new(), Some(UNKNOWN)),
        (None, None) => (said.to_string(), Vec::new(), Some(GONE)),
    };
    aliases.extend(exes.paths_of(&key).filter(|p| *p != path).map(String::from));
    let mut argv = argv.to_vec();
    let mut path = path;
    let multicall = exes.is_multicall(&key)
        || exefile::is_multicall(&file.name)
        || exefile::is_multicall(file_name(&path));
    if multicall {
        match exefile::applet(&argv) {
            Some((applet, at)) => {
                let applet = applet.to_string();
                // toybox runs `argv[1]` when `argv[0]` is no command it
                // knows: that may be the program too.
                let next = (at == 0 && [file.name.as_str(), file_name(&path)].contains(&"toybox"))
                    .then(|| argv.get(1).map(|w| file_name(w).to_string()))
                    .flatten();
                aliases.retain(|p| file_name(p) == applet);
                aliases.push(applet);
                aliases.extend(next);
                argv.drain(..at);
            }
            None => unseen = unseen.or(Some(MULTICALL)),
        }
    } else if exefile::is_loader(&file.name) || exefile::is_loader(file_name(&path)) {
        match loaded_program(tgid, pid, &argv, exes) {
            Some((program, more, at)) => {
                aliases.push(std::mem::replace(&mut path, program));
                aliases.extend(more);
                argv.drain(..at);
            }
            None => unseen = unseen.or(Some(LOADER)),
        }
    }
    let mut a = ExecAction::new(path, argv);
    a.aliases = aliases;
    a.setuid = file.setuid();
    a.cwd = procfs::cwd(tgid).map(|p| p.display().to_string());
    a.parent_exe = procfs::exe(record.process.ppid).map(|p| p.display().to_string());
    (a, unseen)
}

const UNKNOWN: &str = "the kernel could not read which file runs, so the policy did not see it: refused (fail closed)";
const GONE: &str = "the path it was run by no longer names the file the kernel ran, so the policy did not see which file runs: refused (fail closed)";
const MULTICALL: &str = "a multi-call binary runs an applet its argv does not name, so the policy did not see which program runs: refused (fail closed)";
const LOADER: &str = "a dynamic loader runs a program this reader could not name from its argv, so the policy did not see which program runs: refused (fail closed)";

/// The program a dynamic loader runs: its path, the policy's other names
/// for it, and where in argv its own argv starts.
fn loaded_program(
    tgid: u32,
    pid: u32,
    argv: &[String],
    exes: &ExeIndex,
) -> Option<(String, Vec<String>, usize)> {
    let at = exefile::loader_program(argv)?;
    // A name without `/` the loader looks for in its library path, not
    // where this reader would.
    if !argv[at].contains('/') {
        return None;
    }
    let at_path = exefile::said_path(tgid, pid, &argv[at]);
    let key = exefile::file_key(&at_path)?;
    let path = exefile::true_name(&at_path, key)?;
    let more = exes
        .paths_of(&key)
        .filter(|p| *p != path)
        .map(String::from)
        .collect();
    Some((path, more, at))
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Fills a rule's message: {command}, {exe}, {dest}, {path}, {rule},
/// {pack}, {user} and any session label; unknown names become `?`.
pub(super) fn render(
    template: &str,
    rule: &policy::Rule,
    action: &Action,
    req: &ApprovalRequest,
) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        let value = match (name, action) {
            ("command", Action::Exec(e)) => e.cmdline().to_string(),
            ("exe", Action::Exec(e)) => e.path.clone(),
            ("dest", Action::Connect { .. }) => action.summary(),
            ("path", Action::File { path, .. }) => path.clone(),
            ("rule", _) => rule.id.clone(),
            ("pack", _) => rule.pack.clone(),
            ("user", _) => req.uid.to_string(),
            (label, _) => req.labels.get(label).cloned().unwrap_or_else(|| "?".into()),
        };
        out.push_str(&value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}
