//! PKCS#11 backend on `cryptoki` (SoftHSM2 in development and CI).
//!
//! A supervisor thread watches the token. When a call fails in a way that means the device,
//! session or login is gone, the backend drops its [`connection::Connection`], reports not-ready
//! and reconnects in the background; requests meanwhile fail at once with `Unavailable` instead
//! of waiting on a dead device.

mod bench_key;
mod connection;
mod derive;
mod errors;
mod exchange;
pub mod init;
mod missing;
mod settings;
mod templates;
pub mod uri;

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::Session;

pub use self::bench_key::BenchKey;
use self::connection::Connection;
use self::errors::OpError;
use self::errors::{is_auth_failure, severity, translate, Severity};
use self::missing::{Failure, MISSING_PAUSES};
pub use self::settings::{read_pin, Pkcs11Settings};
use self::templates::Template;
pub use self::uri::TokenSelector;
use super::{
    BackendError, BackendResult, DerivedCacheStats, DerivedKey, GeneratedKey, Health, Kdf,
    KeyBackend, KeyRef, ObjectRef, GCM_NONCE_LEN,
};
use crate::encoding;
use crate::keys::KeyType;

thread_local! {
    /// Set while this thread holds the token exclusively (see `Pkcs11Backend::exclusively`).
    static EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
}

/// How long a request waits for a free session before answering `Unavailable`.
const SESSION_WAIT: Duration = Duration::from_secs(5);
/// How often the supervisor probes a healthy token, and retries a failed one.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Whether single calls wait on the device (and so stay off the async workers): as configured,
/// else unless the slot says it is a software token, computed in this process.
fn calls_wait(calls_on_workers: Option<bool>, hardware_slot: bool) -> bool {
    !calls_on_workers.unwrap_or(!hardware_slot)
}

/// Default bound of the derived-key cache: the hot terminals of a large estate, a few MB of
/// SoftHSM memory.
pub const DEFAULT_DERIVED_CACHE: usize = 10_000;

pub struct Pkcs11Backend {
    settings: Pkcs11Settings,
    /// Token-object creation and deletion run alone: SoftHSM's file object store fails them
    /// (`CKR_GENERAL_ERROR`, `CKR_TEMPLATE_INCONSISTENT`) when other sessions use the token at
    /// the same moment. Every other call takes the shared side, which costs nothing while no
    /// key is being created; creations are rare next to signing.
    token_writes: RwLock<()>,
    /// See [`KeyBackend::waits_on_device`]: from the configuration, else from the slot's kind
    /// at start (a reconnect finds the same token).
    waits_on_device: bool,
    live: RwLock<Option<Arc<Connection>>>,
    health: Mutex<Health>,
    wake: (Mutex<bool>, Condvar),
}

impl Pkcs11Backend {
    /// Connect now (a daemon that cannot reach its token at start refuses to start, so a wrong
    /// PIN or URI is seen at once) and start the supervisor.
    pub fn open(settings: Pkcs11Settings) -> Result<Arc<Self>, String> {
        let conn = Connection::open(&settings)?;
        let waits_on_device = calls_wait(settings.calls_on_workers, conn.hardware);
        let backend = Arc::new(Self {
            settings,
            token_writes: RwLock::new(()),
            waits_on_device,
            live: RwLock::new(Some(Arc::new(conn))),
            health: Mutex::new(Health::Ready),
            wake: (Mutex::new(false), Condvar::new()),
        });
        let weak = Arc::downgrade(&backend);
        std::thread::Builder::new()
            .name("pkcs11-supervisor".into())
            .spawn(move || supervise(weak))
            .map_err(|e| format!("starting the pkcs11 supervisor: {e}"))?;
        Ok(backend)
    }

    pub fn token_label(&self) -> Option<String> {
        self.current().map(|c| c.token_label.clone())
    }

    pub fn session_count(&self) -> usize {
        self.current().map_or(0, |c| c.pool_size())
    }

