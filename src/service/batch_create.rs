//! Creating many keys in one request (enrolment of thousands of terminals): each item is judged
//! exactly as a single create would be (name, grants, type, settings, master), made in the
//! device, and all that succeeded are recorded in one database transaction. Every item gets its
//! own result and its own audit entry; one bad item never fails the others.

use std::collections::HashSet;
use std::sync::Arc;

use super::lifecycle::LifecycleInput;
use super::{unix_now, Caller, KeyLifecycle};
use crate::error::ServiceError;
use crate::registry::KeyRecord;

/// Most items in one batch: bounds the request's time in the device and its transaction.
pub const MAX_CREATE_BATCH: usize = 1000;

/// One key to create, as the client wrote it.
pub struct NewKey {
    pub name: String,
    pub key_type: String,
    pub settings: LifecycleInput,
    pub derive_from: Option<String>,
}

pub struct BatchItem {
    pub name: String,
    pub result: Result<Arc<KeyRecord>, ServiceError>,
}

impl KeyLifecycle {
    pub async fn batch_create(
        &self,
        caller: &Caller,
        items: Vec<NewKey>,
        request_id: &str,
    ) -> Result<Vec<BatchItem>, ServiceError> {
        if items.is_empty() || items.len() > MAX_CREATE_BATCH {
            return Err(ServiceError::invalid(format!(
                "a batch holds 1 to {MAX_CREATE_BATCH} keys, not {}",
                items.len()
            )));
        }
        let now = unix_now();
        let mut results: Vec<Option<Result<Arc<KeyRecord>, ServiceError>>> =
            items.iter().map(|_| None).collect();
        let mut seen = HashSet::new();
        let mut made: Vec<(usize, KeyRecord)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match self.make_one(caller, item, now, &mut seen).await {
                Ok(rec) => made.push((i, rec)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let (slots, recs): (Vec<usize>, Vec<KeyRecord>) = made.into_iter().unzip();
        match self.core.registry.insert_new_keys(recs.clone()).await {
            Ok(stored) => {
                for ((slot, r), rec) in slots.into_iter().zip(stored).zip(&recs) {
                    if r.is_none() {
                        self.discard_first(rec).await;
                    }
                    results[slot] = Some(r.ok_or_else(|| {
                        ServiceError::AlreadyExists(format!("key '{}' already exists", rec.name))
                    }));
                }
            }
            Err(e) => {
                for rec in &recs {
                    self.discard_first(rec).await;
                }
                return Err(e.into());
            }
        }
        let out: Vec<BatchItem> = items
            .into_iter()
            .zip(results)
            .map(|(item, r)| BatchItem {
                name: item.name,
                result: r.unwrap_or_else(|| {
                    Err(ServiceError::Internal {
                        detail: "batch item without a result".into(),
                    })
                }),
            })
            .collect();
        self.audit_batch(caller, &out, request_id).await?;
        Ok(out)
    }

    /// Check one item and make its first version in the device (not yet recorded).
    async fn make_one(
        &self,
        caller: &Caller,
        item: &NewKey,
        now: i64,
        seen: &mut HashSet<String>,
    ) -> Result<KeyRecord, ServiceError> {
        let new = self.check_new_key(
            caller,
            &item.name,
            &item.key_type,
            &item.settings,
            item.derive_from.as_deref(),
        )?;
        let name = &new.name;
        if !seen.insert(name.as_str().to_owned()) {
            return Err(ServiceError::invalid(format!(
                "key '{name}' appears more than once in this batch"
            )));
        }
        if self.core.registry.get(name).is_some() {
            return Err(ServiceError::AlreadyExists(format!(
                "key '{name}' already exists"
            )));
        }
        let first = self.core.first_version(&new, now, &caller.identity).await?;
        Ok(new.into_record(first, now, &caller.identity))
    }

    /// Remove the device object of a first version that was never recorded (nothing to do for
    /// derived keys beyond dropping them from the backend's cache).
    async fn discard_first(&self, rec: &KeyRecord) {
        for v in &rec.versions {
            self.core.discard(rec.key_type, v).await;
        }
    }

    /// One audit entry per item, as if each had been its own request, under the batch request's
    /// id. The keys are recorded already; a failed append answers 503 like any unaudited request
    /// (retrying is safe: the items then report `already_exists`).
    async fn audit_batch(
        &self,
        caller: &Caller,
        items: &[BatchItem],
        request_id: &str,
    ) -> Result<(), ServiceError> {
        let appends = items.iter().map(|item| {
            self.core.audit().append(crate::audit::Record {
                identity: caller.identity.clone(),
                operation: "create",
                key: item.name.clone(),
                version: item.result.as_ref().ok().map(|_| 1),
                outcome: match &item.result {
                    Ok(_) => "ok",
                    Err(e) => e.code(),
                },
                request_id: request_id.to_owned(),
                detail: match &item.result {
                    Ok(k) => match &k.derive_from {
                        Some(m) => format!("batch create, derived from {m}"),
                        None => "batch create".into(),
                    },
                    Err(_) => "batch create".into(),
                },
            })
        });
        for r in futures_util::future::join_all(appends).await {
            r?;
        }
        Ok(())
    }
}
