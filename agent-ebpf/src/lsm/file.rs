//! Opens, truncates and renames, links and symlinks onto the names of
//! protected files, held inside the syscall.

use airlock_common::{
    EventKind, FILE_APPROVED, FILE_CAND_DIR, FILE_CAND_NAME, FILE_DENIED, FILE_HELD,
    FILE_HOLD_UNAVAILABLE, FILE_NAME_HASHED, FILE_NO_DAEMON, FILE_OP_LINK, FILE_OP_OPEN,
    FILE_OP_RENAME, FILE_OP_SYMLINK, FILE_OP_TRUNCATE, FILE_OP_UNLINK, FILE_PATH_MAX,
    FILE_PATH_TRUNCATED, FILE_REFUSED, FILE_WRITE, FNV_OFFSET, FileEvent, FileKey, HoldKey,
    file_digest, fnv_step,
};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::lsm, programs::LsmContext};

use crate::{
    maps::{
        FILE_INODES, FILE_NAMES, FILE_SCRATCH, config, digest_seed, file_f_path_offset, session_of,
    },
    task::{current_syscall, header, read},
};

use super::{Flagged, LsmVerdict, Marks, earlier_denial, verdict_or_hold};

/// How file events mark their outcomes.
const FILE_MARKS: Marks = Marks {
    held: FILE_HELD,
    approved: FILE_APPROVED,
    refused: FILE_REFUSED,
    no_daemon: FILE_NO_DAEMON,
    denied: FILE_DENIED,
    unavailable: FILE_HOLD_UNAVAILABLE,
};

impl Flagged for FileEvent {
    fn flags(&mut self) -> &mut u32 {
        &mut self.flags
    }
    fn session(&self) -> u64 {
        self.header.session_id
    }
}

/// FMODE_WRITE in `file->f_mode`: opened write-only or read-write.
const FMODE_WRITE: u32 = 0x2;

/// renameat2's RENAME_EXCHANGE: both names change files.
const RENAME_EXCHANGE: u32 = 2;

/// Room kept after a directory's path for `/` and a name (NAME_MAX 255,
/// and the NUL): a directory's path of up to 254 bytes takes a name.
const NAME_ROOM: usize = 257;

/// `int security_file_open(struct file *file)`, called from do_dentry_open
/// once the file is set up, before open(2) returns it (and for the opens
/// inside execve and the like). Only *candidates* are looked at: files
/// whose own name, or whose directory's name, is in FILE_NAMES, or whose
/// inode, or whose directory's, is in FILE_INODES. Every other
/// open of a watched process returns at once and is not recorded. A
/// candidate open is held like an exec: stopped, published once, re-issued
/// until a verdict for this exact path and access exists. On an internal
/// error it fails open (0).
#[lsm(hook = "file_open")]
pub fn lsm_file_open(ctx: LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(1)) {
        return earlier;
    }
    match try_lsm_file_open(&ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// FNV-1a over a dentry's name, if it is at most FILE_NAME_HASHED bytes
/// (the key of FILE_NAMES, as `airlock_common::name_hash` computes it).
#[inline(always)]
fn dentry_name_hash(dentry: u64) -> Option<u64> {
    let off = config().offsets;
    let name: u64 = read(dentry, off.dentry_d_name + off.qstr_name).ok()?;
    // Two bytes more than hashed: one for the NUL, one to tell a name that
    // fits from a longer one cut to fit.
    let mut buf = [0u8; FILE_NAME_HASHED + 2];
    // SAFETY: a kernel string read into a bounded stack buffer.
    let n = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            name as *const core::ffi::c_void,
        )
    };
    // n counts the NUL: 2..=FILE_NAME_HASHED+1 is a whole, non-empty name.
    if n < 2 || n > FILE_NAME_HASHED as i64 + 1 {
        return None;
    }
    let n = (n - 1) as usize;
    let mut h = FNV_OFFSET;
    for (i, b) in buf.iter().enumerate().take(FILE_NAME_HASHED) {
        if i >= n {
            break;
        }
        h = fnv_step(h, *b);
    }
    Some(h)
}

/// The FILE_CAND_* bits FILE_NAMES holds for a name hash (0 for none).
#[inline(always)]
fn candidate_bits(hash: Option<u64>) -> u32 {
    match hash {
        // SAFETY: copied out at once.
        Some(h) => unsafe { FILE_NAMES.get(h) }.copied().unwrap_or(0),
        None => 0,
    }
}

