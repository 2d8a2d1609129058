//! Reading one key again: after a compare-and-set found this process's copy stale, or when the
//! change feed says another instance changed it. (`load` reads them all at start-up.)

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use super::load::{from_rows, Loaded, KEYS, VERSIONS};
use super::{KeyRecord, Registry, RegistryError};
use crate::keys::KeyName;

/// One key as the database holds it now: what another writer (an instance, an operator) left.
/// Both reads see one snapshot, so a change committed between them cannot tear the record.
async fn read_one(pool: &sqlx::AnyPool, name: &str, sqlite: bool) -> Result<Loaded, RegistryError> {
    let mut tx = pool.begin().await?;
    if !sqlite {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
    }
    let keys = sqlx::query(&KEYS.replace("ORDER BY", "WHERE name = $1 ORDER BY"))
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
    let versions = sqlx::query(&VERSIONS.replace("ORDER BY", "WHERE name = $1 ORDER BY"))
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    from_rows(&keys, &versions)
}

/// Carry this process's count of each version over to a fresh read of its key: the database's
/// count becomes the base, and operations not yet flushed stay to be flushed.
fn keep_usage(old: &KeyRecord, fresh: &mut KeyRecord) {
    for v in &mut fresh.versions {
        if let Some(o) = old.version(v.version) {
            let in_db = v.operations.base.load(AtomicOrdering::Relaxed);
            o.operations.base.store(in_db, AtomicOrdering::Relaxed);
            v.operations = o.operations.clone();
        }
    }
}

impl Registry {
    /// Read `name` again from the database and put what it holds now in the index (or drop the
    /// key, if it is gone or not yet versioned): after a compare-and-set found the index stale,
    /// or another instance changed the key. Read and put in while holding `publishing`, so a
    /// change this process commits meanwhile is never overwritten by the older rows.
    pub async fn reload(&self, name: &KeyName) -> Result<Option<Arc<KeyRecord>>, RegistryError> {
        let _publishing = self.publishing.lock(name.as_str()).await;
        self.read_again(name).await
    }

    /// [`Registry::reload`] for a caller already holding `publishing`.
    pub(super) async fn read_again(
        &self,
        name: &KeyName,
    ) -> Result<Option<Arc<KeyRecord>>, RegistryError> {
        let loaded = read_one(&self.pool, name.as_str(), self.is_sqlite).await?;
        match loaded.entries.into_iter().next() {
            Some((_, rec)) => {
                let mut rec = Arc::unwrap_or_clone(rec);
                if let Some(old) = self.get(name) {
                    keep_usage(&old, &mut rec);
                }
                Ok(Some(self.publish(rec)))
            }
            None => {
                self.forget(name);
                Ok(None)
            }
        }
    }

    /// Drop keys reserved more than `age_s` seconds ago and still without a version: creates
    /// that died half-way (a create takes seconds). The scheduler's lease holder calls this, so
    /// one instance does it for all.
    pub async fn drop_stale_reservations(&self, age_s: i64) -> Result<u64, RegistryError> {
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            - age_s;
        let done = sqlx::query(
            "DELETE FROM keys WHERE created_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM key_versions v WHERE v.name = keys.name)",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
