//! Decoding of the kernel's events into records for the store.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use airlock_common::{
    ARGS_MAX, EventHeader, EventKind, ExecEvent, ExitEvent, FILE_PATH_MAX, FILENAME_MAX, FileEvent,
    ForkEvent, LossReason, NetEvent,
};
use serde::Serialize;

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

/// One recorded action, ready for the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub session_id: u64,
    /// Wall-clock time, ns since the Unix epoch.
    pub ts_ns: i64,
    pub kind: EventKindName,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub detail: Detail,
    /// Set when a rule stopped this action and it waits for a decision.
    #[serde(skip)]
    pub hold: Option<HoldInfo>,
}

/// What the broker needs to resume or refuse a held action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldInfo {
    /// The verdict key's digest (0 for an exec stopped after the fact).
    pub digest: u64,
    /// Held inside the syscall: resumed through a verdict the retried
    /// syscall consumes. Otherwise (exec without BPF LSM) resumed by
    /// SIGCONT and refused by SIGKILL.
    pub in_syscall: bool,
}

/// Serializable wrapper of the kind, by its stable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKindName(pub EventKind);

impl Serialize for EventKindName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

/// What is particular to each kind of event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    Fork {
        child_tgid: u32,
    },
    Exec {
        path: String,
        argv: Vec<String>,
        argv_truncated: bool,
        path_truncated: bool,
        argv_unreadable: bool,
        /// What a rule did: "held" or "denied" (absent when no rule matched).
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<&'static str>,
    },
    Exit(ExitStatus),
    Net {
        protocol: Protocol,
        addr: Option<IpAddr>,
        port: u16,
        ret: Option<i32>,
        /// What a rule did: "held", "denied", "approved" or "refused".
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<&'static str>,
    },
    File {
        /// The opened file's path (only its name when `path_truncated`).
        path: String,
        /// Opened for writing (write-only or read-write).
        write: bool,
        path_truncated: bool,
        /// What happened to the open: "held", "approved", "refused", or
        /// the fail mode's answer with no daemon.
        #[serde(skip_serializing_if = "Option::is_none")]
        enforcement: Option<&'static str>,
    },
    Loss {
        lost_kind: &'static str,
        reason: &'static str,
        count: u64,
    },
    /// The policy's decision on a candidate action (written by the daemon).
    Decision {
        /// "exec", "connect" or "file".
        action: &'static str,
        /// The command line, the destination, or the path.
        target: String,
        /// allow, record, hold or deny.
        decision: &'static str,
        /// The deciding rule (`pack/rule`); absent when none matched.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// A monitor rule's would-be decision: "would hold by pack/rule".
        #[serde(skip_serializing_if = "Option::is_none")]
        monitor: Option<String>,
        /// What the process saw, or the request filed for a hold.
        outcome: String,
        /// From the kernel's event to the decision carried out, in µs.
        decided_in_us: u64,
    },
}

/// How a process ended, decoded from `task->exit_code` (a wait status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

