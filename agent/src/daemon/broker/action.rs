//! The action a held record describes, as the policy sees it (for an
//! exec: the file the kernel ran, by every name the policy has for it),
//! and the rule's message for approvers.

use std::path::{Path, PathBuf};

use airlock_common::FileKey;

use crate::{
    exefile::{self, ExeIndex},
    model::{ApprovalRequest, Detail, ExecContext, ExecFile, FileOp, Protocol, Record},
    policy::{self, Action, ExecAction, ExecEnv, UnixAction},
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
        Detail::Unix {
            socket,
            datagram,
            ino,
            dev,
            peer_outside,
            ..
        } => {
            let key = FileKey {
                ino: *ino,
                dev: *dev,
                _pad: 0,
            };
            let aliases = if *ino == 0 {
                Vec::new()
            } else {
                exes.socket_paths(&key)
                    .filter(|p| p != socket)
                    .map(String::from)
                    .collect()
            };
            Action::Unix(UnixAction {
                socket: socket.clone(),
                aliases,
                outside: *peer_outside,
                datagram: *datagram,
            })
        }
        Detail::File {
            path,
            write,
            ino,
            dev,
            dir_ino,
            dir_dev,
            op,
            ..
        } => {
            let file = FileKey {
                ino: *ino,
                dev: *dev,
                _pad: 0,
            };
            let dir = FileKey {
                ino: *dir_ino,
                dev: *dir_dev,
                _pad: 0,
            };
            // The paths the rules know the file by, and the file's name in
            // each path they know its directory by (a directory renamed
            // away, a file made in it since).
            let name = file_name(path);
            let mut aliases: Vec<String> = exes.protected_paths(&file).map(String::from).collect();
            aliases.extend(exes.protected_paths(&dir).map(|d| format!("{d}/{name}")));
            // A name given to another file, or removed, may be a
            // directory's (`mv ~/prep ~/.ssh`, `rmdir`): a write to every
            // file in it, which `*` stands for.
            if *op != FileOp::Open && *op != FileOp::Truncate {
                let inside: Vec<String> = std::iter::once(path.as_str())
                    .chain(aliases.iter().map(String::as_str))
                    .map(|p| format!("{p}/*"))
                    .collect();
                aliases.extend(inside);
            }
            aliases.retain(|p| p != path);
            aliases.sort();
            aliases.dedup();
            Action::File {
                path: path.clone(),
                aliases,
                write: *write,
            }
        }
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
/// the caller wrote unchecked, and what that file runs in its turn. Its
/// aliases: the other names the policy gives that file, a script's
/// interpreter (held after the exec, the kernel reports the interpreter's
/// file), for a dynamic loader the program it runs in its place, and for
/// a multi-call binary (run directly or by a loader) the applet its argv
/// picks (by name, and the policy's paths of that name); argv from where
/// the program that runs takes it.
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
    let (path, mut aliases, mut unseen) = ran(record, said, file, key, in_syscall, exes);
    aliases.extend(exes.paths_of(&key).filter(|p| *p != path).map(String::from));
    let mut argv = argv.to_vec();
    let mut path = path;
    // What runs in the file's place: a loader's program...
    let (mut key, mut name) = (key, file.name.clone());
    let loader = exes.loader_file(&key)
        || [&name, file_name(&path)]
            .iter()
            .any(|n| exefile::is_loader(n));
    if loader {
        match loaded_program(tgid, pid, &argv, exes) {
            Some(program) => {
                aliases.push(std::mem::replace(&mut path, program.path));
                aliases.extend(program.more);
                argv.drain(..program.argv_at);
                (key, name) = (program.key, file_name(&path).to_string());
            }
            None => unseen = unseen.or(Some(LOADER)),
        }
    }
    // ...and a multi-call binary's applet (run directly or by a loader).
    let names = [name.as_str(), file_name(&path)];
    if exes.multicall_file(&key) || names.iter().any(|n| exefile::is_multicall(n)) {
        let busybox = names.iter().any(|n| n.starts_with("busybox"));
        match exefile::applet(&argv, !busybox) {
            Some(applet) => {
                aliases.retain(|p| applet.names.iter().any(|n| n == file_name(p)));
                aliases.extend(applet.names);
                argv.drain(..applet.argv_at);
            }
            None => unseen = unseen.or(Some(MULTICALL)),
        }
    }
    let mut a = ExecAction::new(path, argv);
    a.aliases = aliases;
    a.setuid = file.setuid();
    a.cwd = procfs::cwd(tgid).map(|p| p.display().to_string());
    // The environment the program gets: held inside execve, the one the
    // caller passes (its memory; the kernel checks the new image gets the
    // same); held after the exec, the new image's own.
    let env = if in_syscall {
        procfs::execve_environ(pid, airlock_common::ENV_MAX)
    } else {
        procfs::environ(tgid, airlock_common::ENV_MAX)
    };
    a.env = env.map(|(raw, cut)| ExecEnv::parse(raw, cut));
    a.parent_exe = procfs::exe(record.process.ppid).map(|p| p.display().to_string());
    (a, unseen)
}

