//! Userspace half of `agent-ebpf/src/lsm.rs`: BPF LSM programs, attached
//! when the kernel runs BPF LSM and accepts them.

use airlock_common::{MODE_LSM_CONNECT, MODE_LSM_EXEC};
use aya::{
    Btf, Ebpf,
    maps::Array,
    programs::{Lsm, TracePoint},
};

use super::{Attached, SensorError, pins::LinkPins};

/// Attaches `lsm_socket_connect` and tells the cgroup hook to leave hold
/// rules to it. Returns why not when the kernel refuses (no BPF LSM, or LSM
/// programs refused as on the development host): the caller falls back.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: &LinkPins,
    attached: &mut Attached,
) -> Result<(), String> {
    let name = "lsm_socket_connect";
    let prog = lsm_program(ebpf, name)?;
    prog.load("socket_connect", btf)
        .map_err(|e| SensorError::program(name, e).to_string())?;
    let id = prog
        .attach()
        .map_err(|e| SensorError::program(name, e).to_string())?;
    keep(pins, name, prog.take_link(id))?;
    set_mode(ebpf, MODE_LSM_CONNECT)?;
    attached.push(format!("{name} (lsm/socket_connect)"));
    Ok(())
}

/// Attaches `lsm_bprm_creds_for_exec` with the argv stash tracepoints, then
/// tells sched_process_exec to leave exec rules to it.
pub fn attach_exec(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: &LinkPins,
    attached: &mut Attached,
) -> Result<(), String> {
    let name = "lsm_bprm_creds_for_exec";
    lsm_program(ebpf, name)?
        .load("bprm_creds_for_exec", btf)
        .map_err(|e| SensorError::program(name, e).to_string())?;
    for (tp_name, tp) in [
        ("exec_sys_enter_execve", "sys_enter_execve"),
        ("exec_sys_enter_execveat", "sys_enter_execveat"),
    ] {
        let t: &mut TracePoint = ebpf
            .program_mut(tp_name)
            .ok_or_else(|| format!("eBPF object has no program {tp_name}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        t.load()
            .map_err(|e| SensorError::program(tp_name, e).to_string())?;
        let id = t
            .attach("syscalls", tp)
            .map_err(|e| SensorError::program(tp_name, e).to_string())?;
        keep(pins, tp_name, t.take_link(id))?;
        attached.push(format!("{tp_name} (tracepoint/syscalls/{tp})"));
    }
    let prog = lsm_program(ebpf, name)?;
    let id = prog
        .attach()
        .map_err(|e| SensorError::program(name, e).to_string())?;
    keep(pins, name, prog.take_link(id))?;
    set_mode(ebpf, MODE_LSM_EXEC)?;
    attached.push(format!("{name} (lsm/bprm_creds_for_exec)"));
    Ok(())
}

/// Attaches `lsm_file_open`, which holds candidate opens (see
/// `files::set_file_candidates`); with no candidates it records nothing.
pub fn attach_file(
    ebpf: &mut Ebpf,
    btf: &Btf,
    pins: &LinkPins,
    attached: &mut Attached,
) -> Result<(), String> {
    let name = "lsm_file_open";
    let prog = lsm_program(ebpf, name)?;
    prog.load("file_open", btf)
        .map_err(|e| SensorError::program(name, e).to_string())?;
    let id = prog
        .attach()
        .map_err(|e| SensorError::program(name, e).to_string())?;
    keep(pins, name, prog.take_link(id))?;
    attached.push(format!("{name} (lsm/file_open)"));
    Ok(())
}

/// Pins a link just taken from its program.
fn keep<L>(
    pins: &LinkPins,
    name: &'static str,
    link: Result<L, aya::programs::ProgramError>,
) -> Result<(), String>
where
    L: TryInto<aya::programs::links::FdLink>,
    L::Error: std::error::Error,
{
    let link = link.map_err(|e| SensorError::program(name, e).to_string())?;
    pins.keep(name, link).map_err(|e| e.to_string())
}

fn lsm_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Lsm, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

/// Turns on a `MODE_*` switch the kernel programs read.
fn set_mode(ebpf: &mut Ebpf, slot: u32) -> Result<(), String> {
    let mut mode: Array<_, u32> =
        Array::try_from(ebpf.map_mut("MODE").ok_or("eBPF object has no map MODE")?)
            .map_err(|e| e.to_string())?;
    mode.set(slot, 1, 0).map_err(|e| e.to_string())
}
