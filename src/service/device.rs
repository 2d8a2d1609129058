//! Token calls to a device that makes them wait run on a few dedicated threads, not on the
//! async workers; so do batches of short calls on every backend. Single calls are taken before
//! batches; a software token's single calls stay on the worker that asked
//! ([`KeyBackend::waits_on_device`](crate::backend::KeyBackend::waits_on_device)). Why, with the
//! measurements: BENCHMARKS.md, "Design measurements moved from module headers".

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use tokio::sync::oneshot;

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
}

struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// Run `f`, the token call of one request: on a device thread if the backend
/// `waits_on_device`, else right here.
pub async fn run<T: Send + 'static>(
    waits_on_device: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    match queue().filter(|_| waits_on_device) {
        Some(q) => submit(q, false, f).await,
        None => Ok(f()),
    }
}

/// Run `f`, a batch of short calls (see [`takes`]), on a device thread once no single call is
/// waiting.
pub async fn run_batch<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    match queue() {
        Some(q) => submit(q, true, f).await,
        None => Ok(f()),
    }
}

async fn submit<T: Send + 'static>(
    q: &Queue,
    batch: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    enqueue(q, batch, f)
        .await
        .map_err(|_| ServiceError::Internal {
            detail: "a device thread dropped a call".into(),
        })
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
        let mut jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if batch {
            jobs.batch.push_back(job);
        } else {
            jobs.single.push_back(job);
        }
    }
    q.ready.notify_one();
    rx
}

/// Whether [`run_batch`] takes a batch of calls with keys of `key_type` (they are short, and
/// the threads are running); other batches go to the blocking pool.
pub fn takes(key_type: KeyType) -> bool {
    short_call(key_type) && queue().is_some()
}

fn short_call(key_type: KeyType) -> bool {
    matches!(key_type, KeyType::HmacSha256 | KeyType::EcdsaP256)
}

/// The queue and how many threads serve it; `None` if no thread could start.
static POOL: OnceLock<Option<(Arc<Queue>, usize)>> = OnceLock::new();

/// Start the device threads, `threads` of them (at least one), unless they are running already;
/// the count they run with is the answer. The daemon calls this at start with what its backend
/// can use: a device that makes calls wait wants one thread for every call it can have in
/// flight (its sessions), not one per CPU (see [`threads_for`]).
pub fn start(threads: usize) -> usize {
    POOL.get_or_init(|| spawn(threads.max(1)))
        .as_ref()
        .map_or(0, |(_, n)| *n)
}

/// How many device threads a backend wants: one per CPU for calls that compute (batches on a
/// software token), one per call the device can have in flight when calls wait on it: with one
/// per CPU, a network HSM answering in 1 ms would be held to ~2,000 calls a second on two CPUs
/// however many sessions it has.
pub fn threads_for(waits_on_device: bool, parallel_calls: usize) -> usize {
    if waits_on_device {
        parallel_calls.max(1)
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// The shared queue; without [`start`], its threads (one per CPU) start with the first call.
/// `None` if no thread could start: calls then run where they are asked, as before.
fn queue() -> Option<&'static Queue> {
    POOL.get_or_init(|| spawn(threads_for(false, 0)))
        .as_ref()
        .map(|(q, _)| &**q)
}

fn spawn(n: usize) -> Option<(Arc<Queue>, usize)> {
    let q = Arc::new(Queue {
        jobs: Mutex::new(Jobs::default()),
        ready: Condvar::new(),
    });
    let started = (0..n)
        .filter(|i| {
            let q = q.clone();
            std::thread::Builder::new()
                .name(format!("{THREAD_PREFIX}{i}"))
                .spawn(move || serve(&q))
                .map_err(|e| tracing::warn!(error = %e, "cannot start a device thread"))
                .is_ok()
        })
        .count();
    (started > 0).then_some((q, started))
}

fn serve(q: &Queue) {
    loop {
        let job = {
            let mut jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = jobs.single.pop_front().or_else(|| jobs.batch.pop_front()) {
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
    use std::time::Duration;

    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_owned()
    }

    #[test]
    fn a_device_that_makes_calls_wait_gets_a_thread_per_call_in_flight() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(threads_for(true, 6), 6);
        assert_eq!(threads_for(true, 0), 1);
        assert_eq!(threads_for(false, 6), cpus);
    }

    #[tokio::test]
    async fn calls_that_wait_go_to_device_threads_and_computed_ones_stay() {
        let waits = run(true, thread_name).await.unwrap();
        assert!(waits.starts_with("device-"), "ran on {waits}");
        let here = thread_name();
        let computed = run(false, thread_name).await.unwrap();
        assert_eq!(computed, here);
        assert!(takes(KeyType::EcdsaP256) && takes(KeyType::HmacSha256));
        assert!(
            !takes(KeyType::Ed25519),
            "long batches stay on the blocking pool"
        );
        let batch = run_batch(thread_name).await.unwrap();
        assert!(batch.starts_with("device-"), "batch ran on {batch}");
    }

    #[tokio::test]
    async fn a_waiting_single_call_goes_before_a_batch_queued_earlier() {
        let q = queue().expect("device threads");
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Occupy every device thread.
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut release = Vec::new();
        let mut blockers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let started_tx = started_tx.clone();
            release.push(tx);
            blockers.push(enqueue(q, true, move || {
                started_tx.send(()).unwrap();
                let _ = rx.recv();
            }));
        }
        for _ in 0..n {
            started
                .recv_timeout(Duration::from_secs(30))
                .expect("every device thread takes a blocker");
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let o = order.clone();
        let batch = enqueue(q, true, move || o.lock().unwrap().push("batch"));
        let o = order.clone();
        let single = enqueue(q, false, move || o.lock().unwrap().push("single"));
        // One thread comes free: it must take the single call first.
        release[0].send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), single)
            .await
            .expect("the single call runs")
            .unwrap();
        assert_eq!(order.lock().unwrap()[0], "single");
        for r in &release[1..] {
            r.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(30), batch)
            .await
            .expect("the batch runs")
            .unwrap();
        for b in blockers {
            b.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_panicking_call_is_an_error_and_the_threads_live_on() {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..n {
            let failed = run(true, || -> u32 { panic!("device call") }).await;
            assert!(matches!(failed, Err(ServiceError::Internal { .. })));
        }
        // Bounded, so a dead pool fails the test instead of hanging it.
        let after = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            run(true, || 7).await
        });
        assert_eq!(after.await.expect("a device thread answers").unwrap(), 7);
    }
}