/// The path of the file the kernel ran (`key`), other paths of what runs
/// (a script's interpreter), and why the policy sees less if it does.
fn ran(
    record: &Record,
    said: &str,
    file: &ExecFile,
    key: FileKey,
    in_syscall: bool,
    exes: &ExeIndex,
) -> (String, Vec<String>, Option<&'static str>) {
    let (tgid, pid) = (record.process.tgid, record.process.pid);
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
    let cut = matches!(
        record.detail,
        Detail::Exec {
            path_truncated: true,
            ..
        }
    );
    match (by_said, by_exe) {
        (Some(p), _) => (p, Vec::new(), None),
        (None, Some(known)) if in_syscall => (known, Vec::new(), None),
        // After the exec the kernel reports a script's interpreter: the
        // caller's string names the script, if it is whole and one. (A
        // descriptor closed on exec names nothing now: fexecve.)
        (None, Some(interp)) => match std::fs::canonicalize(&said_at) {
            Ok(script) if !cut && is_script(&script) => {
                (script.display().to_string(), vec![interp], None)
            }
            Ok(_) => (interp, Vec::new(), Some(GONE)),
            Err(_) if exefile::is_descriptor(said) => (interp, Vec::new(), None),
            Err(_) => (interp, Vec::new(), Some(GONE)),
        },
        (None, None) if file.unknown => (said.to_string(), Vec::new(), Some(UNKNOWN)),
        (None, None) => (said.to_string(), Vec::new(), Some(GONE)),
    }
}

const UNKNOWN: &str = "the kernel could not read which file runs, so the policy did not see it: refused (fail closed)";
const GONE: &str = "the path it was run by no longer names the file the kernel ran, so the policy did not see which file runs: refused (fail closed)";
const MULTICALL: &str = "a multi-call binary runs an applet its argv does not name, so the policy did not see which program runs: refused (fail closed)";
const LOADER: &str = "a dynamic loader runs a program this reader could not name from its argv, so the policy did not see which program runs: refused (fail closed)";

/// The program a dynamic loader runs.
struct Loaded {
    path: String,
    key: FileKey,
    /// The policy's other names for it.
    more: Vec<String>,
    /// Where in argv its own argv starts.
    argv_at: usize,
}

/// The program a dynamic loader runs, named by its first operand.
fn loaded_program(tgid: u32, pid: u32, argv: &[String], exes: &ExeIndex) -> Option<Loaded> {
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
    Some(Loaded {
        path,
        key,
        more,
        argv_at: at,
    })
}

