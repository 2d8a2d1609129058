//! A key and its versions as the registry holds them: what every layer above reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::backend::{Kdf, ObjectRef};
use crate::keys::{KeyName, KeyType, Lifecycle, VersionState};

#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub version: u32,
    pub state: VersionState,
    /// Unix time in seconds.
    pub created_at: i64,
    /// When the version entered its current state, who put it there, and why (revocations).
    pub state_changed_at: i64,
    /// Shared: a registry of a million keys has a handful of distinct identities.
    pub changed_by: Arc<str>,
    pub reason: Option<String>,
    /// End of the verify-only window.
    pub grace_until: Option<i64>,
    pub object: ObjectRef,
    /// DER SubjectPublicKeyInfo for asymmetric keys.
    pub public_key_der: Option<Vec<u8>>,
    /// Key check value (hex) of symmetric keys.
    pub kcv: Option<String>,
    /// For a version derived from a master key: which master version and KDF made it.
    pub derivation: Option<Derivation>,
    /// Operations performed (sign, MAC, encrypt). Shared by every snapshot of this version and
    /// written to the database by [`Registry::flush_usage`], not on every operation.
    pub operations: Arc<Usage>,
}

/// How a derived version was made. The master's key material is named by the version's
/// backend reference; this is the record for people and for the master's own life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Derivation {
    pub master_version: u32,
    pub kdf: Kdf,
}

/// Use count of one version: the database's count when this process last read or wrote it,
/// plus this process's operations not yet written (flushed as increments, so instances sharing
/// the database each add their own and none overwrites another's). Every operation is in
/// exactly one flush; the sum shown between flushes may lag other instances'.
#[derive(Debug, Default)]
pub struct Usage {
    pub(super) base: AtomicU64,
    pub(super) unflushed: AtomicU64,
    /// Whether the version waits in the flush queue (so a flush visits only versions used
    /// since the last one).
    pub(super) queued: AtomicBool,
    /// Operations of a capped version this process has leased, and performed under those
    /// leases (see `cap`).
    pub(super) granted: AtomicU64,
    pub(super) spent: AtomicU64,
    pub(super) leasing: tokio::sync::Mutex<()>,
}

impl Usage {
    pub(super) fn new(count: u64) -> Self {
        Self {
            base: AtomicU64::new(count),
            ..Default::default()
        }
    }

    /// Operations performed, as far as this process knows.
    pub fn count(&self) -> u64 {
        self.base
            .load(Ordering::Relaxed)
            .saturating_add(self.unflushed.load(Ordering::Relaxed))
    }
}

impl VersionRecord {
    pub fn new(
        version: u32,
        created_at: i64,
        by: &str,
        object: ObjectRef,
        public_key_der: Option<Vec<u8>>,
    ) -> Self {
        Self {
            version,
            state: VersionState::Active,
            created_at,
            state_changed_at: created_at,
            changed_by: by.into(),
            reason: None,
            grace_until: None,
            object,
            public_key_der,
            kcv: None,
            derivation: None,
            operations: Arc::new(Usage::new(0)),
        }
    }

    /// The same version moved to `state` at `at` by `by`.
    pub fn moved(&self, state: VersionState, at: i64, by: &str, reason: Option<&str>) -> Self {
        Self {
            state,
            state_changed_at: at,
            changed_by: by.into(),
            reason: reason.map(str::to_owned),
            grace_until: None,
            ..self.clone()
        }
    }

    pub(super) fn same_state(&self, other: &Self) -> bool {
        self.state == other.state
            && self.state_changed_at == other.state_changed_at
            && self.changed_by == other.changed_by
            && self.reason == other.reason
            && self.grace_until == other.grace_until
            && self.object == other.object
    }
}

#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub name: KeyName,
    pub key_type: KeyType,
    pub lifecycle: Lifecycle,
    pub created_at: i64,
    pub created_by: Arc<str>,
    /// The master key (`aes256-derive`) this key's versions are derived from, if any.
    pub derive_from: Option<KeyName>,
    pub versions: Vec<VersionRecord>,
}

impl KeyRecord {
    pub fn active(&self) -> Option<&VersionRecord> {
        self.versions
            .iter()
            .find(|v| v.state == VersionState::Active)
    }

    pub fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }

    pub fn latest_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0)
    }
}
