//! The data directory's lock: one daemon per store (and per pin set),
//! and no `airlock unload` while a daemon runs.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another airlock daemon is running on {data_dir} (it holds {lock})")]
    Held { data_dir: PathBuf, lock: PathBuf },
}

/// Takes the lock file `lock` in `data_dir` (creating both as needed);
/// held until the file is dropped.
pub fn lock_data_dir(data_dir: &Path, lock: &Path) -> Result<std::fs::File, LockError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { path, source }
    };
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    // The store holds every command line and every decision: root's only
    // (a reader could also lock the store against the daemon's writes).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(data_dir))?;
    let file = std::fs::File::create(lock).map_err(io(lock))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held {
            data_dir: data_dir.to_path_buf(),
            lock: lock.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(lock)(e)),
    }
}