/// Whether the file at `p` starts with `#!` (the kernel ran its
/// interpreter, not it).
fn is_script(p: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 2];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"#!"
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// What an approver sees of an exec besides its command line: its
/// working directory and environment, the values of the variables that
/// change what programs do, the others by name only.
pub(super) fn context(action: &Action) -> Option<ExecContext> {
    let Action::Exec(e) = action else {
        return None;
    };
    let env = e.env.as_ref();
    Some(ExecContext {
        cwd: e.cwd.clone(),
        env: env
            .map(|env| {
                env.vars
                    .iter()
                    .map(|(k, v)| {
                        let shown = if changes_behaviour(k) {
                            v.clone()
                        } else {
                            "(set)".to_string()
                        };
                        (k.clone(), shown)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        env_complete: env.is_some_and(|env| !env.cut),
    })
}

/// Whether an environment variable can change what a program does (the
/// loader's, proxies, search paths, configuration homes, commands other
/// programs run): its value is shown to approvers. Other values often
/// hold secrets. Names are compared as written, except proxies (curl and
/// others read `https_proxy` as well as `HTTPS_PROXY`).
fn changes_behaviour(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "SHELL",
        "ENV",
        "BASH_ENV",
        "PROMPT_COMMAND",
        "IFS",
        "TMPDIR",
        "GLIBC_TUNABLES",
        "GCONV_PATH",
        "PAGER",
        "EDITOR",
        "VISUAL",
        "NODE_OPTIONS",
        "NODE_PATH",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "RUBYOPT",
        "RUBYLIB",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "SSH_AUTH_SOCK",
        "SSH_ASKPASS",
        "SUDO_ASKPASS",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        "GIT_ASKPASS",
        "GIT_EXEC_PATH",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_PROXY_COMMAND",
        "GIT_PAGER",
        "GIT_EDITOR",
        "GIT_EXTERNAL_DIFF",
    ];
    const PREFIXES: &[&str] = &["LD_", "PYTHON", "GIT_CONFIG", "BASH_FUNC_", "npm_config_"];
    EXACT.contains(&name)
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || name.ends_with("_HOME")
        || name.to_ascii_uppercase().ends_with("_PROXY")
}

/// Fills a rule's message: {command}, {exe}, {dest} (a Unix socket's
/// too), {path} (a file's or a Unix socket's), {rule},
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
            ("dest" | "path", Action::Unix(u)) => u.socket.clone(),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use airlock_common::EventKind;

    use super::*;
    use crate::model::Process;

    #[test]
    fn an_approver_sees_values_that_change_behaviour_and_names_of_the_rest() {
        let mut a = ExecAction::new("/usr/bin/curl".into(), vec!["curl".into()]);
        a.cwd = Some("/home/dev/proj".into());
        a.env = Some(ExecEnv::parse(
            b"LD_PRELOAD=/tmp/x.so\0https_proxy=http://p:3128\0GIT_SSH_COMMAND=ssh -i k\0AWS_SECRET_ACCESS_KEY=s3cr3t\0CARGO_HOME=/c\0".to_vec(),
            false,
        ));
        let c = context(&Action::Exec(a)).unwrap();
        let shown = |k: &str| c.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(shown("LD_PRELOAD"), Some("/tmp/x.so"));
        assert_eq!(shown("https_proxy"), Some("http://p:3128"));
        assert_eq!(shown("GIT_SSH_COMMAND"), Some("ssh -i k"));
        assert_eq!(shown("CARGO_HOME"), Some("/c"));
        assert_eq!(shown("AWS_SECRET_ACCESS_KEY"), Some("(set)"));
        assert_eq!(c.cwd.as_deref(), Some("/home/dev/proj"));
        assert!(c.env_complete);
        let unread = context(&Action::Exec(ExecAction::new("/bin/ls".into(), vec![]))).unwrap();
        assert!(!unread.env_complete && unread.env.is_empty());
    }

    /// An exec by this test process, reported as the file at `ran` (by
    /// device and inode; unknown if None) under the name `name`.
    fn record(ran: Option<&Path>, name: &str) -> (Record, ExecFile) {
        let file = match ran.and_then(exefile::file_key) {
            Some(key) => ExecFile {
                name: name.into(),
                ino: key.ino,
                dev: key.dev,
                mode: 0o100755,
                unknown: false,
            },
            None => ExecFile {
                unknown: true,
                ..ExecFile::default()
            },
        };
        let me = std::process::id();
        let r = Record {
            session_id: 1,
            ts_ns: 0,
            kind: EventKind::Exec,
            process: Process {
                pid: me,
                tgid: me,
                ..Process::default()
            },
            detail: Detail::Exit(crate::model::ExitStatus {
                exit_code: Some(0),
                signal: None,
                core_dumped: false,
            }),
            hold: None,
        };
        (r, file)
    }

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn an_exec_is_the_file_the_kernel_ran_or_refused_as_unseen() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "\x7fELF").unwrap();
        let real = std::fs::canonicalize(&tool).unwrap().display().to_string();
        let none = ExeIndex::default();
        let said = tool.display().to_string();

        // Named by the caller's string, which names that file.
        let (r, f) = record(Some(&tool), "tool");
        let (a, unseen) = exec(&r, &said, &v("tool -x"), &f, true, &none);
        assert_eq!((a.path.as_str(), unseen), (real.as_str(), None));

        // The kernel could not read the file.
        let (r, f) = record(None, "");
        let (_, unseen) = exec(&r, &said, &v("tool"), &f, true, &none);
        assert_eq!(unseen, Some(UNKNOWN));

        // The string names another file now, and nothing else names it.
        let other = dir.path().join("other");
        std::fs::write(&other, "x").unwrap();
        let (r, f) = record(Some(&other), "other");
        let (_, unseen) = exec(&r, &said, &v("tool"), &f, true, &none);
        assert_eq!(unseen, Some(GONE));

        // ... but the policy's index does (held inside execve).
        let o = other.display().to_string();
        let index = ExeIndex::build([&o], [], |_| false);
        let (a, unseen) = exec(&r, &said, &v("tool"), &f, true, &index);
        assert_eq!(unseen, None);
        assert_eq!(
            a.path,
            std::fs::canonicalize(&other).unwrap().display().to_string()
        );
    }

    #[test]
    fn after_the_fact_a_script_is_named_by_the_callers_string_if_it_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("job");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let not_script = dir.path().join("data");
        std::fs::write(&not_script, "hello").unwrap();
        // The kernel reports the interpreter: this test's own binary, as
        // /proc/self/exe says.
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let none = ExeIndex::default();
        let said = script.display().to_string();
        let (r, f) = record(Some(&me), "interp");
        let (a, unseen) = exec(&r, &said, &v("job"), &f, false, &none);
        assert_eq!(unseen, None);
        assert_eq!(
            a.path,
            std::fs::canonicalize(&script)
                .unwrap()
                .display()
                .to_string()
        );
        assert!(
            a.aliases.iter().any(|p| Path::new(p) == me),
            "{:?}",
            a.aliases
        );
        let said = not_script.display().to_string();
        let (_, unseen) = exec(&r, &said, &v("data"), &f, false, &none);
        assert_eq!(unseen, Some(GONE));
    }

    #[test]
    fn a_multicall_binary_or_a_loader_is_judged_by_what_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join("busybox");
        std::fs::write(&bb, "\x7fELF").unwrap();
        let none = ExeIndex::default();
        let said = bb.display().to_string();
        let (r, f) = record(Some(&bb), "busybox");
        let (a, unseen) = exec(&r, &said, &v("busybox wget -q x"), &f, true, &none);
        assert_eq!(unseen, None);
        assert!(a.aliases.contains(&"wget".to_string()), "{:?}", a.aliases);
        assert_eq!(a.argv, v("wget -q x"));
        let (_, unseen) = exec(&r, &said, &v("busybox"), &f, true, &none);
        assert_eq!(unseen, Some(MULTICALL));

        let ld = dir.path().join("ld-linux-x86-64.so.2");
        std::fs::write(&ld, "\x7fELF").unwrap();
        let said = ld.display().to_string();
        let (r, f) = record(Some(&ld), "ld-linux-x86-64.so.2");
        // A program by bare name: the loader's search, not ours.
        let (_, unseen) = exec(&r, &said, &v("ld.so curl"), &f, true, &none);
        assert_eq!(unseen, Some(LOADER));
        // A loader running a multi-call binary runs its applet.
        let prog = bb.display().to_string();
        let cmd = format!("ld.so {prog} wget -q");
        let (a, unseen) = exec(&r, &said, &v(&cmd), &f, true, &none);
        assert_eq!(unseen, None);
        assert_eq!(
            a.path,
            std::fs::canonicalize(&bb).unwrap().display().to_string()
        );
        assert!(a.aliases.contains(&"wget".to_string()), "{:?}", a.aliases);
        assert_eq!(a.argv, v("wget -q"));
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "\x7fELF").unwrap();
        let prog = tool.display().to_string();
        let cmd = format!("ld.so {prog} -x");
        let (a, unseen) = exec(&r, &said, &v(&cmd), &f, true, &none);
        assert_eq!(unseen, None);
        assert_eq!(
            a.path,
            std::fs::canonicalize(&tool).unwrap().display().to_string()
        );
        assert_eq!(a.argv, v(&format!("{prog} -x")));
    }
}
