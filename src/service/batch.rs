//! Batched sign and verify: many messages under one key in one request.
//!
//! The request is judged once (name, policy, existence, key type, active version), exactly as a
//! single call is; then every item gets its own result. An item's own mistake (bad base64, a
//! signature of the wrong length) is that item's error; a fault of the service or the device
//! (token gone, internal error) fails the whole request, so an answer never mixes results with
//! a hidden outage. The device calls run off the async workers ([`crate::device::Device::batch`]): a
//! long batch must not hold up the workers that carry every other connection.

use super::key_core::key_ref;
use super::operations::verify_with;
use super::{Caller, Operations, SignatureFormat, Signed, Verified};
use crate::backend::{BackendError, KeyBackend};
use crate::encoding;
use crate::error::ServiceError;
use crate::keys::KeyType;
use crate::policy::Operation;

/// Most items one batch request may carry.
pub const MAX_BATCH: usize = 256;

/// One item's outcome.
pub type ItemResult<T> = Result<T, ServiceError>;

/// Refuse an empty or oversized batch before anything is authorized or counted.
pub fn check_size(n: usize) -> Result<(), ServiceError> {
    match n {
        0 => Err(ServiceError::invalid("batch is empty")),
        n if n > MAX_BATCH => Err(ServiceError::invalid(format!(
            "batch holds {n} items; at most {MAX_BATCH} per request"
        ))),
        _ => Ok(()),
    }
}

/// A verify item after decoding: message, signature, optional version.
pub struct VerifyItem {
    pub message: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_version: Option<u32>,
}

impl Operations {
    /// Sign every well-formed message with the active version. Items that arrive as errors
    /// (they failed to decode) stay errors and are neither counted nor signed.
    pub async fn sign_batch(
        &self,
        caller: &Caller,
        name: &str,
        mut items: Vec<ItemResult<Vec<u8>>>,
        format: SignatureFormat,
    ) -> Result<(u32, Vec<ItemResult<Signed>>), ServiceError> {
        check_size(items.len())?;
        let name = self.core.authorize(caller, Operation::Sign, name)?;
        let uses = items.iter().filter(|i| i.is_ok()).count() as u64;
        let (key, v) = self
            .core
            .claim_active_uses(&name, "sign", |t| t.signs(), uses)
            .await?;
        let version = v.version;
        let key_type = key.key_type;
        let run = move |backend: &dyn KeyBackend| {
            let messages: Vec<Vec<u8>> = items
                .iter_mut()
                .filter_map(|i| i.as_mut().ok().map(std::mem::take))
                .collect();
            let mut signed = backend.sign_many(key_ref(&key, &v), &messages).into_iter();
            items
                .into_iter()
                .map(|item| {
                    if let Err(e) = item {
                        return Ok(Err(e));
                    }
                    match signed.next() {
                        Some(Ok(raw)) => signature_out(key.key_type, format, raw)
                            .map(|signature| Ok(Signed { signature, version })),
                        Some(Err(e)) => item_error(e),
                        None => Err(ServiceError::Internal {
                            detail: "backend returned fewer signatures than messages".into(),
                        }),
                    }
                })
                .collect::<Result<Vec<_>, ServiceError>>()
        };
        let results = self.core.device.batch(key_type, run).await?;
        Ok((version, results))
    }

    /// Verify every well-formed item, each as a single `:verify` would.
    pub async fn verify_batch(
        &self,
        caller: &Caller,
        name: &str,
        items: Vec<ItemResult<VerifyItem>>,
        format: SignatureFormat,
    ) -> Result<Vec<ItemResult<Verified>>, ServiceError> {
        check_size(items.len())?;
        let key = self.verifying_key(caller, name)?;
        let key_type = key.key_type;
        let run = move |backend: &dyn KeyBackend| {
            items
                .into_iter()
                .map(|item| {
                    let item = match item {
                        Ok(i) => i,
                        Err(e) => return Ok(Err(e)),
                    };
                    match verify_with(
                        backend,
                        &key,
                        &item.message,
                        &item.signature,
                        item.key_version,
                        format,
                    ) {
                        Ok(v) => Ok(Ok(v)),
                        Err(e) if is_item_fault(&e) => Ok(Err(e)),
                        Err(e) => Err(e),
                    }
                })
                .collect::<Result<Vec<_>, ServiceError>>()
        };
        self.core.device.batch(key_type, run).await
    }
}

fn signature_out(
    key_type: KeyType,
    format: SignatureFormat,
    raw: Vec<u8>,
) -> Result<Vec<u8>, ServiceError> {
    match (key_type, format) {
        (KeyType::EcdsaP256, SignatureFormat::Der) => {
            encoding::ecdsa_raw_to_der(&raw).ok_or_else(|| ServiceError::Internal {
                detail: format!("backend returned a {}-byte ECDSA signature", raw.len()),
            })
        }
        _ => Ok(raw),
    }
}

/// The caller's own mistakes stay with the item; everything else fails the request.
fn is_item_fault(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::InvalidArgument(_)
            | ServiceError::NotFound(_)
            | ServiceError::UnsupportedOperation(_)
    )
}

fn item_error<T>(e: BackendError) -> Result<ItemResult<T>, ServiceError> {
    let e = ServiceError::from(e);
    if is_item_fault(&e) {
        Ok(Err(e))
    } else {
        Err(e)
    }
}
