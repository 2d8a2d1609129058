//! The raw speed of the token: the same operation the daemon performs, called straight through
//! `cryptoki` from `threads` threads, one session each, on a token key made for the purpose and
//! destroyed afterwards.

use std::sync::Arc;
use std::time::Duration;

use super::timing::{timed, RawRate};
use super::RawOp;
use crate::backend::pkcs11::{BenchKey, Pkcs11Settings};
use crate::keys::KeyType;

pub fn measure(
    settings: &Pkcs11Settings,
    key_type: KeyType,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    measure_op(
        settings,
        key_type,
        RawOp::Sign,
        threads,
        warmup,
        duration,
        message,
    )
}

pub fn measure_op(
    settings: &Pkcs11Settings,
    key_type: KeyType,
    op: RawOp,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let key = Arc::new(BenchKey::make(
        settings,
        threads,
        key_type,
        b"tillkey-rawbench",
    )?);
    let data = message.to_vec();
    let worker_key = key.clone();
    let rate = timed(threads, warmup, duration, move |_, pace| {
        let key = &worker_key;
        let mech = key.sign_mechanism().ok_or("not a signing key type")?;
        let s = key.take_session()?;
        let h = key.handle(&s, false)?;
        let verify_h = match op {
            RawOp::Sign => None,
            RawOp::Verify => {
                let sig = s
                    .sign(&mech, h, &key.to_be_signed(&data))
                    .map_err(|e| e.to_string())?;
                Some((key.handle(&s, true)?, sig))
            }
        };
        while pace.running() {
            // ECDSA hashes per call, as the daemon does.
            let input = key.to_be_signed(&data);
            match &verify_h {
                None => s.sign(&mech, h, &input).map(|_| ()),
                Some((vh, sig)) => s.verify(&mech, *vh, &input, sig),
            }
            .map_err(|e| e.to_string())?;
            pace.done_one();
        }
        key.give_session(s);
        Ok(())
    });
    key.remove();
    rate
}
