//! How many device threads the daemon starts. SoftHSM's slot is a software token: its single
//! calls run on the async workers, and one device thread per CPU serves batches. A token whose
//! calls wait on the device (here SoftHSM declared so with `backend.calls_on_workers = false`,
//! as for a network HSM that does not flag its slot as hardware) gets one device thread per
//! session, so a slow device is not held to as many calls in flight as the machine has CPUs.
//! Either way every signing type still signs. (Which thread a call runs on is checked in
//! `device`'s unit tests.)

mod common;

use common::*;
use serde_json::{json, Value};

fn device_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|n| n.starts_with("device-"))
        })
        .count()
}

fn token_ready(d: &Daemon) -> Value {
    let line = d
        .logs()
        .into_iter()
        .find(|l| l.contains("pkcs11 token ready"))
        .expect("the daemon logs its token");
    serde_json::from_str(&line).unwrap()
}

async fn signs(d: &Daemon) {
    for t in ["hmac-sha256", "ecdsa-p256", "ed25519"] {
        let name = format!("stores/1/pos/1/{t}");
        create(d, &name, t).await;
        let mut svc = d.conn("service").await;
        let (s, signed) = post(
            &mut svc,
            &format!("/v1/keys/{name}:sign"),
            json!({"message": b64(b"purchase 7")}),
        )
        .await;
        assert_eq!(s, 200, "{t}: {signed}");
    }
}

#[tokio::test]
async fn a_token_whose_calls_wait_gets_a_device_thread_per_session() {
    let env = Env::new();
    env.configure("backend", "calls_on_workers = false\nsessions = 5");
    let d = env.start();
    let ready = token_ready(&d);
    assert_eq!(ready["calls_off_workers"], true, "{ready}");
    assert_eq!(ready["device_threads"], 5, "{ready}");
    assert_eq!(device_threads(d.pid()), 5);
    signs(&d).await;
}

#[tokio::test]
async fn a_software_token_keeps_one_device_thread_per_cpu() {
    let env = Env::new();
    let d = env.start();
    let ready = token_ready(&d);
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(ready["calls_off_workers"], false, "{ready}");
    assert_eq!(ready["device_threads"], cpus, "{ready}");
    signs(&d).await;
    assert_eq!(device_threads(d.pid()), cpus);
}
