//! A pool of TSS contexts, each with the one key it loaded last.
//!
//! Object residency, planned for a TPM without a resource manager (swtpm, `/dev/tpm0`), which
//! holds about three loaded objects in all, shared by every connection:
//! - each context keeps at most one key loaded (the last one it used), so repeated use of the
//!   same key costs one command;
//! - the storage primary is loaded only while a key is being created or loaded (its saved
//!   context is loaded, used and flushed again), one context at a time (`parent` lock);
//! - so at most `contexts + 1` objects are loaded at any moment, and two contexts fit swtpm.
//!
//! A saved context does not survive a TPM restart; the supervisor then builds new contexts and
//! saves the primary again, which comes out the same from the same template.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::CapabilityData;
use tss_esapi::structures::{Auth, Private, Public};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::utils::TpmsContext;
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::objects;

/// Why an operation failed, before translation.
pub enum OpError {
    Tss(tss_esapi::Error),
    /// A stored reference that does not decode, or an answer of an unexpected shape.
    Bad(String),
}

impl From<tss_esapi::Error> for OpError {
    fn from(e: tss_esapi::Error) -> Self {
        Self::Tss(e)
    }
}

pub struct Worker {
    pub ctx: Context,
    primary: TpmsContext,
    /// The reference and handle of the key this context has loaded, if any.
    loaded: Option<(Vec<u8>, KeyHandle)>,
    last_used: Instant,
    /// The key it held when taken from the pool (see [`Slots::in_use`]).
    taken_with: Option<Vec<u8>>,
}

struct Slots {
    idle: Vec<Worker>,
    /// Keys loaded in contexts that are in use: a request for one of them waits for that
    /// context rather than evicting another hot key from an idle one.
    in_use: Vec<Vec<u8>>,
}

/// How long a request waits for the busy context that holds its key before loading the key
/// elsewhere.
const HOLDER_WAIT: Duration = Duration::from_millis(100);

pub struct Pool {
    idle: Mutex<Slots>,
    freed: Condvar,
    size: usize,
    /// Held while the primary is loaded, so only one context loads it at a time.
    parent: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// Open `size` contexts on `tcti`, each with the saved primary. With `reclaim`, first flush
    /// every transient object the TPM holds: without a resource manager, objects of a process
    /// that died stay loaded until the TPM restarts, and three of them fill swtpm.
    pub fn open(
        tcti: &str,
        size: usize,
        owner_auth: Option<&Zeroizing<Vec<u8>>>,
        reclaim: bool,
    ) -> Result<Self, tss_esapi::Error> {
        if reclaim {
            let mut ctx = Context::new(tcti.parse()?)?;
            let flushed = flush_transients(&mut ctx)?;
            if flushed > 0 {
                tracing::warn!(objects = flushed, "flushed objects left loaded in the tpm");
            }
        }
        let pool = Self {
            idle: Mutex::new(Slots {
                idle: Vec::with_capacity(size),
                in_use: Vec::with_capacity(size),
            }),
            freed: Condvar::new(),
            size,
            parent: Mutex::new(()),
        };
        for _ in 0..size {
            let w = Worker::open(tcti, owner_auth, &pool.parent)?;
            lock(&pool.idle).idle.push(w);
        }
        Ok(pool)
    }

