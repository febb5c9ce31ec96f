//! Decoding of the kernel's events (`airlock_common`'s repr(C) structs,
//! as read from the ring buffer) into records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use airlock_common::{
    ARGS_MAX, EXEC_ARGS_TRUNCATED, EXEC_ARGS_UNREADABLE, EXEC_CHANGED, EXEC_DENIED,
    EXEC_FILE_UNKNOWN, EXEC_FILENAME_TRUNCATED, EXEC_HELD, EXEC_HELD_IN_SYSCALL, EXEC_NAME_MAX,
    EXEC_NO_DAEMON, EXEC_REFUSED, EventHeader, EventKind, ExecEvent, ExitEvent, FILE_APPROVED,
    FILE_DENIED, FILE_HELD, FILE_HOLD_UNAVAILABLE, FILE_NO_DAEMON, FILE_PATH_MAX,
    FILE_PATH_TRUNCATED, FILE_REFUSED, FILE_WRITE, FILENAME_MAX, FileEvent, FileId, ForkEvent,
    NET_APPROVED, NET_DENIED, NET_HOLD_UNAVAILABLE, NET_NO_DAEMON, NET_REFUSED, NetEvent,
    UNIX_ABSTRACT, UNIX_DGRAM, UNIX_HELD, UNIX_PATH_MAX, UNIX_PEER_OUTSIDE, UnixEvent,
};

use crate::model::{
    Clock, Detail, Enforcement, ExecFile, ExitStatus, FileOp, HoldInfo, Process, Protocol, Record,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {got} bytes is shorter than its {kind} header ({want} bytes)")]
    Short {
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
}

fn read<T: Copy>(bytes: &[u8], kind: &'static str) -> Result<T, DecodeError> {
    let want = size_of::<T>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            kind,
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked above; T is a repr(C) integer-only type from
    // airlock-common, valid for any bit pattern; read_unaligned copes with
    // the ring buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], clock: &Clock) -> Result<Record, DecodeError> {
    let h: EventHeader = read(bytes, "event")?;
    let kind = EventKind::from_u32(h.kind).ok_or(DecodeError::UnknownKind(h.kind))?;
    let (detail, hold) = match kind {
        EventKind::Fork => (
            Detail::Fork {
                child_tgid: read::<ForkEvent>(bytes, "fork")?.child_tgid,
            },
            None,
        ),
        EventKind::Exit => (
            Detail::Exit(ExitStatus::from_wait_status(
                read::<ExitEvent>(bytes, "exit")?.exit_code,
            )),
            None,
        ),
        EventKind::Exec => decode_exec(bytes)?,
        EventKind::FileOpen => decode_file(bytes)?,
        EventKind::Connect | EventKind::Accept | EventKind::UdpSend | EventKind::ConnectHeld => {
            decode_net(bytes, kind)?
        }
        EventKind::UnixConnect => decode_unix(bytes)?,
        EventKind::Loss | EventKind::Decision => return Err(DecodeError::UnknownKind(h.kind)),
    };
    Ok(Record {
        session_id: h.session_id,
        ts_ns: clock.wall(h.ts_ns),
        kind,
        process: Process {
            pid: h.pid,
            tgid: h.tgid,
            ppid: h.ppid,
            uid: h.uid,
            euid: h.euid,
            gid: h.gid,
            cgroup_id: h.cgroup_id,
        },
        detail,
        hold,
    })
}

type Decoded = (Detail, Option<HoldInfo>);

/// What the kernel's flags say was done: held; with `no_daemon` set, the
/// fail mode's answer (denied when `denied` is set too); else the first of
/// `others` set, in the order given.
fn enforcement(
    flags: u32,
    held: bool,
    (no_daemon, denied): (u32, u32),
    others: &[(u32, Enforcement)],
) -> Option<Enforcement> {
    if held {
        Some(Enforcement::Held)
    } else if flags & no_daemon != 0 {
        Some(Enforcement::no_daemon(flags & denied != 0))
    } else {
        others
            .iter()
            .find(|(bit, _)| flags & bit != 0)
            .map(|(_, e)| *e)
    }
}

fn decode_net(bytes: &[u8], kind: EventKind) -> Result<Decoded, DecodeError> {
    let n: NetEvent = read(bytes, "network")?;
    let addr = match n.family as i32 {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            n.addr[0], n.addr[1], n.addr[2], n.addr[3],
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(n.addr))),
        _ => None,
    };
    let held = kind == EventKind::ConnectHeld;
    let enforcement = enforcement(
        n.flags,
        held,
        (NET_NO_DAEMON, NET_DENIED),
        &[
            // (NET_DENIED alone: no connect deny rule reaches the kernel;
            // it comes with NO_DAEMON or HOLD_UNAVAILABLE.)
            (NET_HOLD_UNAVAILABLE, Enforcement::HoldUnavailable),
            (NET_APPROVED, Enforcement::Approved),
            (NET_REFUSED, Enforcement::Refused),
        ],
    );
    let detail = Detail::Net {
        protocol: Protocol::from_ip(n.protocol),
        addr,
        port: n.port,
        ret: (n.has_ret != 0).then_some(n.ret),
        enforcement,
    };
    let hold = held.then_some(HoldInfo {
        digest: n.digest,
        in_syscall: true,
    });
    Ok((detail, hold))
}

