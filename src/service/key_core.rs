//! The key core: what every feature needs to use a key, and nothing more. It judges a request
//! in the order every request is judged (a well-formed name, a grant for this caller before
//! existence so names are not probed, a known key, a key type that supports the operation, a
//! version in a state that allows it), counts use against `max_operations` (rotating at the cap),
//! reaches the device through its gate and writes the daemon's own audit entries.
//!
//! Features (operations, lifecycle, approvals, the status feed, each retail flow) hold the core
//! and their own store; none of them reaches the backend or another feature's tables.

use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};

use super::{unix_now, Caller, Device};
use crate::audit::AuditLog;
use crate::backend::KeyRef;
use crate::encoding::hex_encode;
use crate::error::ServiceError;
use crate::keys::{KeyName, KeyPrefix, KeyType, VersionState};
use crate::policy::{Operation, PolicyHandle};
use crate::registry::{KeyRecord, Registry, VersionRecord, MAX_BEHIND};

/// Actor recorded for changes the daemon makes on its own.
pub const SCHEDULER: &str = "tillkeyd:scheduler";
/// Creator recorded for the service's own keys.
pub const SERVICE: &str = "tillkeyd";

/// Who made a version, and when.
pub(super) struct Made<'a> {
    pub version: u32,
    pub now: i64,
    pub by: &'a str,
}

pub struct KeyCore {
    pub(super) device: Arc<Device>,
    pub(super) registry: Registry,
    policy: PolicyHandle,
    audit: AuditLog,
    rng: SystemRandom,
    /// Changes to one key in this process take turns (see `key_locks`).
    pub(super) changes: crate::key_locks::KeyLocks,
}

