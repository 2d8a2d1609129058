//! What `tillkey bench` needs to measure the raw library (`cli::bench::raw`): sessions logged in
//! as the daemon's are and a key made from the daemon's own template, so the raw rate and the
//! daemon's are rates of the same token call. The service never uses this; it goes through
//! [`KeyBackend`](crate::backend::KeyBackend). The bench calls `cryptoki` on these sessions
//! itself: what it measures is the library, not this backend.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use super::connection::Connection;
use super::templates::{self, Template};
use super::DEFAULT_DERIVED_CACHE;
use super::{derive, object_class, sign_mechanism, to_be_signed, Pkcs11Settings};
use crate::keys::KeyType;

/// How long a bench thread waits for a session: they are one per thread, so only a bug waits.
const SESSION_WAIT: Duration = Duration::from_secs(1);

/// A bench's own key in the token, on a connection of its own. Shared by the bench threads;
/// [`BenchKey::remove`] destroys the key when the measurement is over.
pub struct BenchKey {
    conn: Arc<Connection>,
    id: Vec<u8>,
    key_type: KeyType,
}

impl BenchKey {
    /// `sessions` sessions and a fresh token key of `key_type`. Its id is `prefix` and this
    /// process's id, so two benches on one token never sign with or destroy each other's key.
    pub fn make(
        settings: &Pkcs11Settings,
        sessions: usize,
        key_type: KeyType,
        prefix: &[u8],
    ) -> Result<Self, String> {
        let id = [prefix, format!("-{}", std::process::id()).as_bytes()].concat();
        let own = Pkcs11Settings {
            module: settings.module.clone(),
            token_uri: settings.token_uri.clone(),
            token: settings.token.clone(),
            pin: settings.pin.clone(),
            sessions,
            derived_cache: DEFAULT_DERIVED_CACHE,
            calls_on_workers: None,
        };
        let conn = Arc::new(Connection::open(&own)?);
        let session = conn.take_session(SESSION_WAIT).ok_or("no session")?;
        let made = match &templates::for_type(key_type, &id, "tillkey:rawbench", false) {
            Template::Secret { mechanism, attrs } => {
                session.generate_key(mechanism, attrs).map(|_| ())
            }
            Template::Pair {
                mechanism,
                public,
                private,
            } => session
                .generate_key_pair(mechanism, public, private)
                .map(|_| ()),
        };
        conn.give_session(session);
        made.map_err(|e| format!("generating the bench key: {e}"))?;
        Ok(Self { conn, id, key_type })
    }

    /// One of the connection's sessions; hand it back with [`BenchKey::give_session`].
    pub fn take_session(&self) -> Result<Session, String> {
        self.conn
            .take_session(SESSION_WAIT)
            .ok_or_else(|| "no session".to_string())
    }

    pub fn give_session(&self, session: Session) {
        self.conn.give_session(session);
    }

    /// The key's secret or private object (`public` false), or its public one, in `session`.
    pub fn handle(&self, session: &Session, public: bool) -> Result<ObjectHandle, String> {
        self.conn
            .token_handle(session, object_class(self.key_type, public), &self.id)
            .map_err(|e| format!("{e:?}"))
    }

    /// The mechanism the daemon signs and verifies with for this key's type.
    pub fn sign_mechanism(&self) -> Option<Mechanism<'static>> {
        sign_mechanism(self.key_type)
    }

    /// What the daemon hands the token for `message` (for ECDSA its SHA-256, hashed per call).
    pub fn to_be_signed<'a>(&self, message: &'a [u8]) -> Cow<'a, [u8]> {
        to_be_signed(self.key_type, message)
    }

    /// The template the daemon derives a key of `key_type` with (a session object).
    pub fn derived_template(key_type: KeyType) -> Vec<Attribute> {
        derive::template(key_type)
    }

    /// Destroy the key's objects; best effort, like any clean-up after a measurement.
    pub fn remove(&self) {
        if let Some(s) = self.conn.take_session(SESSION_WAIT) {
            if let Ok(objects) = self.conn.all_objects(&s, &self.id) {
                for o in objects {
                    let _ = s.destroy_object(o);
                }
            }
            self.conn.give_session(s);
        }
    }
}
