//! Dual control: destroy needs two different officers; approvals expire and execute once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn revoked_key(d: &Daemon, name: &str) {
    create(d, name, "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let (s, _) = post(
        &mut officer,
        &format!("/v1/keys/{name}:revoke"),
        json!({"reason": "retiring"}),
    )
    .await;
    assert_eq!(s, 200);
}

fn token_labels(env: &Env) -> String {
    pkcs11_tool(env, &["--list-objects"]).1
}

#[tokio::test]
async fn destroy_needs_a_second_officer_and_runs_once() {
    let env = Env::new();
    let d = env.start();
    revoked_key(&d, "stores/1/mac").await;
    assert!(token_labels(&env).contains("tillkey:stores/1/mac#1"));
    let mut alice = d.conn("officer").await;
    let mut bob = d.conn("officer2").await;
    let mut svc = d.conn("service").await;

    let (s, req) = post(
        &mut alice,
        "/v1/keys/stores/1/mac:destroy",
        json!({"version": 1}),
    )
    .await;
    assert_eq!(s, 202, "{req}");
    let approval = &req["approval"];
    let id = approval["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (approval["state"].as_str(), approval["action"].as_str()),
        (Some("pending"), Some("destroy"))
    );
    // Nothing happened yet.
    assert!(token_labels(&env).contains("tillkey:stores/1/mac#1"));

    let approve = format!("/v1/approvals/{id}:approve");
    let r = post(&mut alice, &approve, json!({})).await;
    assert_error(&r, 403, "permission_denied");
    assert!(r.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("dual control"));
    // To a caller who may not act on its key, an approval answers as an unknown id would: its
    // key and action stay unknown to whoever saw its id (in a log, say). Cancelling too.
    for path in [approve.clone(), format!("/v1/approvals/{id}:cancel")] {
        let r = post(&mut svc, &path, json!({})).await;
        assert_error(&r, 404, "not_found");
        assert_eq!(r.1["error"]["message"], format!("no approval {id}"));
    }

    let (_, pending) = get(&mut bob, "/v1/approvals").await;
    assert_eq!(
        pending["approvals"].as_array().unwrap().len(),
        1,
        "{pending}"
    );
    let (_, none) = get(&mut svc, "/v1/approvals").await;
    assert_eq!(none["approvals"], json!([]));

    let (s, done) = post(&mut bob, &approve, json!({})).await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["approval"]["state"], "executed");
    assert_eq!(
        done["approval"]["decided_by"],
        "spiffe://tillkey.test/officer/bob"
    );
    let v1 = &done["key"]["versions"][0];
    assert_eq!(v1["state"], "destroyed");
    assert!(v1["reason"]
        .as_str()
        .unwrap()
        .contains("approved by spiffe://tillkey.test/officer/bob"));
    assert!(
        !token_labels(&env).contains("tillkey:stores/1/mac#1"),
        "the object is still in the token"
    );

    // Executes once; the metadata stays.
    let r = post(&mut bob, &approve, json!({})).await;
    assert_error(&r, 409, "failed_precondition");
    let (s, k) = get(&mut alice, "/v1/keys/stores/1/mac").await;
    assert_eq!(
        (s, k["versions"][0]["state"].clone()),
        (200, json!("destroyed"))
    );

    let mut auditor = d.conn("auditor").await;
    let (_, trail) = get(&mut auditor, "/v1/audit?key=stores/1/mac").await;
    let ops: Vec<(String, String)> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(ops.contains(&("destroy".into(), "ok".into())), "{ops:?}");
    assert!(ops.contains(&("approve".into(), "ok".into())), "{ops:?}");
    assert!(
        ops.contains(&("approve".into(), "permission_denied".into())),
        "{ops:?}"
    );

    // The registry forgets the object reference as well (for a TPM it is the wrapped key),
    // and a restart reads the destroyed version back as destroyed.
    assert!(d.stop().success());
    let out = std::process::Command::new("sqlite3")
        .arg(env.path("registry.db"))
        .arg("SELECT version || ':' || state || ':' || object_ref FROM key_versions WHERE name = 'stores/1/mac' ORDER BY version")
        .output()
        .expect("sqlite3");
    let rows = String::from_utf8_lossy(&out.stdout);
    assert!(rows.lines().next() == Some("1:destroyed:"), "{rows}");
    let d = env.start();
    let (s, k) = get(&mut d.conn("officer").await, "/v1/keys/stores/1/mac").await;
    assert_eq!(
        (s, k["versions"][0]["state"].clone()),
        (200, json!("destroyed"))
    );
}

