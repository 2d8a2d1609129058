//! The signed key-status feed for offline verifiers (`GET /v1/status-list`).
//!
//! A POS that verifies "paid" tokens offline must learn which key versions to stop trusting.
//! The list is a COSE_Sign1 (see [`crate::statuslist`]) signed with ES256 by a P-256 key held in
//! the token (ES256 rather than EdDSA because every backend has it: SoftHSM behind a p11-kit proxy
//! and TPMs hold no Ed25519 keys). Verifiers pin its public key at provisioning, refuse a list past `exp` (fail closed
//! when the feed is cut) and refuse a `seq` lower than the last one they accepted (no replay of
//! an older list that predates a revocation).
//!
//! `seq` is the audit chain's head, read before the list is built, and the list holds every
//! change committed before that read: with several instances, the head is read from the shared
//! database and this instance reads the others' changes first, so a list made later, on any
//! instance, never has a lower `seq`, and a list with a higher `seq` holds every change that
//! committed before an earlier list's `seq` was read. (Each instance's own head lagged the chain's by as much as it had been
//! idle: a list from an idle instance carried a lower `seq` than an older list from a busy one,
//! and verifiers refused it, or accepted an older busy-instance list over it.) What remains is
//! the moment between a change committing and the next read of the head, in which a list may
//! already hold the change under the same `seq` as one that does not; the next list has both.

use std::sync::Arc;

use super::key_core::KeyCore;
use super::{unix_now, Caller};
use crate::backend::KeyRef;
use crate::error::ServiceError;
use crate::keys::{KeyName, KeyPrefix, KeyType, VersionState};
use crate::policy::Operation;
use crate::statuslist::{StatusEntry, StatusList};

/// The P-256 key in the token that signs the feed.
pub const STATUS_KEY: &str = "tillkey/status-list";
/// How long a list may be relied on; verifiers poll well within it.
pub const STATUS_TTL: i64 = 3600;

/// The feed, signed on request with the status key held in the device.
pub struct StatusFeed {
    core: Arc<KeyCore>,
}

pub struct SignedStatus {
    pub cose: Vec<u8>,
    pub kid: String,
    pub public_key_der: Vec<u8>,
    pub sequence: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub entries: usize,
}

impl StatusFeed {
    pub fn new(core: Arc<KeyCore>) -> Self {
        Self { core }
    }

    /// Revoked, retired and destroyed versions under `prefix` of the keys the caller may read or
    /// verify with, signed now.
    pub async fn status_list(
        &self,
        caller: &Caller,
        prefix: &KeyPrefix,
    ) -> Result<SignedStatus, ServiceError> {
        let sequence = self.core.audit().chain_head().await?;
        self.core.catch_up().await?;
        let policy = self.core.policy().current();
        let visible = |name: &str| {
            policy.allows(&caller.identity, Operation::Verify, name)
                || policy.allows(&caller.identity, Operation::Read, name)
        };
        let (keys, _) = self
            .core
            .registry
            .list(prefix.as_str(), None, usize::MAX, |k| {
                !k.name.is_reserved() && visible(k.name.as_str())
            });
        let mut entries = Vec::new();
        for key in &keys {
            for v in &key.versions {
                let state = match v.state {
                    VersionState::Revoked => "revoked",
                    VersionState::Retired => "retired",
                    VersionState::Destroyed => "destroyed",
                    VersionState::Active | VersionState::VerifyOnly => continue,
                };
                entries.push(StatusEntry {
                    kid: key.name.to_string(),
                    version: v.version,
                    state,
                    since: v.state_changed_at,
                    reason: v.reason.clone(),
                });
            }
        }
        let signer = self
            .core
            .registry
            .get(&KeyName::parse(STATUS_KEY)?)
            .ok_or_else(|| ServiceError::Internal {
                detail: format!("{STATUS_KEY} is missing"),
            })?;
        let active = signer.active().ok_or_else(|| ServiceError::Internal {
            detail: format!("{STATUS_KEY} has no active version"),
        })?;
        let now = unix_now();
        let list = StatusList {
            issuer: "tillkey".into(),
            prefix: prefix.to_string(),
            sequence,
            issued_at: now,
            expires_at: now + STATUS_TTL,
            entries,
        };
        let kid = format!("{STATUS_KEY}#{}", active.version);
        let (sequence, issued_at, expires_at, count) = (
            list.sequence,
            list.issued_at,
            list.expires_at,
            list.entries.len(),
        );
        let public_key_der = active.public_key_der.clone().unwrap_or_default();
        let (object, signing_kid) = (active.object.clone(), kid.clone());
        let cose = self
            .core
            .device
            .call(move |b| {
                let key = KeyRef {
                    key_type: KeyType::EcdsaP256,
                    object: &object,
                };
                crate::statuslist::sign1(&list, signing_kid.as_bytes(), |tbs| {
                    b.sign(key, tbs).map_err(|e| e.to_string())
                })
                .map_err(|e| ServiceError::Internal {
                    detail: format!("signing the status list: {e}"),
                })
            })
            .await?;
        Ok(SignedStatus {
            cose,
            kid,
            public_key_der,
            sequence,
            issued_at,
            expires_at,
            entries: count,
        })
    }
}
