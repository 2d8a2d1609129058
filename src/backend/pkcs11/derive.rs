//! Derived per-terminal keys: made inside the token from a master key as non-extractable
//! *session* objects, and kept in a bounded LRU cache so hot terminals do not re-derive on every
//! request while the token's object count stays constant however many terminals exist.
//!
//! A derived version is stored in the registry only as a [`DerivedRef`]: the KDF, the key type,
//! the IV, the master version's `CKA_ID` and the 32-byte context. That is everything needed to
//! derive the same key again (after an eviction, a reconnect or a restart), and nothing secret.
//!
//! Session objects never touch SoftHSM's file store, so deriving does not take the token-write
//! lock (checked: concurrent derive + sign on every pooled session while token objects are
//! created, see `tests/derived.rs` and `tillkey bench --phase derived`).
//!
//! Evicted keys may still be in use by another thread; they are destroyed only once no request
//! holds them (each use holds an `Arc` lease), so a handle is never destroyed under a caller and
//! never reused for a different key while one holds it.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use lru::LruCache;

use super::errors::OpError;
use super::templates::secret_usage;
use crate::backend::{DerivedCacheStats, Kdf};
use crate::keys::KeyType;

/// Marks a backend reference as derived rather than a token object's `CKA_ID` (which tillkey
/// makes 16 random bytes long, or the fixed ids of its own service objects).
const MAGIC: &[u8; 4] = b"tkd1";

/// Everything that determines one derived key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DerivedRef {
    pub kdf: Kdf,
    pub key_type: KeyType,
    pub iv: [u8; 16],
    /// `CKA_ID` of the master version.
    pub master: Vec<u8>,
    pub context: [u8; 32],
}

impl DerivedRef {
    /// `magic | kdf | key type | iv | len(master) | master | context`: fixed fields plus one
    /// length-prefixed field, so parsing is unambiguous.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 2 + 16 + 1 + self.master.len() + 32);
        out.extend_from_slice(MAGIC);
        out.push(kdf_code(self.kdf));
        out.push(type_code(self.key_type));
        out.extend_from_slice(&self.iv);
        out.push(self.master.len() as u8);
        out.extend_from_slice(&self.master);
        out.extend_from_slice(&self.context);
        out
    }

    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (&kdf, rest) = rest.split_first()?;
        let (&key_type, rest) = rest.split_first()?;
        let (iv, rest) = rest.split_first_chunk::<16>()?;
        let (&len, rest) = rest.split_first()?;
        let (master, rest) = rest.split_at_checked(usize::from(len))?;
        let context: [u8; 32] = rest.try_into().ok()?;
        Some(Self {
            kdf: (kdf == 1).then_some(Kdf::AesCbcEncryptData)?,
            key_type: match key_type {
                1 => KeyType::HmacSha256,
                2 => KeyType::Aes256Gcm,
                _ => return None,
            },
            iv: *iv,
            master: master.to_vec(),
            context,
        })
    }
}

fn kdf_code(kdf: Kdf) -> u8 {
    match kdf {
        Kdf::AesCbcEncryptData => 1,
    }
}

/// Only [`KeyType::derivable`] types are ever encoded.
fn type_code(key_type: KeyType) -> u8 {
    if key_type == KeyType::Aes256Gcm {
        2
    } else {
        1
    }
}

/// A derived key object, destroyed once it is out of the cache and no request holds it.
#[derive(Debug)]
pub(super) struct Derived {
    pub handle: ObjectHandle,
}

struct Inner {
    lru: LruCache<Vec<u8>, Arc<Derived>>,
    /// Evicted or forgotten, but possibly still in use.
    retired: Vec<Arc<Derived>>,
}

pub(super) struct DerivedCache {
    inner: Mutex<Inner>,
    capacity: usize,
    derivations: AtomicU64,
}

