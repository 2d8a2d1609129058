//! Dual control: dangerous actions (destroy now; import and export use the same path) need two
//! different officers. The first call records a pending approval; a second officer who holds the
//! same permission on the key approves it, and only then is the action carried out.

use std::sync::Arc;

use super::key_core::KeyCore;
use super::{unix_now, Caller, KeyLifecycle, LifecycleInput};
use crate::backend::KeyRef;
use crate::error::ServiceError;
use crate::keys::{KeyName, VersionState};
use crate::policy::Operation;
use crate::registry::approvals::ApprovalRecord;
use crate::registry::KeyRecord;

/// Dual control over the key core; an approved import becomes a key through the lifecycle.
pub struct Approvals {
    core: Arc<KeyCore>,
    lifecycle: Arc<KeyLifecycle>,
    /// Seconds a dual-control approval stays open.
    approval_ttl: u64,
}

/// What an executed approval produced.
pub enum Executed {
    Key(Arc<KeyRecord>),
    Export(ExportResult),
}

/// A key version wrapped for injection into a terminal.
pub struct ExportResult {
    pub key: String,
    pub version: u32,
    /// RFC 5649 (AES key wrap with padding) under the transport key.
    pub wrapped_key: Vec<u8>,
    pub kcv: Option<String>,
    pub transport_key: String,
    pub transport_version: u32,
    pub transport_kcv: Option<String>,
}

/// An import as the requesting officer sends it. The material itself never appears: only the
/// RSA-OAEP-encrypted one-time KEK and the material wrapped under it.
pub struct ImportRequest {
    pub name: String,
    pub key_type: String,
    pub encrypted_kek: Vec<u8>,
    pub wrapped_key: Vec<u8>,
    /// The key check value the importer computed from the material (hex); checked after import.
    pub kcv: Option<String>,
    pub settings: LifecycleInput,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ImportParams {
    key_type: String,
    encrypted_kek: String,
    wrapped_key: String,
    kcv: Option<String>,
    rotation_period: Option<String>,
    verify_grace: Option<String>,
    max_operations: Option<u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ExportParams {
    transport_key: String,
}

impl Approvals {
    pub fn new(core: Arc<KeyCore>, lifecycle: Arc<KeyLifecycle>, approval_ttl: u64) -> Self {
        Self {
            core,
            lifecycle,
            approval_ttl,
        }
    }

    /// Step one of exporting a version for key injection: only keys created `exportable`, only
    /// under a transport key (`aes256-kw`) the caller may also export with.
    pub async fn request_export(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
        transport: &str,
    ) -> Result<ApprovalRecord, ServiceError> {
        let name = self.core.authorize(caller, Operation::Export, name)?;
        let transport = self.core.authorize(caller, Operation::Export, transport)?;
        let key = self.core.lookup(&name)?;
        let tkey = self.core.lookup(&transport)?;
        exportable(&key, version)?;
        transport_version(&tkey)?;
        let params = serde_json::to_string(&ExportParams {
            transport_key: transport.to_string(),
        })
        .map_err(|e| ServiceError::Internal {
            detail: e.to_string(),
        })?;
        self.new_approval(caller, "export", &name, Some(version), params)
            .await
    }

    /// Step one of importing key material (BYOK).
    pub async fn request_import(
        &self,
        caller: &Caller,
        req: ImportRequest,
    ) -> Result<ApprovalRecord, ServiceError> {
        let name = self.core.authorize(caller, Operation::Import, &req.name)?;
        let key_type = crate::keys::KeyType::parse(&req.key_type)
            .filter(|t| !t.is_asymmetric())
            .ok_or_else(|| {
                ServiceError::invalid(format!(
                    "import type '{}' is not one of hmac-sha256, aes256-gcm, aes256-kw",
                    req.key_type
                ))
            })?;
        if req.settings.exportable == Some(true) {
            return Err(ServiceError::invalid("imported keys are never exportable"));
        }
        req.settings.validate(key_type)?;
        if self.core.registry.get(&name).is_some() {
            return Err(ServiceError::AlreadyExists(format!(
                "key '{name}' already exists"
            )));
        }
        // A backend that cannot import (a TPM) says so now, not after a second officer has
        // spent an approval on it. The wrapping key exists once made, so this costs a lookup.
        self.core.device.call(|b| b.import_wrapping_key()).await?;
        // RFC 5649 output is the material rounded up to 8 bytes plus 8: the blob's length says
        // how long the material is, so a 16-byte key cannot slip in as an AES-256 key.
        let allowed = if key_type == crate::keys::KeyType::HmacSha256 {
            40..=72
        } else {
            40..=40
        };
        if req.encrypted_kek.is_empty() || !allowed.contains(&req.wrapped_key.len()) {
            return Err(ServiceError::invalid(
                "wrapped_key must wrap 32-byte material (hmac-sha256: 32 to 64 bytes), i.e. 40 to 72 bytes of RFC 5649 output",
            ));
        }
        if let Some(k) = &req.kcv {
            if k.len() != 6 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ServiceError::invalid("kcv is 6 hexadecimal characters"));
            }
        }
        let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
        let params = ImportParams {
            key_type: key_type.as_str().into(),
            encrypted_kek: b64(&req.encrypted_kek),
            wrapped_key: b64(&req.wrapped_key),
            kcv: req.kcv.map(|k| k.to_ascii_lowercase()),
            rotation_period: req.settings.rotation_period,
            verify_grace: req.settings.verify_grace,
            max_operations: req.settings.max_operations,
        };
        let params = serde_json::to_string(&params).map_err(|e| ServiceError::Internal {
            detail: e.to_string(),
        })?;
        self.new_approval(caller, "import", &name, None, params)
            .await
    }