/// The identity of an inode: its number and its file system's device.
#[inline(always)]
fn inode_key(inode: u64) -> Result<FileKey, i64> {
    let off = config().offsets;
    let sb: u64 = read(inode, off.inode_i_sb)?;
    Ok(FileKey {
        ino: read(inode, off.inode_i_ino)?,
        dev: read(sb, off.sb_s_dev)?,
        _pad: 0,
    })
}

/// The FILE_CAND_* bits FILE_INODES holds for an inode (0 for none).
#[inline(always)]
fn inode_bits(key: &FileKey) -> u32 {
    // SAFETY: copied out at once.
    unsafe { FILE_INODES.get(*key) }.copied().unwrap_or(0)
}

/// The directory of the file at `dentry` (its dentry's parent) and that
/// directory's identity.
#[inline(always)]
fn parent_of(dentry: u64) -> Result<(u64, FileKey), i64> {
    let off = config().offsets;
    let parent: u64 = read(dentry, off.dentry_d_parent)?;
    let inode: u64 = read(parent, off.dentry_d_inode)?;
    Ok((parent, inode_key(inode)?))
}

/// Whether the file at `dentry` (inode `key`, in directory `parent` of
/// identity `dir`) is a candidate: by its own name or its directory's
/// (FILE_NAMES), or by the file itself or its directory (FILE_INODES: a
/// hard link elsewhere, a renamed directory, a bind mount are the same
/// inodes).
#[inline(always)]
fn is_candidate(dentry: u64, key: &FileKey, parent: u64, dir: &FileKey) -> bool {
    candidate_bits(dentry_name_hash(dentry)) & FILE_CAND_NAME != 0
        || inode_bits(key) & FILE_CAND_NAME != 0
        || candidate_bits(dentry_name_hash(parent)) & FILE_CAND_DIR != 0
        || inode_bits(dir) & FILE_CAND_DIR != 0
}

fn try_lsm_file_open(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let off = config().offsets;
    let file: u64 = ctx.arg(0);
    // The candidate test first, and nothing else before it.
    let dentry: u64 = read(file, off.file_f_path + off.path_dentry)?;
    let inode: u64 = read(file, off.file_inode)?;
    let key = inode_key(inode)?;
    let (parent, dir) = parent_of(dentry)?;
    if !is_candidate(dentry, &key, parent, &dir) {
        return Ok(LsmVerdict::Allow);
    }
    let f_mode: u32 = read(file, off.file_f_mode).unwrap_or(0);
    // `&file->f_path` as a typed kernel pointer: bpf_d_path checks that it
    // points at a struct path (a constant offset into the file argument).
    let path = (file + file_f_path_offset() as u64) as *mut aya_ebpf::bindings::path;
    file_verdict::<true>(
        pid_tgid,
        session_id,
        FileAct {
            path,
            dentry,
            key,
            dir,
            write: f_mode & FMODE_WRITE != 0,
            op: FILE_OP_OPEN,
        },
    )
}

/// `int security_path_truncate(const struct path *path)`, called from
/// truncate(2) before the size changes: a write to a candidate file that
/// never opens it (ftruncate(2) needs a descriptor open for writing, which
/// file_open saw). Held as a write open is. On an internal error it fails
/// open (0).
#[lsm(hook = "path_truncate")]
pub fn lsm_path_truncate(ctx: LsmContext) -> i32 {
    on_truncate::<true>(&ctx)
}

/// [`lsm_path_truncate`] without `bpf_d_path` (see [`lsm_path_rename_named`]).
#[lsm(hook = "path_truncate")]
pub fn lsm_path_truncate_named(ctx: LsmContext) -> i32 {
    on_truncate::<false>(&ctx)
}

/// Syscalls that open a file (x86_64 open, openat, creat, openat2; i386
/// open, creat, openat): before 6.2 an `O_TRUNC` open calls
/// security_path_truncate after file_open decided the same open as a
/// write. Held again there, the one verdict slot of the thread could never
/// hold both answers, and the open would be asked about forever. (No
/// truncate(2) or ftruncate(2) has one of these numbers in either table.)
const OPEN_SYSCALLS: [u64; 7] = [2, 257, 85, 437, 5, 8, 295];

#[inline(always)]
fn on_truncate<const D_PATH: bool>(ctx: &LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(1)) {
        return earlier;
    }
    if current_syscall().is_some_and(|nr| OPEN_SYSCALLS.contains(&nr)) {
        return 0;
    }
    match try_lsm_path_truncate::<D_PATH>(ctx) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

