//! The device gate: the only way the service reaches the key backend, and the one place that
//! decides where a blocking token call runs.
//!
//! A call to a device that makes it wait (a TPM, a hardware or network HSM) runs on the gate's
//! own threads, never on an async worker, where it would stall every connection of that worker.
//! A software token only computes: its single calls run where they are asked, which measured
//! cheaper. Batches of short calls run on the gate's threads on every backend, behind waiting
//! single calls; longer batches on the blocking pool. The figures behind these choices are in
//! BENCHMARKS.md, "Design measurements moved from module headers".

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::backend::{
    BackendResult, DerivedCacheStats, Health, KeyBackend, KeyRef, ObjectRef, SharedBackend,
};
use crate::error::ServiceError;
use crate::keys::KeyType;

/// Device threads are named this plus their index.
pub const THREAD_PREFIX: &str = "device-";

type Job = Box<dyn FnOnce() + Send>;

/// Single calls are taken before batches, so one waits at most for the batches already running.
#[derive(Default)]
struct Jobs {
    single: VecDeque<Job>,
    batch: VecDeque<Job>,
    /// Set when the gate is dropped: the threads finish what is queued and end.
    closing: bool,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The backend behind its threads. Dropping the gate ends its threads once their queue is empty.
pub struct Device {
    backend: SharedBackend,
    /// `None` if no thread could start: calls then run where they are asked.
    queue: Option<Arc<Queue>>,
    threads: usize,
    /// Whether single calls go to the threads (the backend waits on a device).
    single_calls_queue: bool,
    /// Long batches run at most one per CPU at a time: more would only queue inside the backend
    /// for a session, and every hand-over of a session costs a wake-up per item.
    long_batches: tokio::sync::Semaphore,
}

impl Device {
    /// Open the gate in front of `backend`, which can have `parallel_calls` calls in flight (its
    /// sessions or contexts). A device that makes calls wait gets one thread per call it can
    /// have in flight: with one per CPU, a network HSM answering in 1 ms would be held to about
    /// 2,000 calls a second on two CPUs however many sessions it has. A computing token gets
    /// one per CPU, for batches.
    pub fn start(backend: SharedBackend, parallel_calls: usize) -> Self {
        let waits = backend.waits_on_device();
        let wanted = threads_for(waits, parallel_calls);
        let queue = Arc::new(Queue::default());
        let threads = (0..wanted)
            .filter(|i| {
                let q = queue.clone();
                std::thread::Builder::new()
                    .name(format!("{THREAD_PREFIX}{i}"))
                    .spawn(move || serve(&q))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a device thread"))
                    .is_ok()
            })
            .count();
        Self {
            backend,
            queue: (threads > 0).then_some(queue),
            threads,
            single_calls_queue: waits,
            long_batches: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        }
    }

    /// How many device threads run.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f`, the token call (or calls) of one request, on a device thread if the backend
    /// waits on its device, else right here.
    pub async fn call<T, E>(
        &self,
        f: impl FnOnce(&dyn KeyBackend) -> Result<T, E> + Send + 'static,
    ) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        E: Into<ServiceError> + Send + 'static,
    {
        match self.queue.as_ref().filter(|_| self.single_calls_queue) {
            Some(q) => self.submit(q, false, f).await,
            None => f(&*self.backend).map_err(Into::into),
        }
    }

    /// Run `f`, a batch of calls with keys of `key_type`, off the async workers. Short calls
    /// (HMAC, ECDSA) queue on the device threads behind single calls, and the queue hands the
    /// next batch over the moment one ends (the blocking pool left the token idle a fifth of the
    /// time). Long calls (Ed25519) go to the blocking pool, one batch per CPU at a time, so a
    /// 256-item batch never queues in front of short single calls; so do all batches if no
    /// device thread could start.
    pub async fn batch<T, E>(
        &self,
        key_type: KeyType,
        f: impl FnOnce(&dyn KeyBackend) -> Result<T, E> + Send + 'static,
    ) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        E: Into<ServiceError> + Send + 'static,
    {
        match self.queue.as_ref() {
            Some(q) if short_call(key_type) => self.submit(q, true, f).await,
            _ => {
                let _slot = self.long_batches.acquire().await.map_err(|_| dropped())?;
                let backend = self.backend.clone();
                tokio::task::spawn_blocking(move || f(&*backend))
                    .await
                    .map_err(|_| dropped())?
                    .map_err(Into::into)
            }
        }
    }