#[tokio::test]
async fn destroy_refusals() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/2/live", "hmac-sha256").await;
    revoked_key(&d, "stores/2/old").await;
    let mut alice = d.conn("officer").await;
    let mut svc = d.conn("service").await;
    let r = post(
        &mut alice,
        "/v1/keys/stores/2/live:destroy",
        json!({"version": 1}),
    )
    .await;
    assert_error(&r, 409, "failed_precondition");
    assert_error(
        &post(
            &mut alice,
            "/v1/keys/stores/2/old:destroy",
            json!({"version": 3}),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &post(&mut alice, "/v1/keys/stores/2/old:destroy", json!({})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/2/old:destroy",
            json!({"version": 1}),
        )
        .await,
        403,
        "permission_denied",
    );
    assert_error(
        &post(&mut alice, "/v1/approvals/nothex:approve", json!({})).await,
        400,
        "invalid_argument",
    );
    let unknown = format!("/v1/approvals/{}:approve", "ab".repeat(16));
    assert_error(
        &post(&mut alice, &unknown, json!({})).await,
        404,
        "not_found",
    );
    assert_error(
        &post(
            &mut alice,
            &format!("/v1/approvals/{}:explode", "ab".repeat(16)),
            json!({}),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &get(
            &mut alice,
            &format!("/v1/approvals/{}:approve", "ab".repeat(16)),
        )
        .await,
        405,
        "method_not_allowed",
    );

    // A cancelled request cannot be approved.
    let (_, req) = post(
        &mut alice,
        "/v1/keys/stores/2/old:destroy",
        json!({"version": 1}),
    )
    .await;
    let id = req["approval"]["id"].as_str().unwrap().to_owned();
    let (s, c) = post(&mut alice, &format!("/v1/approvals/{id}:cancel"), json!({})).await;
    assert_eq!(
        (s, c["approval"]["state"].clone()),
        (200, json!("cancelled"))
    );
    let mut bob = d.conn("officer2").await;
    let r = post(&mut bob, &format!("/v1/approvals/{id}:approve"), json!({})).await;
    assert_error(&r, 409, "failed_precondition");
    assert!(r.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cancelled"));
}

#[tokio::test]
async fn approvals_expire() {
    let env = Env::new();
    let config = env.path("tillkeyd.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    write(&config, format!("{text}\n[approvals]\nttl = \"1s\"\n"));
    let d = env.start();
    revoked_key(&d, "stores/3/mac").await;
    let mut alice = d.conn("officer").await;
    let (_, req) = post(
        &mut alice,
        "/v1/keys/stores/3/mac:destroy",
        json!({"version": 1}),
    )
    .await;
    let id = req["approval"]["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut bob = d.conn("officer2").await;
    let (_, pending): (u16, Value) = get(&mut bob, "/v1/approvals").await;
    assert_eq!(pending["approvals"], json!([]));
    let r = post(&mut bob, &format!("/v1/approvals/{id}:approve"), json!({})).await;
    assert_error(&r, 409, "failed_precondition");
    assert!(r.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    let (_, k) = get(&mut bob, "/v1/keys/stores/3/mac").await;
    assert_eq!(k["versions"][0]["state"], "revoked");
}
