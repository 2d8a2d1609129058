//! The raw speed of the TPM: the operation the daemon performs, called straight through
//! `tss-esapi` from `threads` threads, one context each, every thread with the bench key loaded
//! once. Nothing is left behind: the key exists only as the blob in memory.

use std::sync::Arc;
use std::time::Duration;

use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, MaxBuffer, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::timing::{timed, RawRate};
use crate::backend::tpm::{BenchKey, TpmSettings};
use crate::keys::KeyType;

pub fn measure(
    settings: &TpmSettings,
    key_type: KeyType,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let key = Arc::new(BenchKey::make(settings, threads, key_type)?);
    let data = message.to_vec();

    timed(threads, warmup, duration, move |_, pace| {
        key.with_loaded(|ctx, h| {
            while pace.running() {
                match key_type {
                    KeyType::HmacSha256 => {
                        let buf = MaxBuffer::try_from(data.clone())?;
                        ctx.execute_with_session(Some(AuthSession::Password), |c| {
                            c.hmac(h.into(), buf, HashingAlgorithm::Sha256)
                        })?;
                    }
                    _ => {
                        // Hash per call, as the daemon does.
                        let d = ring::digest::digest(&ring::digest::SHA256, &data);
                        let digest = Digest::try_from(d.as_ref().to_vec())?;
                        let ticket = TPMT_TK_HASHCHECK {
                            tag: TPM2_ST_HASHCHECK,
                            hierarchy: TPM2_RH_NULL,
                            digest: Default::default(),
                        }
                        .try_into()?;
                        ctx.execute_with_session(Some(AuthSession::Password), |c| {
                            c.sign(h, digest, SignatureScheme::Null, ticket)
                        })?;
                    }
                }
                pace.done_one();
            }
            Ok(())
        })
        .map_err(|e| format!("raw tpm bench: {e}"))
    })
}
