//! Userspace half of the kernel programs' attachment: which program goes
//! on which hook (names mirror `agent-ebpf/src/{exec,session,net,lsm}.rs`),
//! each loaded, attached and its link pinned by one path.

use std::fs::File;

use aya::{
    Btf, Ebpf,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, FEntry, FExit, Lsm, Program, ProgramError,
        TracePoint, links::FdLink,
    },
};

use super::{BpfError, pins::LinkPins};

/// Process lifecycle: BTF tracepoints (program, tracepoint).
const TP_BTF: &[(&str, &str)] = &[
    ("session_sched_process_fork", "sched_process_fork"),
    ("exec_sched_process_exec", "sched_process_exec"),
    ("session_sched_process_exit", "sched_process_exit"),
];

/// Where a syscall's entry or exit is hooked. fentry/fexit on the syscall's
/// wrapper costs only that syscall; a syscall tracepoint, once any is
/// enabled, puts every syscall of every task on the tracing slow path. So
/// the trampolines are preferred and the tracepoints are the fallback for
/// kernels that refuse them (this project's development host does).
struct SyscallHooks {
    trampolines: &'static [Trampoline],
    /// (program, syscalls tracepoint) doing the same.
    tracepoints: &'static [(&'static str, &'static str)],
}

/// One fentry or fexit program and the kernel function it goes on.
#[derive(Clone, Copy)]
struct Trampoline {
    program: &'static str,
    function: &'static str,
    /// fexit (on the return) rather than fentry.
    exit: bool,
    /// Needed for the trampolines to stand in for the tracepoints; an
    /// optional one is skipped where its function does not load (the ia32
    /// and x32 entries without IA-32 emulation or the x32 ABI).
    required: bool,
}

const fn entry(program: &'static str, function: &'static str) -> Trampoline {
    Trampoline {
        program,
        function,
        exit: false,
        required: true,
    }
}

const fn exit(program: &'static str, function: &'static str) -> Trampoline {
    Trampoline {
        exit: true,
        ..entry(program, function)
    }
}

const fn optional(t: Trampoline) -> Trampoline {
    Trampoline {
        required: false,
        ..t
    }
}

/// Connect and accept outcomes.
const NET_HOOKS: SyscallHooks = SyscallHooks {
    trampolines: &[
        exit("net_fexit_connect", "__x64_sys_connect"),
        exit("net_fexit_sendto", "__x64_sys_sendto"),
        exit("net_fexit_sendmsg", "__x64_sys_sendmsg"),
        entry("net_fentry_accept4", "__x64_sys_accept4"),
        entry("net_fentry_accept", "__x64_sys_accept"),
        exit("net_fexit_accept4", "__x64_sys_accept4"),
        exit("net_fexit_accept", "__x64_sys_accept"),
    ],
    tracepoints: &[
        ("net_sys_exit_connect", "sys_exit_connect"),
        ("net_sys_exit_sendto", "sys_exit_sendto"),
        ("net_sys_exit_sendmsg", "sys_exit_sendmsg"),
        ("net_sys_enter_accept4", "sys_enter_accept4"),
        ("net_sys_enter_accept", "sys_enter_accept"),
        ("net_sys_exit_accept4", "sys_exit_accept4"),
        ("net_sys_exit_accept", "sys_exit_accept"),
    ],
};

/// The argv stash the LSM exec hook reads, made at each call's entry (the
/// tracepoints also drop it at the exit: they miss `int $0x80` entries).
const EXEC_STASH: SyscallHooks = SyscallHooks {
    trampolines: &[
        entry("exec_fentry_execve", "__x64_sys_execve"),
        entry("exec_fentry_execveat", "__x64_sys_execveat"),
        optional(entry(
            "exec_fentry_compat_execve",
            "__ia32_compat_sys_execve",
        )),
        optional(entry(
            "exec_fentry_compat_execveat",
            "__ia32_compat_sys_execveat",
        )),
        optional(entry("exec_fentry_x32_execve", "__x64_compat_sys_execve")),
        optional(entry(
            "exec_fentry_x32_execveat",
            "__x64_compat_sys_execveat",
        )),
    ],
    tracepoints: &[
        ("exec_sys_enter_execve", "sys_enter_execve"),
        ("exec_sys_enter_execveat", "sys_enter_execveat"),
        ("exec_sys_exit_execve", "sys_exit_execve"),
        ("exec_sys_exit_execveat", "sys_exit_execveat"),
    ],
};

