//! How many daemons may share a registry: a SQLite file serves exactly one. A second tillkeyd
//! pointed at the same file (a copied unit, a restart racing the old process) must refuse to
//! start, say why, and leave the first one serving.

mod common;

use common::*;

#[tokio::test]
async fn a_second_daemon_on_the_same_sqlite_registry_refuses_to_start() {
    let env = Env::new();
    let first = env.start();
    create(&first, "stores/1/pos/1/mac", "hmac-sha256").await;

    let (status, stderr) = env.run_to_exit();
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("in use by another tillkeyd") && stderr.contains("PostgreSQL"),
        "{stderr}"
    );

    // The first daemon is untouched and still serves.
    assert_eq!(first.admin_get("/readyz").0, 200);
    let mut svc = first.conn("service").await;
    let (s, v) = post(
        &mut svc,
        "/v1/keys/stores/1/pos/1/mac:sign",
        serde_json::json!({"message": b64(b"still here")}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    drop(svc);
    assert!(first.stop().success());

    // Once it has stopped, the file is free again.
    let second = env.start();
    assert_eq!(second.admin_get("/readyz").0, 200);
}
