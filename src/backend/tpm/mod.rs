//! TPM 2.0 backend on `tss-esapi` (swtpm in development and CI, `/dev/tpmrm0` in stores).
//!
//! Keys are created under a storage primary that is recreated from a fixed template, and kept
//! in the registry as their private blob plus public area (see [`objects`]); contexts load them
//! on demand (see [`worker`] for how few objects a TPM without resource manager can hold).
//! A supervisor thread watches the TPM as the PKCS#11 one watches the token: when the link or
//! the TPM's state is lost (swtpm restarted, device gone), requests get `Unavailable` at once,
//! readiness goes false, and new contexts are built as soon as the TPM answers again.
//!
//! What a TPM cannot do here is refused with `Unsupported` naming the backend: AES-GCM and
//! Ed25519 keys, exportable keys and export (keys are `fixedTPM`), and BYOK import (the
//! service's import format is RSA-OAEP + AES-KWP, which a TPM cannot unwrap).

mod bench_key;
mod errors;
mod objects;
mod settings;
mod worker;

use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, MaxBuffer, Signature, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

pub use self::bench_key::BenchKey;
use self::errors::{severity, translate, Severity};
pub use self::settings::TpmSettings;
use self::worker::{OpError, Pool, Worker};
use super::{BackendError, BackendResult, GeneratedKey, Health, KeyBackend, KeyRef, GCM_NONCE_LEN};
use crate::encoding;
use crate::keys::KeyType;

/// How long a request waits for a free context before answering `Unavailable`.
const CONTEXT_WAIT: Duration = Duration::from_secs(5);
/// How long an operation retries while the TPM has no room for another object, and how often.
const BUSY_WAIT: Duration = Duration::from_secs(3);
const BUSY_RETRY: Duration = Duration::from_millis(50);
/// How often the supervisor probes a healthy TPM, and retries a lost one.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Largest message `TPM2_HMAC` takes in one command (`TPM2B_MAX_BUFFER`).
pub const MAX_HMAC_INPUT: usize = 1024;
/// A context unloads its key after this long unused, so other users of a TPM without resource
/// manager (tpm2-tools, `tillkey bench`, `tillkey audit verify`) find room.
pub const IDLE_UNLOAD: Duration = Duration::from_secs(1);

/// Whether a TPM can hold keys of this type (HMAC-SHA256 and ECDSA P-256).
pub fn holds(key_type: KeyType) -> bool {
    objects::template(key_type).is_some()
}

pub struct TpmBackend {
    settings: TpmSettings,
    /// This process is the TPM's main user: it reclaims objects left loaded by others.
    owner: bool,
    closed: std::sync::atomic::AtomicBool,
    live: RwLock<Option<Arc<Pool>>>,
    health: Mutex<Health>,
    wake: (Mutex<bool>, Condvar),
}

impl TpmBackend {
    /// Connect now (a daemon that cannot reach its TPM at start refuses to start) and start the
    /// supervisor. `owner` (the daemon) flushes objects that dead processes left loaded, at
    /// start and at each reconnect; tools that share the TPM with a running daemon pass false.
    pub fn open(settings: TpmSettings, owner: bool) -> Result<Arc<Self>, String> {
        let pool = Pool::open(
            &settings.tcti,
            settings.contexts,
            settings.owner_auth.as_ref(),
            owner,
        )
        .map_err(|e| translate(&e, "open", &settings.tcti).to_string())?;
        let backend = Arc::new(Self {
            settings,
            owner,
            closed: std::sync::atomic::AtomicBool::new(false),
            live: RwLock::new(Some(Arc::new(pool))),
            health: Mutex::new(Health::Ready),
            wake: (Mutex::new(false), Condvar::new()),
        });
        let weak = Arc::downgrade(&backend);
        std::thread::Builder::new()
            .name("tpm-supervisor".into())
            .spawn(move || supervise(weak))
            .map_err(|e| format!("starting the tpm supervisor: {e}"))?;
        Ok(backend)
    }

