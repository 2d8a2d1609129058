//! Changes to keys: creation, rotation, revocation and settings (the scheduler, which makes the
//! timed ones, is in `scheduler`).
//!
//! Every change goes through [`KeyCore::changes`](super::KeyCore), one lock for all keys: officer actions and
//! scheduled rotations are rare next to signing, and one lock keeps the database and the index in
//! step without per-key bookkeeping. Signing never takes it.

use std::sync::Arc;

use super::key_core::KeyCore;
use super::key_core::Made;
use super::versions::NewKeyChecked;
use super::{unix_now, Caller};
use crate::device::Device;
use crate::error::ServiceError;
use crate::keys::{parse_duration, KeyName, KeyPrefix, KeyType, Lifecycle, VersionState};
use crate::policy::Operation;
use crate::registry::{KeyRecord, Registry, RegistryError, VersionRecord};

pub use super::key_core::{SCHEDULER, SERVICE};

/// Officer changes to keys: create (one or a batch), rotate, revoke (one key or a prefix),
/// settings; and the scheduler's timed changes.
pub struct KeyLifecycle {
    pub(super) core: Arc<KeyCore>,
    /// When the scheduler last cleared stale reservations (unix seconds).
    pub(super) swept_at: std::sync::atomic::AtomicI64,
}

impl KeyLifecycle {
    pub fn new(core: Arc<KeyCore>) -> Self {
        Self {
            core,
            swept_at: Default::default(),
        }
    }
}

/// Settings as a client writes them (durations like `90d`).
#[derive(Debug, Default)]
pub struct LifecycleInput {
    pub rotation_period: Option<String>,
    pub verify_grace: Option<String>,
    pub max_operations: Option<u64>,
    pub exportable: Option<bool>,
}

/// What a prefix action did.
pub struct PrefixOutcome {
    pub keys: Vec<String>,
    pub versions: usize,
}

impl LifecycleInput {
    /// Check the settings without applying them (for requests carried out later).
    pub fn validate(&self, key_type: KeyType) -> Result<(), ServiceError> {
        self.apply(Lifecycle::default(), key_type, true).map(|_| ())
    }

    /// Apply onto `base`. `rotation_period = "none"` and `max_operations = 0` switch those off.
    fn apply(
        &self,
        base: Lifecycle,
        key_type: KeyType,
        creating: bool,
    ) -> Result<Lifecycle, ServiceError> {
        let mut l = base;
        if let Some(p) = &self.rotation_period {
            l.rotation_period = if p == "none" {
                None
            } else {
                Some(parse_duration(p)?)
            };
        }
        if let Some(g) = &self.verify_grace {
            l.verify_grace = parse_duration(g)?;
        }
        if let Some(m) = self.max_operations {
            // Stored as a signed 64-bit integer: a larger number is refused, never clamped.
            if i64::try_from(m).is_err() {
                return Err(ServiceError::invalid(format!(
                    "max_operations must be at most {}",
                    i64::MAX
                )));
            }
            l.max_operations = (m > 0).then_some(m);
        }
        if let Some(e) = self.exportable {
            if !creating {
                return Err(ServiceError::invalid(
                    "exportable is fixed when the key is created",
                ));
            }
            if e && (key_type.is_asymmetric() || key_type.derives()) {
                return Err(ServiceError::invalid(
                    "only symmetric keys (for terminals) may be exportable",
                ));
            }
            l.exportable = e;
        }
        Ok(l)
    }
}