impl ExitStatus {
    pub fn from_wait_status(status: u32) -> Self {
        let sig = (status & 0x7f) as i32;
        if sig == 0 {
            Self {
                exit_code: Some(((status >> 8) & 0xff) as i32),
                signal: None,
                core_dumped: false,
            }
        } else {
            Self {
                exit_code: None,
                signal: Some(sig),
                core_dumped: status & 0x80 != 0,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Other,
}

impl Protocol {
    fn from_ip(p: u16) -> Self {
        match p {
            6 => Self::Tcp,
            17 => Self::Udp,
            _ => Self::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Other => "other",
        }
    }
}

/// Converts the kernel's CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns, measured once.
    offset_ns: i64,
}

impl Clock {
    pub fn now() -> Self {
        let rt = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: rt - mono,
        }
    }

    pub fn fixed(offset_ns: i64) -> Self {
        Self { offset_ns }
    }

    pub fn wall(&self, mono_ns: u64) -> i64 {
        (mono_ns as i64).saturating_add(self.offset_ns)
    }
}

/// Now, in wall-clock ns since the epoch.
pub fn wall_now_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer; these clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
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
    let mut hold = None;
    let detail = match kind {
        EventKind::Fork => Detail::Fork {
            child_tgid: read::<ForkEvent>(bytes, "fork")?.child_tgid,
        },
        EventKind::Exit => Detail::Exit(ExitStatus::from_wait_status(
            read::<ExitEvent>(bytes, "exit")?.exit_code,
        )),
        EventKind::Exec => {
            let (detail, held) = decode_exec(bytes)?;
            hold = held;
            detail
        }
        EventKind::FileOpen => {
            let (detail, held) = decode_file(bytes)?;
            hold = held;
            detail
        }
        EventKind::Connect | EventKind::Accept | EventKind::UdpSend | EventKind::ConnectHeld => {
            let n: NetEvent = read(bytes, "network")?;
            let addr = match n.family as i32 {
                libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                    n.addr[0], n.addr[1], n.addr[2], n.addr[3],
                ))),
                libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(n.addr))),
                _ => None,
            };
            let enforcement = if kind == EventKind::ConnectHeld {
                hold = Some(HoldInfo {
                    digest: n.digest,
                    in_syscall: true,
                });
                Some("held")
            } else if n.flags & airlock_common::NET_NO_DAEMON != 0 {
                Some(if n.flags & airlock_common::NET_DENIED != 0 {
                    NO_DAEMON_DENIED
                } else {
                    NO_DAEMON_ALLOWED
                })
            } else if n.flags & airlock_common::NET_HOLD_UNAVAILABLE != 0 {
                Some("denied: cannot hold here")
            } else if n.flags & airlock_common::NET_DENIED != 0 {
                Some("denied")
            } else if n.flags & airlock_common::NET_APPROVED != 0 {
                Some("approved")
            } else if n.flags & airlock_common::NET_REFUSED != 0 {
                Some("refused")
            } else {
                None
            };
            Detail::Net {
                protocol: Protocol::from_ip(n.protocol),
                addr,
                port: n.port,
                ret: (n.has_ret != 0).then_some(n.ret),
                enforcement,
            }
        }
        EventKind::Loss | EventKind::Decision => return Err(DecodeError::UnknownKind(h.kind)),
    };
    Ok(Record {
        session_id: h.session_id,
        ts_ns: clock.wall(h.ts_ns),
        kind: EventKindName(kind),
        pid: h.pid,
        tgid: h.tgid,
        ppid: h.ppid,
        uid: h.uid,
        euid: h.euid,
        gid: h.gid,
        cgroup_id: h.cgroup_id,
        detail,
        hold,
    })
}

/// A hold rule matched while no daemon was alive, and the fail mode
/// decided (closed / open).
pub const NO_DAEMON_DENIED: &str = "denied: no daemon (fail closed)";
pub const NO_DAEMON_ALLOWED: &str = "allowed: no daemon (fail open)";

/// The exec event is sent cut to the argv bytes used.
fn decode_exec(bytes: &[u8]) -> Result<(Detail, Option<HoldInfo>), DecodeError> {
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
    let held = flags & airlock_common::EXEC_HELD != 0;
    let in_syscall = flags & airlock_common::EXEC_HELD_IN_SYSCALL != 0;
    let enforcement = if held {
        Some("held")
    } else if flags & airlock_common::EXEC_NO_DAEMON != 0 {
        Some(if flags & airlock_common::EXEC_DENIED != 0 {
            NO_DAEMON_DENIED
        } else {
            NO_DAEMON_ALLOWED
        })
    } else if flags & airlock_common::EXEC_REFUSED != 0 {
        Some("refused")
    } else if flags & airlock_common::EXEC_DENIED != 0 {
        Some("denied")
    } else {
        None
    };
    let name_at = std::mem::offset_of!(ExecEvent, filename);
    let path = String::from_utf8_lossy(&bytes[name_at..name_at + filename_len]).into_owned();
    let args = &bytes[fixed..(fixed + args_len).min(bytes.len())];
    let detail = Detail::Exec {
        path,
        argv: split_args(args),
        argv_truncated: flags & airlock_common::EXEC_ARGS_TRUNCATED != 0,
        path_truncated: flags & airlock_common::EXEC_FILENAME_TRUNCATED != 0,
        argv_unreadable: flags & airlock_common::EXEC_ARGS_UNREADABLE != 0,
        enforcement,
    };
    Ok((detail, held.then_some(HoldInfo { digest, in_syscall })))
}

