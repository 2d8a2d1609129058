//! Dual control: dangerous actions (destroy now; import and export use the same path) need two
//! different officers. The first call records a pending approval; a second officer who holds the
//! same permission on the key approves it, and only then is the action carried out.

use std::sync::Arc;

use ring::rand::SecureRandom;

use super::{unix_now, Caller, Service};
use crate::backend::KeyRef;
use crate::error::ServiceError;
use crate::keys::{KeyName, VersionState};
use crate::policy::Operation;
use crate::registry::approvals::ApprovalRecord;
use crate::registry::KeyRecord;

/// What an executed approval produced.
pub enum Executed {
    Key(Arc<KeyRecord>),
}

impl Service {
    /// Step one of destroying a revoked or retired version: record it for a second officer.
    pub async fn request_destroy(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Result<ApprovalRecord, ServiceError> {
        let name = self.authorize(caller, Operation::Destroy, name)?;
        let key = self.lookup(&name)?;
        destroyable(&key, version)?;
        self.new_approval(caller, "destroy", &name, Some(version), "{}".into())
            .await
    }

    async fn new_approval(
        &self,
        caller: &Caller,
        action: &str,
        name: &KeyName,
        version: Option<u32>,
        params: String,
    ) -> Result<ApprovalRecord, ServiceError> {
        let mut id = [0u8; 16];
        self.rng.fill(&mut id).map_err(|_| ServiceError::Internal {
            detail: "system random generator failed".into(),
        })?;
        let now = unix_now();
        let a = ApprovalRecord {
            id: crate::registry::hex_encode(&id),
            action: action.into(),
            key: name.to_string(),
            version,
            params,
            requested_by: caller.identity.clone(),
            requested_at: now,
            expires_at: now + self.approval_ttl as i64,
            state: "pending".into(),
            decided_by: None,
            decided_at: None,
            result: None,
        };
        self.registry.insert_approval(&a).await?;
        Ok(a)
    }

    /// Pending approvals this caller could approve.
    pub async fn pending_approvals(
        &self,
        caller: &Caller,
    ) -> Result<Vec<ApprovalRecord>, ServiceError> {
        let policy = self.policy.current();
        Ok(self
            .registry
            .pending_approvals(unix_now())
            .await?
            .into_iter()
            .filter(|a| {
                action_operation(&a.action)
                    .is_some_and(|op| policy.allows(&caller.identity, op, &a.key))
            })
            .collect())
    }

    /// Step two: a different officer with the same permission carries the action out.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(ApprovalRecord, Executed), ServiceError> {
        let a = self.find_approval(id).await?;
        let op = action_operation(&a.action).ok_or_else(|| ServiceError::Internal {
            detail: format!("approval {id} has unknown action {}", a.action),
        })?;
        self.authorize(caller, op, &a.key)?;
        if a.requested_by == caller.identity {
            return Err(ServiceError::PermissionDenied(
                "dual control: the officer who requested an action cannot approve it".into(),
            ));
        }
        let now = unix_now();
        let _guard = self.changes.lock().await;
        if !self
            .registry
            .decide_approval(id, "executing", &caller.identity, now, true)
            .await?
        {
            return Err(self.why_not_pending(id, now).await);
        }
        let result = match a.action.as_str() {
            "destroy" => self.execute_destroy(&a, caller).await.map(Executed::Key),
            other => Err(ServiceError::Internal {
                detail: format!("approval action {other} has no executor"),
            }),
        };
        let (state, text) = match &result {
            Ok(_) => ("executed", "ok".to_string()),
            Err(e) => ("failed", e.to_string()),
        };
        self.registry.finish_approval(id, state, &text).await?;
        let mut a = a;
        a.state = state.into();
        a.decided_by = Some(caller.identity.clone());
        a.decided_at = Some(now);
        a.result = Some(text);
        result.map(|r| (a, r))
    }

    /// Withdraw a pending approval: its requester, or anyone who could approve it.
    pub async fn cancel_approval(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<ApprovalRecord, ServiceError> {
        let mut a = self.find_approval(id).await?;
        if a.requested_by != caller.identity {
            let op = action_operation(&a.action).unwrap_or(Operation::Destroy);
            self.authorize(caller, op, &a.key)?;
        }
        let now = unix_now();
        if !self
            .registry
            .decide_approval(id, "cancelled", &caller.identity, now, false)
            .await?
        {
            return Err(self.why_not_pending(id, now).await);
        }
        a.state = "cancelled".into();
        a.decided_by = Some(caller.identity.clone());
        a.decided_at = Some(now);
        Ok(a)
    }

    /// The key an approval concerns, for the audit entry of any request naming it.
    pub async fn approval_key(&self, id: &str) -> Option<String> {
        self.find_approval(id).await.ok().map(|a| a.key)
    }

    async fn find_approval(&self, id: &str) -> Result<ApprovalRecord, ServiceError> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::invalid(
                "approval ids are 32 hexadecimal characters",
            ));
        }
        self.registry
            .approval(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no approval {id}")))
    }

    async fn why_not_pending(&self, id: &str, now: i64) -> ServiceError {
        match self.registry.approval(id).await {
            Ok(Some(a)) if a.state == "pending" && a.expires_at <= now => {
                let _ = self
                    .registry
                    .decide_approval(id, "expired", "tillkeyd", now, false)
                    .await;
                ServiceError::FailedPrecondition(format!(
                    "approval {id} expired; request the action again"
                ))
            }
            Ok(Some(a)) => {
                ServiceError::FailedPrecondition(format!("approval {id} is already {}", a.state))
            }
            Ok(None) => ServiceError::NotFound(format!("no approval {id}")),
            Err(e) => e.into(),
        }
    }

    async fn execute_destroy(
        &self,
        a: &ApprovalRecord,
        approver: &Caller,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = KeyName::parse(&a.key)?;
        let key = self.lookup(&name)?;
        let version = a
            .version
            .ok_or_else(|| ServiceError::invalid("destroy needs a version"))?;
        let v = destroyable(&key, version)?;
        self.backend.destroy(KeyRef {
            key_type: key.key_type,
            object: &v.object,
        })?;
        let reason = format!(
            "requested by {}, approved by {}",
            a.requested_by, approver.identity
        );
        let mut new = (*key).clone();
        for x in &mut new.versions {
            if x.version == version {
                *x = x.moved(
                    VersionState::Destroyed,
                    unix_now(),
                    &approver.identity,
                    Some(&reason),
                );
            }
        }
        Ok(self.registry.commit(&key, new).await?)
    }
}

fn action_operation(action: &str) -> Option<Operation> {
    match action {
        "destroy" => Some(Operation::Destroy),
        _ => None,
    }
}

/// Only versions that can no longer be used may be destroyed.
fn destroyable(
    key: &KeyRecord,
    version: u32,
) -> Result<&crate::registry::VersionRecord, ServiceError> {
    let v = key.version(version).ok_or_else(|| {
        ServiceError::NotFound(format!("key '{}' has no version {version}", key.name))
    })?;
    match v.state {
        VersionState::Revoked | VersionState::Retired => Ok(v),
        other => Err(ServiceError::FailedPrecondition(format!(
            "version {version} of '{}' is {}; only revoked or retired versions can be destroyed",
            key.name,
            other.as_str()
        ))),
    }
}
