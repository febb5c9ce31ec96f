//! Userspace half of the kernel programs' attachment: which program goes
//! on which hook (names mirror `agent-ebpf/src/{exec,session,net,lsm}.rs`),
//! each loaded, attached and its link pinned by one path.

use std::fs::File;

use aya::{
    Btf, Ebpf,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, Lsm, Program, ProgramError, TracePoint,
    },
};

use super::{BpfError, pins::LinkPins};

/// Process lifecycle: BTF tracepoints (program, tracepoint).
const TP_BTF: &[(&str, &str)] = &[
    ("session_sched_process_fork", "sched_process_fork"),
    ("exec_sched_process_exec", "sched_process_exec"),
    ("session_sched_process_exit", "sched_process_exit"),
];

/// Connect and accept outcomes: syscall tracepoints (program, tracepoint).
const NET_TRACEPOINTS: &[(&str, &str)] = &[
    ("net_sys_exit_connect", "sys_exit_connect"),
    ("net_sys_exit_sendto", "sys_exit_sendto"),
    ("net_sys_exit_sendmsg", "sys_exit_sendmsg"),
    ("net_sys_enter_accept4", "sys_enter_accept4"),
    ("net_sys_enter_accept", "sys_enter_accept"),
    ("net_sys_exit_accept4", "sys_exit_accept4"),
    ("net_sys_exit_accept", "sys_exit_accept"),
];

/// The argv stash the LSM exec hook reads, made at each call's entry and
/// dropped at its exit (program, tracepoint).
const EXEC_STASH: &[(&str, &str)] = &[
    ("exec_sys_enter_execve", "sys_enter_execve"),
    ("exec_sys_enter_execveat", "sys_enter_execveat"),
    ("exec_sys_exit_execve", "sys_exit_execve"),
    ("exec_sys_exit_execveat", "sys_exit_execveat"),
];

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
pub fn network(ebpf: &mut Ebpf, cgroup2: &str, links: &mut LinkPins) -> Result<bool, BpfError> {
    // Tracepoints first: a connect seen by the cgroup hook waits for its exit.
    syscall_tracepoints(ebpf, links, NET_TRACEPOINTS)?;
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

/// The exec hold: `lsm_bprm_creds_for_exec` with the argv stash
/// tracepoints it reads (loaded first, so no exec misses its stash).
pub fn lsm_exec(ebpf: &mut Ebpf, btf: &Btf, links: &mut LinkPins) -> Result<(), BpfError> {
    let name = "lsm_bprm_creds_for_exec";
    program::<Lsm>(ebpf, name)?
        .load("bprm_creds_for_exec", btf)
        .map_err(err(name))?;
    syscall_tracepoints(ebpf, links, EXEC_STASH)?;
    let p: &mut Lsm = program(ebpf, name)?;
    let id = p.attach().map_err(err(name))?;
    links.keep(
        name,
        p.take_link(id),
        format!("{name} (lsm/bprm_creds_for_exec)"),
    )
}