    /// The public key importers wrap for (PEM), made in the token on first use.
    pub async fn import_wrapping_key(&self) -> Result<String, ServiceError> {
        let der = self.core.device.call(|b| b.import_wrapping_key()).await?;
        Ok(crate::encoding::pem("PUBLIC KEY", &der))
    }

    /// Step one of destroying a revoked or retired version: record it for a second officer.
    pub async fn request_destroy(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Result<ApprovalRecord, ServiceError> {
        let name = self.core.authorize(caller, Operation::Destroy, name)?;
        let key = self.core.lookup(&name)?;
        destroyable(&key, version)?;
        self.no_dependents(&key, version)?;
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
        let id = self.core.random::<16>()?;
        let now = unix_now();
        let a = ApprovalRecord {
            id: crate::encoding::hex_encode(&id),
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
        self.core.registry.insert_approval(&a).await?;
        Ok(a)
    }

    /// Pending approvals this caller could approve.
    pub async fn pending_approvals(
        &self,
        caller: &Caller,
    ) -> Result<Vec<ApprovalRecord>, ServiceError> {
        let policy = self.core.policy().current();
        Ok(self
            .core
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
        self.core
            .authorize(caller, op, &a.key)
            .map_err(|e| unseen(e, id))?;
        if a.action == "export" {
            // The approver vouches for the destination too, as the requester had to.
            let p: ExportParams =
                serde_json::from_str(&a.params).map_err(|e| ServiceError::Internal {
                    detail: format!("approval params: {e}"),
                })?;
            self.core
                .authorize(caller, op, &p.transport_key)
                .map_err(|e| unseen(e, id))?;
        }
        if a.requested_by == caller.identity {
            return Err(ServiceError::PermissionDenied(
                "dual control: the officer who requested an action cannot approve it".into(),
            ));
        }
        let now = unix_now();
        let _guard = self.core.changes.lock(&a.key).await;
        if !self
            .core
            .registry
            .decide_approval(id, "executing", &caller.identity, now, true)
            .await?
        {
            return Err(self.why_not_pending(id, now).await);
        }
        let result = match a.action.as_str() {
            "destroy" => self.execute_destroy(&a, caller).await.map(Executed::Key),
            "export" => self.execute_export(&a).await.map(Executed::Export),
            "import" => self.execute_import(&a, caller).await.map(Executed::Key),
            other => Err(ServiceError::Internal {
                detail: format!("approval action {other} has no executor"),
            }),
        };
        let (state, text) = match &result {
            Ok(_) => ("executed", "ok".to_string()),
            Err(e) => ("failed", e.to_string()),
        };
        self.core.registry.finish_approval(id, state, &text).await?;
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
            self.core
                .authorize(caller, op, &a.key)
                .map_err(|e| unseen(e, id))?;
        }
        let now = unix_now();
        if !self
            .core
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
        self.core
            .registry
            .approval(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no approval {id}")))
    }

    async fn why_not_pending(&self, id: &str, now: i64) -> ServiceError {
        match self.core.registry.approval(id).await {
            Ok(Some(a)) if a.state == "pending" && a.expires_at <= now => {
                let _ = self
                    .core
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

    async fn execute_export(&self, a: &ApprovalRecord) -> Result<ExportResult, ServiceError> {
        let p: ExportParams =
            serde_json::from_str(&a.params).map_err(|e| ServiceError::Internal {
                detail: format!("approval params: {e}"),
            })?;
        let key = self.core.lookup(&KeyName::parse(&a.key)?)?;
        let tkey = self.core.lookup(&KeyName::parse(&p.transport_key)?)?;
        let version = a
            .version
            .ok_or_else(|| ServiceError::invalid("export needs a version"))?;
        let v = exportable(&key, version)?;
        let t = transport_version(&tkey)?;
        let (key_type, object) = (key.key_type, v.object.clone());
        let (transport_type, transport) = (tkey.key_type, t.object.clone());
        let wrapped = self
            .core
            .device
            .call(move |b| {
                b.wrap(
                    KeyRef {
                        key_type,
                        object: &object,
                    },
                    KeyRef {
                        key_type: transport_type,
                        object: &transport,
                    },
                )
            })
            .await?;
        Ok(ExportResult {
            key: key.name.to_string(),
            version,
            wrapped_key: wrapped,
            kcv: v.kcv.clone(),
            transport_key: tkey.name.to_string(),
            transport_version: t.version,
            transport_kcv: t.kcv.clone(),
        })
    }

    async fn execute_import(
        &self,
        a: &ApprovalRecord,
        approver: &Caller,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let p: ImportParams =
            serde_json::from_str(&a.params).map_err(|e| ServiceError::Internal {
                detail: format!("approval params: {e}"),
            })?;
        let unb64 = |s: &str| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).map_err(|e| {
                ServiceError::Internal {
                    detail: format!("approval params: {e}"),
                }
            })
        };
        let key_type =
            crate::keys::KeyType::parse(&p.key_type).ok_or_else(|| ServiceError::Internal {
                detail: "approval params: key type".into(),
            })?;
        let settings = LifecycleInput {
            rotation_period: p.rotation_period.clone(),
            verify_grace: p.verify_grace.clone(),
            max_operations: p.max_operations,
            exportable: None,
        };
        let reason = format!(
            "imported; requested by {}, approved by {}",
            a.requested_by, approver.identity
        );
        self.lifecycle
            .import_key(
                &KeyName::parse(&a.key)?,
                key_type,
                &settings,
                &unb64(&p.encrypted_kek)?,
                &unb64(&p.wrapped_key)?,
                p.kcv.as_deref(),
                &a.requested_by,
                &reason,
            )
            .await
    }

    async fn execute_destroy(
        &self,
        a: &ApprovalRecord,
        approver: &Caller,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = KeyName::parse(&a.key)?;
        let key = self.core.lookup(&name)?;
        let version = a
            .version
            .ok_or_else(|| ServiceError::invalid("destroy needs a version"))?;
        let v = destroyable(&key, version)?;
        self.no_dependents(&key, version)?;
        let (key_type, object) = (key.key_type, v.object.clone());
        self.core
            .device
            .call(move |b| {
                b.destroy(KeyRef {
                    key_type,
                    object: &object,
                })
            })
            .await?;
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
                // Forget the reference too: for a TPM it is the key's wrapped private blob,
                // which would still load on the same TPM.
                x.object = crate::backend::ObjectRef(Vec::new());
            }
        }
        Ok(self.core.registry.commit(&key, new).await?)
    }
}

impl Approvals {
    /// A master version that derived keys still use is not destroyed: revoke or rotate (and let
    /// retire) those keys first.
    fn no_dependents(&self, key: &KeyRecord, version: u32) -> Result<(), ServiceError> {
        if !key.key_type.derives() {
            return Ok(());
        }
        match self.core.derived_dependents(&key.name, version) {
            0 => Ok(()),
            n => Err(ServiceError::FailedPrecondition(format!(
                "version {version} of master '{}' still derives {n} usable key(s); revoke them or let them retire first",
                key.name
            ))),
        }
    }
}

fn action_operation(action: &str) -> Option<Operation> {
    match action {
        "destroy" => Some(Operation::Destroy),
        "export" => Some(Operation::Export),
        "import" => Some(Operation::Import),
        _ => None,
    }
}

fn exportable(
    key: &KeyRecord,
    version: u32,
) -> Result<&crate::registry::VersionRecord, ServiceError> {
    if !key.lifecycle.exportable {
        return Err(ServiceError::UnsupportedOperation(format!(
            "key '{}' was not created exportable; it cannot leave the token",
            key.name
        )));
    }
    let v = key.version(version).ok_or_else(|| {
        ServiceError::NotFound(format!("key '{}' has no version {version}", key.name))
    })?;
    if !v.state.may_check() {
        return Err(ServiceError::FailedPrecondition(format!(
            "version {version} of '{}' is {}; only active or verify-only versions are exported",
            key.name,
            v.state.as_str()
        )));
    }
    Ok(v)
}

fn transport_version(t: &KeyRecord) -> Result<&crate::registry::VersionRecord, ServiceError> {
    if !t.key_type.wraps() {
        return Err(ServiceError::UnsupportedOperation(format!(
            "'{}' is a {} key, not a transport key (aes256-kw)",
            t.name,
            t.key_type.as_str()
        )));
    }
    t.active().ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "transport key '{}' has no active version",
            t.name
        ))
    })
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

/// To a caller who may not act on an approval's key, the approval does not exist: the answer
/// is the one for an unknown id, so an id seen in a log tells nothing of its key or action.
fn unseen(e: ServiceError, id: &str) -> ServiceError {
    match e {
        ServiceError::PermissionDenied(_) => ServiceError::NotFound(format!("no approval {id}")),
        other => other,
    }
}