    /// Unload everything and stop reconnecting (at shutdown): a TPM without resource manager
    /// would otherwise keep this process's objects loaded after it exits.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let pool = self.live.write().unwrap_or_else(|p| p.into_inner()).take();
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) =
            Health::NotReady("tpm backend closed".into());
        if let Some(pool) = pool {
            pool.close();
        }
    }

    pub fn tcti(&self) -> &str {
        &self.settings.tcti
    }

    pub fn context_count(&self) -> usize {
        self.current().map_or(0, |p| p.size())
    }

    fn current(&self) -> Option<Arc<Pool>> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tear down `pool` (if it is still the live one) and let the supervisor rebuild.
    fn fail(&self, pool: &Arc<Pool>, why: String) {
        {
            let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
            if live.as_ref().is_some_and(|p| Arc::ptr_eq(p, pool)) {
                *live = None;
                tracing::error!(tcti = %self.settings.tcti, reason = %why, "tpm failed; reconnecting");
            }
        }
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::NotReady(why);
        let (flag, cv) = &self.wake;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_one();
    }

    /// Run `f` on a pooled context, classifying failures once; a fatal one drops the context
    /// and hands the TPM to the supervisor.
    fn with_worker<T>(
        &self,
        what: &str,
        object: Option<&[u8]>,
        f: impl Fn(&Pool, &mut Worker) -> Result<T, OpError>,
    ) -> BackendResult<T> {
        // Every TPM command waits for the TPM: never on an async worker.
        super::refuse_async_worker("tpm", what)?;
        let pool = self.current().ok_or_else(|| {
            BackendError::Unavailable(format!("tpm {} is reconnecting", self.settings.tcti))
        })?;
        let mut w = pool.take_for(CONTEXT_WAIT, object).ok_or_else(|| {
            BackendError::Unavailable(format!(
                "all {} tpm contexts stayed busy for {CONTEXT_WAIT:?}",
                pool.size()
            ))
        })?;
        // A TPM without resource manager may be full of other users' objects for a moment
        // (another context loading, `tillkey audit verify`, tpm2-tools): wait a little.
        let deadline = Instant::now() + BUSY_WAIT;
        let mut result = f(&pool, &mut w);
        while let Err(OpError::Tss(e)) = &result {
            if severity(e) != Severity::Busy || Instant::now() >= deadline {
                break;
            }
            w.unload();
            std::thread::sleep(BUSY_RETRY);
            result = f(&pool, &mut w);
        }
        match result {
            Ok(v) => {
                pool.give(w);
                Ok(v)
            }
            Err(OpError::Bad(msg)) => {
                pool.give(w);
                Err(BackendError::Failed(format!("tpm {what}: {msg}")))
            }
            Err(OpError::Tss(e)) => {
                let err = translate(&e, what, &self.settings.tcti);
                match severity(&e) {
                    Severity::Fatal => {
                        drop(w);
                        self.fail(&pool, err.to_string());
                    }
                    Severity::Busy => {
                        // Free what this context holds so the next try has room.
                        w.unload();
                        pool.give(w);
                    }
                    Severity::Failed => pool.give(w),
                }
                Err(err)
            }
        }
    }

    fn hmac(&self, what: &str, key: KeyRef<'_>, message: &[u8]) -> BackendResult<Vec<u8>> {
        if message.len() > MAX_HMAC_INPUT {
            return Err(BackendError::InvalidInput(format!(
                "the tpm backend MACs messages of at most {MAX_HMAC_INPUT} bytes"
            )));
        }
        let data = MaxBuffer::try_from(message.to_vec())
            .map_err(|e| BackendError::InvalidInput(format!("tpm {what}: {e}")))?;
        self.with_worker(what, Some(&key.object.0), |pool, w| {
            let h = pool.key(w, &key.object.0)?;
            let tag = w
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.hmac(h.into(), data.clone(), HashingAlgorithm::Sha256)
                })?;
            Ok(tag.value().to_vec())
        })
    }

    fn unsupported(&self, what: &str) -> BackendError {
        BackendError::Unsupported(format!("the tpm backend cannot {what}"))
    }
}

