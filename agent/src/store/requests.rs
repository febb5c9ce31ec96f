//! Approval requests in the store: one row each, the request as JSON.

use rusqlite::params;

use super::{Store, StoreError};
use crate::model::{ApprovalRequest, State};

impl Store {
    /// Stores a new request and returns its id (written into the body too).
    pub fn create_request(&mut self, req: &mut ApprovalRequest) -> Result<u64, StoreError> {
        let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        tx.execute(
            "INSERT INTO requests (session_id, state, requested_at, body) VALUES (?1, ?2, ?3, '{}')",
            params![req.session_id, req.state.name(), req.requested_at],
        )
        .map_err(|e| StoreError::Sqlite { path: self.path.clone(), source: e })?;
        req.id = tx.last_insert_rowid() as u64;
        let body = serde_json::to_string(req).unwrap_or_else(|_| "{}".into());
        tx.execute(
            "UPDATE requests SET body = ?2 WHERE id = ?1",
            params![req.id, body],
        )
        .map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        tx.commit().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(req.id)
    }

    /// Writes a request's new state.
    pub fn update_request(&mut self, req: &ApprovalRequest) -> Result<(), StoreError> {
        let body = serde_json::to_string(req).unwrap_or_else(|_| "{}".into());
        self.conn
            .execute(
                "UPDATE requests SET state = ?2, body = ?3 WHERE id = ?1",
                params![req.id, req.state.name(), body],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Requests, newest last; only those in `state` when given.
    pub fn requests(&self, state: Option<State>) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM requests WHERE ?1 IS NULL OR state = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![state.map(State::name)], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for body in rows {
            let body = body.map_err(|e| self.err(e))?;
            if let Ok(req) = serde_json::from_str(&body) {
                out.push(req);
            }
        }
        Ok(out)
    }

    /// One request.
    pub fn request(&self, id: u64) -> Result<Option<ApprovalRequest>, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM requests WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(|e| self.err(e))?;
        Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
    }

    /// A session's labels.
    pub fn session_labels(
        &self,
        id: u64,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        Ok(self.session(id)?.labels)
    }
}
