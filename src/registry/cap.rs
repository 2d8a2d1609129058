//! A hard `max_operations` across instances: before a process performs operations on a capped
//! version it leases a block of them from the database (`key_versions.leased`, raised by one
//! conditional UPDATE that never passes the cap), then spends the block from memory. The leases
//! of all processes together never exceed the cap, so neither do the operations, however many
//! instances share the database; only a lease's first operation waits on SQL.
//!
//! A process that stops cleanly gives its unspent operations back; one that dies loses them,
//! so the version reaches its cap early by at most one block per lost process. Blocks are a
//! small share of the cap (see [`block`]) so that loss stays small.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{to_i64, Registry, RegistryError, Usage, VersionRecord};
use crate::keys::KeyName;

/// How many operations a process leases at a time: a sixty-fourth of the cap, between 1 and
/// 10,000. A cap of a million then costs one database write per 10,000 operations, and a
/// cap of 50 one per operation (such keys are rare and slow by intent).
pub(super) fn block(max: u64) -> u64 {
    (max / 64).clamp(1, 10_000)
}

impl Usage {
    /// Spend `n` leased operations if this process holds that many unspent.
    fn try_spend(&self, n: u64) -> bool {
        let granted = self.granted.load(Ordering::Acquire);
        self.spent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s.saturating_add(n) <= granted).then_some(s + n)
            })
            .is_ok()
    }

    /// Unspent operations, taken back from this process (they are returned to the database).
    fn take_unspent(&self) -> u64 {
        let spent = self.spent.load(Ordering::Acquire);
        let granted = self.granted.swap(spent, Ordering::AcqRel);
        granted.saturating_sub(spent)
    }
}

impl Registry {
    /// Take `uses` of the operations `max_operations` (`max`) allows version `v` of `name`,
    /// leasing more from the database when this process has too few. `false` when the
    /// database has no more to lease: the version has reached its cap (or is no longer active).
    pub async fn take_capped(
        &self,
        name: &KeyName,
        v: &VersionRecord,
        uses: u64,
        max: u64,
    ) -> Result<bool, RegistryError> {
        let u = &v.operations;
        if u.try_spend(uses) {
            return Ok(true);
        }
        // One lease at a time per version: concurrent requests wait for it rather than each
        // leasing a block of its own.
        let _leasing = u.leasing.lock().await;
        if u.try_spend(uses) {
            return Ok(true);
        }
        let unspent = u
            .granted
            .load(Ordering::Acquire)
            .saturating_sub(u.spent.load(Ordering::Acquire));
        let need = uses.saturating_sub(unspent);
        let got = self.lease(name, v.version, need, max).await?;
        if got == 0 {
            return Ok(false);
        }
        u.granted.fetch_add(got, Ordering::AcqRel);
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).push((
            name.clone(),
            v.version,
            u.clone(),
        ));
        Ok(u.try_spend(uses))
    }

    /// Lease at least `need` operations (a whole block when the cap has room for one) of an
    /// active version; how many were leased, 0 when fewer than `need` are left.
    async fn lease(
        &self,
        name: &KeyName,
        version: u32,
        need: u64,
        max: u64,
    ) -> Result<u64, RegistryError> {
        let want = need.max(block(max));
        let whole = sqlx::query(
            "UPDATE key_versions SET leased = leased + $1 \
             WHERE name = $2 AND version = $3 AND state = 'active' AND leased + $1 <= $4",
        )
        .bind(to_i64(want))
        .bind(name.as_str())
        .bind(i64::from(version))
        .bind(to_i64(max))
        .execute(&self.pool)
        .await?;
        if whole.rows_affected() == 1 {
            return Ok(want);
        }
        // Less than a block is left: take all of it if that is enough, compare-and-set on what
        // was read, so two processes cannot both take the same rest.
        for _ in 0..8 {
            let Some(leased) = sqlx::query_scalar::<_, i64>(
                "SELECT leased FROM key_versions WHERE name = $1 AND version = $2 AND state = 'active'",
            )
            .bind(name.as_str())
            .bind(i64::from(version))
            .fetch_optional(&self.pool)
            .await?
            else {
                return Ok(0);
            };
            let rest = max.saturating_sub(super::from_i64(leased));
            if rest < need {
                return Ok(0);
            }
            let taken = sqlx::query(
                "UPDATE key_versions SET leased = $1 WHERE name = $2 AND version = $3 AND leased = $4",
            )
            .bind(to_i64(max))
            .bind(name.as_str())
            .bind(i64::from(version))
            .bind(leased)
            .execute(&self.pool)
            .await?;
            if taken.rows_affected() == 1 {
                return Ok(rest);
            }
        }
        // Others kept taking the rest first: by now there is little or nothing left.
        Ok(0)
    }

    /// Give back the operations this process leased but did not perform (at shutdown).
    pub(super) async fn return_leases(&self) -> Result<(), RegistryError> {
        let leases = std::mem::take(&mut *self.leases.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, version, u) in leases {
            let unspent = u.take_unspent();
            if unspent == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE key_versions SET leased = leased - $1 WHERE name = $2 AND version = $3 AND leased >= $1",
            )
            .bind(to_i64(unspent))
            .bind(name.as_str())
            .bind(i64::from(version))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

/// Versions this process holds leases on (for [`Registry::return_leases`]).
pub(super) type Leases = std::sync::Mutex<Vec<(KeyName, u32, Arc<Usage>)>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_a_small_share_of_the_cap() {
        assert_eq!(block(5), 1);
        assert_eq!(block(640), 10);
        assert_eq!(block(u64::MAX), 10_000);
    }

    #[test]
    fn spends_only_what_was_granted() {
        let u = Usage::new(0);
        assert!(!u.try_spend(1));
        u.granted.store(3, Ordering::Release);
        assert!(u.try_spend(2));
        assert!(!u.try_spend(2));
        assert!(u.try_spend(1));
        assert_eq!(u.take_unspent(), 0);
        u.granted.store(10, Ordering::Release);
        assert_eq!(u.take_unspent(), 7);
        assert!(!u.try_spend(1));
    }
}
