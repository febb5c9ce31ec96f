//! A human's decision on a pending request: who may decide (no
//! self-approval, named approvers and groups), N distinct approvals, one
//! denial final.

use super::Broker;
use crate::{
    config::Approver,
    model::{Approval, ApprovalRequest, DecideError, State, wall_now_ns},
    store::Store,
};

impl Broker {
    pub(super) async fn decide(
        &mut self,
        id: u64,
        approve: bool,
        by: String,
        reason: Option<String>,
    ) -> Result<ApprovalRequest, DecideError> {
        let Some(req) = self.pending.get(&id) else {
            return Err(self.not_pending(id).await);
        };
        if req.labels_unread {
            // No one may decide before the self-approval check can run.
            let session = req.session_id;
            let labels = self
                .labels(session)
                .await
                .ok_or(DecideError::LabelsUnread { id })?;
            let req = self.pending.get_mut(&id).ok_or(DecideError::NotFound(id))?;
            req.labels = labels;
            req.labels_unread = false;
            let req = req.clone();
            self.store_and_announce(&req).await;
        }
        let req = self.pending.get(&id).ok_or(DecideError::NotFound(id))?;
        if req.labels.get("user") == Some(&by) {
            return Err(DecideError::SelfApproval { id, who: by });
        }
        if !may_decide(req, &by, &self.approvers) {
            return Err(DecideError::NotAnApprover { id, who: by });
        }
        if !approve {
            return self
                .finish(id, State::Denied, &by, reason, String::new())
                .await
                .ok_or(DecideError::NotFound(id));
        }
        if req.approvals.iter().any(|a| a.by == by) {
            return Err(DecideError::AlreadyApproved {
                id,
                who: by,
                needed: req.approvals_needed,
            });
        }
        let needed = req.approvals_needed.max(1) as usize;
        let req = self.pending.get_mut(&id).ok_or(DecideError::NotFound(id))?;
        req.approvals.push(Approval {
            by: by.clone(),
            at: wall_now_ns(),
            reason: reason.clone(),
        });
        if req.approvals.len() < needed {
            // Not enough yet: the approval is stored, the hold goes on.
            tracing::info!(
                id,
                by,
                have = req.approvals.len(),
                needed,
                "approval recorded"
            );
            let req = req.clone();
            self.store_and_announce(&req).await;
            return Ok(req);
        }
        let by_all: Vec<&str> = req.approvals.iter().map(|a| a.by.as_str()).collect();
        let by_all = by_all.join(", ");
        self.finish(id, State::Approved, &by_all, reason, String::new())
            .await
            .ok_or(DecideError::NotFound(id))
    }

    /// Why a request that is not pending cannot be decided.
    async fn not_pending(&self, id: u64) -> DecideError {
        let db = self.db.clone();
        let stored = tokio::task::spawn_blocking(move || {
            Store::open_read_only(&db).ok()?.request(id).ok()?
        })
        .await
        .ok()
        .flatten();
        match stored {
            Some(r) => DecideError::AlreadyDecided { id, state: r.state },
            None => DecideError::NotFound(id),
        }
    }
}

/// Whether `who` may decide `req`: any approver when the rule names none,
/// else a named approver or a member of a named group.
fn may_decide(req: &ApprovalRequest, who: &str, approvers: &[Approver]) -> bool {
    if req.approvers.is_empty() && req.groups.is_empty() {
        return true;
    }
    req.approvers.iter().any(|a| a == who)
        || approvers
            .iter()
            .filter(|a| a.name == who)
            .any(|a| a.groups.iter().any(|g| req.groups.contains(g)))
}
