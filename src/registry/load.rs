//! Reading the whole registry into the in-memory index at start-up.
//!
//! Both tables are streamed in name order (their primary-key indexes) and merged, so a million
//! keys are read in one pass with no intermediate copy of the result set, and the index is
//! built from already sorted entries.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::TryStreamExt;
use sqlx::Row;

use super::deadlines::Deadlines;
use super::{key_from_row, version_from_row, KeyRecord, Registry, RegistryError, VersionRecord};
use crate::keys::KeyName;

impl Registry {
    /// Fill the index. With `maintain`, keys reserved but never given a version (a crash
    /// between the two steps of a create) are dropped to free their names; they never served.
    pub(super) async fn load(&self, maintain: bool) -> Result<(), RegistryError> {
        let mut keys = sqlx::query(
            "SELECT name, key_type, created_at, created_by, rotation_period, verify_grace, max_operations, exportable, derive_from FROM keys ORDER BY name",
        )
        .fetch(&self.pool);
        let mut versions = sqlx::query(
            "SELECT name, version, state, created_at, state_changed_at, changed_by, reason, grace_until, operations, object_ref, public_key, kcv, kdf, master_version FROM key_versions ORDER BY name, version",
        )
        .fetch(&self.pool);
        let mut entries: Vec<(KeyName, Arc<KeyRecord>)> = Vec::new();
        let mut deadlines = Deadlines::default();
        let mut orphans: Vec<KeyName> = Vec::new();
        let mut next: Option<(String, VersionRecord)> = None;
        while let Some(row) = keys.try_next().await? {
            let mut rec = key_from_row(&row)?;
            loop {
                if next.is_none() {
                    let Some(vrow) = versions.try_next().await? else {
                        break;
                    };
                    let name: String = vrow.try_get("name")?;
                    let v = version_from_row(&name, &vrow)?;
                    next = Some((name, v));
                }
                let Some((name, _)) = &next else { break };
                match name.as_str().cmp(rec.name.as_str()) {
                    // A version whose key row is gone: nothing can use it.
                    Ordering::Less => next = None,
                    Ordering::Equal => {
                        if let Some((_, v)) = next.take() {
                            rec.versions.push(v);
                        }
                    }
                    Ordering::Greater => break,
                }
            }
            if rec.versions.is_empty() {
                orphans.push(rec.name);
                continue;
            }
            deadlines.update(None, &rec);
            entries.push((rec.name.clone(), Arc::new(rec)));
        }
        drop(keys);
        drop(versions);
        // Already in order: building the map is linear.
        let index: BTreeMap<KeyName, Arc<KeyRecord>> = entries.into_iter().collect();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        *self.deadlines.lock().unwrap_or_else(|p| p.into_inner()) = deadlines;
        if maintain && !orphans.is_empty() {
            for name in &orphans {
                self.release(name).await?;
            }
            tracing::warn!(
                count = orphans.len(),
                "dropped keys reserved but never generated"
            );
        }
        Ok(())
    }
}
