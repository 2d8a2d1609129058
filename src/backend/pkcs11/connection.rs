//! One live attachment to a token: the initialized library, an anchor session that holds the
//! login for the process, a pool of working sessions and a cache of object handles.
//!
//! A `Connection` is all-or-nothing: when the token fails, the backend drops the whole thing and
//! builds a new one, so no stale session or handle survives a device restart.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::derive::{Derived, DerivedCache, DerivedRef};
use super::errors::OpError;
use super::Pkcs11Settings;

pub(super) struct Connection {
    pub token_label: String,
    /// The slot says it is hardware (`CKF_HW_SLOT`), not a software token; unknown counts as
    /// hardware.
    pub hardware: bool,
    ctx: Pkcs11,
    anchor: Mutex<Option<Session>>,
    pool: SessionPool,
    handles: RwLock<HashMap<(u8, Vec<u8>), ObjectHandle>>,
    /// Derived keys live in this connection's sessions, so they go with it.
    pub derived: DerivedCache,
}

/// A key's handle for the length of one operation; for a derived key it also holds the lease
/// that keeps the object from being destroyed meanwhile.
pub(super) struct Held {
    handle: ObjectHandle,
    _lease: Option<Arc<Derived>>,
}

impl Held {
    pub fn get(&self) -> ObjectHandle {
        self.handle
    }
}

impl Connection {
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, String> {
        let mut looked = 1;
        loop {
            let ctx = load_module(&settings.module)?;
            let result = Self::attach(ctx.clone(), settings);
            let Err(e) = result else { return result };
            let _ = ctx.finalize();
            // A software token that several processes share (instances starting together on
            // one SoftHSM directory) can list no token while another process rewrites its
            // files: seen once in a few dozen simultaneous starts. Look again, briefly.
            if !e.starts_with(NO_TOKEN) || looked == NO_TOKEN_LOOKS {
                return Err(e);
            }
            looked += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn attach(ctx: Pkcs11, settings: &Pkcs11Settings) -> Result<Self, String> {
        let (slot, token_label) = find_token(&ctx, settings)?;
        let hardware = ctx
            .get_slot_info(slot)
            .map_or(true, |info| info.hardware_slot());
        let anchor = ctx
            .open_rw_session(slot)
            .map_err(|e| format!("opening the anchor session on token '{token_label}': {e}"))?;
        let pin = AuthPin::from(settings.pin.as_str().to_owned());
        match anchor.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Error::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked), _)) => {
                return Err(format!("login to token '{token_label}' refused: {rv}"));
            }
            Err(e) => return Err(format!("login to token '{token_label}': {e}")),
        }
        let mut sessions = Vec::with_capacity(settings.sessions);
        for _ in 0..settings.sessions {
            sessions.push(
                ctx.open_rw_session(slot).map_err(|e| {
                    format!("opening a pooled session on token '{token_label}': {e}")
                })?,
            );
        }
        Ok(Self {
            token_label,
            hardware,
            ctx,
            anchor: Mutex::new(Some(anchor)),
            pool: SessionPool::new(sessions),
            handles: RwLock::new(HashMap::new()),
            derived: DerivedCache::new(settings.derived_cache),
        })
    }

    /// Cheap liveness probe on the anchor session.
    pub fn probe(&self) -> Result<(), Error> {
        let anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        match anchor.as_ref() {
            Some(s) => s.get_session_info().map(|_| ()),
            None => Err(Error::Pkcs11(
                RvError::SessionClosed,
                cryptoki::context::Function::GetSessionInfo,
            )),
        }
    }

    /// Borrow a working session; hand it back with [`Connection::give_session`].
    pub fn take_session(&self, wait: Duration) -> Option<Session> {
        self.pool.take(wait)
    }

    pub fn give_session(&self, session: Session) {
        self.pool.give(session);
    }

    pub fn pool_size(&self) -> usize {
        self.pool.size
    }

    /// The key a registry reference names: a token object found by `CKA_ID`, or a derived key
    /// (derived now unless cached).
    pub fn handle(
        &self,
        session: &Session,
        class: ObjectClass,
        id: &[u8],
    ) -> Result<Held, OpError> {
        match DerivedRef::parse(id) {
            Some(r) => {
                let d = self.derived.resolve(session, id, &r, || {
                    self.token_handle(session, ObjectClass::SECRET_KEY, &r.master)
                })?;
                Ok(Held {
                    handle: d.handle,
                    _lease: Some(d),
                })
            }
            None => Ok(Held {
                handle: self.token_handle(session, class, id)?,
                _lease: None,
            }),
        }
    }

    /// Handle of the token object with this class and `CKA_ID`, cached after the first search.
    pub fn token_handle(
        &self,
        session: &Session,
        class: ObjectClass,
        id: &[u8],
    ) -> Result<ObjectHandle, OpError> {
        let key = (class_tag(class), id.to_vec());
        if let Some(h) = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(*h);
        }
        let found = session.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])?;
        let h = *found.first().ok_or(OpError::ObjectMissing)?;
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, h);
        Ok(h)
    }

    /// Every object carrying this `CKA_ID` (a key pair has two). Not cached: used for destroy.
    pub fn all_objects(&self, session: &Session, id: &[u8]) -> Result<Vec<ObjectHandle>, Error> {
        session.find_objects(&[Attribute::Id(id.to_vec())])
    }

    pub fn forget_handles(&self, id: Option<&[u8]>) {
        if let Some(id) = id {
            self.derived.forget(id);
        }
        let mut map = self.handles.write().unwrap_or_else(|p| p.into_inner());
        match id {
            Some(id) => map.retain(|(_, k), _| k != id),
            None => map.clear(),
        }
    }
}