fn supervise(backend: Weak<TpmBackend>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        if b.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match b.current() {
            Some(pool) => {
                // Probe with an idle context (when all are busy, requests are the probe), and
                // unload keys nobody used for a while.
                let mut idle = Vec::new();
                while let Some(w) = pool.try_take() {
                    idle.push(w);
                }
                let mut failed = None;
                if let Some(w) = idle.first_mut() {
                    if let Err(e) = w.ctx.execute_without_session(|c| c.get_random(8)) {
                        if severity(&e) == Severity::Fatal {
                            failed = Some(translate(&e, "probe", &b.settings.tcti).to_string());
                        }
                    }
                }
                match failed {
                    Some(why) => {
                        drop(idle);
                        b.fail(&pool, why);
                    }
                    None => {
                        for mut w in idle {
                            w.unload_if_idle(IDLE_UNLOAD);
                            pool.give(w);
                        }
                    }
                }
            }
            None => {
                let s = &b.settings;
                match Pool::open(&s.tcti, s.contexts, s.owner_auth.as_ref(), b.owner) {
                    Ok(pool) => {
                        tracing::info!(tcti = %s.tcti, "tpm reconnected");
                        *b.live.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(pool));
                        *b.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Ready;
                    }
                    Err(e) => {
                        let why = translate(&e, "reconnect", &s.tcti).to_string();
                        tracing::warn!(reason = %why, "tpm reconnect failed; will retry");
                        *b.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::NotReady(why);
                    }
                }
            }
        }
        let (flag, cv) = &b.wake;
        let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
        let (mut woken, _) = cv
            .wait_timeout_while(guard, PROBE_INTERVAL, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *woken = false;
    }
}

/// `r || s`, each left-padded to 32 bytes.
fn raw_ecdsa(sig: Signature) -> Result<Vec<u8>, OpError> {
    let Signature::EcDsa(sig) = sig else {
        return Err(OpError::Bad(
            "the TPM answered with a non-ECDSA signature".into(),
        ));
    };
    let mut out = Vec::with_capacity(64);
    for part in [sig.signature_r().value(), sig.signature_s().value()] {
        if part.len() > 32 {
            return Err(OpError::Bad(
                "ECDSA signature part longer than 32 bytes".into(),
            ));
        }
        out.extend(std::iter::repeat_n(0, 32 - part.len()));
        out.extend_from_slice(part);
    }
    Ok(out)
}

impl KeyBackend for TpmBackend {
    fn close(&self) {
        TpmBackend::close(self)
    }