impl DerivedCache {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::new(cap),
                retired: Vec::new(),
            }),
            capacity: cap.get(),
            derivations: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> DerivedCacheStats {
        let inner = self.lock();
        DerivedCacheStats {
            held: inner.lru.len() + inner.retired.len(),
            capacity: self.capacity,
            derivations: self.derivations.load(Ordering::Relaxed),
        }
    }

    /// The derived key for `id` (an encoded [`DerivedRef`]), derived now if not cached.
    /// `master` finds the master key's handle, only when the key must be derived.
    pub fn resolve(
        &self,
        session: &Session,
        id: &[u8],
        r: &DerivedRef,
        master: impl FnOnce() -> Result<ObjectHandle, OpError>,
    ) -> Result<Arc<Derived>, OpError> {
        if let Some(d) = self.lock().lru.get(id) {
            return Ok(d.clone());
        }
        let master = master()?;
        let handle = match r.kdf {
            Kdf::AesCbcEncryptData => {
                let params = AesCbcDeriveParams::new(r.iv, &r.context);
                session.derive_key(
                    &Mechanism::AesCbcEncryptData(params),
                    master,
                    &template(r.key_type),
                )?
            }
        };
        self.derivations.fetch_add(1, Ordering::Relaxed);
        let fresh = Arc::new(Derived { handle });
        let (chosen, doomed) = {
            let mut inner = self.lock();
            if let Some(other) = inner.lru.get(id) {
                // Another request derived the same key meanwhile: keep one.
                (other.clone(), vec![fresh])
            } else {
                if let Some((_, old)) = inner.lru.push(id.to_vec(), fresh.clone()) {
                    inner.retired.push(old);
                }
                (fresh, sweep(&mut inner.retired))
            }
        };
        for d in doomed {
            // Failure leaves a session object that goes when the session closes; nothing to do.
            let _ = session.destroy_object(d.handle);
        }
        Ok(chosen)
    }

    /// Drop `id` from the cache (its version was destroyed or its handle went stale).
    pub fn forget(&self, id: &[u8]) {
        let mut inner = self.lock();
        if let Some(d) = inner.lru.pop(id) {
            inner.retired.push(d);
        }
    }

    /// Destroy now the dropped keys no request holds, rather than at the next derivation: a
    /// destroyed version's key should not outlive its destruction in the token.
    pub fn destroy_retired(&self, session: &Session) {
        let doomed = sweep(&mut self.lock().retired);
        for d in doomed {
            // Failure leaves a session object that goes when the session closes; nothing to do.
            let _ = session.destroy_object(d.handle);
        }
    }
}

/// Take the retired keys no request holds any more.
fn sweep(retired: &mut Vec<Arc<Derived>>) -> Vec<Arc<Derived>> {
    let (free, held): (Vec<_>, Vec<_>) = std::mem::take(retired)
        .into_iter()
        .partition(|d| Arc::strong_count(d) == 1);
    *retired = held;
    free
}

/// A session object: sensitive, never extractable, with the usage of its type only.
pub(super) fn template(key_type: KeyType) -> Vec<Attribute> {
    let mut attrs = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::ValueLen(32.into()),
        Attribute::KeyType(if key_type == KeyType::Aes256Gcm {
            CkKeyType::AES
        } else {
            CkKeyType::GENERIC_SECRET
        }),
    ];
    attrs.extend(secret_usage(key_type));
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_refuse_garbage() {
        let r = DerivedRef {
            kdf: Kdf::AesCbcEncryptData,
            key_type: KeyType::Aes256Gcm,
            iv: [7; 16],
            master: vec![1; 16],
            context: [9; 32],
        };
        let bytes = r.encode();
        assert_eq!(DerivedRef::parse(&bytes), Some(r));
        assert_eq!(DerivedRef::parse(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(DerivedRef::parse(&longer), None);
        assert_eq!(DerivedRef::parse(&[0u8; 16]), None);
        assert_eq!(DerivedRef::parse(b"tkd1"), None);
    }
}
