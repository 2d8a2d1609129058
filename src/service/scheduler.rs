//! The scheduler's pass: the changes nobody asks for. A key rotates when its period has
//! elapsed, a verify-only version retires when its grace ends, usage counts reach the database,
//! and a failed audit store is probed until it takes writes again. The daemon runs a pass on a
//! timer; each change takes the same lock and leaves the same audit entry as an officer's.
//! (Rotation on usage happens where the usage is counted: `KeyCore::rotate_exhausted`.)

use std::sync::Arc;

use super::lifecycle::{SCHEDULER, SERVICE};
use super::{unix_now, KeyLifecycle};
use crate::error::ServiceError;
use crate::keys::{KeyName, VersionState};
use crate::registry::KeyRecord;

/// How long the scheduler lease lasts without renewal; the pass renews it every second, so
/// another instance takes over within this after the holder stops.
const LEASE_TERM_MS: i64 = 5_000;

/// How often a long pass renews the lease as it goes (as the pass itself does, once a second).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A key reserved this long ago and still without a version is a create that died half-way
/// (creates take seconds); the lease holder clears such names once a minute.
const STALE_RESERVATION_S: i64 = 600;
const SWEEP_EVERY_S: i64 = 60;

/// Keys whose timed changes run at once. Each rotation mostly waits (on the token, the
/// database and two audit commits), so a pass with many keys due needs them side by side: one
/// at a time managed about 20 rotations a second here. Different keys only; see `key_locks`.
const PARALLEL: usize = 8;

impl KeyLifecycle {
    /// Take or renew the scheduler lease; whether this instance holds it.
    async fn hold_lease(&self) -> Result<bool, crate::registry::RegistryError> {
        self.core
            .registry
            .hold_lease("scheduler", LEASE_TERM_MS)
            .await
    }

    async fn sweep_reservations(&self, now: i64) {
        use std::sync::atomic::Ordering;
        if now - self.swept_at.load(Ordering::Relaxed) < SWEEP_EVERY_S {
            return;
        }
        self.swept_at.store(now, Ordering::Relaxed);
        match self
            .core
            .registry
            .drop_stale_reservations(STALE_RESERVATION_S)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(count = n, "dropped keys reserved but never generated"),
            Err(e) => tracing::warn!(error = %e, "could not clear stale key reservations"),
        }
    }

    /// One pass of the scheduler: rotate keys whose period has elapsed, retire verify-only
    /// versions whose grace has ended, persist usage counts. Failures are logged and retried on
    /// the next pass.
    pub async fn tick(&self) {
        let now = unix_now();
        // Timed changes are one instance's work (the lease); the audit probe and the usage
        // flush below are every instance's own.
        let lead = match self.hold_lease().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the scheduler lease; skipping this pass");
                false
            }
        };
        if lead {
            self.sweep_reservations(now).await;
        }
        let due = if lead {
            self.core.registry.due(now)
        } else {
            Vec::new()
        };
        let mut renewed = std::time::Instant::now();
        for wave in due.chunks(PARALLEL) {
            // A pass with many keys due can outlast the term: it renews the lease as it goes,
            // and stops once another instance holds it (else both rotate the same keys, one in
            // vain: the compare-and-set refuses its changes and its new objects are discarded).
            if renewed.elapsed() >= RENEW_EVERY {
                match self.hold_lease().await {
                    Ok(true) => renewed = std::time::Instant::now(),
                    Ok(false) => {
                        tracing::warn!("the scheduler lease passed to another instance during a long pass; leaving the rest to it");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the scheduler lease; ending this pass");
                        break;
                    }
                }
            }
            futures_util::future::join_all(wave.iter().map(|name| self.timed_changes(name, now)))
                .await;
        }
        // A failed audit store keeps readiness red until a write succeeds again; the probe is
        // itself an audited entry, so recovery is proven by a durable write, not assumed.
        if self.core.audit().failure().is_some() {
            let probe = crate::audit::Record {
                identity: SERVICE.into(),
                operation: "audit_probe",
                key: String::new(),
                version: None,
                outcome: "ok",
                request_id: "scheduler".into(),
                detail: "retrying the audit store after a failed write".into(),
            };
            if self.core.audit().append(probe).await.is_ok() {
                tracing::info!("audit store accepts writes again");
            }
        }
        if let Err(e) = self.core.registry.flush_usage().await {
            tracing::warn!(error = %e, "could not persist usage counts; will retry");
        }
    }

    /// The timed changes of one key: rotation when its period has elapsed, retirement of
    /// verify-only versions whose grace has ended. Each has its intent entry before it begins
    /// and its outcome's after; a failure is logged and retried on the next pass.
    async fn timed_changes(&self, name: &KeyName, now: i64) {
        let _guards = self.core.lock_rotation(name).await;
        let Some(key) = self.core.registry.get(name) else {
            return;
        };
        let result = match self.rotate_if_due(key, now).await {
            Ok(key) => self.retire_if_due(&key, now).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(key = %name, error = %e, detail = e.internal_detail().unwrap_or(""), "scheduled change failed; will retry");
        }
    }

    /// The key as it stands after rotating it if its period has elapsed.
    async fn rotate_if_due(
        &self,
        key: Arc<KeyRecord>,
        now: i64,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        const WHY: &str = "rotation_period elapsed";
        let due = match (key.lifecycle.rotation_period, key.active()) {
            (Some(p), Some(a)) => a.created_at + p as i64 <= now,
            _ => false,
        };
        if !due {
            return Ok(key);
        }
        self.core.intend_own("rotate", &key.name, WHY).await?;
        match self.core.rotate_locked(&key, SCHEDULER, Some(WHY)).await {
            Ok(rotated) => {
                tracing::info!(key = %key.name, "rotated: rotation_period elapsed");
                let v = rotated.active().map(|v| v.version);
                self.core.audit_own("rotate", &key.name, v, "ok", WHY).await;
                Ok(rotated)
            }
            Err(e) => {
                self.core
                    .audit_own("rotate", &key.name, None, e.code(), WHY)
                    .await;
                Err(e)
            }
        }
    }

    /// Retire the verify-only versions whose grace has ended.
    async fn retire_if_due(&self, key: &KeyRecord, now: i64) -> Result<(), ServiceError> {
        const WHY: &str = "verify_grace ended";
        let mut new = key.clone();
        let mut retired = Vec::new();
        for v in &mut new.versions {
            if v.state == VersionState::VerifyOnly && v.grace_until.is_some_and(|g| g <= now) {
                *v = v.moved(VersionState::Retired, now, SCHEDULER, Some(WHY));
                retired.push(v.version);
            }
        }
        if retired.is_empty() {
            return Ok(());
        }
        self.core.intend_own("retire", &key.name, WHY).await?;
        if let Err(e) = self.core.registry.commit(key, new).await {
            let e = ServiceError::from(e);
            self.core
                .audit_own("retire", &key.name, None, e.code(), WHY)
                .await;
            return Err(e);
        }
        tracing::info!(key = %key.name, ?retired, "retired versions whose grace ended");
        for v in retired {
            self.core
                .audit_own("retire", &key.name, Some(v), "ok", WHY)
                .await;
        }
        Ok(())
    }
}