    /// Unload every context's key (waiting briefly for busy ones); the contexts stay out of
    /// the pool, so nothing loads again.
    pub fn close(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut closed = 0;
        while closed < self.size && Instant::now() < deadline {
            if let Some(mut w) = self.take(Duration::from_millis(100)) {
                w.unload();
                closed += 1;
            }
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn take(&self, wait: Duration) -> Option<Worker> {
        self.take_for(wait, None)
    }

    /// An idle context: the one that has `object` loaded already; else, if a context in use
    /// holds it, that one once it is free (briefly); else one with nothing loaded; else any.
    /// Hot keys (the audit key, a busy terminal's key) so settle in a context each instead of
    /// evicting one another.
    pub fn take_for(&self, wait: Duration, object: Option<&[u8]>) -> Option<Worker> {
        let start = Instant::now();
        let mut slots = lock(&self.idle);
        loop {
            let holds = |w: &Worker| match (&w.loaded, object) {
                (Some((blob, _)), Some(o)) => blob.as_slice() == o,
                _ => false,
            };
            let held_elsewhere = object.is_some_and(|o| slots.in_use.iter().any(|b| b == o))
                && start.elapsed() < HOLDER_WAIT;
            let pick = slots.idle.iter().position(holds).or_else(|| {
                if held_elsewhere {
                    None
                } else {
                    let empty = slots.idle.iter().position(|w| w.loaded.is_none());
                    empty.or(slots.idle.len().checked_sub(1))
                }
            });
            if let Some(i) = pick {
                let mut w = slots.idle.swap_remove(i);
                w.taken_with = w.loaded.as_ref().map(|(b, _)| b.clone());
                if let Some(b) = &w.taken_with {
                    slots.in_use.push(b.clone());
                }
                return Some(w);
            }
            let left = wait.checked_sub(start.elapsed())?;
            let nap = if held_elsewhere {
                left.min(HOLDER_WAIT)
            } else {
                left
            };
            slots = self
                .freed
                .wait_timeout(slots, nap)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn try_take(&self) -> Option<Worker> {
        let mut slots = lock(&self.idle);
        let mut w = slots.idle.pop()?;
        w.taken_with = w.loaded.as_ref().map(|(b, _)| b.clone());
        if let Some(b) = &w.taken_with {
            slots.in_use.push(b.clone());
        }
        Some(w)
    }

    pub fn give(&self, mut w: Worker) {
        let mut slots = lock(&self.idle);
        if let Some(b) = w.taken_with.take() {
            if let Some(i) = slots.in_use.iter().position(|x| *x == b) {
                slots.in_use.swap_remove(i);
            }
        }
        slots.idle.push(w);
        drop(slots);
        self.freed.notify_all();
    }

    /// Run `f` with the primary loaded (and flushed afterwards, whatever `f` returned).
    pub fn with_primary<T>(
        &self,
        w: &mut Worker,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let _alone = lock(&self.parent);
        w.with_primary(f)
    }

    /// The handle of the key `object` refers to, loading it (and unloading the previous one)
    /// unless it is the one this context already holds.
    pub fn key(&self, w: &mut Worker, object: &[u8]) -> Result<KeyHandle, OpError> {
        w.last_used = Instant::now();
        if let Some((blob, handle)) = &w.loaded {
            if blob.as_slice() == object {
                return Ok(*handle);
            }
        }
        w.unload();
        let (public, private) =
            objects::decode(&crate::backend::ObjectRef(object.to_vec())).map_err(OpError::Bad)?;
        let handle = self.with_primary(w, |ctx, parent| {
            Ok(ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent, private, public)
            })?)
        })?;
        w.loaded = Some((object.to_vec(), handle));
        Ok(handle)
    }
}

fn flush_transients(ctx: &mut Context) -> Result<usize, tss_esapi::Error> {
    let (data, _) = ctx.execute_without_session(|c| {
        c.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
    })?;
    let CapabilityData::Handles(list) = data else {
        return Ok(0);
    };
    let mut flushed = 0;
    for h in list.into_inner() {
        if let TpmHandle::Transient(_) = h {
            let object = ctx.execute_without_session(|c| c.tr_from_tpm_public(h))?;
            ctx.flush_context(object)?;
            flushed += 1;
        }
    }
    Ok(flushed)
}

impl Worker {
    fn open(
        tcti: &str,
        owner_auth: Option<&Zeroizing<Vec<u8>>>,
        parent: &Mutex<()>,
    ) -> Result<Self, tss_esapi::Error> {
        let conf: TctiNameConf = tcti.parse()?;
        let mut ctx = Context::new(conf)?;
        if let Some(a) = owner_auth {
            ctx.tr_set_auth(Hierarchy::Owner.into(), Auth::try_from(a.to_vec())?)?;
        }
        let _alone = lock(parent);
        let created = ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(
                Hierarchy::Owner,
                objects::primary()?,
                None,
                None,
                None,
                None,
            )
        })?;
        let handle: ObjectHandle = created.key_handle.into();
        let saved = ctx.context_save(handle);
        let flushed = ctx.flush_context(handle);
        let primary = saved?;
        flushed?;
        Ok(Self {
            ctx,
            primary,
            loaded: None,
            last_used: Instant::now(),
            taken_with: None,
        })
    }

    fn with_primary<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        let handle = self.ctx.context_load(self.primary.clone())?;
        let out = f(&mut self.ctx, handle.into());
        let flushed = self.ctx.flush_context(handle);
        let out = out?;
        flushed?;
        Ok(out)
    }

    /// Flush the loaded key, if any. Best effort: if the flush fails on its way to the TPM,
    /// ESAPI refuses the next call on this context, and `errors` counts that refusal as fatal.
    pub fn unload(&mut self) {
        if let Some((_, h)) = self.loaded.take() {
            let _ = self.ctx.flush_context(h.into());
        }
    }

    pub fn unload_if_idle(&mut self, after: Duration) {
        if self.last_used.elapsed() >= after {
            self.unload();
        }
    }

    /// Forget (and flush) `object` if it is the loaded key.
    pub fn forget(&mut self, object: &[u8]) {
        if self.loaded.as_ref().is_some_and(|(b, _)| b == object) {
            self.unload();
        }
    }

    /// Create a key under the primary: its public area and private blob.
    pub fn create(
        pool: &Pool,
        w: &mut Self,
        template: Public,
    ) -> Result<(Public, Private), OpError> {
        pool.with_primary(w, |ctx, parent| {
            let r = ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.create(parent, template, None, None, None, None)
            })?;
            Ok((r.out_public, r.out_private))
        })
    }
}