#[inline(always)]
fn try_lsm_path_truncate<const D_PATH: bool>(ctx: &LsmContext) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let off = config().offsets;
    let path: u64 = ctx.arg(0);
    let dentry: u64 = read(path, off.path_dentry)?;
    let inode: u64 = read(dentry, off.dentry_d_inode)?;
    let key = inode_key(inode)?;
    let (parent, dir) = parent_of(dentry)?;
    if !is_candidate(dentry, &key, parent, &dir) {
        return Ok(LsmVerdict::Allow);
    }
    file_verdict::<D_PATH>(
        pid_tgid,
        session_id,
        FileAct {
            path: path as *mut aya_ebpf::bindings::path,
            dentry,
            key,
            dir,
            write: true,
            op: FILE_OP_TRUNCATE,
        },
    )
}

/// `int security_path_rename(const struct path *old_dir, struct dentry *old_dentry,
/// const struct path *new_dir, struct dentry *new_dentry, unsigned int flags)`:
/// both names change: another file put in place of a candidate's name
/// (`mv x ~/.ssh/authorized_keys`) is a write to that name, and so is a
/// candidate's name moved away (as removing it is: `mv hardening.conf
/// /tmp`). The file keeps its inode, so it stays known under any name.
#[lsm(hook = "path_rename")]
pub fn lsm_path_rename(ctx: LsmContext) -> i32 {
    on_rename::<true>(&ctx)
}

/// [`lsm_path_rename`] for kernels that refuse `bpf_d_path` in this hook
/// (6.1): the event names only the file, the daemon finds its directory
/// by inode.
#[lsm(hook = "path_rename")]
pub fn lsm_path_rename_named(ctx: LsmContext) -> i32 {
    on_rename::<false>(&ctx)
}