/// The registry record of a service key under `tillkey/`, created in the token on first start.
pub async fn ensure_service_key(
    registry: &Registry,
    device: &Device,
    name: &str,
    key_type: KeyType,
) -> Result<Arc<KeyRecord>, ServiceError> {
    let name = KeyName::parse(name)?;
    if let Some(k) = registry.get(&name) {
        return Ok(k);
    }
    let now = unix_now();
    let lifecycle = Lifecycle::default();
    match registry
        .reserve(&name, key_type, &lifecycle, now, SERVICE)
        .await
    {
        Ok(()) => {}
        Err(RegistryError::Exists) => return made_elsewhere(registry, &name).await,
        Err(e) => return Err(e.into()),
    }
    let label = format!("tillkey:{name}#1");
    let made = device
        .call(move |b| b.generate(key_type, &label, false))
        .await;
    let g = match made {
        Ok(g) => g,
        Err(e) => {
            registry.release(&name).await?;
            return Err(e);
        }
    };
    let rec = KeyRecord {
        name,
        key_type,
        lifecycle,
        created_at: now,
        created_by: SERVICE.into(),
        derive_from: None,
        versions: vec![VersionRecord::new(
            1,
            now,
            SERVICE,
            g.object,
            g.public_key_der,
        )],
    };
    Ok(registry.insert_first_version(rec).await?)
}