    /// MAC or sign `message` with one key version (see [`KeyBackend::sign`]).
    pub async fn sign(
        &self,
        key_type: KeyType,
        object: &ObjectRef,
        message: Vec<u8>,
    ) -> Result<Vec<u8>, ServiceError> {
        let object = object.clone();
        self.call(move |b| {
            b.sign(
                KeyRef {
                    key_type,
                    object: &object,
                },
                &message,
            )
        })
        .await
    }

    /// Check a MAC or signature against the first of `objects` that accepts it (newest first is
    /// the caller's order); the answer is that object's index.
    pub async fn verify_any(
        &self,
        key_type: KeyType,
        objects: Vec<ObjectRef>,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<Option<usize>, ServiceError> {
        self.call(move |b| {
            for (i, object) in objects.iter().enumerate() {
                if b.verify(KeyRef { key_type, object }, &message, &signature)? {
                    return Ok(Some(i));
                }
            }
            Ok::<_, crate::backend::BackendError>(None)
        })
        .await
    }

    /// Run `f` here, on a thread that is not an async worker (the audit writer's own thread):
    /// such a thread may wait on the device. Test builds refuse it on an async worker.
    pub(crate) fn call_blocking<T>(
        &self,
        f: impl FnOnce(&dyn KeyBackend) -> BackendResult<T>,
    ) -> BackendResult<T> {
        crate::backend::refuse_async_worker(self.backend.kind(), "call_blocking")?;
        f(&*self.backend)
    }

    /// The backend's short name ("pkcs11", "tpm").
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Whether single calls leave the async workers (see [`KeyBackend::waits_on_device`]).
    pub fn waits_on_device(&self) -> bool {
        self.single_calls_queue
    }

    pub fn supports(&self, key_type: KeyType) -> bool {
        self.backend.supports(key_type)
    }

    /// Readiness as the backend last saw it (kept by the backend; no device call).
    pub fn health(&self) -> Health {
        self.backend.health()
    }

    pub fn derived_cache(&self) -> Option<DerivedCacheStats> {
        self.backend.derived_cache()
    }

    /// Release what the device keeps for this process (see [`KeyBackend::close`]).
    pub fn close(&self) {
        self.backend.close();
    }

    async fn submit<T, E>(
        &self,
        q: &Queue,
        batch: bool,
        f: impl FnOnce(&dyn KeyBackend) -> Result<T, E> + Send + 'static,
    ) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        E: Into<ServiceError> + Send + 'static,
    {
        let backend = self.backend.clone();
        enqueue(q, batch, move || f(&*backend))
            .await
            .map_err(|_| dropped())?
            .map_err(Into::into)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.lock().closing = true;
            q.ready.notify_all();
        }
    }
}

fn dropped() -> ServiceError {
    ServiceError::Internal {
        detail: "a device call ended without an answer".into(),
    }
}

fn enqueue<T: Send + 'static>(
    q: &Queue,
    batch: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    {
        let mut jobs = q.lock();
        if batch {
            jobs.batch.push_back(job);
        } else {
            jobs.single.push_back(job);
        }
    }
    q.ready.notify_one();
    rx
}

fn short_call(key_type: KeyType) -> bool {
    matches!(key_type, KeyType::HmacSha256 | KeyType::EcdsaP256)
}

/// How many device threads a backend wants (see [`Device::start`]).
fn threads_for(waits_on_device: bool, parallel_calls: usize) -> usize {
    if waits_on_device {
        parallel_calls.max(1)
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

fn serve(q: &Queue) {
    loop {
        let job = {
            let mut jobs = q.lock();
            loop {
                if let Some(j) = jobs.single.pop_front().or_else(|| jobs.batch.pop_front()) {
                    break j;
                }
                if jobs.closing {
                    return;
                }
                jobs = q.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A panicking call answers its caller with an error (its sender is dropped); the
        // thread lives on for the next.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests;