#[inline(always)]
fn on_rename<const D_PATH: bool>(ctx: &LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(5)) {
        return earlier;
    }
    let flags: u32 = ctx.arg(4);
    let (old_dir, old, new_dir, new): (u64, u64, u64, u64) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    // One of the names a candidate: held as that name's write. A plain
    // rename onto a candidate is held as the new name's write (`sed -i`,
    // `ssh-keygen -R`: a temporary file renamed over the real one, both in
    // a protected directory). With RENAME_EXCHANGE both names are given
    // other files: both candidates is refused, as one syscall cannot wait
    // for two decisions (the thread has one verdict slot).
    // (A name that cannot be read counts as no candidate: the other one
    // still decides.)
    let old_placed = is_placed(old_dir, old).unwrap_or(false);
    let new_placed = is_placed(new_dir, new).unwrap_or(false);
    let v = if old_placed && new_placed && flags & RENAME_EXCHANGE != 0 && in_session() {
        Ok(LsmVerdict::Deny)
    } else if old_placed && !new_placed {
        try_placement::<D_PATH>(old_dir, old, FILE_OP_RENAME)
    } else {
        try_placement::<D_PATH>(new_dir, new, FILE_OP_RENAME)
    };
    match v {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// `int security_path_unlink(const struct path *dir, struct dentry *dentry)`:
/// removing a candidate's name is a write to it.
#[lsm(hook = "path_unlink")]
pub fn lsm_path_unlink(ctx: LsmContext) -> i32 {
    on_unlink::<true>(&ctx)
}

/// [`lsm_path_unlink`] without `bpf_d_path` (see [`lsm_path_rename_named`]).
#[lsm(hook = "path_unlink")]
pub fn lsm_path_unlink_named(ctx: LsmContext) -> i32 {
    on_unlink::<false>(&ctx)
}

/// `int security_path_rmdir(const struct path *dir, struct dentry *dentry)`:
/// as unlink, for a directory.
#[lsm(hook = "path_rmdir")]
pub fn lsm_path_rmdir(ctx: LsmContext) -> i32 {
    on_unlink::<true>(&ctx)
}

/// [`lsm_path_rmdir`] without `bpf_d_path` (see [`lsm_path_rename_named`]).
#[lsm(hook = "path_rmdir")]
pub fn lsm_path_rmdir_named(ctx: LsmContext) -> i32 {
    on_unlink::<false>(&ctx)
}

#[inline(always)]
fn on_unlink<const D_PATH: bool>(ctx: &LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(2)) {
        return earlier;
    }
    match try_placement::<D_PATH>(ctx.arg(0), ctx.arg(1), FILE_OP_UNLINK) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// `int security_path_link(struct dentry *old_dentry, const struct path *new_dir,
/// struct dentry *new_dentry)`: a hard link made with a candidate's name
/// (after removing the file) is a write to that name.
#[lsm(hook = "path_link")]
pub fn lsm_path_link(ctx: LsmContext) -> i32 {
    on_link::<true>(&ctx)
}

/// [`lsm_path_link`] without `bpf_d_path` (see [`lsm_path_rename_named`]).
#[lsm(hook = "path_link")]
pub fn lsm_path_link_named(ctx: LsmContext) -> i32 {
    on_link::<false>(&ctx)
}

#[inline(always)]
fn on_link<const D_PATH: bool>(ctx: &LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(3)) {
        return earlier;
    }
    match try_placement::<D_PATH>(ctx.arg(1), ctx.arg(2), FILE_OP_LINK) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// `int security_path_symlink(const struct path *dir, struct dentry *dentry,
/// const char *old_name)`: a symlink made with a candidate's name is a
/// write to that name.
#[lsm(hook = "path_symlink")]
pub fn lsm_path_symlink(ctx: LsmContext) -> i32 {
    on_symlink::<true>(&ctx)
}

/// [`lsm_path_symlink`] without `bpf_d_path` (see [`lsm_path_rename_named`]).
#[lsm(hook = "path_symlink")]
pub fn lsm_path_symlink_named(ctx: LsmContext) -> i32 {
    on_symlink::<false>(&ctx)
}

#[inline(always)]
fn on_symlink<const D_PATH: bool>(ctx: &LsmContext) -> i32 {
    if let Some(earlier) = earlier_denial(ctx.arg(3)) {
        return earlier;
    }
    match try_placement::<D_PATH>(ctx.arg(0), ctx.arg(1), FILE_OP_SYMLINK) {
        Ok(v) => v.ret(),
        Err(_) => 0,
    }
}

/// Whether the current process is in a watched session.
#[inline(always)]
fn in_session() -> bool {
    session_of((bpf_get_current_pid_tgid() >> 32) as u32).is_some()
}

/// Whether giving the name `dentry` (inode `key`, or none) in directory
/// `parent` (identity `dir`) to another file is a candidate write: the
/// name or its directory is a candidate, or it is a protected directory's
/// own name, or the protected directory it replaces (`mv ~/prep ~/.ssh`,
/// RENAME_EXCHANGE): a write to every file in it.
#[inline(always)]
fn placement_candidate(dentry: u64, key: &FileKey, parent: u64, dir: &FileKey) -> bool {
    candidate_bits(dentry_name_hash(dentry)) & FILE_CAND_DIR != 0
        || inode_bits(key) & FILE_CAND_DIR != 0
        || is_candidate(dentry, key, parent, dir)
}

/// [`placement_candidate`] for the name `dentry` in the directory `dir`
/// (a `struct path`).
#[inline(always)]
fn is_placed(dir: u64, dentry: u64) -> Result<bool, i64> {
    let off = config().offsets;
    let parent: u64 = read(dir, off.path_dentry)?;
    let dir_key = inode_key(read(parent, off.dentry_d_inode)?)?;
    let inode: u64 = read(dentry, off.dentry_d_inode)?;
    let key = if inode != 0 {
        inode_key(inode)?
    } else {
        FileKey::default()
    };
    Ok(placement_candidate(dentry, &key, parent, &dir_key))
}

/// The verdict on making the name `dentry` in the directory `dir` (a
/// `struct path`) refer to another file: held as a write open of that
/// name when the name is a candidate (by its name, its directory's name
/// or inode, or the inode it names now).
#[inline(always)]
fn try_placement<const D_PATH: bool>(dir: u64, dentry: u64, op: u32) -> Result<LsmVerdict, i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(session_id) = session_of(tgid) else {
        return Ok(LsmVerdict::Allow);
    };
    let off = config().offsets;
    let parent: u64 = read(dir, off.path_dentry)?;
    let dir_key = inode_key(read(parent, off.dentry_d_inode)?)?;
    // The file the name refers to now, if any (none: a negative dentry).
    let inode: u64 = read(dentry, off.dentry_d_inode)?;
    let key = if inode != 0 {
        inode_key(inode)?
    } else {
        FileKey::default()
    };
    if !placement_candidate(dentry, &key, parent, &dir_key) {
        return Ok(LsmVerdict::Allow);
    }
    file_verdict::<D_PATH>(
        pid_tgid,
        session_id,
        FileAct {
            path: dir as *mut aya_ebpf::bindings::path,
            dentry,
            key,
            dir: dir_key,
            write: true,
            op,
        },
    )
}

