//! The hardware boundary.
//!
//! Everything above this module talks to keys through [`KeyBackend`] and names backend objects
//! only by the opaque bytes in [`ObjectRef`]. Each implementation translates its own library's
//! errors into [`BackendError`] exactly once, at its edge, with enough context (slot, token,
//! object label) for an operator to act on, and classifies them so the service knows whether to
//! blame the caller, the request, or the device.

mod open;
pub mod pkcs11;
pub mod tpm;

pub use self::open::{open, Opened, OpenedDevice, Purpose, Settings};

use std::sync::Arc;

use crate::keys::KeyType;

/// Backend-specific reference to a stored key (for PKCS#11 the `CKA_ID`). Stored in the
/// registry; meaningless to anyone but the backend that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef(pub Vec<u8>);

/// A freshly generated key version.
#[derive(Debug)]
pub struct GeneratedKey {
    pub object: ObjectRef,
    /// DER SubjectPublicKeyInfo, for asymmetric types.
    pub public_key_der: Option<Vec<u8>>,
}

/// One key version as the backend needs to see it.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub key_type: KeyType,
    pub object: &'a ObjectRef,
}

/// The key-derivation function that made a derived key version. Recorded per version, so a
/// version keeps its derivation after the master rotates or a later generation changes KDF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// PKCS#11 `CKM_AES_CBC_ENCRYPT_DATA`: the 32-byte context encrypted under the master in CBC
    /// mode (IV recorded with the version). What SoftHSM offers; each output block is the
    /// master's AES permutation of a distinct input, so one terminal's key says nothing about
    /// another's.
    AesCbcEncryptData,
}

impl Kdf {
    pub fn as_str(self) -> &'static str {
        match self {
            Kdf::AesCbcEncryptData => "aes-cbc-encrypt-data",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        (s == "aes-cbc-encrypt-data").then_some(Kdf::AesCbcEncryptData)
    }
}

/// A derived key version: its backend reference (which re-derives the key on demand; nothing is
/// stored in the device) and the KDF used.
#[derive(Debug)]
pub struct DerivedKey {
    pub object: ObjectRef,
    pub kdf: Kdf,
}

/// Occupancy of a backend's cache of derived keys, for metrics and the bound's tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedCacheStats {
    /// Derived keys held in the device now (cached plus those still in use after eviction).
    pub held: usize,
    pub capacity: usize,
    /// Derivations performed since start (cache misses).
    pub derivations: u64,
}

/// Whether the backend can serve, and if not, why (shown on `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    NotReady(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The device is gone or recovering; the request may succeed later.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend cannot do this for this key type; the message names the backend.
    #[error("{0}")]
    Unsupported(String),
    /// The request's data was refused by the device (e.g. wrong length); the caller's fault.
    #[error("{0}")]
    InvalidInput(String),
    /// Anything else: an internal fault with context for the log.
    #[error("backend failure: {0}")]
    Failed(String),
}

pub type BackendResult<T> = Result<T, BackendError>;

/// The name the daemon gives its async workers. A call that waits on a device must never run on
/// one of them (it would stall every connection of that worker): the service's device gate keeps
/// such calls on its own threads, and a backend whose calls wait refuses, in test builds, a call
/// made on a thread of this name, so a call that bypasses the gate fails its test.
pub const ASYNC_WORKER_THREAD: &str = "tillkeyd-worker";

/// In test (debug) builds, an error if the calling thread is an async worker; see
/// [`ASYNC_WORKER_THREAD`]. Release builds do not check.
pub fn refuse_async_worker(backend: &str, what: &str) -> BackendResult<()> {
    if cfg!(debug_assertions) && std::thread::current().name() == Some(ASYNC_WORKER_THREAD) {
        tracing::error!(
            backend,
            operation = what,
            "a device call reached the backend on an async worker"
        );
        return Err(BackendError::Failed(format!(
            "{backend} {what} was called on an async worker, not through the device gate"
        )));
    }
    Ok(())
}

/// Length of the AES-GCM nonce the service generates for each encryption.
pub const GCM_NONCE_LEN: usize = 12;

/// A store of keys that never leave it in the clear.
///
/// Calls are blocking and short (tens of microseconds on SoftHSM); implementations are safe to
/// call from many threads at once and keep their own session or context pools.
pub trait KeyBackend: Send + Sync {
    /// Short name used in messages and metrics ("pkcs11", "tpm").
    fn kind(&self) -> &'static str;