    fn current(&self) -> Option<Arc<Connection>> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tear down `conn` (if it is still the live one) and let the supervisor rebuild.
    fn fail(&self, conn: &Arc<Connection>, why: String) {
        {
            let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
            if live.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *live = None;
                tracing::error!(token = %conn.token_label, reason = %why, "pkcs11 token failed; reconnecting");
            }
        }
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::NotReady(why);
        let (flag, cv) = &self.wake;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_one();
    }

    /// Run `f` with the token to itself (no other session's call in flight); for calls that
    /// create or delete token objects.
    fn exclusively<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                EXCLUSIVE.with(|e| e.set(false));
            }
        }
        let _alone = self.token_writes.write().unwrap_or_else(|p| p.into_inner());
        EXCLUSIVE.with(|e| e.set(true));
        let _reset = Reset;
        f()
    }

    /// Run `f` on a pooled session, classifying failures once. A stale handle is looked up again
    /// once; a fatal error tears the connection down.
    ///
    /// A missing object is looked for again, alone on the token and after a pause (see
    /// [`MISSING_PAUSES`]): another process sharing the token (an instance of a cluster) may
    /// have just made it.
    fn with_session<T>(
        &self,
        what: &str,
        object: &ObjectRef,
        f: impl Fn(&Connection, &Session) -> Result<T, OpError>,
    ) -> BackendResult<T> {
        // A token whose calls wait is never called on an async worker (test builds check).
        if self.waits_on_device {
            super::refuse_async_worker("pkcs11", what)?;
        }
        let mut result = self.attempt(what, object, &f);
        if !EXCLUSIVE.with(Cell::get) {
            for pause in MISSING_PAUSES {
                let Err(Failure::Missing(conn)) = &result else {
                    break;
                };
                conn.forget_handles(Some(&object.0));
                std::thread::sleep(pause);
                result = self.exclusively(|| self.attempt(what, object, &f));
            }
        }
        result.map_err(|e| e.into_backend(what, object))
    }

    fn attempt<T>(
        &self,
        what: &str,
        object: &ObjectRef,
        f: &impl Fn(&Connection, &Session) -> Result<T, OpError>,
    ) -> Result<T, Failure> {
        // Shared with other calls, excluded while a token object is written (unless this thread
        // is the writer).
        let _shared = if EXCLUSIVE.with(Cell::get) {
            None
        } else {
            Some(self.token_writes.read().unwrap_or_else(|p| p.into_inner()))
        };
        let conn = self.current().ok_or_else(|| {
            BackendError::Unavailable(format!(
                "pkcs11 token {} is reconnecting",
                self.settings.token_uri
            ))
        })?;
        let session = conn.take_session(SESSION_WAIT).ok_or_else(|| {
            BackendError::Unavailable(format!(
                "all {} pkcs11 sessions stayed busy for {SESSION_WAIT:?}",
                conn.pool_size()
            ))
        })?;
        let mut result = f(&conn, &session);
        if let Err(OpError::Ck(e)) = &result {
            if severity(e) == Severity::StaleHandle {
                conn.forget_handles(Some(&object.0));
                result = f(&conn, &session);
            }
        }
        // Only failures name the object: hex-encoding its id on every call cost more than a
        // few percent of the request path.
        let object_label = || encoding::hex_encode(&object.0);
        match result {
            Ok(v) => {
                conn.give_session(session);
                Ok(v)
            }
            Err(OpError::Refused(msg)) => {
                conn.give_session(session);
                Err(BackendError::InvalidInput(msg).into())
            }
            Err(OpError::ObjectMissing) => {
                conn.give_session(session);
                Err(Failure::Missing(conn))
            }
            Err(OpError::Ck(e)) => {
                let err = translate(&e, what, &conn.token_label, &object_label());
                if severity(&e) == Severity::Fatal {
                    let _ = session.close();
                    self.fail(&conn, err.to_string());
                } else {
                    conn.give_session(session);
                }
                Err(err.into())
            }
        }
    }

    fn unsupported(&self, what: &str, key_type: KeyType) -> BackendError {
        BackendError::Unsupported(format!(
            "{what} is not an operation of {} keys",
            key_type.as_str()
        ))
    }
}