/// A candidate file action, as the hooks found it.
struct FileAct {
    /// The file's `struct path` (a BTF pointer `bpf_d_path` accepts), or
    /// for a name being placed (rename, link, symlink) its directory's:
    /// the name (`dentry`'s) is added to it.
    path: *mut aya_ebpf::bindings::path,
    dentry: u64,
    key: FileKey,
    dir: FileKey,
    write: bool,
    op: u32,
}

/// The verdict on a candidate file action, or a hold: the event is filled
/// (path, identity, access), the verdict for this exact path, access and
/// operation taken, else the task held and the request published.
#[inline(always)]
fn file_verdict<const D_PATH: bool>(
    pid_tgid: u64,
    session_id: u64,
    act: FileAct,
) -> Result<LsmVerdict, i64> {
    let tgid = (pid_tgid >> 32) as u32;
    let off = config().offsets;
    let Some(ev) = FILE_SCRATCH.get_ptr_mut(0) else {
        return Err(-1);
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let ev: &mut FileEvent = unsafe { &mut *ev };
    ev.header = header(EventKind::FileOpen, session_id);
    ev.flags = if act.write { FILE_WRITE } else { 0 };
    ev.ino = act.key.ino;
    ev.dev = act.key.dev;
    ev.op = act.op;
    ev.dir_ino = act.dir.ino;
    ev.dir_dev = act.dir.dev;
    ev._pad = 0;
    // Without D_PATH (a hook this kernel refuses bpf_d_path in) the path
    // is left out: the file's name below stands for it.
    let n = if D_PATH {
        // SAFETY: bpf_d_path writes at most FILE_PATH_MAX bytes into the
        // slot's buffer of that size.
        unsafe {
            aya_ebpf::helpers::generated::bpf_d_path(
                act.path,
                ev.path.as_mut_ptr().cast(),
                FILE_PATH_MAX as u32,
            )
        }
    } else {
        -1
    };
    let placed = act.op >= FILE_OP_RENAME;
    // A directory's path, and room for `/` and a name after it.
    let fits = if placed {
        n > 0 && n <= (FILE_PATH_MAX - NAME_ROOM) as i64
    } else {
        n > 0 && n <= FILE_PATH_MAX as i64
    };
    if fits {
        ev.path_len = (n - 1) as u32;
        if placed {
            // n - 1 < 255: the mask only shows the verifier the bound.
            let at = (n as usize - 1) & 0xff;
            let name: u64 = read(act.dentry, off.dentry_d_name + off.qstr_name).unwrap_or(0);
            if let Some(slash) = ev.path.get_mut(at) {
                *slash = b'/';
            }
            // SAFETY: a kernel string read into the slot's buffer: `at` +
            // 1 + NAME_ROOM - 1 stays within FILE_PATH_MAX.
            let m = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
                    ev.path.as_mut_ptr().add(at + 1).cast(),
                    (NAME_ROOM - 1) as u32,
                    name as *const core::ffi::c_void,
                )
            };
            ev.path_len = if m > 0 {
                (at + m as usize) as u32
            } else {
                at as u32
            };
        }
    } else {
        // Too long (or unresolvable): record the file's own name instead.
        ev.flags |= FILE_PATH_TRUNCATED;
        let name: u64 = read(act.dentry, off.dentry_d_name + off.qstr_name).unwrap_or(0);
        // SAFETY: a kernel string read into the slot's bounded buffer.
        let n = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel_str(
                ev.path.as_mut_ptr().cast(),
                FILE_PATH_MAX as u32,
                name as *const core::ffi::c_void,
            )
        };
        ev.path_len = if n > 0 && n <= FILE_PATH_MAX as i64 {
            (n - 1) as u32
        } else {
            0
        };
    }
    // The path, the access, the operation, and the files themselves: an
    // approval of one file never covers another swapped in at that path
    // while the task waited.
    let mut digest = file_digest(digest_seed(), &ev.path, ev.path_len as usize, act.write);
    if act.op != FILE_OP_OPEN {
        digest = fnv_step(digest, act.op as u8);
    }
    for b in act.key.ino.to_le_bytes() {
        digest = fnv_step(digest, b);
    }
    for b in act.dir.ino.to_le_bytes() {
        digest = fnv_step(digest, b);
    }
    for b in act.key.dev.to_le_bytes() {
        digest = fnv_step(digest, b);
    }
    ev.digest = digest;
    let key = HoldKey {
        tgid,
        _pad: 0,
        digest,
    };
    Ok(verdict_or_hold(
        pid_tgid as u32,
        key,
        EventKind::FileOpen,
        ev,
        &FILE_MARKS,
        |_| {},
    ))
}
