//! Reading the audit trail: auditors are granted `audit` on key patterns and see the entries
//! of those keys (entries without a key count as `-`).

use std::sync::Arc;

use super::key_core::KeyCore;
use super::Caller;
use crate::audit;
use crate::error::ServiceError;
use crate::policy::Operation;

pub struct AuditTrail {
    core: Arc<KeyCore>,
}

impl AuditTrail {
    pub fn new(core: Arc<KeyCore>) -> Self {
        Self { core }
    }

    /// Audit entries after `q.since` that the caller may see: auditors are granted `audit` on
    /// key patterns, and see the entries of those keys (entries without a key count as `-`).
    pub async fn audit_entries(
        &self,
        caller: &Caller,
        q: &audit::Query,
    ) -> Result<(Vec<audit::Entry>, Option<u64>), ServiceError> {
        let policy = self.core.policy().current();
        if !policy.grants_any(&caller.identity, Operation::Audit) {
            return Err(ServiceError::PermissionDenied(format!(
                "'{}' may not read the audit trail",
                caller.identity
            )));
        }
        // The policy filter runs after the query, so keep reading (bounded) until the page is
        // full; `next_since` lets the caller continue where this page stopped looking.
        let mut out = Vec::new();
        let mut cursor = audit::Query {
            since: q.since,
            key: q.key.clone(),
            identity: q.identity.clone(),
            limit: q.limit,
        };
        for _ in 0..20 {
            let batch = audit::read(self.core.registry.pool(), &cursor)
                .await
                .map_err(|detail| ServiceError::Internal {
                    detail: format!("reading audit: {detail}"),
                })?;
            let exhausted = batch.len() < cursor.limit;
            for e in batch {
                cursor.since = e.seq;
                let key = if e.key.is_empty() {
                    "-"
                } else {
                    e.key.as_str()
                };
                if policy.allows(&caller.identity, Operation::Audit, key) {
                    out.push(e);
                    if out.len() == q.limit {
                        return Ok((out, Some(cursor.since)));
                    }
                }
            }
            if exhausted {
                return Ok((out, None));
            }
        }
        Ok((out, Some(cursor.since)))
    }
}
