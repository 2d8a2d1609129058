//! Operations, in the order every request is judged: a well-formed name (400), a grant for this
//! caller (403, before existence so names are not probed), a known key (404), a key type that
//! supports the operation (422), a version in a state that allows it, then the device.
//! Single signs and verifies reach the device through `device` (short calls to a device that
//! makes them wait run on dedicated threads); batches through `batch`.

mod approvals;
pub mod batch;
mod batch_create;
mod derived;
mod envelope;
pub mod lifecycle;
mod scheduler;
pub mod status;
mod versions;

pub use approvals::{Executed, ExportResult, ImportRequest};
pub use batch_create::{BatchItem, NewKey, MAX_CREATE_BATCH};
pub use derived::context as derivation_context;
pub use lifecycle::{ensure_service_key, LifecycleInput, PrefixOutcome};

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use crate::audit::{self, AuditLog};
use crate::backend::{KeyBackend, KeyRef, GCM_NONCE_LEN};
use crate::device::Device;
use crate::encoding;
use crate::error::ServiceError;
use crate::keys::{KeyName, KeyType};
use crate::policy::{Operation, PolicyHandle};
use crate::registry::{KeyRecord, Registry, VersionRecord};

/// Most keys one listing page returns.
pub const LIST_PAGE: usize = 1000;

/// The authenticated client, from its certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// ASN.1 DER `SEQUENCE { r, s }` for ECDSA, as OpenSSL writes it.
    Der,
    /// `r || s`, as JOSE and COSE use it.
    Raw,
}

pub struct Signed {
    pub signature: Vec<u8>,
    pub version: u32,
}

pub struct Verified {
    pub valid: bool,
    pub version: u32,
}

pub struct Service {
    pub(crate) device: Arc<Device>,
    pub(crate) registry: Registry,
    policy: PolicyHandle,
    audit: AuditLog,
    rng: SystemRandom,
    /// Serializes every change to keys (see `lifecycle`).
    changes: tokio::sync::Mutex<()>,
    /// Seconds a dual-control approval stays open.
    approval_ttl: u64,
    /// Gift-code checks per client identity.
    pub(crate) throttle: crate::tokens::giftcode::Throttle,
    pub(crate) tokens: crate::config::TokenSettings,
}

