//! The raw cost of a derived key that is not cached, for `tillkey bench --scale-hot`: derive a
//! per-terminal key from a master (AES-CBC-ENCRYPT-DATA), MAC once with it, destroy it; straight
//! through `cryptoki` from `threads` threads, one session each, as the daemon would on a miss.

use std::sync::Arc;
use std::time::Duration;

use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;

use super::timing::{timed, RawRate};
use crate::backend::pkcs11::{BenchKey, Pkcs11Settings};
use crate::keys::KeyType;

pub fn measure(
    settings: &Pkcs11Settings,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let key = Arc::new(BenchKey::make(
        settings,
        threads,
        KeyType::Aes256Derive,
        b"tillkey-rawderive",
    )?);
    let data = message.to_vec();
    let worker_key = key.clone();
    let rate = timed(threads, warmup, duration, move |t, pace| {
        let key = &worker_key;
        let s = key.take_session()?;
        let master = key.handle(&s, false)?;
        let template = BenchKey::derived_template(KeyType::HmacSha256);
        let mut n: u64 = 0;
        while pace.running() {
            // A different terminal every time: nothing is reused.
            let mut context = [0u8; 32];
            context[..8].copy_from_slice(&n.to_be_bytes());
            context[8] = t as u8;
            n += 1;
            let params = AesCbcDeriveParams::new([0; 16], &context);
            let k = s
                .derive_key(&Mechanism::AesCbcEncryptData(params), master, &template)
                .map_err(|e| e.to_string())?;
            s.sign(&Mechanism::Sha256Hmac, k, &data)
                .map_err(|e| e.to_string())?;
            s.destroy_object(k).map_err(|e| e.to_string())?;
            pace.done_one();
        }
        key.give_session(s);
        Ok(())
    });
    key.remove();
    rate
}
