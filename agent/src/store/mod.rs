//! The local SQLite store: sessions and their recorded events, approval
//! requests, and policy loads.
//!
//! WAL mode, batched transactions, a versioned schema with migrations
//! (`PRAGMA user_version`), indexes for session and time.

mod lock;
mod policy_loads;
mod query;
mod requests;
mod schema;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OpenFlags, params};

use crate::model::Record;
pub use lock::{LockError, lock_data_dir};
pub use query::{EventRow, SessionRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "store {path}: schema version {found} is newer than this airlock knows ({known}); upgrade airlock"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store {path}: cannot create its directory or set its mode: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} does not exist: start the daemon (`airlock daemon`) first")]
    Missing { path: PathBuf },
    #[error("no session {0}")]
    NoSession(u64),
}

/// One connection to the store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A new session as the daemon registers it.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub started_at: i64,
    pub root_pid: u32,
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl Store {
    /// Opens (creating if needed) the store for writing and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.into(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.into(),
            source,
        })?;
        // Its write-ahead log and index files take the same mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| StoreError::Dir {
                path: path.into(),
                source,
            },
        )?;
        let mut store = Self {
            conn,
            path: path.into(),
        };
        store.configure()?;
        schema::migrate(&mut store.conn).map_err(|e| store.schema_err(e))?;
        Ok(store)
    }

    /// Opens an existing store for reading (the CLI), without migrating.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing { path: path.into() });
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| StoreError::Sqlite {
                path: path.into(),
                source,
            },
        )?;
        let store = Self {
            conn,
            path: path.into(),
        };
        store
            .conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| store.err(e))?;
        let found = schema::version(&store.conn).map_err(|e| store.err(e))?;
        if found > schema::VERSION {
            return Err(StoreError::TooNew {
                path: path.into(),
                found,
                known: schema::VERSION,
            });
        }
        Ok(store)
    }

    fn configure(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn schema_err(&self, e: schema::MigrateError) -> StoreError {
        match e {
            schema::MigrateError::Sqlite(source) => self.err(source),
            schema::MigrateError::TooNew(found) => StoreError::TooNew {
                path: self.path.clone(),
                found,
                known: schema::VERSION,
            },
        }
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers a session and returns its id.
    pub fn create_session(&mut self, s: &NewSession) -> Result<u64, StoreError> {
        let command = serde_json::to_string(&s.command).unwrap_or_else(|_| "[]".into());
        let labels = serde_json::to_string(&s.labels).unwrap_or_else(|_| "{}".into());
        self.conn
            .execute(
                "INSERT INTO sessions (started_at, root_pid, command, labels) VALUES (?1, ?2, ?3, ?4)",
                params![s.started_at, s.root_pid, command, labels],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Marks a session ended (idempotent: the first end stands).
    pub fn end_session(&mut self, id: u64, ended_at: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE sessions SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
                params![id, ended_at],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Writes a batch of records in one transaction.
    pub fn insert(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (session_id, ts, kind, pid, tgid, ppid, uid, euid, gid, cgroup_id, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .map_err(err)?;
            for r in records {
                let detail = serde_json::to_string(&r.detail).unwrap_or_else(|_| "{}".into());
                stmt.execute(params![
                    r.session_id,
                    r.ts_ns,
                    r.kind as u32,
                    r.process.pid,
                    r.process.tgid,
                    r.process.ppid,
                    r.process.uid,
                    r.process.euid,
                    r.process.gid,
                    r.process.cgroup_id as i64,
                    detail
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Sessions that were open when the daemon last stopped: (id, root pid).
    pub fn open_sessions(&self) -> Result<Vec<(u64, u32)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, root_pid FROM sessions WHERE ended_at IS NULL")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, u32>(1)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Losses recorded so far, summed by (session, kind lost, reason).
    pub fn recorded_losses(&self) -> Result<Vec<(u64, String, String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT session_id, json_extract(detail, '$.lost_kind'),
                        json_extract(detail, '$.reason'), SUM(json_extract(detail, '$.count'))
                 FROM events WHERE kind = ?1 GROUP BY 1, 2, 3",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([airlock_common::EventKind::Loss as u32], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests;