fn decode_unix(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let u: UnixEvent = read(bytes, "unix")?;
    let held = u.flags & UNIX_HELD != 0;
    let enforcement = enforcement(
        u.flags,
        held,
        (NET_NO_DAEMON, NET_DENIED),
        &[
            (NET_HOLD_UNAVAILABLE, Enforcement::HoldUnavailable),
            (NET_APPROVED, Enforcement::Approved),
            (NET_REFUSED, Enforcement::Refused),
        ],
    );
    let name = &u.path[..(u.path_len as usize).min(UNIX_PATH_MAX)];
    let detail = Detail::Unix {
        socket: unix_address(name, u.flags & UNIX_ABSTRACT != 0),
        datagram: u.flags & UNIX_DGRAM != 0,
        ino: u.ino,
        dev: u.dev,
        peer_tgid: (u.peer_tgid != 0).then_some(u.peer_tgid),
        peer_outside: u.flags & UNIX_PEER_OUTSIDE != 0,
        enforcement,
    };
    let hold = held.then_some(HoldInfo {
        digest: u.digest,
        in_syscall: true,
    });
    Ok((detail, hold))
}

/// A Unix socket address as `ss` shows it: a path as bound (without the
/// NULs that end it), or `@` and an abstract address with each NUL shown
/// as `@`.
pub fn unix_address(name: &[u8], is_abstract: bool) -> String {
    if is_abstract {
        let rest = name.get(1..).unwrap_or_default();
        let shown: Vec<u8> = rest
            .iter()
            .map(|&b| if b == 0 { b'@' } else { b })
            .collect();
        format!("@{}", String::from_utf8_lossy(&shown))
    } else {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    }
}