/// Connect and datagram hooks that can hold (need bpf_send_signal in
/// cgroup programs, Linux 6.18+), and the ones used where the kernel
/// refuses that (they refuse what they cannot hold).
const CONNECT_HOLD: &[&str] = &[
    "net_connect4_hold",
    "net_connect6_hold",
    "net_sendmsg4_hold",
    "net_sendmsg6_hold",
];
const CONNECT_PLAIN: &[&str] = &[
    "net_connect4",
    "net_connect6",
    "net_sendmsg4",
    "net_sendmsg6",
];

/// The program `name`, as the type its hook needs.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|e| BpfError::program(name, e))
}

/// A `map_err` for one program's errors.
fn err(name: &'static str) -> impl Fn(ProgramError) -> BpfError {
    move |e| BpfError::program(name, e)
}

/// The process lifecycle programs (fork, exec, exit).
pub fn process(ebpf: &mut Ebpf, btf: &Btf, links: &mut LinkPins) -> Result<(), BpfError> {
    for &(name, tp) in TP_BTF {
        let p: &mut BtfTracePoint = program(ebpf, name)?;
        p.load(tp, btf).map_err(err(name))?;
        let id = p.attach().map_err(err(name))?;
        links.keep(name, p.take_link(id), format!("{name} (tp_btf/{tp})"))?;
    }
    Ok(())
}

fn syscall_tracepoints(
    ebpf: &mut Ebpf,
    links: &mut LinkPins,
    list: &[(&'static str, &'static str)],
) -> Result<(), BpfError> {
    for &(name, tp) in list {
        let p: &mut TracePoint = program(ebpf, name)?;
        p.load().map_err(err(name))?;
        let id = p.attach("syscalls", tp).map_err(err(name))?;
        links.keep(
            name,
            p.take_link(id),
            format!("{name} (tracepoint/syscalls/{tp})"),
        )?;
    }
    Ok(())
}

/// Attaches `hooks` by trampoline where this kernel loads every required
/// one, else by syscall tracepoint. Nothing is attached before everything
/// is loaded, so the two are never both attached.
fn syscall_hooks(
    ebpf: &mut Ebpf,
    btf: &Btf,
    links: &mut LinkPins,
    hooks: &SyscallHooks,
) -> Result<(), BpfError> {
    let attached =
        load_trampolines(ebpf, btf, hooks.trampolines).and_then(|l| attach_trampolines(ebpf, l));
    match attached {
        Ok(attached) => {
            for (name, link, what) in attached {
                links.keep(name, Ok::<_, ProgramError>(link), what)?;
            }
            Ok(())
        }
        Err(why) => {
            tracing::info!(
                "syscall hooks by tracepoint, which slows every syscall on the host: {why}"
            );
            syscall_tracepoints(ebpf, links, hooks.tracepoints)
        }
    }
}

/// Attaches the loaded trampolines, all or none: their links, unpinned
/// (dropping them detaches), with what each is.
fn attach_trampolines(
    ebpf: &mut Ebpf,
    loaded: Vec<Trampoline>,
) -> Result<Vec<(&'static str, FdLink, String)>, BpfError> {
    let mut attached = Vec::with_capacity(loaded.len());
    for Trampoline {
        program: name,
        function: func,
        exit,
        ..
    } in loaded
    {
        let (link, kind) = if exit {
            let p: &mut FExit = program(ebpf, name)?;
            let id = p.attach().map_err(err(name))?;
            (p.take_link(id).map(FdLink::from), "fexit")
        } else {
            let p: &mut FEntry = program(ebpf, name)?;
            let id = p.attach().map_err(err(name))?;
            (p.take_link(id).map(FdLink::from), "fentry")
        };
        let link = link.map_err(err(name))?;
        attached.push((name, link, format!("{name} ({kind}/{func})")));
    }
    Ok(attached)
}