    /// Whether a call waits for a device outside this process (a TPM, a hardware slot) rather
    /// than computing in it (a software token). The service keeps waiting calls off the async
    /// workers, where they would stall every connection on that worker; a computing call costs
    /// less where it is asked (BENCHMARKS.md, 2026-12-04). When unsure, a backend says true.
    fn waits_on_device(&self) -> bool {
        true
    }

    fn supports(&self, key_type: KeyType) -> bool;

    /// Generate a new key inside the device. `label` is a human-readable name for standard tools
    /// (e.g. `pkcs11-tool --list-objects`). Keys are never readable; `exportable` (symmetric keys
    /// for terminals only) allows them to leave wrapped under another device key.
    fn generate(
        &self,
        key_type: KeyType,
        label: &str,
        exportable: bool,
    ) -> BackendResult<GeneratedKey>;

    /// HMAC tag, ECDSA signature (raw `r || s`, over SHA-256 of `message`) or Ed25519 signature.
    fn sign(&self, key: KeyRef<'_>, message: &[u8]) -> BackendResult<Vec<u8>>;

    /// Sign several messages under one key, one result each, in order. A backend with per-call
    /// setup (a pooled session, a key lookup) overrides this to pay it once per batch.
    fn sign_many(&self, key: KeyRef<'_>, messages: &[Vec<u8>]) -> Vec<BackendResult<Vec<u8>>> {
        messages.iter().map(|m| self.sign(key, m)).collect()
    }

    /// `Ok(false)` for a well-formed request whose signature does not match.
    fn verify(&self, key: KeyRef<'_>, message: &[u8], signature: &[u8]) -> BackendResult<bool>;

    /// AES-256-GCM; returns ciphertext followed by the 16-byte tag.
    fn encrypt(
        &self,
        key: KeyRef<'_>,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> BackendResult<Vec<u8>>;

    /// `Ok(None)` when the ciphertext or associated data fail authentication.
    fn decrypt(
        &self,
        key: KeyRef<'_>,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> BackendResult<Option<Vec<u8>>>;

    /// Delete the key's objects from the device.
    fn destroy(&self, key: KeyRef<'_>) -> BackendResult<()>;

    /// Key check value of a symmetric key: the first 3 bytes of AES-CMAC over a zero block
    /// (AES keys) or of HMAC-SHA256 over 32 zero bytes (HMAC keys). Lets operators compare keys
    /// without seeing them.
    fn check_value(&self, key: KeyRef<'_>) -> BackendResult<[u8; 3]>;

    /// An exportable key wrapped (AES key wrap with padding, RFC 5649) under a transport key.
    fn wrap(&self, key: KeyRef<'_>, transport: KeyRef<'_>) -> BackendResult<Vec<u8>>;

    /// DER SubjectPublicKeyInfo of the RSA key clients wrap import material for; made in the
    /// device on first use.
    fn import_wrapping_key(&self) -> BackendResult<Vec<u8>>;

    /// Import key material that arrives as an RSA-OAEP(SHA-1)-encrypted one-time AES-256 KEK
    /// plus the material wrapped under that KEK (RFC 5649). The material becomes a
    /// non-extractable key; it is never in the clear outside the device.
    fn import(
        &self,
        key_type: KeyType,
        label: &str,
        encrypted_kek: &[u8],
        wrapped_key: &[u8],
    ) -> BackendResult<GeneratedKey>;

    fn health(&self) -> Health;

    /// Release what the device would otherwise keep after this process exits (a TPM without a
    /// resource manager keeps loaded objects). Nothing to do for PKCS#11.
    fn close(&self) {}

    /// Make a derived key of `key_type` from a master version (`aes256-derive`) and a 32-byte
    /// context unique to the key name and version. The device holds no new persistent object:
    /// the returned reference re-derives the key (deterministically) whenever it is used, so
    /// signing and verifying work after a restart and the device's object count does not grow.
    fn derive(
        &self,
        master: KeyRef<'_>,
        key_type: KeyType,
        context: &[u8; 32],
    ) -> BackendResult<DerivedKey> {
        let _ = (master, key_type, context);
        Err(BackendError::Unsupported(format!(
            "the {} backend cannot derive keys",
            self.kind()
        )))
    }

    /// Cache occupancy, for backends that cache derived keys.
    fn derived_cache(&self) -> Option<DerivedCacheStats> {
        None
    }
}

pub type SharedBackend = Arc<dyn KeyBackend>;
