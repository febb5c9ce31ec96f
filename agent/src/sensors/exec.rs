//! Userspace half of `agent-ebpf/src/exec.rs` and `session.rs`: the process
//! lifecycle programs (fork, exec, exit), all BTF tracepoints.

use aya::{Btf, Ebpf, programs::BtfTracePoint};

use super::{Attached, SensorError, pins::LinkPins};

/// (program, kernel tracepoint) pairs; names mirror the kernel side.
const PROGRAMS: &[(&str, &str)] = &[
    ("session_sched_process_fork", "sched_process_fork"),
    ("exec_sched_process_exec", "sched_process_exec"),
    ("session_sched_process_exit", "sched_process_exit"),
];

pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: &LinkPins,
    attached: &mut Attached,
) -> Result<(), SensorError> {
    for (name, tracepoint) in PROGRAMS {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or(SensorError::MissingProgram(name))?
            .try_into()
            .map_err(|e| SensorError::program(name, e))?;
        prog.load(tracepoint, btf)
            .map_err(|e| SensorError::program(name, e))?;
        let id = prog.attach().map_err(|e| SensorError::program(name, e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| SensorError::program(name, e))?;
        pins.keep(name, link)?;
        attached.push(format!("{name} (tp_btf/{tracepoint})"));
    }
    Ok(())
}
