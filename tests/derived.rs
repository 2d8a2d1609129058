//! Per-terminal keys derived inside the HSM from a store-group master: signing and verifying,
//! determinism across a restart, master rotation, a constant token object count, the cache
//! bound, and the refusals around them. Real daemon, real SoftHSM token.

mod common;

use common::*;
use serde_json::{json, Value};

const MASTER: &str = "groups/north/pos-master";

fn token_objects(env: &Env) -> usize {
    let (ok, out) = pkcs11_tool(env, &["--list-objects", "--type", "secrkey"]);
    assert!(ok, "{out}");
    out.lines()
        .filter(|l| l.starts_with("Secret Key Object"))
        .count()
}

async fn create_derived(d: &Daemon, name: &str, key_type: &str) -> Value {
    let mut c = d.conn("officer").await;
    let (s, k) = post(
        &mut c,
        "/v1/keys",
        json!({"name": name, "type": key_type, "derive_from": MASTER}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    k
}

async fn sign(d: &Daemon, name: &str, msg: &[u8]) -> (String, u64) {
    let mut c = d.conn("service").await;
    let (s, v) = post(
        &mut c,
        &format!("/v1/keys/{name}:sign"),
        json!({"message": b64(msg)}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    (
        v["signature"].as_str().unwrap().to_owned(),
        v["key_version"].as_u64().unwrap(),
    )
}

async fn verify(d: &Daemon, name: &str, msg: &[u8], sig: &str) -> Value {
    let mut c = d.conn("service").await;
    let (s, v) = post(
        &mut c,
        &format!("/v1/keys/{name}:verify"),
        json!({"message": b64(msg), "signature": sig}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn version(k: &Value, n: u64) -> Value {
    k["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == n)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn derived_keys_sign_verify_survive_restart_and_master_rotation() {
    let env = Env::new();
    let d = env.start();
    let master = create(&d, MASTER, "aes256-derive").await;
    assert!(master["versions"][0]["kcv"].is_null(), "{master}");

    let a = create_derived(&d, "stores/1/pos/1/qr-mac", "hmac-sha256").await;
    let b = create_derived(&d, "stores/1/pos/2/qr-mac", "hmac-sha256").await;
    assert_eq!(a["derive_from"], MASTER);
    assert_eq!(
        version(&a, 1)["derivation"],
        json!({"master_version": 1, "kdf": "aes-cbc-encrypt-data"})
    );
    let (kcv_a, kcv_b) = (version(&a, 1)["kcv"].clone(), version(&b, 1)["kcv"].clone());
    assert!(kcv_a.is_string() && kcv_b.is_string());
    assert_ne!(kcv_a, kcv_b, "two terminals must not share a key");

    let msg = b"paid 12.50 EUR purchase 77";
    let (sig_a, v) = sign(&d, "stores/1/pos/1/qr-mac", msg).await;
    assert_eq!(v, 1);
    assert_eq!(
        verify(&d, "stores/1/pos/1/qr-mac", msg, &sig_a).await["valid"],
        true
    );
    // Another terminal's key does not accept it.
    assert_eq!(
        verify(&d, "stores/1/pos/2/qr-mac", msg, &sig_a).await["valid"],
        false
    );
    assert_eq!(
        verify(&d, "stores/1/pos/1/qr-mac", b"paid 99.00 EUR", &sig_a).await["valid"],
        false
    );

    // A derived AES-GCM key encrypts and decrypts.
    create_derived(&d, "stores/1/pos/1/seal", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let (s, ct) = post(
        &mut svc,
        "/v1/keys/stores/1/pos/1/seal:encrypt",
        json!({"plaintext": b64(b"counter 5")}),
    )
    .await;
    assert_eq!(s, 200, "{ct}");
    let (s, pt) = post(
        &mut svc,
        "/v1/keys/stores/1/pos/1/seal:decrypt",
        json!({"ciphertext": ct["ciphertext"]}),
    )
    .await;
    assert_eq!(
        (s, unb64(pt["plaintext"].as_str().unwrap())),
        (200, b"counter 5".to_vec())
    );

    // The master rotates: existing derived versions keep verifying; the next terminal version
    // derives from the new master version.
    let mut officer = d.conn("officer").await;
    let (s, m) = post(
        &mut officer,
        &format!("/v1/keys/{MASTER}:rotate"),
        json!({}),
    )
    .await;
    assert_eq!((s, m["active_version"].clone()), (200, 2.into()), "{m}");
    assert_eq!(
        verify(&d, "stores/1/pos/1/qr-mac", msg, &sig_a).await["valid"],
        true
    );
    let (s, a2) = post(
        &mut officer,
        "/v1/keys/stores/1/pos/1/qr-mac:rotate",
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{a2}");
    assert_eq!(version(&a2, 2)["derivation"]["master_version"], 2);
    let (sig_a2, v) = sign(&d, "stores/1/pos/1/qr-mac", msg).await;
    assert_eq!(v, 2);
    assert_ne!(sig_a2, sig_a);
    let old = verify(&d, "stores/1/pos/1/qr-mac", msg, &sig_a).await;
    assert_eq!(
        (old["valid"].clone(), old["key_version"].clone()),
        (true.into(), 1.into())
    );

    // Master version 1 still derives a usable (verify-only) version: it cannot be destroyed.
    let (s, _) = post(
        &mut officer,
        &format!("/v1/keys/{MASTER}:revoke"),
        json!({"version": 1, "reason": "test"}),
    )
    .await;
    assert_eq!(s, 200);
    let refused = post(
        &mut officer,
        &format!("/v1/keys/{MASTER}:destroy"),
        json!({"version": 1}),
    )
    .await;
    assert_error(&refused, 409, "failed_precondition");

    // Restart: derivation is deterministic, so the same key signs the same MAC and old
    // signatures still verify.
    drop(officer);
    drop(svc);
    d.stop();
    let d = env.start();
    let (again, v) = sign(&d, "stores/1/pos/1/qr-mac", msg).await;
    assert_eq!((again.as_str(), v), (sig_a2.as_str(), 2));
    assert_eq!(
        verify(&d, "stores/1/pos/1/qr-mac", msg, &sig_a).await["valid"],
        true
    );
    let (sig_b, _) = sign(&d, "stores/1/pos/2/qr-mac", msg).await;
    assert_eq!(
        verify(&d, "stores/1/pos/2/qr-mac", msg, &sig_b).await["valid"],
        true
    );
}

#[tokio::test]
async fn derived_keys_add_no_token_objects_and_refuse_what_they_must() {
    let env = Env::new();
    let d = env.start();
    create(&d, MASTER, "aes256-derive").await;
    create(&d, "stores/1/transport", "aes256-kw").await;
    create(&d, "stores/1/plain-mac", "hmac-sha256").await;
    let before = token_objects(&env);
    for pos in 0..40 {
        let name = format!("stores/1/pos/{pos}/qr-mac");
        create_derived(&d, &name, "hmac-sha256").await;
        sign(&d, &name, b"m").await;
    }
    assert_eq!(
        token_objects(&env),
        before,
        "derived keys must not add token objects"
    );

    let mut officer = d.conn("officer").await;
    for (body, status, code) in [
        (
            json!({"name": "stores/2/a", "type": "hmac-sha256", "derive_from": MASTER, "exportable": true}),
            400,
            "invalid_argument",
        ),
        (
            json!({"name": "stores/2/b", "type": "ecdsa-p256", "derive_from": MASTER}),
            400,
            "invalid_argument",
        ),
        (
            json!({"name": "stores/2/c", "type": "hmac-sha256", "derive_from": "stores/1/plain-mac"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"name": "stores/2/d", "type": "hmac-sha256", "derive_from": "groups/none"}),
            404,
            "not_found",
        ),
        (
            json!({"name": "stores/2/e", "type": "hmac-sha256", "derive_from": "Bad Name"}),
            400,
            "invalid_argument",
        ),
        (
            json!({"name": "stores/2/f", "type": "aes256-derive", "exportable": true}),
            400,
            "invalid_argument",
        ),
    ] {
        let got = post(&mut officer, "/v1/keys", body).await;
        assert_error(&got, status, code);
    }

    // The master derives; it neither signs nor encrypts, and derived keys never leave.
    let mut svc = d.conn("service").await;
    let got = post(
        &mut officer,
        "/v1/keys/stores/1/pos/1/qr-mac:export",
        json!({"version": 1, "transport_key": "stores/1/transport"}),
    )
    .await;
    assert_error(&got, 422, "unsupported_operation");
    create(&d, "stores/9/pos-master", "aes256-derive").await;
    let got = post(
        &mut svc,
        "/v1/keys/stores/9/pos-master:sign",
        json!({"message": b64(b"x")}),
    )
    .await;
    assert_error(&got, 422, "unsupported_operation");
    // Deriving needs the `derive` grant on the master: the payments service has none.
    let got = post(
        &mut svc,
        "/v1/keys",
        json!({"name": "stores/3/pos/1/qr-mac", "type": "hmac-sha256", "derive_from": MASTER}),
    )
    .await;
    assert_error(&got, 403, "permission_denied");
}

#[tokio::test]
async fn the_derived_key_cache_stays_within_its_bound() {
    let env = Env::new();
    env.configure("backend", "derived_cache = 4");
    let d = env.start();
    create(&d, MASTER, "aes256-derive").await;
    let mut sigs = Vec::new();
    for pos in 0..12 {
        let name = format!("stores/1/pos/{pos}/qr-mac");
        create_derived(&d, &name, "hmac-sha256").await;
        sigs.push((name.clone(), sign(&d, &name, b"hello").await.0));
    }
    // Evicted keys are derived again, to the same key.
    for (name, sig) in &sigs {
        assert_eq!(verify(&d, name, b"hello", sig).await["valid"], true);
    }
    let figure = |what: &str| {
        d.metric(&format!("tillkey_derived_keys{{what=\"{what}\"}}"))
            .unwrap_or_else(|| panic!("no {what} in /metrics"))
    };
    assert_eq!(figure("capacity"), 4.0);
    let held = figure("held");
    assert!((1.0..=4.0).contains(&held), "held {held}");
    // 12 keys through a cache of 4: most uses had to derive again.
    let derivations = figure("derivations");
    assert!(derivations > 12.0, "derivations {derivations}");
}

#[tokio::test]
async fn a_derived_version_is_revoked_and_destroyed_under_dual_control() {
    let env = Env::new();
    let d = env.start();
    create(&d, MASTER, "aes256-derive").await;
    let name = "stores/5/pos/1/qr-mac";
    create_derived(&d, name, "hmac-sha256").await;
    let (sig1, _) = sign(&d, name, b"m").await;
    let mut alice = d.conn("officer").await;
    let mut bob = d.conn("officer2").await;
    let (s, _) = post(&mut alice, &format!("/v1/keys/{name}:rotate"), json!({})).await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &mut alice,
        &format!("/v1/keys/{name}:revoke"),
        json!({"version": 1, "reason": "terminal stolen"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(verify(&d, name, b"m", &sig1).await["valid"], false);
    let id = request_destroy(&mut alice, name, 1).await;
    let held = || {
        d.metric("tillkey_derived_keys{what=\"held\"}")
            .expect("derived keys held")
    };
    // Versions 1 (signed with) and 2 (derived once when made).
    let held_before = held();
    assert_eq!(held_before, 2.0);
    let (s, done) = post(&mut bob, &format!("/v1/approvals/{id}:approve"), json!({})).await;
    assert_eq!(s, 200, "{done}");
    let (_, k) = get(&mut alice, &format!("/v1/keys/{name}")).await;
    assert_eq!(version(&k, 1)["state"], "destroyed", "{k}");
    // The destroyed version's derived key is gone from the token at once, not at the next
    // derivation.
    assert_eq!(held(), held_before - 1.0);
    // Version 2 is untouched.
    let (sig2, v) = sign(&d, name, b"m").await;
    assert_eq!(v, 2);
    assert_eq!(verify(&d, name, b"m", &sig2).await["valid"], true);
}