impl Service {
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
            changes: tokio::sync::Mutex::new(()),
            approval_ttl: crate::config::DEFAULT_APPROVAL_TTL,
            throttle: Default::default(),
            tokens: Default::default(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    /// Final work at shutdown: persist usage counts, then close the database.
    pub async fn shutdown(&self) {
        if let Err(e) = self.registry.flush_usage().await {
            tracing::warn!(error = %e, "could not persist usage counts at shutdown");
        }
        self.registry.close().await;
    }

    pub fn with_token_settings(mut self, tokens: crate::config::TokenSettings) -> Self {
        self.tokens = tokens;
        self
    }

    pub fn with_approval_ttl(mut self, seconds: u64) -> Self {
        self.approval_ttl = seconds;
        self
    }

    /// The process's CSPRNG (the OS generator).
    pub(crate) fn rng(&self) -> &SystemRandom {
        &self.rng
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Audit entries after `q.since` that the caller may see: auditors are granted `audit` on
    /// key patterns, and see the entries of those keys (entries without a key count as `-`).
    pub async fn audit_entries(
        &self,
        caller: &Caller,
        q: &audit::Query,
    ) -> Result<(Vec<audit::Entry>, Option<u64>), ServiceError> {
        let policy = self.policy.current();
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
            let batch = audit::read(self.registry.pool(), &cursor)
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

    pub fn key_count(&self) -> usize {
        self.registry.len()
    }

    pub(crate) fn authorize(
        &self,
        caller: &Caller,
        op: Operation,
        name: &str,
    ) -> Result<KeyName, ServiceError> {
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

    pub fn get_key(&self, caller: &Caller, name: &str) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.authorize(caller, Operation::Read, name)?;
        self.lookup(&name)
    }

    /// One page (at most `page_size`, capped at [`LIST_PAGE`]) of the keys under `prefix` that the caller may read (others are left out, not
    /// refused), starting after `page_token` (the last name of the previous page). The second
    /// value is the token for the next page, if there is one.
    pub fn list_keys(
        &self,
        caller: &Caller,
        prefix: &str,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<(Vec<Arc<KeyRecord>>, Option<String>), ServiceError> {
        let name_chars = |s: &str| {
            s.len() <= crate::keys::MAX_NAME_LEN + 1
                && s.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/'))
        };
        if !name_chars(prefix) || !page_token.is_none_or(name_chars) {
            return Err(ServiceError::invalid(
                "prefix and page_token may contain only a-z, 0-9, '.', '_', '-' and '/'",
            ));
        }
        let policy = self.policy.current();
        let (keys, more) =
            self.registry
                .list(prefix, page_token, page_size.clamp(1, LIST_PAGE), |k| {
                    !k.name.is_reserved()
                        && policy.allows(&caller.identity, Operation::Read, k.name.as_str())
                });
        let next = if more {
            keys.last().map(|k| k.name.to_string())
        } else {
            None
        };
        Ok((keys, next))
    }

    pub async fn sign(
        &self,
        caller: &Caller,
        name: &str,
        message: Vec<u8>,
        format: SignatureFormat,
    ) -> Result<Signed, ServiceError> {
        let name = self.authorize(caller, Operation::Sign, name)?;
        let (key, v) = self.claim_active(&name, "sign", |t| t.signs()).await?;
        let (k, version) = (key.clone(), v.version);
        let raw = self
            .device
            .call(move |b| b.sign(key_ref(&k, &v), &message))
            .await?;
        let signature = match (key.key_type, format) {
            (KeyType::EcdsaP256, SignatureFormat::Der) => encoding::ecdsa_raw_to_der(&raw)
                .ok_or_else(|| ServiceError::Internal {
                    detail: format!("backend returned a {}-byte ECDSA signature", raw.len()),
                })?,
            _ => raw,
        };
        Ok(Signed { signature, version })
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

    /// [`Service::claim_active`] for `uses` operations at once (a batch): all of them go to one
    /// version, so a version that cannot take them all is rotated first.
    pub(crate) async fn claim_active_uses(
        &self,
        name: &KeyName,
        op: &str,
        allowed: impl Fn(KeyType) -> bool,
        uses: u64,
    ) -> Result<(Arc<KeyRecord>, Box<VersionRecord>), ServiceError> {
        for _ in 0..3 {
            let key = self.lookup(name)?;
            require(allowed(key.key_type), op, &key)?;
            if key.lifecycle.max_operations.is_some_and(|max| uses > max) {
                return Err(ServiceError::invalid(format!(
                    "a batch of {uses} is more than key '{name}' may do per version (max_operations)"
                )));
            }
            let v = active(&key)?;
            let used = self.registry.count_use(name, v, uses);
            match key.lifecycle.max_operations {
                Some(max) if used + uses > max => {
                    v.operations
                        .fetch_sub(uses, std::sync::atomic::Ordering::Relaxed);
                    let version = v.version;
                    self.rotate_exhausted(name, version).await?;
                }
                _ => {
                    let v = Box::new(v.clone());
                    return Ok((key, v));
                }
            }
        }
        Err(ServiceError::Unavailable {
            detail: format!("key '{name}' kept reaching max_operations while rotating"),
        })
    }

    /// Verify against the named version, or else against each version that may still verify,
    /// newest first, reporting the one that matched.
    pub async fn verify(
        &self,
        caller: &Caller,
        name: &str,
        message: Vec<u8>,
        signature: Vec<u8>,
        version: Option<u32>,
        format: SignatureFormat,
    ) -> Result<Verified, ServiceError> {
        let key = self.verifying_key(caller, name)?;
        self.device
            .call(move |b| verify_with(b, &key, &message, &signature, version, format))
            .await
    }

    /// The key a verify names, after the policy, existence and key-type checks.
    pub(crate) fn verifying_key(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.authorize(caller, Operation::Verify, name)?;
        let key = self.lookup(&name)?;
        require(key.key_type.signs(), "verify", &key)?;
        Ok(key)
    }

    pub async fn encrypt(
        &self,
        caller: &Caller,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), ServiceError> {
        let name = self.authorize(caller, Operation::Encrypt, name)?;
        let (key, v) = self
            .claim_active(&name, "encrypt", |t| t.encrypts())
            .await?;
        let mut nonce = [0u8; GCM_NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| ServiceError::Internal {
                detail: "system random generator failed".into(),
            })?;
        let header = envelope::Header {
            version: v.version,
            nonce,
        };
        let (aad, plaintext) = (header.aad(aad), plaintext.to_vec());
        let version = v.version;
        let sealed = self
            .device
            .call(move |b| b.encrypt(key_ref(&key, &v), &nonce, &aad, &plaintext))
            .await?;
        Ok((header.seal(&sealed), version))
    }

    pub async fn decrypt(
        &self,
        caller: &Caller,
        name: &str,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), ServiceError> {
        let name = self.authorize(caller, Operation::Decrypt, name)?;
        let key = self.lookup(&name)?;
        require(key.key_type.encrypts(), "decrypt", &key)?;
        let (header, body) = envelope::Header::open(ciphertext)?;
        let version = match checkable_versions(&key, Some(header.version)) {
            Ok(vs) => vs.into_iter().next().map(|v| v.version),
            // An unknown version in the header is a ciphertext this key never made.
            Err(ServiceError::NotFound(_)) => None,
            Err(e) => return Err(e),
        }
        .ok_or_else(|| ServiceError::invalid("ciphertext was not made by this key"))?;
        let (aad, body) = (header.aad(aad), body.to_vec());
        let opened = self
            .device
            .call(move |b| {
                let v = key.version(version).ok_or_else(|| ServiceError::Internal {
                    detail: "a checked version vanished".into(),
                })?;
                Ok::<_, ServiceError>(b.decrypt(key_ref(&key, v), &header.nonce, &aad, &body)?)
            })
            .await?;
        match opened {
            Some(pt) => Ok((pt, version)),
            None => Err(ServiceError::invalid(
                "decryption failed: ciphertext or associated data is not authentic",
            )),
        }
    }
}

/// Verify with a key already authorized by [`Service::verifying_key`].
pub(crate) fn verify_with(
    backend: &dyn KeyBackend,
    key: &KeyRecord,
    message: &[u8],
    signature: &[u8],
    version: Option<u32>,
    format: SignatureFormat,
) -> Result<Verified, ServiceError> {
    let candidates = checkable_versions(key, version)?;
    let newest = candidates.first().map(|v| v.version).ok_or_else(|| {
        ServiceError::UnsupportedOperation(format!(
            "key '{}' has no version that may verify",
            key.name
        ))
    })?;
    let signature = match (key.key_type, format) {
        (KeyType::EcdsaP256, SignatureFormat::Der) => {
            match encoding::ecdsa_der_to_raw(signature) {
                Some(raw) => raw.to_vec(),
                // Not DER at all: no version can accept it.
                None => {
                    return Ok(Verified {
                        valid: false,
                        version: newest,
                    })
                }
            }
        }
        _ => signature.to_vec(),
    };
    for v in &candidates {
        if backend.verify(key_ref(key, v), message, &signature)? {
            return Ok(Verified {
                valid: true,
                version: v.version,
            });
        }
    }
    Ok(Verified {
        valid: false,
        version: newest,
    })
}

/// Every key under `prefix` after checking that the caller may do `op` on each; a single refusal
/// refuses the whole action.
fn authorize_all(
    svc: &Service,
    caller: &Caller,
    op: Operation,
    prefix: &str,
) -> Result<Vec<Arc<KeyRecord>>, ServiceError> {
    // Whole segments only: "stores/1/" must never also take "stores/12/...".
    let valid = prefix.ends_with('/')
        && prefix.len() > 1
        && prefix.len() <= crate::keys::MAX_NAME_LEN + 1
        && prefix
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/'));
    if !valid {
        return Err(ServiceError::invalid(
            "prefix is required, ends with '/' (whole segments), and contains only a-z, 0-9, '.', '_', '-' and '/'",
        ));
    }
    let (keys, _) = svc.registry.list(prefix, None, usize::MAX, |_| true);
    if keys.is_empty() {
        // Only someone who may act on keys at all learns that a prefix is empty.
        if !svc.policy.current().grants_any(&caller.identity, op) {
            return Err(ServiceError::PermissionDenied(format!(
                "'{}' may not {}",
                caller.identity,
                op.as_str()
            )));
        }
        return Err(ServiceError::NotFound(format!("no keys under '{prefix}'")));
    }
    let policy = svc.policy.current();
    if let Some(denied) = keys
        .iter()
        .find(|k| k.name.is_reserved() || !policy.allows(&caller.identity, op, k.name.as_str()))
    {
        return Err(ServiceError::PermissionDenied(format!(
            "'{}' may not {} '{}'; nothing was changed",
            caller.identity,
            op.as_str(),
            denied.name
        )));
    }
    Ok(keys)
}

fn require(ok: bool, op: &str, key: &KeyRecord) -> Result<(), ServiceError> {
    if ok {
        Ok(())
    } else {
        Err(ServiceError::UnsupportedOperation(format!(
            "{op} is not an operation of {} keys",
            key.key_type.as_str()
        )))
    }
}

fn active(key: &KeyRecord) -> Result<&VersionRecord, ServiceError> {
    key.active().ok_or_else(|| {
        ServiceError::UnsupportedOperation(format!("key '{}' has no active version", key.name))
    })
}

/// The versions a verify or decrypt may use: the one asked for if it may check, otherwise every
/// checkable version newest first.
fn checkable_versions(
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

fn key_ref<'a>(key: &KeyRecord, v: &'a VersionRecord) -> KeyRef<'a> {
    KeyRef {
        key_type: key.key_type,
        object: &v.object,
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