/// How long an instance starting beside another waits for the other to make a service key.
const MADE_ELSEWHERE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The service key `name` that another instance reserved first: instances started together on
/// an empty database race to make it, and the others take the winner's once it has a version.
async fn made_elsewhere(
    registry: &Registry,
    name: &KeyName,
) -> Result<Arc<KeyRecord>, ServiceError> {
    let started = std::time::Instant::now();
    loop {
        if let Some(key) = registry.reload(name).await? {
            return Ok(key);
        }
        if started.elapsed() > MADE_ELSEWHERE_PATIENCE {
            return Err(ServiceError::Unavailable {
                detail: format!(
                    "{name} is reserved but has no version after {} s: if no other instance is \
                     starting, one died making it, and the reservation is cleared 10 minutes \
                     after it was made",
                    MADE_ELSEWHERE_PATIENCE.as_secs()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

impl KeyLifecycle {
    pub async fn create_key(
        &self,
        caller: &Caller,
        name: &str,
        key_type: &str,
        settings: &LifecycleInput,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        self.create_key_from(caller, name, key_type, settings, None)
            .await
    }

    /// Everything about a new key that can be checked before the device is asked: the name,
    /// the grant(s), the type, the settings, and the master for a derived key.
    pub(super) fn check_new_key(
        &self,
        caller: &Caller,
        name: &str,
        key_type: &str,
        settings: &LifecycleInput,
        derive_from: Option<&str>,
    ) -> Result<NewKeyChecked, ServiceError> {
        let name = self.core.authorize(caller, Operation::Create, name)?;
        let key_type = KeyType::parse(key_type).ok_or_else(|| {
            ServiceError::invalid(format!(
                "unknown key type '{key_type}' (known: {})",
                KeyType::ALL.map(KeyType::as_str).join(", ")
            ))
        })?;
        let lifecycle = settings.apply(Lifecycle::default(), key_type, true)?;
        let master = match derive_from {
            None => None,
            Some(m) => {
                if !key_type.derivable() {
                    return Err(ServiceError::invalid(format!(
                        "{} keys cannot be derived; derived keys are hmac-sha256 or aes256-gcm",
                        key_type.as_str()
                    )));
                }
                if lifecycle.exportable {
                    return Err(ServiceError::invalid("derived keys are never exportable"));
                }
                Some(self.core.master_for(caller, m)?)
            }
        };
        if !self.core.device.supports(key_type) {
            return Err(ServiceError::UnsupportedOperation(format!(
                "the {} backend cannot hold {} keys",
                self.core.device.kind(),
                key_type.as_str()
            )));
        }
        Ok(NewKeyChecked {
            name,
            key_type,
            lifecycle,
            master,
        })
    }

    /// Create a key; with `derive_from`, one derived from that master (see `derived`).
    pub async fn create_key_from(
        &self,
        caller: &Caller,
        name: &str,
        key_type: &str,
        settings: &LifecycleInput,
        derive_from: Option<&str>,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let new = self.check_new_key(caller, name, key_type, settings, derive_from)?;
        let (name, key_type, by) = (new.name.clone(), new.key_type, &caller.identity);
        let now = unix_now();
        match self
            .core
            .registry
            .reserve(&name, key_type, &new.lifecycle, now, by)
            .await
        {
            Err(RegistryError::Exists) => {
                return Err(ServiceError::AlreadyExists(format!(
                    "key '{name}' already exists"
                )))
            }
            other => other?,
        }
        let first = match self.core.first_version(&new, now, by).await {
            Ok(v) => v,
            Err(e) => {
                self.core.registry.release(&name).await?;
                return Err(e);
            }
        };
        match self
            .core
            .registry
            .insert_first_version(new.into_record(first.clone(), now, by))
            .await
        {
            Ok(rec) => Ok(rec),
            Err(e) => {
                self.core.discard(key_type, &first).await;
                self.core.registry.release(&name).await?;
                Err(e.into())
            }
        }
    }

    /// Bring imported material in as a new key (the second half of an approved import).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn import_key(
        &self,
        name: &KeyName,
        key_type: KeyType,
        settings: &LifecycleInput,
        encrypted_kek: &[u8],
        wrapped_key: &[u8],
        expected_kcv: Option<&str>,
        requested_by: &str,
        reason: &str,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let lifecycle = settings.apply(Lifecycle::default(), key_type, true)?;
        let now = unix_now();
        match self
            .core
            .registry
            .reserve(name, key_type, &lifecycle, now, requested_by)
            .await
        {
            Err(RegistryError::Exists) => {
                return Err(ServiceError::AlreadyExists(format!(
                    "key '{name}' already exists"
                )))
            }
            other => other?,
        }
        let made = Made {
            version: 1,
            now,
            by: requested_by,
        };
        let mut v = match self
            .core
            .import_version(name, key_type, encrypted_kek, wrapped_key, made)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.core.registry.release(name).await?;
                return Err(e);
            }
        };
        v.reason = Some(reason.to_owned());
        if let Some(expected) = expected_kcv {
            if v.kcv.as_deref() != Some(expected) {
                self.core.discard(key_type, &v).await;
                self.core.registry.release(name).await?;
                return Err(ServiceError::invalid(
                    "the imported key's check value differs from the one given; nothing was imported",
                ));
            }
        }
        let rec = KeyRecord {
            name: name.clone(),
            key_type,
            lifecycle,
            created_at: now,
            created_by: requested_by.into(),
            derive_from: None,
            versions: vec![v.clone()],
        };
        match self.core.registry.insert_first_version(rec).await {
            Ok(rec) => Ok(rec),
            Err(e) => {
                self.core.discard(key_type, &v).await;
                self.core.registry.release(name).await?;
                Err(e.into())
            }
        }
    }

    /// A new active version; `reason` is recorded on the version it replaces.
    pub async fn rotate(
        &self,
        caller: &Caller,
        name: &str,
        reason: Option<&str>,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let reason = reason.map(check_reason).transpose()?;
        let name = self.core.authorize(caller, Operation::Rotate, name)?;
        let _guards = self.core.lock_rotation(&name).await;
        let key = self.core.lookup(&name)?;
        self.core
            .rotate_locked(&key, &caller.identity, reason)
            .await
    }

    /// Revoke one version, or every version still usable. Effective for the next request.
    pub async fn revoke(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
        reason: &str,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let reason = check_reason(reason)?;
        let name = self.core.authorize(caller, Operation::Revoke, name)?;
        let _guard = self.core.changes.lock(name.as_str()).await;
        let key = self.core.lookup(&name)?;
        if let Some(n) = version {
            if key.version(n).is_none() {
                return Err(ServiceError::NotFound(format!(
                    "key '{name}' has no version {n}"
                )));
            }
        }
        let (new, _) = revoked(&key, version, reason, &caller.identity);
        Ok(self.core.registry.commit(&key, new).await?)
    }

    /// One audited action over every key under `prefix` (a store or a terminal). All or nothing
    /// on authorization: if the caller may not act on one of the keys, nothing is done.
    pub async fn revoke_prefix(
        &self,
        caller: &Caller,
        prefix: &KeyPrefix,
        reason: &str,
    ) -> Result<PrefixOutcome, ServiceError> {
        let reason = check_reason(reason)?;
        let keys = self
            .core
            .authorize_prefix(caller, Operation::Revoke, prefix)?;
        let mut out = PrefixOutcome {
            keys: Vec::new(),
            versions: 0,
        };
        for key in keys {
            // Each key in its turn, read again once it is this action's turn.
            let _guard = self.core.changes.lock(key.name.as_str()).await;
            // A key another instance changed meanwhile is read again and revoked from there:
            // a revocation after a leak must not stop half-way for a routine change.
            let mut attempt = self.core.lookup(&key.name)?;
            let mut tries = 0;
            let n = loop {
                let (new, n) = revoked(&attempt, None, reason, &caller.identity);
                match self.core.registry.commit(&attempt, new).await {
                    Ok(_) => break n,
                    Err(RegistryError::Conflict(_)) if tries < 3 => {
                        tries += 1;
                        attempt = self.core.lookup(&attempt.name)?;
                    }
                    Err(RegistryError::Conflict(_)) => {
                        return Err(partial(&out, "revoked", attempt.name.as_str()))
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            out.versions += n;
            out.keys.push(attempt.name.to_string());
        }
        Ok(out)
    }

    pub async fn rotate_prefix(
        &self,
        caller: &Caller,
        prefix: &KeyPrefix,
        reason: Option<&str>,
    ) -> Result<PrefixOutcome, ServiceError> {
        let reason = reason.map(check_reason).transpose()?;
        let keys = self
            .core
            .authorize_prefix(caller, Operation::Rotate, prefix)?;
        let mut out = PrefixOutcome {
            keys: Vec::new(),
            versions: 0,
        };
        for key in keys {
            let _guards = self.core.lock_rotation(&key.name).await;
            let key = self.core.lookup(&key.name)?;
            match self
                .core
                .rotate_locked(&key, &caller.identity, reason)
                .await
            {
                Ok(_) => {}
                Err(ServiceError::FailedPrecondition(_)) => {
                    return Err(partial(&out, "rotated", key.name.as_str()))
                }
                Err(e) => return Err(e),
            }
            out.versions += 1;
            out.keys.push(key.name.to_string());
        }
        Ok(out)
    }

    pub async fn update_lifecycle(
        &self,
        caller: &Caller,
        name: &str,
        settings: &LifecycleInput,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.core.authorize(caller, Operation::Update, name)?;
        let _guard = self.core.changes.lock(name.as_str()).await;
        let key = self.core.lookup(&name)?;
        let mut new = (*key).clone();
        new.lifecycle = settings.apply(key.lifecycle, key.key_type, false)?;
        Ok(self.core.registry.commit(&key, new).await?)
    }
}

/// A prefix action stopped at `at` by another instance's change: says which keys it had
/// already changed, since those stay changed.
fn partial(done: &PrefixOutcome, verb: &str, at: &str) -> ServiceError {
    ServiceError::FailedPrecondition(format!(
        "key '{at}' was changed elsewhere meanwhile and was not {verb}; {} keys under the \
         prefix before it were {verb} ({}); retry to finish",
        done.keys.len(),
        done.keys.join(", ")
    ))
}

fn check_reason(reason: &str) -> Result<&str, ServiceError> {
    let r = reason.trim();
    if r.is_empty() || r.len() > 500 {
        return Err(ServiceError::invalid(
            "reason is required (1 to 500 characters)",
        ));
    }
    Ok(r)
}

/// `key` with `version` (or every version not already revoked or destroyed) revoked.
fn revoked(key: &KeyRecord, version: Option<u32>, reason: &str, by: &str) -> (KeyRecord, usize) {
    let now = unix_now();
    let mut new = key.clone();
    let mut n = 0;
    for v in &mut new.versions {
        let wanted = version.is_none_or(|want| want == v.version);
        if wanted
            && matches!(
                v.state,
                VersionState::Active | VersionState::VerifyOnly | VersionState::Retired
            )
        {
            *v = v.moved(VersionState::Revoked, now, by, Some(reason));
            n += 1;
        }
    }
    (new, n)
}