    fn kind(&self) -> &'static str {
        "tpm"
    }

    /// Every command is a round trip to the TPM (another process for swtpm, a chip on a bus).
    fn waits_on_device(&self) -> bool {
        true
    }

    fn supports(&self, key_type: KeyType) -> bool {
        holds(key_type)
    }

    fn generate(
        &self,
        key_type: KeyType,
        _label: &str,
        exportable: bool,
    ) -> BackendResult<GeneratedKey> {
        if exportable {
            return Err(self.unsupported(
                "make exportable keys: TPM keys are bound to the TPM and never leave it",
            ));
        }
        let template = objects::template(key_type)
            .ok_or_else(|| self.unsupported(&format!("hold {} keys", key_type.as_str())))?
            .map_err(|e| BackendError::Failed(format!("tpm key template: {e}")))?;
        let (public, private) = self.with_worker("generate", None, |pool, w| {
            Worker::create(pool, w, template.clone())
        })?;
        let public_key_der = match key_type {
            KeyType::EcdsaP256 => Some(
                objects::ec_point(&public)
                    .and_then(|p| encoding::spki_from_ec_point(key_type, &p))
                    .ok_or_else(|| {
                        BackendError::Failed("tpm generate: unexpected ECC public area".into())
                    })?,
            ),
            _ => None,
        };
        let object = objects::encode(&public, &private)
            .map_err(|e| BackendError::Failed(format!("tpm generate: {e}")))?;
        Ok(GeneratedKey {
            object,
            public_key_der,
        })
    }

    fn sign(&self, key: KeyRef<'_>, message: &[u8]) -> BackendResult<Vec<u8>> {
        match key.key_type {
            KeyType::HmacSha256 => self.hmac("sign", key, message),
            KeyType::EcdsaP256 => {
                let digest = ring::digest::digest(&ring::digest::SHA256, message);
                let digest = Digest::try_from(digest.as_ref().to_vec())
                    .map_err(|e| BackendError::Failed(format!("tpm sign: {e}")))?;
                self.with_worker("sign", Some(&key.object.0), |pool, w| {
                    let h = pool.key(w, &key.object.0)?;
                    // An unrestricted key signs outside digests; the ticket is the null one.
                    let ticket = TPMT_TK_HASHCHECK {
                        tag: TPM2_ST_HASHCHECK,
                        hierarchy: TPM2_RH_NULL,
                        digest: Default::default(),
                    }
                    .try_into()?;
                    let sig = w
                        .ctx
                        .execute_with_session(Some(AuthSession::Password), |c| {
                            c.sign(h, digest.clone(), SignatureScheme::Null, ticket)
                        })?;
                    raw_ecdsa(sig)
                })
            }
            other => Err(self.unsupported(&format!("sign with {} keys", other.as_str()))),
        }
    }

    fn verify(&self, key: KeyRef<'_>, message: &[u8], signature: &[u8]) -> BackendResult<bool> {
        match key.key_type {
            KeyType::HmacSha256 => {
                let tag = self.hmac("verify", key, message)?;
                Ok(tag.len() == signature.len() && bool::from(tag.ct_eq(signature)))
            }
            // Verification needs only the public key, which is in the reference: no TPM
            // command, no loaded object.
            KeyType::EcdsaP256 => {
                let (public, _) = objects::decode(key.object)
                    .map_err(|e| BackendError::Failed(format!("tpm verify: {e}")))?;
                let point = objects::ec_point(&public).ok_or_else(|| {
                    BackendError::Failed("tpm verify: not an ECC public area".into())
                })?;
                let pk = ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    point,
                );
                Ok(pk.verify(message, signature).is_ok())
            }
            other => Err(self.unsupported(&format!("verify with {} keys", other.as_str()))),
        }
    }

    fn encrypt(
        &self,
        key: KeyRef<'_>,
        _nonce: &[u8; GCM_NONCE_LEN],
        _aad: &[u8],
        _plaintext: &[u8],
    ) -> BackendResult<Vec<u8>> {
        Err(self.unsupported(&format!("encrypt with {} keys", key.key_type.as_str())))
    }

    fn decrypt(
        &self,
        key: KeyRef<'_>,
        _nonce: &[u8; GCM_NONCE_LEN],
        _aad: &[u8],
        _ciphertext: &[u8],
    ) -> BackendResult<Option<Vec<u8>>> {
        Err(self.unsupported(&format!("decrypt with {} keys", key.key_type.as_str())))
    }

    /// Nothing of the key is stored in the TPM: the blob in the registry is the key. Unload it
    /// where it is loaded; the service stops using a destroyed version.
    fn destroy(&self, key: KeyRef<'_>) -> BackendResult<()> {
        self.with_worker("destroy", Some(&key.object.0), |_, w| {
            w.forget(&key.object.0);
            Ok(())
        })
    }

    fn check_value(&self, key: KeyRef<'_>) -> BackendResult<[u8; 3]> {
        if key.key_type != KeyType::HmacSha256 {
            return Err(self.unsupported(&format!(
                "compute check values of {} keys",
                key.key_type.as_str()
            )));
        }
        let tag = self.hmac("check value", key, &[0u8; 32])?;
        match tag.as_slice() {
            [a, b, c, ..] => Ok([*a, *b, *c]),
            _ => Err(BackendError::Failed("tpm check value: short HMAC".into())),
        }
    }

    fn wrap(&self, _key: KeyRef<'_>, _transport: KeyRef<'_>) -> BackendResult<Vec<u8>> {
        Err(self.unsupported(
            "export keys: TPM keys are bound to the TPM (fixedTPM) and cannot be wrapped for a terminal",
        ))
    }

    fn import_wrapping_key(&self) -> BackendResult<Vec<u8>> {
        Err(self.unsupported("import keys: it cannot unwrap the RSA-OAEP + AES-KWP import format"))
    }

    fn import(
        &self,
        _key_type: KeyType,
        _label: &str,
        _encrypted_kek: &[u8],
        _wrapped_key: &[u8],
    ) -> BackendResult<GeneratedKey> {
        Err(self.unsupported("import keys: it cannot unwrap the RSA-OAEP + AES-KWP import format"))
    }

    fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
