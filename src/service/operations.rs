//! The key operations backend services call: sign, verify, encrypt, decrypt, one at a time or
//! in batches, and reading keys and the audit trail. Each is judged by the key core first.

use std::sync::Arc;

use super::key_core::{checkable_versions, key_ref, require, KeyCore};
use super::{envelope, Caller, SignatureFormat, Signed, Verified, LIST_PAGE};
use crate::backend::{KeyBackend, GCM_NONCE_LEN};
use crate::encoding;
use crate::error::ServiceError;
use crate::keys::{KeyPrefix, KeyType};
use crate::policy::Operation;
use crate::registry::KeyRecord;

pub struct Operations {
    pub(super) core: Arc<KeyCore>,
}

impl Operations {
    pub fn new(core: Arc<KeyCore>) -> Self {
        Self { core }
    }

    pub fn get_key(&self, caller: &Caller, name: &str) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.core.authorize(caller, Operation::Read, name)?;
        self.core.lookup(&name)
    }

    /// One page (at most `page_size`, capped at [`LIST_PAGE`]) of the keys under `prefix` that the caller may read (others are left out, not
    /// refused), starting after `page_token` (the last name of the previous page). The second
    /// value is the token for the next page, if there is one.
    pub fn list_keys(
        &self,
        caller: &Caller,
        prefix: &KeyPrefix,
        page_token: Option<&KeyPrefix>,
        page_size: usize,
    ) -> Result<(Vec<Arc<KeyRecord>>, Option<String>), ServiceError> {
        let (prefix, page_token) = (prefix.as_str(), page_token.map(KeyPrefix::as_str));
        let policy = self.core.policy().current();
        let (keys, more) =
            self.core
                .registry
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
        let name = self.core.authorize(caller, Operation::Sign, name)?;
        let (key, v) = self.core.claim_active(&name, "sign", |t| t.signs()).await?;
        let (k, version) = (key.clone(), v.version);
        let raw = self
            .core
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
        self.core
            .device
            .call(move |b| verify_with(b, &key, &message, &signature, version, format))
            .await
    }

    /// The key a verify names, after the policy, existence and key-type checks.
    pub(crate) fn verifying_key(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.core.authorize(caller, Operation::Verify, name)?;
        let key = self.core.lookup(&name)?;
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
        let name = self.core.authorize(caller, Operation::Encrypt, name)?;
        let (key, v) = self
            .core
            .claim_active(&name, "encrypt", |t| t.encrypts())
            .await?;
        let nonce = self.core.random::<GCM_NONCE_LEN>()?;
        let header = envelope::Header {
            version: v.version,
            nonce,
        };
        // The device needs it owned; the copy is wiped when the call is done.
        let (aad, plaintext) = (header.aad(aad), zeroize::Zeroizing::new(plaintext.to_vec()));
        let version = v.version;
        let sealed = self
            .core
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
        let name = self.core.authorize(caller, Operation::Decrypt, name)?;
        let key = self.core.lookup(&name)?;
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
            .core
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

/// Verify with a key already authorized by [`Operations::verifying_key`].
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
