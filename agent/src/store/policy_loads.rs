//! Policy loads in the store: every load and reload, in force or refused.

use rusqlite::params;

use super::{Store, StoreError};
use crate::model::PolicyLoad;

impl Store {
    pub fn insert_policy_load(&mut self, l: &PolicyLoad) -> Result<(), StoreError> {
        let body = serde_json::to_string(l).unwrap_or_else(|_| "{}".into());
        self.conn
            .execute(
                "INSERT INTO policy_loads (ts, trigger, ok, body) VALUES (?1, ?2, ?3, ?4)",
                params![l.ts, l.trigger, l.ok, body],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Policy loads, oldest first.
    pub fn policy_loads(&self) -> Result<Vec<PolicyLoad>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM policy_loads ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        Ok(rows
            .filter_map(Result::ok)
            .filter_map(|b| serde_json::from_str(&b).ok())
            .collect())
    }
}
