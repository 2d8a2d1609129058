//! Making key versions in the device: generated, derived from a master, or imported, each with
//! its key check value. Every call goes through the device gate, and a version whose check
//! value cannot be computed is removed from the device rather than kept half-described.

use std::sync::Arc;

use super::derived::context;
use super::key_core::{KeyCore, Made};
use crate::backend::{KeyBackend, KeyRef, ObjectRef};
use crate::error::ServiceError;
use crate::keys::{KeyName, KeyType, Lifecycle};
use crate::registry::{Derivation, KeyRecord, VersionRecord};

/// A new key that passed every check short of the device.
pub(super) struct NewKeyChecked {
    pub name: KeyName,
    pub key_type: KeyType,
    pub lifecycle: Lifecycle,
    /// The master, for a derived key.
    pub master: Option<Arc<KeyRecord>>,
}

impl NewKeyChecked {
    /// The new key's record, with `first` as its only version.
    pub fn into_record(self, first: VersionRecord, now: i64, by: &str) -> KeyRecord {
        KeyRecord {
            name: self.name,
            key_type: self.key_type,
            lifecycle: self.lifecycle,
            created_at: now,
            created_by: by.into(),
            derive_from: self.master.map(|m| m.name.clone()),
            versions: vec![first],
        }
    }
}

impl KeyCore {
    /// Version 1 of a checked new key: derived from its master, or generated in the device.
    pub(super) async fn first_version(
        &self,
        new: &NewKeyChecked,
        now: i64,
        by: &str,
    ) -> Result<VersionRecord, ServiceError> {
        let made = Made {
            version: 1,
            now,
            by,
        };
        match &new.master {
            Some(m) => self.derive_version(&new.name, new.key_type, m, made).await,
            None => {
                let exportable = new.lifecycle.exportable;
                self.generate_version(&new.name, new.key_type, exportable, made)
                    .await
            }
        }
    }

    /// The next version of an existing key: derived from its master's active version, or
    /// generated.
    pub(super) async fn next_version(
        &self,
        key: &KeyRecord,
        made: Made<'_>,
    ) -> Result<VersionRecord, ServiceError> {
        match &key.derive_from {
            Some(m) => {
                let master = self.registry.get(m).ok_or_else(|| {
                    ServiceError::FailedPrecondition(format!(
                        "master '{m}' of '{}' no longer exists",
                        key.name
                    ))
                })?;
                self.derive_version(&key.name, key.key_type, &master, made)
                    .await
            }
            None => {
                let exportable = key.lifecycle.exportable;
                self.generate_version(&key.name, key.key_type, exportable, made)
                    .await
            }
        }
    }

    async fn generate_version(
        &self,
        name: &KeyName,
        key_type: KeyType,
        exportable: bool,
        made: Made<'_>,
    ) -> Result<VersionRecord, ServiceError> {
        let label = format!("tillkey:{name}#{}", made.version);
        let (version, now, by) = (made.version, made.now, made.by.to_owned());
        self.device
            .call(move |b| {
                let g = b.generate(key_type, &label, exportable)?;
                let mut v = VersionRecord::new(version, now, &by, g.object, g.public_key_der);
                attach_check_value(b, key_type, &mut v)?;
                Ok::<_, ServiceError>(v)
            })
            .await
    }

    /// Version `made.version` of `name`, derived from the master's active version and checked
    /// by computing its key check value.
    async fn derive_version(
        &self,
        name: &KeyName,
        key_type: KeyType,
        master: &Arc<KeyRecord>,
        made: Made<'_>,
    ) -> Result<VersionRecord, ServiceError> {
        let mv = master.active().ok_or_else(|| {
            ServiceError::FailedPrecondition(format!(
                "master '{}' has no active version to derive from",
                master.name
            ))
        })?;
        let (master_type, master_object, master_version) =
            (master.key_type, mv.object.clone(), mv.version);
        let ctx = context(name, made.version);
        let (version, now, by) = (made.version, made.now, made.by.to_owned());
        self.device
            .call(move |b| {
                let master = KeyRef {
                    key_type: master_type,
                    object: &master_object,
                };
                let derived = b.derive(master, key_type, &ctx)?;
                let mut v = VersionRecord::new(version, now, &by, derived.object, None);
                v.derivation = Some(Derivation {
                    master_version,
                    kdf: derived.kdf,
                });
                let kcv = b.check_value(KeyRef {
                    key_type,
                    object: &v.object,
                })?;
                v.kcv = Some(crate::encoding::hex_encode(&kcv));
                Ok::<_, ServiceError>(v)
            })
            .await
    }

    /// Version 1 of an imported key: the material unwrapped into the device, with its check
    /// value.
    pub(super) async fn import_version(
        &self,
        name: &KeyName,
        key_type: KeyType,
        encrypted_kek: &[u8],
        wrapped_key: &[u8],
        made: Made<'_>,
    ) -> Result<VersionRecord, ServiceError> {
        let label = format!("tillkey:{name}#{}", made.version);
        let (kek, wrapped) = (encrypted_kek.to_vec(), wrapped_key.to_vec());
        let (version, now, by) = (made.version, made.now, made.by.to_owned());
        self.device
            .call(move |b| {
                let imported = b.import(key_type, &label, &kek, &wrapped)?;
                let mut v = VersionRecord::new(version, now, &by, imported.object, None);
                attach_check_value(b, key_type, &mut v)?;
                Ok::<_, ServiceError>(v)
            })
            .await
    }

    /// Remove a freshly made object that never reached the registry.
    pub(super) async fn discard(&self, key_type: KeyType, v: &VersionRecord) {
        let object = v.object.clone();
        let _ = self
            .device
            .call(move |b| {
                discard_on(b, key_type, &object);
                Ok::<_, ServiceError>(())
            })
            .await;
    }
}

/// Compute and record the key check value of a new symmetric version; a version whose KCV
/// cannot be computed is removed from the device.
fn attach_check_value(
    b: &dyn KeyBackend,
    key_type: KeyType,
    v: &mut VersionRecord,
) -> Result<(), ServiceError> {
    // Masters have no KCV: they can neither MAC nor encrypt a check block.
    if key_type.is_asymmetric() || key_type.derives() {
        return Ok(());
    }
    match b.check_value(KeyRef {
        key_type,
        object: &v.object,
    }) {
        Ok(kcv) => {
            v.kcv = Some(crate::encoding::hex_encode(&kcv));
            Ok(())
        }
        Err(e) => {
            discard_on(b, key_type, &v.object);
            Err(e.into())
        }
    }
}

fn discard_on(b: &dyn KeyBackend, key_type: KeyType, object: &ObjectRef) {
    if let Err(e) = b.destroy(KeyRef { key_type, object }) {
        tracing::warn!(error = %e, "could not remove an unrecorded key object");
    }
}
