//! Field offsets of the kernel structs the programs read, taken from the
//! running kernel's BTF so one object serves every kernel (6.1, 6.12, 6.18).

use airlock_common::KernelOffsets;
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading kernel BTF at {VMLINUX_BTF}: {0}")]
    Read(String),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no field {1}")]
    NoField(String, String),
    #[error("kernel BTF: {0}.{1} is a bitfield")]
    Bitfield(String, String),
}

/// Reads the offsets from the running kernel.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| BtfError::Read(e.to_string()))?;
    offsets_from(&btf)
}

/// Reads the offsets from a parsed BTF.
pub fn offsets_from(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let f = |s: &str, field: &str| field_offset(btf, s, field);
    Ok(KernelOffsets {
        task_pid: f("task_struct", "pid")?,
        task_tgid: f("task_struct", "tgid")?,
        task_real_parent: f("task_struct", "real_parent")?,
        task_exit_code: f("task_struct", "exit_code")?,
        task_mm: f("task_struct", "mm")?,
        task_cred: f("task_struct", "cred")?,
        task_signal: f("task_struct", "signal")?,
        signal_live: f("signal_struct", "live")?,
        mm_arg_start: f("mm_struct", "arg_start")?,
        mm_arg_end: f("mm_struct", "arg_end")?,
        cred_euid: f("cred", "euid")?,
        binprm_filename: f("linux_binprm", "filename")?,
        binprm_interp: f("linux_binprm", "interp")?,
        mm_env_start: f("mm_struct", "env_start")?,
        mm_env_end: f("mm_struct", "env_end")?,
        socket_type: f("socket", "type")?,
        binprm_file: f("linux_binprm", "file")?,
        file_inode: f("file", "f_inode")?,
        inode_mode: f("inode", "i_mode")?,
        file_f_path: f("file", "f_path")?,
        file_f_mode: f("file", "f_mode")?,
        path_dentry: f("path", "dentry")?,
        dentry_d_name: f("dentry", "d_name")?,
        dentry_d_parent: f("dentry", "d_parent")?,
        qstr_name: f("qstr", "name")?,
        inode_i_ino: f("inode", "i_ino")?,
        inode_i_sb: f("inode", "i_sb")?,
        sb_s_dev: f("super_block", "s_dev")?,
        msghdr_msg_name: f("msghdr", "msg_name")?,
        msghdr_msg_flags: f("msghdr", "msg_flags")?,
        task_group_leader: f("task_struct", "group_leader")?,
        task_start_time: f("task_struct", "start_time")?,
        dentry_d_inode: f("dentry", "d_inode")?,
        socket_sk: f("socket", "sk")?,
        sock_sk_peer_pid: f("sock", "sk_peer_pid")?,
        pid_numbers: f("pid", "numbers")?,
        pid_tasks: f("pid", "tasks")?,
        task_flags: f("task_struct", "flags")?,
        task_stack: f("task_struct", "stack")?,
        // Zero where AF_UNIX is a module (its structs are in the module's
        // BTF): the Unix socket hooks are then not attached.
        unix_sock_addr: f("unix_sock", "addr").unwrap_or(0),
        unix_sock_path: f("unix_sock", "path").unwrap_or(0),
        unix_address_len: f("unix_address", "len").unwrap_or(0),
        unix_address_name: f("unix_address", "name").unwrap_or(0),
        binprm_argc: f("linux_binprm", "argc")?,
    })
}

/// Whether the offsets the Unix socket hooks read were all found.
pub fn has_unix(o: &KernelOffsets) -> bool {
    o.unix_sock_addr != 0 && o.unix_sock_path != 0 && o.unix_address_name != 0
}

/// Byte offset of `field` in `struct name`, looking inside anonymous
/// struct and union members (mm_struct keeps its fields in one).
pub fn field_offset(btf: &Btf, name: &str, field: &str) -> Result<u32, BtfError> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|_| BtfError::NoStruct(name.into()))?;
    let st = types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| BtfError::NoStruct(name.into()))?;
    find_member(btf, &st, field).map_err(|bitfield| {
        if bitfield {
            BtfError::Bitfield(name.into(), field.into())
        } else {
            BtfError::NoField(name.into(), field.into())
        }
    })
}

/// Err(true) when the field exists but is a bitfield.
fn find_member(btf: &Btf, st: &btf_rs::Struct, field: &str) -> Result<u32, bool> {
    for m in &st.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            if m.bitfield_size().is_some_and(|s| s != 0) || m.bit_offset() % 8 != 0 {
                return Err(true);
            }
            return Ok(m.bit_offset() / 8);
        }
        if name.is_empty() {
            // Anonymous struct or union: search inside it.
            let Ok(ty) = btf.resolve_chained_type(m) else {
                continue;
            };
            let inner = match ty {
                Type::Struct(s) | Type::Union(s) => s,
                _ => continue,
            };
            if let Ok(off) = find_member(btf, &inner, field) {
                return Ok(m.bit_offset() / 8 + off);
            }
        }
    }
    Err(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// False (said loudly, and listed in `AIRLOCK_SKIP_LOG`) when this
    /// machine has no kernel BTF; a failure under `CI=true`.
    fn have_btf(test: &str) -> bool {
        if std::path::Path::new(VMLINUX_BTF).exists() {
            return true;
        }
        let why = format!("no {VMLINUX_BTF} on this machine");
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "{test}: cannot run and CI=true forbids skipping: {why}"
        );
        eprintln!("SKIPPED {test}: {why}");
        if let Some(path) = std::env::var_os("AIRLOCK_SKIP_LOG") {
            use std::io::Write as _;
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{test}: {why}"));
        }
        false
    }

    /// Reads this machine's BTF when it has one; the offsets are checked
    /// against facts that hold on every kernel.
    #[test]
    fn offsets_from_running_kernel() {
        if !have_btf("offsets_from_running_kernel") {
            return;
        }
        let o = kernel_offsets().unwrap();
        assert_eq!(
            o.task_tgid,
            o.task_pid + 4,
            "tgid follows pid in task_struct"
        );
        assert!(
            o.mm_arg_end == o.mm_arg_start + 8,
            "arg_end follows arg_start"
        );
        assert!(o.task_real_parent > o.task_tgid);
        assert!(o.cred_euid > 0);
        assert_eq!(o.path_dentry, 8, "struct path: mnt, then dentry");
        assert_eq!(o.qstr_name, 8, "struct qstr: hash_len, then name");
        assert!(o.dentry_d_name > o.dentry_d_parent, "d_parent, then d_name");
        assert!(has_unix(&o), "AF_UNIX is built in on the kernels tested");
        assert_eq!(o.unix_address_len, 4, "unix_address: refcnt, then len");
        assert_eq!(o.unix_address_name, 8, "unix_address: len, then name");
    }

    #[test]
    fn unknown_field_is_named() {
        if !have_btf("unknown_field_is_named") {
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let e = field_offset(&btf, "task_struct", "no_such_field").unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel BTF: struct task_struct has no field no_such_field"
        );
    }
}
