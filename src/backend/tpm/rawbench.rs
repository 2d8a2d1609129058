//! The raw speed of the TPM, for `tillkey bench`: the operation the daemon performs, called
//! straight through `tss-esapi` from `threads` threads, one context each, every thread with the
//! bench key loaded once. Nothing is left behind: the key exists only as the blob in memory.

use std::sync::Arc;
use std::time::Duration;

use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, MaxBuffer, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::objects;
use super::worker::{OpError, Pool};
use super::TpmSettings;
use crate::backend::timing::{timed, RawRate};
use crate::keys::KeyType;

fn describe(e: OpError) -> String {
    match e {
        OpError::Tss(e) => e.to_string(),
        OpError::Bad(m) => m,
    }
}

pub fn measure(
    settings: &TpmSettings,
    key_type: KeyType,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let pool = Arc::new(
        Pool::open(&settings.tcti, threads, settings.owner_auth.as_ref(), false)
            .map_err(|e| format!("opening {threads} tpm contexts: {e}"))?,
    );
    let template = objects::template(key_type)
        .ok_or_else(|| format!("a TPM cannot hold {} keys", key_type.as_str()))?
        .map_err(|e| e.to_string())?;
    let mut w = pool.take(Duration::from_secs(1)).ok_or("no tpm context")?;
    let made = super::Worker::create(&pool, &mut w, template);
    pool.give(w);
    let (public, private) = made.map_err(describe)?;
    let blob = Arc::new(objects::encode(&public, &private)?.0);
    let data = message.to_vec();

    timed(threads, warmup, duration, move |_, pace| {
        let Some(mut w) = pool.take(Duration::from_secs(1)) else {
            return Err("raw tpm bench: no tpm context".into());
        };
        let result = (|| -> Result<(), OpError> {
            let h = pool.key(&mut w, &blob)?;
            while pace.running() {
                match key_type {
                    KeyType::HmacSha256 => {
                        let buf = MaxBuffer::try_from(data.clone())?;
                        w.ctx
                            .execute_with_session(Some(AuthSession::Password), |c| {
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
                        w.ctx
                            .execute_with_session(Some(AuthSession::Password), |c| {
                                c.sign(h, digest, SignatureScheme::Null, ticket)
                            })?;
                    }
                }
                pace.done_one();
            }
            Ok(())
        })();
        w.unload();
        pool.give(w);
        result.map_err(|e| format!("raw tpm bench: {}", describe(e)))
    })
}