impl Drop for Connection {
    /// Close every session before finalizing, so a later `C_Initialize` starts clean. Errors are
    /// expected here when the device is already gone and change nothing.
    fn drop(&mut self) {
        self.pool.drain();
        if let Some(anchor) = self
            .anchor
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = anchor.close();
        }
        let _ = self.ctx.clone().finalize();
    }
}

/// `ObjectClass` is not `Hash`; the cache keys on this tag instead.
fn class_tag(class: ObjectClass) -> u8 {
    if class == ObjectClass::SECRET_KEY {
        0
    } else if class == ObjectClass::PUBLIC_KEY {
        1
    } else {
        2
    }
}

/// Load and initialize the module, starting from a clean library state if an earlier context of
/// this process was never finalized (its device died under it).
pub(super) fn load_module(path: &std::path::Path) -> Result<Pkcs11, String> {
    let module = path.display();
    let ctx = Pkcs11::new(path).map_err(|e| format!("cannot load PKCS#11 module {module}: {e}"))?;
    let args = || CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK);
    match ctx.initialize(args()) {
        Ok(()) => {}
        Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            let _ = ctx.clone().finalize();
            ctx.initialize(args())
                .map_err(|e| format!("C_Initialize of {module}: {e}"))?;
        }
        Err(e) => return Err(format!("C_Initialize of {module}: {e}")),
    }
    Ok(ctx)
}

/// How a search that finds no token begins its error.
const NO_TOKEN: &str = "no token matches";
/// How many times `Connection::open` looks for a token that is not listed (200 ms apart).
const NO_TOKEN_LOOKS: u32 = 10;

pub(super) fn find_token(
    ctx: &Pkcs11,
    settings: &Pkcs11Settings,
) -> Result<(Slot, String), String> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| format!("listing slots: {e}"))?;
    let mut found = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if settings.token.matches(
            info.label(),
            info.serial_number(),
            info.manufacturer_id(),
            info.model(),
        ) {
            found.push((slot, info.label().trim_end().to_owned()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "{NO_TOKEN} {} in module {}",
            settings.token_uri,
            settings.module.display()
        )),
        n => Err(format!(
            "{n} tokens match {}; add serial= to the URI",
            settings.token_uri
        )),
    }
}

/// Fixed set of sessions opened with the connection. Fixed, because SoftHSM and real HSMs limit
/// sessions per application and a burst should queue, not open more.
struct SessionPool {
    idle: Mutex<Vec<Session>>,
    returned: Condvar,
    size: usize,
}

impl SessionPool {
    fn new(sessions: Vec<Session>) -> Self {
        Self {
            size: sessions.len(),
            idle: Mutex::new(sessions),
            returned: Condvar::new(),
        }
    }

    fn take(&self, wait: Duration) -> Option<Session> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (mut idle, _) = self
            .returned
            .wait_timeout_while(idle, wait, |idle| idle.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        idle.pop()
    }

    fn give(&self, session: Session) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
        self.returned.notify_one();
    }

    fn drain(&mut self) {
        for s in self
            .idle
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.close();
        }
    }
}
