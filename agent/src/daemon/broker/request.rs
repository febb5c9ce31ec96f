//! A new approval request, built from a held action and the rule that
//! holds it.

use std::collections::BTreeMap;

use super::{Held, action};
use crate::{
    model::{Ancestor, ApprovalRequest, State, wall_now_ns},
    policy::Rule,
};

/// The pending request for `h` under `rule`. `labels` is None when the
/// session's labels could not be read: nobody may decide it until they
/// can be.
pub(super) fn new(
    h: &Held,
    rule: &Rule,
    labels: Option<BTreeMap<String, String>>,
    ancestry: Vec<Ancestor>,
) -> ApprovalRequest {
    let now = wall_now_ns();
    let timeout_ns = (rule.hold.timeout_s as i64).saturating_mul(1_000_000_000);
    let mut req = ApprovalRequest {
        id: 0,
        state: State::Pending,
        session_id: h.record.session_id,
        labels_unread: labels.is_none(),
        labels: labels.unwrap_or_default(),
        kind: h.target.kind,
        pid: h.record.process.pid,
        tgid: h.record.process.tgid,
        uid: h.record.process.uid,
        ancestry,
        action: serde_json::to_value(&h.record.detail).unwrap_or_default(),
        rule: rule.id.clone(),
        requested_at: now,
        deadline: now.saturating_add(timeout_ns),
        on_timeout: rule.hold.on_timeout,
        decided_at: None,
        decided_by: None,
        reason: None,
        outcome: None,
        digest: h.target.digest,
        start_time: h.target.start_time,
        in_syscall: h.target.in_syscall,
        event_kind: h.target.event_kind,
        message: None,
        monitor: h.monitor.clone(),
        approvers: rule.hold.approvers.clone(),
        groups: rule.hold.groups.clone(),
        approvals_needed: rule.hold.approvals,
        approvals: Vec::new(),
        context: action::context(&h.action),
        env_binding: h.target.env,
    };
    req.message = rule
        .hold
        .message
        .as_deref()
        .map(|m| action::render(m, rule, &h.action, &req));
    req
}
