//! The raw device rate `tillkey bench` compares the daemon with: the same operation, called
//! straight through the device library from `threads` threads (one session or context each), on
//! a key made for the purpose.
//!
//! The one module above `backend` that names `cryptoki` and `tss-esapi`: it measures those
//! libraries, so it calls them itself. From the backend it takes only a `BenchKey` per backend
//! (sessions or contexts opened as the daemon's are, a key from the daemon's template).

mod derive;
mod pkcs11;
pub mod timing;
mod tpm;

use std::time::Duration;

use self::timing::RawRate;
use crate::backend::Settings;
use crate::keys::KeyType;

pub use self::derive::measure as measure_derived;
pub use self::pkcs11::measure as measure_pkcs11;

/// What the raw threads call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawOp {
    Sign,
    /// Verify a correct signature (made once before the clock starts).
    Verify,
}

/// The raw rate of `op` on the device `settings` reach.
pub fn measure(
    settings: &Settings,
    key_type: KeyType,
    op: RawOp,
    threads: usize,
    warmup: Duration,
    measured: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    match settings {
        Settings::Pkcs11(settings) => {
            pkcs11::measure_op(settings, key_type, op, threads, warmup, measured, message)
        }
        Settings::Tpm(settings) => {
            // A TPM verifies an HMAC by computing it, so the raw sign rate is the raw verify
            // rate too. Without a resource manager the TPM has room for the bench's keys only
            // once the daemon has unloaded its own (after a second idle).
            std::thread::sleep(crate::backend::tpm::IDLE_UNLOAD * 2);
            tpm::measure(settings, key_type, threads, warmup, measured, message)
        }
    }
}