/// The exec event is sent cut to the argv bytes used.
fn decode_exec(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let fixed = std::mem::offset_of!(ExecEvent, args);
    if bytes.len() < fixed {
        return Err(DecodeError::Short {
            kind: "exec",
            got: bytes.len(),
            want: fixed,
        });
    }
    let f = |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let filename_len =
        (f(std::mem::offset_of!(ExecEvent, filename_len)) as usize).min(FILENAME_MAX);
    let args_len = (f(std::mem::offset_of!(ExecEvent, args_len)) as usize).min(ARGS_MAX);
    let flags = f(std::mem::offset_of!(ExecEvent, flags));
    let digest = {
        let o = std::mem::offset_of!(ExecEvent, digest);
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_ne_bytes(b)
    };
    let held = flags & EXEC_HELD != 0;
    let enforcement = enforcement(
        flags,
        held,
        (EXEC_NO_DAEMON, EXEC_DENIED),
        &[
            (EXEC_CHANGED, Enforcement::ChangedDuringExec),
            (EXEC_REFUSED, Enforcement::Refused),
            (EXEC_DENIED, Enforcement::Denied),
        ],
    );
    let text = |at: usize, len: usize| String::from_utf8_lossy(&bytes[at..at + len]).into_owned();
    let path = text(std::mem::offset_of!(ExecEvent, filename), filename_len);
    let name_len = (f(std::mem::offset_of!(ExecEvent, name_len)) as usize).min(EXEC_NAME_MAX);
    let id: FileId = read(&bytes[std::mem::offset_of!(ExecEvent, file)..], "exec file")?;
    let file = ExecFile {
        name: text(std::mem::offset_of!(ExecEvent, name), name_len),
        ino: id.ino,
        dev: id.dev,
        mode: id.mode,
        unknown: flags & EXEC_FILE_UNKNOWN != 0,
    };
    let args = &bytes[fixed..(fixed + args_len).min(bytes.len())];
    let detail = Detail::Exec {
        path,
        argv: split_args(args),
        argv_truncated: flags & EXEC_ARGS_TRUNCATED != 0,
        path_truncated: flags & EXEC_FILENAME_TRUNCATED != 0,
        argv_unreadable: flags & EXEC_ARGS_UNREADABLE != 0,
        enforcement,
        file,
    };
    let hold = held.then_some(HoldInfo {
        digest,
        in_syscall: flags & EXEC_HELD_IN_SYSCALL != 0,
    });
    Ok((detail, hold))
}

/// A candidate open: held (with what the broker needs), or decided.
fn decode_file(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let f: FileEvent = read(bytes, "file")?;
    let flags = f.flags;
    let held = flags & FILE_HELD != 0;
    let enforcement = enforcement(
        flags,
        held,
        (FILE_NO_DAEMON, FILE_DENIED),
        &[
            (FILE_HOLD_UNAVAILABLE, Enforcement::HoldUnavailable),
            (FILE_REFUSED, Enforcement::Refused),
            (FILE_APPROVED, Enforcement::Approved),
            (FILE_DENIED, Enforcement::Denied),
        ],
    );
    let len = (f.path_len as usize).min(FILE_PATH_MAX);
    let detail = Detail::File {
        path: String::from_utf8_lossy(&f.path[..len]).into_owned(),
        write: flags & FILE_WRITE != 0,
        path_truncated: flags & FILE_PATH_TRUNCATED != 0,
        enforcement,
        op: FileOp::from_kernel(f.op),
        ino: f.ino,
        dev: f.dev,
        dir_ino: f.dir_ino,
        dir_dev: f.dir_dev,
    };
    let hold = held.then_some(HoldInfo {
        digest: f.digest,
        in_syscall: true,
    });
    Ok((detail, hold))
}

