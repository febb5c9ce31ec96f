//! Userspace half of `agent-ebpf/src/net.rs`: cgroup sock_addr hooks on the
//! root cgroup v2 and the connect/accept syscall tracepoints.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, TracePoint},
};

use super::{Attached, SensorError, pins::LinkPins};

/// Connect hooks that can hold (need bpf_send_signal in cgroup programs,
/// Linux 6.18+), and the ones used where the kernel refuses that.
const CONNECT_HOLD: &[&str] = &["net_connect4_hold", "net_connect6_hold"];
const CONNECT_PLAIN: &[&str] = &["net_connect4", "net_connect6"];
const SENDMSG: &[&str] = &["net_sendmsg4", "net_sendmsg6"];

const TRACEPOINTS: &[(&str, &str)] = &[
    ("net_sys_exit_connect", "sys_exit_connect"),
    ("net_sys_enter_accept4", "sys_enter_accept4"),
    ("net_sys_enter_accept", "sys_enter_accept"),
    ("net_sys_exit_accept4", "sys_exit_accept4"),
    ("net_sys_exit_accept", "sys_exit_accept"),
];

/// Attaches the network programs; returns whether connects can be held.
pub fn attach(
    ebpf: &mut Ebpf,
    cgroup2: &str,
    pins: &LinkPins,
    attached: &mut Attached,
) -> Result<bool, SensorError> {
    // Tracepoints first: a connect seen by the cgroup hook waits for its exit.
    for (name, tp) in TRACEPOINTS {
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        prog.load().map_err(|e| SensorError::program(name, e))?;
        let id = prog
            .attach("syscalls", tp)
            .map_err(|e| SensorError::program(name, e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| SensorError::program(name, e))?;
        pins.keep(name, link)?;
        attached.push(format!("{name} (tracepoint/syscalls/{tp})"));
    }
    let cgroup = File::open(cgroup2).map_err(|source| SensorError::Cgroup {
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
    let connect = if can_hold {
        CONNECT_HOLD
    } else {
        CONNECT_PLAIN
    };
    for name in connect.iter().chain(SENDMSG) {
        if SENDMSG.contains(name) {
            load_cgroup(ebpf, &[name])?;
        }
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        // On 5.7+ aya attaches through bpf_link_create, whose links always
        // coexist with other programs (systemd's, Cilium's) and which refuses
        // any flag: `Single` is the mode that passes flags = 0.
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| SensorError::program(name, e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| SensorError::program(name, e))?;
        pins.keep(name, link)?;
        attached.push(format!("{name} (cgroup_sock_addr on {cgroup2})"));
    }
    Ok(can_hold)
}

fn load_cgroup(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), SensorError> {
    for name in names {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        prog.load().map_err(|e| SensorError::program(name, e))?;
    }
    Ok(())
}
