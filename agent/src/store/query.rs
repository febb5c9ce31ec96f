//! Read side of the store: what the CLI and replay show.

use std::collections::BTreeMap;

use airlock_common::EventKind;
use rusqlite::params;
use serde::Serialize;

use super::{Store, StoreError};
use crate::model::Process;

/// A session as listed by `airlock sessions`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionRow {
    pub id: u64,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub root_pid: u32,
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub events: u64,
    pub lost: u64,
}

/// An event as shown by `airlock events`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventRow {
    pub id: u64,
    pub session_id: u64,
    pub ts: i64,
    pub kind: String,
    /// Who acted (flattened: the JSON keeps pid, tgid, ... at the top).
    #[serde(flatten)]
    pub process: Process,
    pub detail: serde_json::Value,
}

/// 900 is `EventKind::Loss` (checked by a test).
const SESSION_COLUMNS: &str = "s.id, s.started_at, s.ended_at, s.root_pid, s.command, s.labels,
    (SELECT count(*) FROM events e WHERE e.session_id = s.id AND e.kind != 900),
    (SELECT coalesce(sum(json_extract(e.detail, '$.count')), 0) FROM events e WHERE e.session_id = s.id AND e.kind = 900)";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    let command: String = r.get(4)?;
    let labels: String = r.get(5)?;
    Ok(SessionRow {
        id: r.get::<_, i64>(0)? as u64,
        started_at: r.get(1)?,
        ended_at: r.get(2)?,
        root_pid: r.get(3)?,
        command: serde_json::from_str(&command).unwrap_or_default(),
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        events: r.get::<_, i64>(6)? as u64,
        lost: r.get::<_, i64>(7)? as u64,
    })
}

impl Store {
    /// Every session, oldest first.
    pub fn sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions s ORDER BY s.id");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], session_row).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// One session.
    pub fn session(&self, id: u64) -> Result<SessionRow, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.id = ?1");
        self.conn
            .query_row(&sql, params![id], session_row)
            .map_err(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => StoreError::NoSession(id),
                e => self.err(e),
            })
    }

    /// A session's events in time order.
    pub fn events(&self, session_id: u64) -> Result<Vec<EventRow>, StoreError> {
        self.session(session_id)?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, session_id, ts, kind, pid, tgid, ppid, uid, euid, gid, cgroup_id, detail
                 FROM events WHERE session_id = ?1 ORDER BY ts, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![session_id], |r| {
                let kind: u32 = r.get(3)?;
                let detail: String = r.get(11)?;
                Ok(EventRow {
                    id: r.get::<_, i64>(0)? as u64,
                    session_id: r.get::<_, i64>(1)? as u64,
                    ts: r.get(2)?,
                    kind: EventKind::from_u32(kind)
                        .map_or_else(|| format!("unknown({kind})"), |k| k.name().into()),
                    process: Process {
                        pid: r.get(4)?,
                        tgid: r.get(5)?,
                        ppid: r.get(6)?,
                        uid: r.get(7)?,
                        euid: r.get(8)?,
                        gid: r.get(9)?,
                        cgroup_id: r.get::<_, i64>(10)? as u64,
                    },
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Number of events of one kind in a session.
    pub fn count(&self, session_id: u64, kind: EventKind) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM events WHERE session_id = ?1 AND kind = ?2",
                params![session_id, kind as u32],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }
}