fn supervise(backend: Weak<Pkcs11Backend>) {
    let mut previous: Weak<Connection> = Weak::new();
    loop {
        let Some(b) = backend.upgrade() else { return };
        match b.current() {
            Some(conn) => {
                if let Err(e) = conn.probe() {
                    if severity(&e) == Severity::Fatal {
                        b.fail(
                            &conn,
                            translate(&e, "probe", &conn.token_label, "-").to_string(),
                        );
                    }
                }
                previous = Arc::downgrade(&conn);
            }
            None => {
                // The old connection must be finalized before the library is initialized again;
                // in-flight calls on it finish first (bounded, a hung device is not waited for).
                for _ in 0..100 {
                    if previous.strong_count() == 0 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                match Connection::open(&b.settings) {
                    Ok(conn) => {
                        tracing::info!(token = %conn.token_label, "pkcs11 token reconnected");
                        *b.live.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(conn));
                        *b.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Ready;
                    }
                    Err(why) => {
                        tracing::warn!(reason = %why, "pkcs11 reconnect failed; will retry");
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

fn object_class(key_type: KeyType, public: bool) -> ObjectClass {
    match key_type {
        KeyType::HmacSha256 | KeyType::Aes256Gcm | KeyType::Aes256Kw | KeyType::Aes256Derive => {
            ObjectClass::SECRET_KEY
        }
        _ if public => ObjectClass::PUBLIC_KEY,
        _ => ObjectClass::PRIVATE_KEY,
    }
}

fn sign_mechanism(key_type: KeyType) -> Option<Mechanism<'static>> {
    match key_type {
        KeyType::HmacSha256 => Some(Mechanism::Sha256Hmac),
        // SoftHSM offers raw ECDSA only: the service hashes, the token signs the digest.
        KeyType::EcdsaP256 => Some(Mechanism::Ecdsa),
        KeyType::Ed25519 => Some(Mechanism::Eddsa(EddsaParams::new(
            EddsaSignatureScheme::Pure,
        ))),
        KeyType::Aes256Gcm | KeyType::Aes256Kw | KeyType::Aes256Derive => None,
    }
}

/// What the token actually signs: the SHA-256 digest for ECDSA, the message otherwise.
fn to_be_signed(key_type: KeyType, message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if key_type == KeyType::EcdsaP256 {
        ring::digest::digest(&ring::digest::SHA256, message)
            .as_ref()
            .to_vec()
            .into()
    } else {
        message.into()
    }
}

impl KeyBackend for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn waits_on_device(&self) -> bool {
        self.waits_on_device
    }

    fn supports(&self, _key_type: KeyType) -> bool {
        true
    }

    fn generate(
        &self,
        key_type: KeyType,
        label: &str,
        exportable: bool,
    ) -> BackendResult<GeneratedKey> {
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| BackendError::Failed("system random generator failed".into()))?;
        let object = ObjectRef(id.to_vec());
        let template = templates::for_type(key_type, &id, label, exportable);
        self.exclusively(|| {
            self.with_session("generate", &object, |_, s| match &template {
                Template::Secret { mechanism, attrs } => {
                    s.generate_key(mechanism, attrs)?;
                    Ok(None)
                }
                Template::Pair {
                    mechanism,
                    public,
                    private,
                } => {
                    let (pub_h, _) = s.generate_key_pair(mechanism, public, private)?;
                    let attrs = s.get_attributes(pub_h, &[AttributeType::EcPoint])?;
                    let point = attrs.into_iter().find_map(|a| match a {
                        Attribute::EcPoint(p) => Some(p),
                        _ => None,
                    });
                    Ok(point)
                }
            })
            .and_then(|point| {
                let public_key_der = match point {
                    None => None,
                    Some(p) => {
                        Some(encoding::spki_from_ec_point(key_type, &p).ok_or_else(|| {
                            BackendError::Failed(format!(
                                "pkcs11 generate: unexpected CKA_EC_POINT of {} bytes",
                                p.len()
                            ))
                        })?)
                    }
                };
                Ok(GeneratedKey {
                    object: object.clone(),
                    public_key_der,
                })
            })
        })
    }

    fn sign(&self, key: KeyRef<'_>, message: &[u8]) -> BackendResult<Vec<u8>> {
        let mech =
            sign_mechanism(key.key_type).ok_or_else(|| self.unsupported("sign", key.key_type))?;
        let data = to_be_signed(key.key_type, message);
        let class = object_class(key.key_type, false);
        self.with_session("sign", key.object, |conn, s| {
            let h = conn.handle(s, class, &key.object.0)?;
            Ok(s.sign(&mech, h.get(), &data)?)
        })
    }

    /// One session and one key lookup for the whole batch. If any call fails, the batch is
    /// signed again one call at a time, so each failure is classified (and a fatal one handled)
    /// exactly as a single `sign` would.
    fn sign_many(&self, key: KeyRef<'_>, messages: &[Vec<u8>]) -> Vec<BackendResult<Vec<u8>>> {
        let Some(mech) = sign_mechanism(key.key_type) else {
            let e = self.unsupported("sign", key.key_type);
            return messages.iter().map(|_| Err(e.clone())).collect();
        };
        let class = object_class(key.key_type, false);
        let all = self.with_session("sign", key.object, |conn, s| {
            let h = conn.handle(s, class, &key.object.0)?;
            messages
                .iter()
                .map(|m| Ok(s.sign(&mech, h.get(), &to_be_signed(key.key_type, m))?))
                .collect::<Result<Vec<_>, OpError>>()
        });
        match all {
            Ok(signatures) => signatures.into_iter().map(Ok).collect(),
            Err(_) => messages.iter().map(|m| self.sign(key, m)).collect(),
        }
    }

    fn verify(&self, key: KeyRef<'_>, message: &[u8], signature: &[u8]) -> BackendResult<bool> {
        let mech =
            sign_mechanism(key.key_type).ok_or_else(|| self.unsupported("verify", key.key_type))?;
        let data = to_be_signed(key.key_type, message);
        let class = object_class(key.key_type, true);
        self.with_session("verify", key.object, |conn, s| {
            let h = conn.handle(s, class, &key.object.0)?;
            match s.verify(&mech, h.get(), &data, signature) {
                Ok(()) => Ok(true),
                Err(e) if is_auth_failure(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn encrypt(
        &self,
        key: KeyRef<'_>,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> BackendResult<Vec<u8>> {
        if !key.key_type.encrypts() {
            return Err(self.unsupported("encrypt", key.key_type));
        }
        self.with_session("encrypt", key.object, |conn, s| {
            let h = conn.handle(s, ObjectClass::SECRET_KEY, &key.object.0)?;
            let mut iv = *nonce;
            let params = GcmParams::new(&mut iv, aad, 128.into())?;
            Ok(s.encrypt(&Mechanism::AesGcm(params), h.get(), plaintext)?)
        })
    }

    fn decrypt(
        &self,
        key: KeyRef<'_>,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> BackendResult<Option<Vec<u8>>> {
        if !key.key_type.encrypts() {
            return Err(self.unsupported("decrypt", key.key_type));
        }
        self.with_session("decrypt", key.object, |conn, s| {
            let h = conn.handle(s, ObjectClass::SECRET_KEY, &key.object.0)?;
            let mut iv = *nonce;
            let params = GcmParams::new(&mut iv, aad, 128.into())?;
            match s.decrypt(&Mechanism::AesGcm(params), h.get(), ciphertext) {
                Ok(pt) => Ok(Some(pt)),
                Err(e) if is_auth_failure(&e) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn destroy(&self, key: KeyRef<'_>) -> BackendResult<()> {
        if derive::DerivedRef::parse(&key.object.0).is_some() {
            // Nothing is stored for a derived key: dropping it from the cache, and its session
            // object from the token, is all there is. (A request still using it keeps it until
            // it finishes; the next derivation then destroys it.)
            if let Some(conn) = self.current() {
                conn.forget_handles(Some(&key.object.0));
                if let Some(s) = conn.take_session(Duration::from_secs(1)) {
                    conn.derived.destroy_retired(&s);
                    conn.give_session(s);
                }
            }
            return Ok(());
        }
        self.exclusively(|| {
            self.with_session("destroy", key.object, |conn, s| {
                for h in conn.all_objects(s, &key.object.0)? {
                    s.destroy_object(h)?;
                }
                conn.forget_handles(Some(&key.object.0));
                Ok(())
            })
        })
    }

    fn check_value(&self, key: KeyRef<'_>) -> BackendResult<[u8; 3]> {
        self.check_value_impl(key)
    }

    fn wrap(&self, key: KeyRef<'_>, transport: KeyRef<'_>) -> BackendResult<Vec<u8>> {
        self.wrap_impl(key, transport)
    }

    fn import_wrapping_key(&self) -> BackendResult<Vec<u8>> {
        self.exclusively(|| self.import_wrapping_key_impl())
    }

    fn import(
        &self,
        key_type: KeyType,
        label: &str,
        encrypted_kek: &[u8],
        wrapped_key: &[u8],
    ) -> BackendResult<GeneratedKey> {
        self.exclusively(|| self.import_impl(key_type, label, encrypted_kek, wrapped_key))
    }

    fn derive(
        &self,
        master: KeyRef<'_>,
        key_type: KeyType,
        context: &[u8; 32],
    ) -> BackendResult<DerivedKey> {
        if !master.key_type.derives() {
            return Err(self.unsupported("derive", master.key_type));
        }
        if !key_type.derivable() {
            return Err(BackendError::Unsupported(format!(
                "{} keys cannot be derived",
                key_type.as_str()
            )));
        }
        let r = derive::DerivedRef {
            kdf: Kdf::AesCbcEncryptData,
            key_type,
            // The context is already unique per key and version; the IV is recorded with it so
            // a later generation may choose another without breaking older versions.
            iv: [0; 16],
            master: master.object.0.clone(),
            context: *context,
        };
        let object = ObjectRef(r.encode());
        // Derive once now, so a missing or unusable master fails the creation, not a later sign.
        self.with_session("derive", &object, |conn, s| {
            conn.handle(s, ObjectClass::SECRET_KEY, &object.0)
                .map(|_| ())
        })?;
        Ok(DerivedKey { object, kdf: r.kdf })
    }

    fn derived_cache(&self) -> Option<DerivedCacheStats> {
        self.current().map(|c| c.derived.stats())
    }

    fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::calls_wait;

    #[test]
    fn the_configuration_overrides_what_the_slot_says() {
        // Unset: a software slot's calls are computed here, a hardware slot's wait.
        assert!(!calls_wait(None, false));
        assert!(calls_wait(None, true));
        // A network HSM that does not flag its slot as hardware.
        assert!(calls_wait(Some(false), false));
        assert!(!calls_wait(Some(true), true));
    }
}
