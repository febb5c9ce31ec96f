//! Userspace half of `agent-ebpf/src/net.rs`: cgroup sock_addr hooks on the
//! root cgroup v2 and the connect/accept syscall tracepoints.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, TracePoint},
};

use super::{Attached, SensorError};

const CGROUP_PROGRAMS: &[&str] = &[
    "net_connect4",
    "net_connect6",
    "net_sendmsg4",
    "net_sendmsg6",
];

const TRACEPOINTS: &[(&str, &str)] = &[
    ("net_sys_exit_connect", "sys_exit_connect"),
    ("net_sys_enter_accept4", "sys_enter_accept4"),
    ("net_sys_enter_accept", "sys_enter_accept"),
    ("net_sys_exit_accept4", "sys_exit_accept4"),
    ("net_sys_exit_accept", "sys_exit_accept"),
];

pub fn attach(ebpf: &mut Ebpf, cgroup2: &str, attached: &mut Attached) -> Result<(), SensorError> {
    // Tracepoints first: a connect seen by the cgroup hook waits for its exit.
    for (name, tp) in TRACEPOINTS {
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        prog.load().map_err(|e| SensorError::program(name, e))?;
        prog.attach("syscalls", tp)
            .map_err(|e| SensorError::program(name, e))?;
        attached.push(format!("{name} (tracepoint/syscalls/{tp})"));
    }
    let cgroup = File::open(cgroup2).map_err(|source| SensorError::Cgroup {
        path: cgroup2.into(),
        source,
    })?;
    for name in CGROUP_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        prog.load().map_err(|e| SensorError::program(name, e))?;
        // On 5.7+ aya attaches through bpf_link_create, whose links always
        // coexist with other programs (systemd's, Cilium's) and which refuses
        // any flag: `Single` is the mode that passes flags = 0.
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| SensorError::program(name, e))?;
        attached.push(format!("{name} (cgroup_sock_addr on {cgroup2})"));
    }
    Ok(())
}