impl KeyCore {
    pub fn new(
        device: Arc<Device>,
        registry: Registry,
        policy: PolicyHandle,
        audit: AuditLog,
    ) -> Self {
        Self {
            device,
            registry,
            policy,
            audit,
            rng: SystemRandom::new(),
            changes: crate::key_locks::KeyLocks::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The registry's database, for features that keep their own tables in it.
    pub fn pool(&self) -> &sqlx::AnyPool {
        self.registry.pool()
    }

    pub fn key_count(&self) -> usize {
        self.registry.len()
    }

    /// `N` bytes from the OS generator.
    pub fn random<const N: usize>(&self) -> Result<[u8; N], ServiceError> {
        let mut out = [0u8; N];
        self.rng
            .fill(&mut out)
            .map_err(|_| ServiceError::Internal {
                detail: "system random generator failed".into(),
            })?;
        Ok(out)
    }

    /// The key named `name`, if it exists (no authorization: for a caller already judged).
    pub fn get(&self, name: &KeyName) -> Option<Arc<KeyRecord>> {
        self.registry.get(name)
    }

    /// HMAC under `key`'s versions (active first) of `label || data`, hex: the storage index of a
    /// secret that must never be stored itself.
    pub(crate) async fn keyed_indexes(
        &self,
        key: &crate::registry::KeyRecord,
        label: &[u8],
        data: &[u8],
    ) -> Result<Vec<String>, ServiceError> {
        let mut versions: Vec<_> = key
            .versions
            .iter()
            .filter(|v| v.state.may_check())
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.state == crate::keys::VersionState::Active));
        let objects: Vec<_> = versions.iter().map(|v| v.object.clone()).collect();
        let message = [label, data].concat();
        self.device
            .call(move |b| {
                objects
                    .iter()
                    .map(|object| {
                        let key = KeyRef {
                            key_type: KeyType::HmacSha256,
                            object,
                        };
                        b.sign(key, &message).map(|mac| hex_encode(&mac))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
    }

    /// Read again what other instances changed (see `registry::feed`); the daemon calls this
    /// a few times a second.
    pub async fn catch_up(&self) -> Result<usize, ServiceError> {
        let caught = self.registry.catch_up().await?;
        // Another instance destroyed these derived versions and emptied its own cache; the
        // device in this process may still hold them (never usable again: the registry refuses
        // destroyed versions, but a destroyed key should not outlive its destruction anywhere).
        for (key_type, object) in caught.destroyed {
            let forgotten = self
                .device
                .call(move |b| {
                    b.destroy(KeyRef {
                        key_type,
                        object: &object,
                    })
                })
                .await;
            if let Err(e) = forgotten {
                tracing::warn!(error = %e, "could not drop a destroyed derived key from this instance's cache");
            }
        }
        Ok(caught.keys)
    }

    /// Fail closed: an instance that has not caught up with the other instances' changes for
    /// longer than [`MAX_BEHIND`] may hold a revoked version as usable, so it serves no key
    /// until it has.
    pub fn current(&self) -> Result<(), ServiceError> {
        match self.registry.behind() {
            Some(behind) if behind > MAX_BEHIND => Err(ServiceError::Unavailable {
                detail: format!(
                    "the registry has not caught up with other instances' changes for {} ms",
                    behind.as_millis()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Final work at shutdown: persist usage counts, then close the database.
    pub async fn shutdown(&self) {
        if let Err(e) = self.registry.flush_usage().await {
            tracing::warn!(error = %e, "could not persist usage counts at shutdown");
        }
        self.registry.close().await;
    }

    pub(crate) fn authorize(
        &self,
        caller: &Caller,
        op: Operation,
        name: &str,
    ) -> Result<KeyName, ServiceError> {
        self.current()?;
        let name = KeyName::parse(name)?;
        if name.is_reserved() {
            return Err(ServiceError::PermissionDenied(format!(
                "names under '{}' are reserved for the service",
                crate::keys::RESERVED_PREFIX
            )));
        }
        if self
            .policy
            .current()
            .allows(&caller.identity, op, name.as_str())
        {
            Ok(name)
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "'{}' may not {} '{}'",
                caller.identity,
                op.as_str(),
                name
            )))
        }
    }

    pub(crate) fn lookup(&self, name: &KeyName) -> Result<Arc<KeyRecord>, ServiceError> {
        self.registry
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(format!("no key named '{name}'")))
    }

    /// The active version, with one use counted against its `max_operations`. A version at its
    /// limit is rotated first, so the caller gets the new one.
    pub(crate) async fn claim_active(
        &self,
        name: &KeyName,
        op: &str,
        allowed: impl Fn(KeyType) -> bool,
    ) -> Result<(Arc<KeyRecord>, Box<VersionRecord>), ServiceError> {
        self.claim_active_uses(name, op, allowed, 1).await
    }

    /// [`KeyCore::claim_active`] for `uses` operations at once (a batch): all of them go to one
    /// version, so a version that cannot take them all is rotated first.
    pub(crate) async fn claim_active_uses(
        &self,
        name: &KeyName,
        op: &str,
        allowed: impl Fn(KeyType) -> bool,
        uses: u64,
    ) -> Result<(Arc<KeyRecord>, Box<VersionRecord>), ServiceError> {
        // Each pass either claims or finds the version at its cap and sees it rotated (here or
        // by another instance): a failed pass means other requests were served, so the loop
        // ends. Under a burst on a small cap a request may see several rotations; only one
        // that keeps losing for seconds gives up.
        let deadline = std::time::Instant::now() + CAP_PATIENCE;
        while std::time::Instant::now() < deadline {
            let key = self.lookup(name)?;
            require(allowed(key.key_type), op, &key)?;
            if key.lifecycle.max_operations.is_some_and(|max| uses > max) {
                return Err(ServiceError::invalid(format!(
                    "a batch of {uses} is more than key '{name}' may do per version (max_operations)"
                )));
            }
            let v = active(&key)?;
            if let Some(max) = key.lifecycle.max_operations {
                // The count this process knows (which catches a cap just lowered here), then
                // the cap across instances: a lease of operations from the database.
                let known = v.operations.count();
                let room = known.saturating_add(uses) <= max
                    && self.registry.take_capped(name, v, uses, max).await?;
                if !room {
                    self.rotate_exhausted(name, v.version).await?;
                    continue;
                }
            }
            self.registry.count_use(name, v, uses);
            return Ok((key.clone(), Box::new(v.clone())));
        }
        Err(ServiceError::Unavailable {
            detail: format!("key '{name}' kept reaching max_operations while rotating"),
        })
    }

    /// Every key under `prefix`, for a caller whose grants cover the whole prefix for `op`.
    /// Judged by the policy alone, before any key is looked at, so the answer (403, 404 or the
    /// keys) tells nothing about names the caller may not act on, and a refusal names only
    /// the prefix the caller sent.
    pub fn authorize_prefix(
        &self,
        caller: &Caller,
        op: Operation,
        prefix: &KeyPrefix,
    ) -> Result<Vec<Arc<KeyRecord>>, ServiceError> {
        self.current()?;
        if !prefix.is_whole_segments() {
            return Err(ServiceError::invalid(crate::keys::WHOLE_SEGMENTS));
        }
        let reserved = crate::keys::RESERVED_PREFIX;
        if prefix.as_str().starts_with(reserved) || reserved.starts_with(prefix.as_str()) {
            return Err(ServiceError::PermissionDenied(format!(
                "names under '{reserved}' are reserved for the service; choose a prefix \
                 beside it; nothing was changed"
            )));
        }
        let policy = self.policy.current();
        if !policy.covers_prefix(&caller.identity, op, prefix.as_str()) {
            return Err(ServiceError::PermissionDenied(format!(
                "'{}' may not {} every key under '{prefix}' (a prefix action needs a grant \
                 covering the whole prefix); nothing was changed",
                caller.identity,
                op.as_str()
            )));
        }
        let (keys, _) = self
            .registry
            .list(prefix.as_str(), None, usize::MAX, |_| true);
        if keys.is_empty() {
            return Err(ServiceError::NotFound(format!("no keys under '{prefix}'")));
        }
        Ok(keys)
    }

    /// The turn of `name` for a rotation, and of its master too if it is derived: a new derived
    /// version is made from the master's active version, so the master's revocation or a
    /// destruction of that version (which checks for dependents) must not interleave with it.
    pub(crate) async fn lock_rotation(
        &self,
        name: &KeyName,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let master = self.registry.get(name).and_then(|k| k.derive_from.clone());
        let names = std::iter::once(name.as_str()).chain(master.as_ref().map(KeyName::as_str));
        self.changes.lock_many(names).await
    }

    /// Record the intent of a change the daemon makes on its own, before making it: refused
    /// when the trail refuses it, and then the change is not made (see `audit::STARTED`).
    pub(crate) async fn intend_own(
        &self,
        operation: &'static str,
        key: &KeyName,
        detail: &str,
    ) -> Result<(), ServiceError> {
        self.audit
            .append(own_record(
                operation,
                key,
                None,
                crate::audit::STARTED,
                detail,
            ))
            .await
            .map(|_| ())
    }

    /// Record the outcome (`ok` or an error code) of a change the daemon made on its own. The
    /// change is already committed and its intent durable, so a failed append can only be
    /// reported loudly.
    pub(crate) async fn audit_own(
        &self,
        operation: &'static str,
        key: &KeyName,
        version: Option<u32>,
        outcome: &'static str,
        detail: &str,
    ) {
        let record = own_record(operation, key, version, outcome, detail);
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(key = %key, operation, error = %e, detail = e.internal_detail().unwrap_or(""), "scheduled change made but its outcome entry could not be written (its intent entry is in the trail)");
        }
    }

    /// A new active version; the previous one verifies only until its grace ends.
    pub(crate) async fn rotate_locked(
        &self,
        key: &KeyRecord,
        by: &str,
        reason: Option<&str>,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let now = unix_now();
        let next = key.latest_version() + 1;
        let made = Made {
            version: next,
            now,
            by,
        };
        let fresh = self.next_version(key, made).await?;
        let mut new = key.clone();
        for v in &mut new.versions {
            if v.state == VersionState::Active {
                let mut moved = v.moved(VersionState::VerifyOnly, now, by, reason);
                moved.grace_until = Some(now + key.lifecycle.verify_grace as i64);
                *v = moved;
            }
        }
        new.versions.push(fresh.clone());
        match self.registry.commit(key, new).await {
            Ok(rec) => Ok(rec),
            Err(e) => {
                self.discard(key.key_type, &fresh).await;
                Err(e.into())
            }
        }
    }

    /// Called when an operation finds the active version at its `max_operations`: rotate it
    /// (once, however many requests notice at the same time) so the operation can use the new
    /// version. The cap is hard: the exhausted version performs no further operation.
    async fn rotate_exhausted(&self, name: &KeyName, version: u32) -> Result<(), ServiceError> {
        let _guards = self.lock_rotation(name).await;
        let key = self.lookup(name)?;
        if key.active().is_some_and(|v| v.version == version) {
            const WHY: &str = "max_operations reached";
            self.intend_own("rotate", name, WHY).await?;
            match self.rotate_locked(&key, SCHEDULER, Some(WHY)).await {
                Ok(new) => {
                    tracing::info!(key = %name, version, "rotated: max_operations reached");
                    let v = new.active().map(|v| v.version);
                    self.audit_own("rotate", name, v, "ok", WHY).await;
                }
                // Another instance changed the key first (most likely rotating it at the same
                // cap); the registry has read it again, and the caller tries with that.
                Err(e @ ServiceError::FailedPrecondition(_)) => {
                    self.audit_own("rotate", name, None, e.code(), WHY).await;
                }
                Err(e) => {
                    self.audit_own("rotate", name, None, e.code(), WHY).await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// An entry for a change the daemon makes on its own (the scheduler's identity).
fn own_record(
    operation: &'static str,
    key: &KeyName,
    version: Option<u32>,
    outcome: &'static str,
    detail: &str,
) -> crate::audit::Record {
    crate::audit::Record {
        identity: SCHEDULER.into(),
        operation,
        key: key.to_string(),
        version,
        outcome,
        request_id: "scheduler".into(),
        detail: detail.into(),
    }
}

/// How long a request keeps trying a key whose versions others keep using up.
const CAP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) fn require(ok: bool, op: &str, key: &KeyRecord) -> Result<(), ServiceError> {
    if ok {
        Ok(())
    } else {
        Err(ServiceError::UnsupportedOperation(format!(
            "{op} is not an operation of {} keys",
            key.key_type.as_str()
        )))
    }
}

pub(super) fn active(key: &KeyRecord) -> Result<&VersionRecord, ServiceError> {
    key.active().ok_or_else(|| {
        ServiceError::UnsupportedOperation(format!("key '{}' has no active version", key.name))
    })
}

/// The versions a verify or decrypt may use: the one asked for if it may check, otherwise every
/// checkable version newest first.
pub(super) fn checkable_versions(
    key: &KeyRecord,
    wanted: Option<u32>,
) -> Result<Vec<&VersionRecord>, ServiceError> {
    match wanted {
        Some(n) => {
            let v = key.version(n).ok_or_else(|| {
                ServiceError::NotFound(format!("key '{}' has no version {n}", key.name))
            })?;
            if !v.state.may_check() {
                return Err(ServiceError::UnsupportedOperation(format!(
                    "version {n} of key '{}' is {}",
                    key.name,
                    v.state.as_str()
                )));
            }
            Ok(vec![v])
        }
        None => {
            let mut vs: Vec<_> = key
                .versions
                .iter()
                .filter(|v| v.state.may_check())
                .collect();
            vs.sort_by_key(|v| std::cmp::Reverse(v.version));
            Ok(vs)
        }
    }
}

pub(super) fn key_ref<'a>(key: &KeyRecord, v: &'a VersionRecord) -> KeyRef<'a> {
    KeyRef {
        key_type: key.key_type,
        object: &v.object,
    }
}
