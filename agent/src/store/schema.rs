//! Schema versions. Each migration moves the store up by one version; never
//! edit a published one, add the next.

use rusqlite::Connection;

/// The newest schema this build knows.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATIONS: &[&str] = &[
    // 1: sessions and events.
    "CREATE TABLE sessions (
        id         INTEGER PRIMARY KEY,
        started_at INTEGER NOT NULL,           -- ns since the epoch
        ended_at   INTEGER,                    -- ns since the epoch, NULL while running
        root_pid   INTEGER NOT NULL,
        command    TEXT NOT NULL,              -- JSON array
        labels     TEXT NOT NULL               -- JSON object
    );
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY,
        session_id INTEGER NOT NULL,
        ts         INTEGER NOT NULL,           -- ns since the epoch
        kind       INTEGER NOT NULL,           -- airlock_common::EventKind id
        pid        INTEGER NOT NULL,
        tgid       INTEGER NOT NULL,
        ppid       INTEGER NOT NULL,
        uid        INTEGER NOT NULL,
        euid       INTEGER NOT NULL,
        gid        INTEGER NOT NULL,
        cgroup_id  INTEGER NOT NULL,
        detail     TEXT NOT NULL               -- JSON, by kind
    );
    CREATE INDEX events_session_ts ON events (session_id, ts);
    CREATE INDEX events_ts ON events (ts);
    CREATE INDEX sessions_started ON sessions (started_at);",
    // 2: approval requests; the whole request as JSON in `body`.
    "CREATE TABLE requests (
        id           INTEGER PRIMARY KEY,
        session_id   INTEGER NOT NULL,
        state        TEXT NOT NULL,            -- pending, approved, denied, timed_out, abandoned, failed
        requested_at INTEGER NOT NULL,         -- ns since the epoch
        body         TEXT NOT NULL             -- JSON: model::ApprovalRequest
    );
    CREATE INDEX requests_state ON requests (state, id);
    CREATE INDEX requests_session ON requests (session_id, id);",
    // 3: every policy load and reload, successful or not.
    "CREATE TABLE policy_loads (
        id      INTEGER PRIMARY KEY,
        ts      INTEGER NOT NULL,              -- ns since the epoch
        trigger TEXT NOT NULL,                 -- start, SIGHUP, file change
        ok      INTEGER NOT NULL,              -- 1: in force; 0: refused, the old one stayed
        body    TEXT NOT NULL                  -- JSON: model::PolicyLoad
    );",
    // 4: the kernel's rule id left the events (always 1 once the policy
    // decided): drop it from stored exec and network details and from the
    // held actions inside requests.
    "UPDATE events SET detail = json_remove(detail, '$.rule_id')
        WHERE json_valid(detail) AND json_type(detail, '$.rule_id') IS NOT NULL;
    UPDATE requests SET body = json_remove(body, '$.action.rule_id')
        WHERE json_valid(body) AND json_type(body, '$.action.rule_id') IS NOT NULL;",
];

#[derive(Debug)]
pub enum MigrateError {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

pub fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the store to [`VERSION`], one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    migrate_to(conn, VERSION)
}

/// Brings the store to `target` (tests build older stores with it).
pub fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), MigrateError> {
    let current = version(conn)?;
    if current > VERSION {
        return Err(MigrateError::TooNew(current));
    }
    let steps = (target - current).max(0) as usize;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(current as usize)
        .take(steps)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
