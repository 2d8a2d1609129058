//! What `tillkey bench` needs to measure the raw library (`cli::bench::raw`): contexts of its
//! own and a key made from the daemon's own template, loaded as the daemon loads it. The service
//! never uses this; it goes through [`KeyBackend`](crate::backend::KeyBackend). The bench calls
//! `tss-esapi` on the context itself: what it measures is the library, not this backend.
//! Nothing is left behind: the key exists only as the blob in memory.

use std::sync::Arc;
use std::time::Duration;

use tss_esapi::handles::KeyHandle;
use tss_esapi::Context;

use super::worker::{OpError, Pool, Worker};
use super::{objects, TpmSettings};
use crate::keys::KeyType;

fn describe(e: OpError) -> String {
    match e {
        OpError::Tss(e) => e.to_string(),
        OpError::Bad(m) => m,
    }
}

/// A bench's own key, on `contexts` contexts of its own; shared by the bench threads.
pub struct BenchKey {
    pool: Arc<Pool>,
    blob: Vec<u8>,
}

impl BenchKey {
    /// Leaves the TPM's other objects alone: the daemon may be running beside it.
    pub fn make(
        settings: &TpmSettings,
        contexts: usize,
        key_type: KeyType,
    ) -> Result<Self, String> {
        let pool = Arc::new(
            Pool::open(
                &settings.tcti,
                contexts,
                settings.owner_auth.as_ref(),
                false,
            )
            .map_err(|e| format!("opening {contexts} tpm contexts: {e}"))?,
        );
        let template = objects::template(key_type)
            .ok_or_else(|| format!("a TPM cannot hold {} keys", key_type.as_str()))?
            .map_err(|e| e.to_string())?;
        let mut w = pool.take(Duration::from_secs(1)).ok_or("no tpm context")?;
        let made = Worker::create(&pool, &mut w, template);
        pool.give(w);
        let (public, private) = made.map_err(describe)?;
        let blob = objects::encode(&public, &private)?.0;
        Ok(Self { pool, blob })
    }

    /// Run `f` on a context of this thread's own with the key loaded (once, as a daemon context
    /// keeps it); the key is unloaded and the context handed back afterwards.
    pub fn with_loaded<T>(
        &self,
        f: impl FnOnce(&mut Context, KeyHandle) -> tss_esapi::Result<T>,
    ) -> Result<T, String> {
        let mut w = self
            .pool
            .take(Duration::from_secs(1))
            .ok_or("no tpm context")?;
        let result = (|| -> Result<T, OpError> {
            let h = self.pool.key(&mut w, &self.blob)?;
            Ok(f(&mut w.ctx, h)?)
        })();
        w.unload();
        self.pool.give(w);
        result.map_err(describe)
    }
}