/// argv as the kernel lays it out: NUL-terminated strings back to back.
pub fn split_args(args: &[u8]) -> Vec<String> {
    let args = args.strip_suffix(&[0]).unwrap_or(args);
    if args.is_empty() {
        return Vec::new();
    }
    args.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: EventKind) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            ts_ns: 1_000,
            session_id: 7,
            pid: 11,
            tgid: 10,
            ppid: 9,
            uid: 1000,
            euid: 0,
            gid: 100,
            cgroup_id: 42,
            ..Default::default()
        }
    }

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn exec_cut_to_args_len() {
        let mut ev = ExecEvent {
            header: header(EventKind::Exec),
            filename_len: 8,
            args_len: 0,
            flags: airlock_common::EXEC_ARGS_TRUNCATED,
            name_len: 4,
            digest: 0,
            file: FileId {
                ino: 12,
                dev: (8 << 20) | 1,
                mode: 0o104755,
            },
            filename: [0; FILENAME_MAX],
            name: [0; EXEC_NAME_MAX],
            args: [0; ARGS_MAX],
        };
        ev.name[..5].copy_from_slice(b"dash\0");
        ev.filename[..8].copy_from_slice(b"/bin/sh\0");
        ev.filename_len = 7;
        let argv = b"sh\0-c\0echo hi\0";
        ev.args[..argv.len()].copy_from_slice(argv);
        ev.args_len = argv.len() as u32;
        let bytes = bytes_of(&ev);
        let cut = &bytes[..std::mem::offset_of!(ExecEvent, args) + argv.len()];
        let r = decode(cut, &Clock::fixed(5)).unwrap();
        assert_eq!(r.ts_ns, 1_005);
        assert_eq!(r.session_id, 7);
        assert_eq!(
            r.process,
            Process {
                pid: 11,
                tgid: 10,
                ppid: 9,
                uid: 1000,
                euid: 0,
                gid: 100,
                cgroup_id: 42
            }
        );
        assert_eq!(
            r.detail,
            Detail::Exec {
                path: "/bin/sh".into(),
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                argv_truncated: true,
                path_truncated: false,
                argv_unreadable: false,
                enforcement: None,
                file: ExecFile {
                    name: "dash".into(),
                    ino: 12,
                    dev: (8 << 20) | 1,
                    mode: 0o104755,
                    unknown: false,
                },
            }
        );
        assert_eq!(r.hold, None);
    }

    #[test]
    fn net_v4_and_v6() {
        let mut n = NetEvent {
            header: header(EventKind::Connect),
            family: libc::AF_INET as u16,
            protocol: 6,
            port: 8080,
            ret: -111,
            has_ret: 1,
            ..Default::default()
        };
        n.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let r = decode(&bytes_of(&n), &Clock::fixed(0)).unwrap();
        assert_eq!(
            r.detail,
            Detail::Net {
                protocol: Protocol::Tcp,
                addr: Some("127.0.0.1".parse().unwrap()),
                port: 8080,
                ret: Some(-111),
                enforcement: None,
            }
        );
        n.family = libc::AF_INET6 as u16;
        n.protocol = 17;
        n.has_ret = 0;
        n.addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        let r = decode(&bytes_of(&n), &Clock::fixed(0)).unwrap();
        assert_eq!(
            r.detail,
            Detail::Net {
                protocol: Protocol::Udp,
                addr: Some("::1".parse().unwrap()),
                port: 8080,
                ret: None,
                enforcement: None,
            }
        );
    }

    #[test]
    fn held_connect_carries_its_hold() {
        let mut n = NetEvent {
            header: header(EventKind::ConnectHeld),
            family: libc::AF_INET as u16,
            protocol: 6,
            port: 443,
            digest: 0xfeed,
            ..Default::default()
        };
        n.addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let r = decode(&bytes_of(&n), &Clock::fixed(0)).unwrap();
        assert_eq!(
            r.hold,
            Some(HoldInfo {
                digest: 0xfeed,
                in_syscall: true,
            })
        );
        assert_eq!(r.kind.name(), "connect_held");
        let d = airlock_common::net_digest(0, 2, 6, 443, &n.addr);
        assert_eq!(
            d,
            airlock_common::net_digest(0, 2, 6, 443, &n.addr),
            "stable"
        );
        assert_ne!(
            d,
            airlock_common::net_digest(0, 2, 6, 444, &n.addr),
            "bound to the port"
        );
    }

    fn file_event(flags: u32, path: &[u8]) -> FileEvent {
        let mut f = FileEvent {
            header: header(EventKind::FileOpen),
            flags,
            path_len: path.len() as u32,
            digest: 0,
            ino: 7,
            dev: 3,
            op: 0,
            dir_ino: 5,
            dir_dev: 3,
            _pad: 0,
            path: [0; FILE_PATH_MAX],
        };
        f.path[..path.len()].copy_from_slice(path);
        f.digest = airlock_common::file_digest(
            0,
            &f.path,
            path.len(),
            flags & airlock_common::FILE_WRITE != 0,
        );
        f
    }

    #[test]
    fn held_file_open_carries_its_hold() {
        let f = file_event(airlock_common::FILE_HELD, b"/tmp/x/id_test");
        let r = decode(&bytes_of(&f), &Clock::fixed(0)).unwrap();
        assert_eq!(r.kind.name(), "file_open");
        assert_eq!(
            r.detail,
            Detail::File {
                path: "/tmp/x/id_test".into(),
                write: false,
                path_truncated: false,
                enforcement: Some(Enforcement::Held),
                op: FileOp::Open,
                ino: 7,
                dev: 3,
                dir_ino: 5,
                dir_dev: 3,
            }
        );
        assert_eq!(
            r.hold,
            Some(HoldInfo {
                digest: f.digest,
                in_syscall: true,
            })
        );
        assert_eq!(
            serde_json::to_value(&r.detail).unwrap(),
            serde_json::json!({"path": "/tmp/x/id_test", "write": false, "path_truncated": false, "enforcement": "held", "ino": 7, "dev": 3, "dir_ino": 5, "dir_dev": 3})
        );
    }

    #[test]
    fn file_open_outcomes_and_flags() {
        let outcome = |flags: u32| {
            let r = decode(&bytes_of(&file_event(flags, b"id_test")), &Clock::fixed(0)).unwrap();
            assert_eq!(r.hold, None, "only held opens go to the broker");
            match r.detail {
                Detail::File {
                    enforcement,
                    write,
                    path_truncated,
                    ..
                } => (enforcement, write, path_truncated),
                d => panic!("{d:?}"),
            }
        };
        assert_eq!(
            outcome(FILE_APPROVED),
            (Some(Enforcement::Approved), false, false)
        );
        assert_eq!(
            outcome(FILE_REFUSED | FILE_WRITE),
            (Some(Enforcement::Refused), true, false)
        );
        assert_eq!(
            outcome(FILE_NO_DAEMON | FILE_DENIED),
            (Some(Enforcement::NoDaemonDenied), false, false)
        );
        assert_eq!(
            outcome(FILE_NO_DAEMON | FILE_PATH_TRUNCATED),
            (Some(Enforcement::NoDaemonAllowed), false, true)
        );
        assert_eq!(outcome(0), (None, false, false));
        // A cut event is an error, not a garbled path.
        let f = file_event(FILE_APPROVED, b"/etc/x");
        assert!(matches!(
            decode(&bytes_of(&f)[..100], &Clock::fixed(0)),
            Err(DecodeError::Short { kind: "file", .. })
        ));
    }

    #[test]
    fn file_digest_binds_path_and_access() {
        let f = file_event(0, b"/root/.ssh/id_ed25519");
        let w = file_event(airlock_common::FILE_WRITE, b"/root/.ssh/id_ed25519");
        let other = file_event(0, b"/root/.ssh/id_rsa");
        assert_ne!(f.digest, w.digest, "bound to the access");
        assert_ne!(f.digest, other.digest, "bound to the path");
        // Bytes past path_len do not count.
        let mut g = f;
        g.path[100] = b'x';
        assert_eq!(
            airlock_common::file_digest(0, &g.path, g.path_len as usize, false),
            f.digest
        );
    }

    #[test]
    fn short_and_unknown_are_errors() {
        assert_eq!(
            decode(&[0u8; 10], &Clock::fixed(0)),
            Err(DecodeError::Short {
                kind: "event",
                got: 10,
                want: 56
            })
        );
        let mut h = header(EventKind::Fork);
        h.kind = 4242;
        assert_eq!(
            decode(&bytes_of(&h), &Clock::fixed(0)),
            Err(DecodeError::UnknownKind(4242))
        );
        let h = header(EventKind::Fork);
        assert_eq!(
            decode(&bytes_of(&h), &Clock::fixed(0)),
            Err(DecodeError::Short {
                kind: "fork",
                got: 56,
                want: 64
            })
        );
    }

    #[test]
    fn split_args_handles_edges() {
        assert_eq!(split_args(b""), Vec::<String>::new());
        assert_eq!(split_args(b"a\0\0b\0"), vec!["a", "", "b"]);
        assert_eq!(split_args(b"cut-with-no-nul"), vec!["cut-with-no-nul"]);
    }
}
