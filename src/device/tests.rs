//! Where the gate runs calls. The backend here only reports the thread it was called on: these
//! tests are about scheduling, not about a device.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::backend::{BackendError, BackendResult, GeneratedKey, KeyRef, GCM_NONCE_LEN};

struct ThreadNames {
    waits: bool,
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_owned()
}

fn unused<T>() -> BackendResult<T> {
    Err(BackendError::Unsupported("not in this test".into()))
}

impl KeyBackend for ThreadNames {
    fn kind(&self) -> &'static str {
        "thread-names"
    }
    fn waits_on_device(&self) -> bool {
        self.waits
    }
    fn supports(&self, _: KeyType) -> bool {
        true
    }
    fn generate(&self, _: KeyType, _: &str, _: bool) -> BackendResult<GeneratedKey> {
        unused()
    }
    fn sign(&self, _: KeyRef<'_>, _: &[u8]) -> BackendResult<Vec<u8>> {
        Ok(thread_name().into_bytes())
    }
    fn verify(&self, _: KeyRef<'_>, _: &[u8], _: &[u8]) -> BackendResult<bool> {
        unused()
    }
    fn encrypt(
        &self,
        _: KeyRef<'_>,
        _: &[u8; GCM_NONCE_LEN],
        _: &[u8],
        _: &[u8],
    ) -> BackendResult<Vec<u8>> {
        unused()
    }
    fn decrypt(
        &self,
        _: KeyRef<'_>,
        _: &[u8; GCM_NONCE_LEN],
        _: &[u8],
        _: &[u8],
    ) -> BackendResult<Option<Vec<u8>>> {
        unused()
    }
    fn destroy(&self, _: KeyRef<'_>) -> BackendResult<()> {
        unused()
    }
    fn check_value(&self, _: KeyRef<'_>) -> BackendResult<[u8; 3]> {
        unused()
    }
    fn wrap(&self, _: KeyRef<'_>, _: KeyRef<'_>) -> BackendResult<Vec<u8>> {
        unused()
    }
    fn import_wrapping_key(&self) -> BackendResult<Vec<u8>> {
        unused()
    }
    fn import(&self, _: KeyType, _: &str, _: &[u8], _: &[u8]) -> BackendResult<GeneratedKey> {
        unused()
    }
    fn health(&self) -> Health {
        Health::Ready
    }
}

fn gate(waits: bool, parallel_calls: usize) -> Device {
    Device::start(Arc::new(ThreadNames { waits }), parallel_calls)
}

/// The thread a gate call's backend ran on.
async fn ran_on(d: &Device, batch: Option<KeyType>) -> String {
    let object = crate::backend::ObjectRef(Vec::new());
    let call = move |b: &dyn KeyBackend| {
        b.sign(
            KeyRef {
                key_type: KeyType::HmacSha256,
                object: &object,
            },
            b"",
        )
    };
    let name = match batch {
        Some(t) => d.batch(t, call).await,
        None => d.call(call).await,
    };
    String::from_utf8(name.unwrap()).unwrap()
}

#[test]
fn a_device_that_makes_calls_wait_gets_a_thread_per_call_in_flight() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(threads_for(true, 6), 6);
    assert_eq!(threads_for(true, 0), 1);
    assert_eq!(threads_for(false, 6), cpus);
    assert_eq!(gate(true, 3).threads(), 3);
}

#[tokio::test]
async fn calls_that_wait_go_to_device_threads_and_computed_ones_stay() {
    let waiting = gate(true, 2);
    let on = ran_on(&waiting, None).await;
    assert!(on.starts_with(THREAD_PREFIX), "ran on {on}");

    let computing = gate(false, 2);
    assert_eq!(ran_on(&computing, None).await, thread_name());
    for t in [KeyType::HmacSha256, KeyType::EcdsaP256] {
        let on = ran_on(&computing, Some(t)).await;
        assert!(on.starts_with(THREAD_PREFIX), "{t:?} batch ran on {on}");
    }
    // Long batches stay on the blocking pool, off the device threads and off this worker.
    let on = ran_on(&computing, Some(KeyType::Ed25519)).await;
    assert!(
        !on.starts_with(THREAD_PREFIX) && on != thread_name(),
        "ran on {on}"
    );
}

#[tokio::test]
async fn a_waiting_single_call_goes_before_a_batch_queued_earlier() {
    let d = gate(true, 2);
    let q = d.queue.clone().expect("device threads");
    // Occupy every device thread.
    let (started_tx, started) = std::sync::mpsc::channel();
    let mut release = Vec::new();
    let mut blockers = Vec::new();
    for _ in 0..d.threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let started_tx = started_tx.clone();
        release.push(tx);
        blockers.push(enqueue(&q, true, move || {
            started_tx.send(()).unwrap();
            let _ = rx.recv();
        }));
    }
    for _ in 0..d.threads() {
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("every device thread takes a blocker");
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let batch = enqueue(&q, true, move || o.lock().unwrap().push("batch"));
    let o = order.clone();
    let single = enqueue(&q, false, move || o.lock().unwrap().push("single"));
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
    let d = gate(true, 2);
    for _ in 0..d.threads() {
        let failed = d
            .call(|_| -> Result<u32, ServiceError> { panic!("device call") })
            .await;
        assert!(matches!(failed, Err(ServiceError::Internal { .. })));
    }
    // Bounded, so a dead pool fails the test instead of hanging it.
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        d.call(|_| Ok::<_, ServiceError>(7)).await
    });
    assert_eq!(after.await.expect("a device thread answers").unwrap(), 7);
}

#[tokio::test]
async fn the_gate_owns_its_threads_and_they_end_with_it() {
    let d = gate(true, 3);
    let queue = Arc::downgrade(d.queue.as_ref().expect("device threads"));
    assert!(ran_on(&d, None).await.starts_with(THREAD_PREFIX));
    drop(d);
    // Each thread holds the queue until it ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while queue.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "device threads still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
