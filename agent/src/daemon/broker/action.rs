//! The action a held record describes, as the policy sees it, and the
//! rule's message for approvers.

use crate::{
    model::{ApprovalRequest, Detail, Protocol, Record},
    policy::{self, Action, ExecAction},
    procfs,
};

/// The action a held record describes, with what the rules look at that
/// the kernel did not send (parent, working directory, set-user-ID bit).
pub(super) fn of(record: &Record) -> Option<Action> {
    match &record.detail {
        Detail::Exec { path, argv, .. } => {
            let mut a = ExecAction::new(path.clone(), argv.clone());
            a.cwd = procfs::cwd(record.process.tgid).map(|p| p.display().to_string());
            a.parent_exe = procfs::exe(record.process.ppid).map(|p| p.display().to_string());
            let full = match &a.cwd {
                Some(cwd) if !path.starts_with('/') => format!("{cwd}/{path}"),
                _ => path.clone(),
            };
            a.setuid = std::fs::metadata(full)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o6000 != 0)
                .unwrap_or(false);
            Some(Action::Exec(a))
        }
        Detail::File { path, write, .. } => Some(Action::File {
            path: path.clone(),
            write: *write,
        }),
        Detail::Net {
            protocol,
            addr: Some(addr),
            port,
            ..
        } => Some(Action::Connect {
            addr: *addr,
            port: *port,
            protocol: match protocol {
                Protocol::Tcp => Some(policy::Protocol::Tcp),
                Protocol::Udp => Some(policy::Protocol::Udp),
                Protocol::Other => None,
            },
        }),
        _ => None,
    }
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
