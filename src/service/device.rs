//! Short token calls, single or batched, run on a few dedicated threads, not on the async
//! workers.
//!
//! Under load each HMAC or ECDSA call cost the daemon 1.5-2x the CPU of the same call in the raw
//! benchmark. Our reading: between two calls a worker ran TLS, HTTP and JSON code, so every
//! `C_SignInit` started on cold caches. Device threads (one per CPU) take queued calls back to
//! back while the workers stay on the network side; alternating builds on one token, this cut
//! daemon CPU per HMAC and ECDSA sign by 10-20 % and raised throughput as much (BENCHMARKS.md).
//!
//! Batches of short calls queue here too, one job each, so a single call can wait behind a
//! batch: at most 256 HMAC items, ~8 ms on SoftHSM.
//!
//! Long calls (Ed25519: ~250 us in SoftHSM) measured 15-20 % slower on device threads: they
//! gain nothing from warm caches, and four busy threads on two CPUs pre-empt each other inside
//! the token's locks. They stay on the worker that asked, as every other token call does.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use tokio::sync::oneshot;

use crate::error::ServiceError;
use crate::keys::KeyType;

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

/// Run `f`, the token call(s) of one request with a key of `key_type`: on a device thread if
/// the call is short, else right here.
pub async fn run<T: Send + 'static>(
    key_type: KeyType,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    let Some(q) = queue().filter(|_| short_call(key_type)) else {
        return Ok(f());
    };
    let (tx, rx) = oneshot::channel();
    q.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push_back(Box::new(move || {
            let _ = tx.send(f());
        }));
    q.ready.notify_one();
    rx.await.map_err(|_| ServiceError::Internal {
        detail: "a device thread dropped a call".into(),
    })
}

/// Whether [`run`] sends calls with keys of `key_type` to a device thread (they are short, and
/// the threads are running) rather than running them where they are asked.
pub fn takes(key_type: KeyType) -> bool {
    short_call(key_type) && queue().is_some()
}

fn short_call(key_type: KeyType) -> bool {
    matches!(key_type, KeyType::HmacSha256 | KeyType::EcdsaP256)
}

/// The shared queue; its threads start with the first short call. `None` if no thread could
/// start: calls then run where they are asked, as before.
fn queue() -> Option<&'static Queue> {
    static QUEUE: OnceLock<Option<Arc<Queue>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let q = Arc::new(Queue {
                jobs: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
            });
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            let started = (0..n)
                .filter(|i| {
                    let q = q.clone();
                    std::thread::Builder::new()
                        .name(format!("device-{i}"))
                        .spawn(move || serve(&q))
                        .map_err(|e| tracing::warn!(error = %e, "cannot start a device thread"))
                        .is_ok()
                })
                .count();
            (started > 0).then_some(q)
        })
        .as_deref()
}

fn serve(q: &Queue) {
    loop {
        let job = {
            let mut jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = jobs.pop_front() {
                    break j;
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
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_owned()
    }

    #[tokio::test]
    async fn short_calls_go_to_device_threads_and_long_ones_stay() {
        let short = run(KeyType::EcdsaP256, thread_name).await.unwrap();
        assert!(short.starts_with("device-"), "ran on {short}");
        let here = thread_name();
        let long = run(KeyType::Ed25519, thread_name).await.unwrap();
        assert_eq!(long, here);
    }

    #[tokio::test]
    async fn a_panicking_call_is_an_error_and_the_threads_live_on() {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..n {
            let failed = run(KeyType::HmacSha256, || -> u32 { panic!("device call") }).await;
            assert!(matches!(failed, Err(ServiceError::Internal { .. })));
        }
        // Bounded, so a dead pool fails the test instead of hanging it.
        let after = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            run(KeyType::HmacSha256, || 7).await
        });
        assert_eq!(after.await.expect("a device thread answers").unwrap(), 7);
    }
}