/// A candidate open: held (with what the broker needs), or decided.
fn decode_file(bytes: &[u8]) -> Result<(Detail, Option<HoldInfo>), DecodeError> {
    let f: FileEvent = read(bytes, "file")?;
    let flags = f.flags;
    let held = flags & airlock_common::FILE_HELD != 0;
    let enforcement = if held {
        Some("held")
    } else if flags & airlock_common::FILE_NO_DAEMON != 0 {
        Some(if flags & airlock_common::FILE_DENIED != 0 {
            NO_DAEMON_DENIED
        } else {
            NO_DAEMON_ALLOWED
        })
    } else if flags & airlock_common::FILE_REFUSED != 0 {
        Some("refused")
    } else if flags & airlock_common::FILE_APPROVED != 0 {
        Some("approved")
    } else if flags & airlock_common::FILE_DENIED != 0 {
        Some("denied")
    } else {
        None
    };
    let len = (f.path_len as usize).min(FILE_PATH_MAX);
    let detail = Detail::File {
        path: String::from_utf8_lossy(&f.path[..len]).into_owned(),
        write: flags & airlock_common::FILE_WRITE != 0,
        path_truncated: flags & airlock_common::FILE_PATH_TRUNCATED != 0,
        enforcement,
    };
    Ok((
        detail,
        held.then_some(HoldInfo {
            digest: f.digest,
            in_syscall: true,
        }),
    ))
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

/// A loss record for a session, made from the kernel's counters.
pub fn loss_record(session_id: u64, kind: EventKind, reason: LossReason, count: u64) -> Record {
    Record {
        session_id,
        ts_ns: wall_now_ns(),
        kind: EventKindName(EventKind::Loss),
        pid: 0,
        tgid: 0,
        ppid: 0,
        uid: 0,
        euid: 0,
        gid: 0,
        cgroup_id: 0,
        detail: Detail::Loss {
            lost_kind: kind.name(),
            reason: reason.name(),
            count,
        },
        hold: None,
    }
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
            _pad: 0,
            digest: 0,
            filename: [0; FILENAME_MAX],
            args: [0; ARGS_MAX],
        };
        ev.filename[..8].copy_from_slice(b"/bin/sh\0");
        ev.filename_len = 7;
        let argv = b"sh\0-c\0echo hi\0";
        ev.args[..argv.len()].copy_from_slice(argv);
        ev.args_len = argv.len() as u32;
        let bytes = bytes_of(&ev);
        let cut = &bytes[..std::mem::offset_of!(ExecEvent, args) + argv.len()];
        let r = decode(cut, &Clock::fixed(5)).unwrap();
        assert_eq!(r.ts_ns, 1_005);
        assert_eq!(
            (
                r.session_id,
                r.pid,
                r.tgid,
                r.ppid,
                r.uid,
                r.euid,
                r.gid,
                r.cgroup_id
            ),
            (7, 11, 10, 9, 1000, 0, 100, 42)
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
            }
        );
        assert_eq!(r.hold, None);
    }

    #[test]
    fn exit_status_decoding() {
        assert_eq!(
            ExitStatus::from_wait_status(3 << 8),
            ExitStatus {
                exit_code: Some(3),
                signal: None,
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(9),
            ExitStatus {
                exit_code: None,
                signal: Some(9),
                core_dumped: false
            }
        );
        assert_eq!(
            ExitStatus::from_wait_status(0x80 | 11),
            ExitStatus {
                exit_code: None,
                signal: Some(11),
                core_dumped: true
            }
        );
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
        assert_eq!(r.kind.0.name(), "connect_held");
        let d = airlock_common::net_digest(2, 6, 443, &n.addr);
        assert_eq!(d, airlock_common::net_digest(2, 6, 443, &n.addr), "stable");
        assert_ne!(
            d,
            airlock_common::net_digest(2, 6, 444, &n.addr),
            "bound to the port"
        );
    }

    fn file_event(flags: u32, path: &[u8]) -> FileEvent {
        let mut f = FileEvent {
            header: header(EventKind::FileOpen),
            flags,
            path_len: path.len() as u32,
            digest: 0,
            path: [0; FILE_PATH_MAX],
        };
        f.path[..path.len()].copy_from_slice(path);
        f.digest = airlock_common::file_digest(
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
        assert_eq!(r.kind.0.name(), "file_open");
        assert_eq!(
            r.detail,
            Detail::File {
                path: "/tmp/x/id_test".into(),
                write: false,
                path_truncated: false,
                enforcement: Some("held"),
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
            serde_json::json!({"path": "/tmp/x/id_test", "write": false, "path_truncated": false, "enforcement": "held"})
        );
    }

    #[test]
    fn file_open_outcomes_and_flags() {
        use airlock_common::{
            FILE_APPROVED, FILE_DENIED, FILE_NO_DAEMON, FILE_PATH_TRUNCATED, FILE_REFUSED,
            FILE_WRITE,
        };
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
        assert_eq!(outcome(FILE_APPROVED), (Some("approved"), false, false));
        assert_eq!(
            outcome(FILE_REFUSED | FILE_WRITE),
            (Some("refused"), true, false)
        );
        assert_eq!(
            outcome(FILE_NO_DAEMON | FILE_DENIED),
            (Some(NO_DAEMON_DENIED), false, false)
        );
        assert_eq!(
            outcome(FILE_NO_DAEMON | FILE_PATH_TRUNCATED),
            (Some(NO_DAEMON_ALLOWED), false, true)
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
            airlock_common::file_digest(&g.path, g.path_len as usize, false),
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