/// Loads the trampolines; returns the ones to attach, or the first
/// required one this kernel refuses.
fn load_trampolines(
    ebpf: &mut Ebpf,
    btf: &Btf,
    list: &[Trampoline],
) -> Result<Vec<Trampoline>, BpfError> {
    let mut loaded = Vec::with_capacity(list.len());
    for &t in list {
        let (name, func, required) = (t.program, t.function, t.required);
        let done = if t.exit {
            program::<FExit>(ebpf, name)?.load(func, btf)
        } else {
            program::<FEntry>(ebpf, name)?.load(func, btf)
        };
        match done {
            Ok(()) => loaded.push(t),
            Err(e) if required => return Err(BpfError::program(name, e)),
            // Where the function does not exist, neither do its callers
            // (no IA-32 emulation or x32 ABI); said at start all the same.
            Err(e) => {
                tracing::info!("{name} not attached ({func}, an optional syscall entry): {e}")
            }
        }
    }
    Ok(loaded)
}

fn load_cgroup(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), BpfError> {
    for &name in names {
        program::<CgroupSockAddr>(ebpf, name)?
            .load()
            .map_err(err(name))?;
    }
    Ok(())
}

/// The network programs: syscall tracepoints, then the cgroup sock_addr
/// hooks on the root cgroup v2. Returns whether the cgroup hook can hold
/// connects.
pub fn network(
    ebpf: &mut Ebpf,
    btf: &Btf,
    cgroup2: &str,
    links: &mut LinkPins,
) -> Result<bool, BpfError> {
    // Exits first: a connect seen by the cgroup hook waits for its exit.
    syscall_hooks(ebpf, btf, links, &NET_HOOKS)?;
    let cgroup = File::open(cgroup2).map_err(|source| BpfError::Cgroup {
        path: cgroup2.into(),
        source,
    })?;
    let can_hold = match load_cgroup(ebpf, CONNECT_HOLD) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(
                "the cgroup hook cannot hold connects on this kernel ({e}); BPF LSM will if it can, else flagged connects are refused"
            );
            load_cgroup(ebpf, CONNECT_PLAIN)?;
            false
        }
    };
    let programs = if can_hold {
        CONNECT_HOLD
    } else {
        CONNECT_PLAIN
    };
    for &name in programs {
        let p: &mut CgroupSockAddr = program(ebpf, name)?;
        // On 5.7+ aya attaches through bpf_link_create, whose links always
        // coexist with other programs (systemd's, Cilium's) and which refuses
        // any flag: `Single` is the mode that passes flags = 0.
        let id = p
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(err(name))?;
        links.keep(
            name,
            p.take_link(id),
            format!("{name} (cgroup_sock_addr on {cgroup2})"),
        )?;
    }
    Ok(can_hold)
}

/// One BPF LSM program on `hook`. Fails where BPF LSM is not active or
/// the kernel refuses LSM programs (the development host): the caller
/// falls back.
pub fn lsm(
    ebpf: &mut Ebpf,
    btf: &Btf,
    links: &mut LinkPins,
    name: &'static str,
    hook: &str,
) -> Result<(), BpfError> {
    let p: &mut Lsm = program(ebpf, name)?;
    p.load(hook, btf).map_err(err(name))?;
    let id = p.attach().map_err(err(name))?;
    links.keep(name, p.take_link(id), format!("{name} (lsm/{hook})"))
}

/// The exec hold: `lsm_bprm_creds_for_exec` with the argv stash hooks it
/// reads (attached first, so no exec misses its stash).
pub fn lsm_exec(ebpf: &mut Ebpf, btf: &Btf, links: &mut LinkPins) -> Result<(), BpfError> {
    let name = "lsm_bprm_creds_for_exec";
    program::<Lsm>(ebpf, name)?
        .load("bprm_creds_for_exec", btf)
        .map_err(err(name))?;
    syscall_hooks(ebpf, btf, links, &EXEC_STASH)?;
    let p: &mut Lsm = program(ebpf, name)?;
    let id = p.attach().map_err(err(name))?;
    links.keep(
        name,
        p.take_link(id),
        format!("{name} (lsm/bprm_creds_for_exec)"),
    )
}
