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
}

pub struct Pool {
    idle: Mutex<Vec<Worker>>,
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
            idle: Mutex::new(Vec::with_capacity(size)),
            freed: Condvar::new(),
            size,
            parent: Mutex::new(()),
        };
        for _ in 0..size {
            let w = Worker::open(tcti, owner_auth, &pool.parent)?;
            lock(&pool.idle).push(w);
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

    /// An idle context, preferably the one that has `object` loaded already, else one with
    /// nothing loaded: hot keys (the audit key, a busy terminal's key) settle in a context each
    /// instead of evicting one another.
    pub fn take_for(&self, wait: Duration, object: Option<&[u8]>) -> Option<Worker> {
        let guard = lock(&self.idle);
        let (mut idle, _) = self
            .freed
            .wait_timeout_while(guard, wait, |idle| idle.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        let holds = |w: &Worker| match (&w.loaded, object) {
            (Some((blob, _)), Some(o)) => blob.as_slice() == o,
            _ => false,
        };
        let pick = idle
            .iter()
            .position(holds)
            .or_else(|| idle.iter().position(|w| w.loaded.is_none()));
        match pick {
            Some(i) => Some(idle.swap_remove(i)),
            None => idle.pop(),
        }
    }

    pub fn try_take(&self) -> Option<Worker> {
        lock(&self.idle).pop()
    }

    pub fn give(&self, w: Worker) {
        lock(&self.idle).push(w);
        self.freed.notify_one();
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

    /// Flush the loaded key, if any (best effort: a dead link is noticed by the next call).
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
