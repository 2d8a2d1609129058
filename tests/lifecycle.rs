//! Key versions over time: rotation (by officer, period and usage), grace, retirement,
//! revocation and prefix actions, through the real daemon and token.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn key(d: &Daemon, name: &str) -> Value {
    let mut c = d.conn("officer").await;
    let (s, k) = get(&mut c, &format!("/v1/keys/{name}")).await;
    assert_eq!(s, 200, "{k}");
    k
}

fn state(k: &Value, version: u64) -> String {
    k["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == version)
        .map(|v| v["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Poll the key (bounded) until `cond` holds.
async fn wait_key(d: &Daemon, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let k = key(d, name).await;
        if cond(&k) {
            return k;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {}", key(d, name).await);
}

on_each_backend! {
    async fn scheduler_rotates_on_time_keeps_grace_then_retires(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut officer = d.conn("officer").await;
        let (s, k) = post(
            &mut officer,
            "/v1/keys",
            json!({"name": "stores/1/pos/1/qr-mac", "type": "hmac-sha256", "rotation_period": "3s", "verify_grace": "3s"}),
        )
        .await;
        assert_eq!(s, 201, "{k}");
        assert_eq!(
            (k["rotation_period"].as_str(), k["verify_grace"].as_str()),
            (Some("3s"), Some("3s"))
        );
        let mut svc = d.conn("service").await;
        let msg = b64(b"request token");
        let (_, sig1) = post(
            &mut svc,
            "/v1/keys/stores/1/pos/1/qr-mac:sign",
            json!({"message": msg}),
        )
        .await;
        assert_eq!(sig1["key_version"], 1);

        let k = wait_key(&d, "stores/1/pos/1/qr-mac", "rotation to v2", |k| {
            k["active_version"] == 2
        })
        .await;
        assert_eq!(state(&k, 1), "verify-only");
        let v1 = &k["versions"][0];
        assert_eq!(v1["changed_by"], "tillkeyd:scheduler");
        assert_eq!(v1["reason"], "rotation_period elapsed");
        assert!(v1["grace_until"].as_str().is_some());

        // During grace: v1 signatures still verify (found without naming the version); new ones use v2.
        let (_, v) = post(
            &mut svc,
            "/v1/keys/stores/1/pos/1/qr-mac:verify",
            json!({"message": msg, "signature": sig1["signature"]}),
        )
        .await;
        assert_eq!(
            (v["valid"].clone(), v["key_version"].clone()),
            (json!(true), json!(1)),
            "{v}"
        );
        let (_, sig2) = post(
            &mut svc,
            "/v1/keys/stores/1/pos/1/qr-mac:sign",
            json!({"message": msg}),
        )
        .await;
        assert!(sig2["key_version"].as_u64().unwrap() >= 2);
        assert_ne!(sig2["signature"], sig1["signature"]);

        // After grace v1 is retired: refused by name, and no longer matches when not named.
        wait_key(&d, "stores/1/pos/1/qr-mac", "v1 retirement", |k| {
            state(k, 1) == "retired"
        })
        .await;
        let r = post(
            &mut svc,
            "/v1/keys/stores/1/pos/1/qr-mac:verify",
            json!({"message": msg, "signature": sig1["signature"], "key_version": 1}),
        )
        .await;
        assert_error(&r, 422, "unsupported_operation");
        assert!(r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retired"));
        let (_, v) = post(
            &mut svc,
            "/v1/keys/stores/1/pos/1/qr-mac:verify",
            json!({"message": msg, "signature": sig1["signature"]}),
        )
        .await;
        assert_eq!(v["valid"], false);
    }
}

on_each_backend! {
    async fn max_operations_is_a_hard_cap_enforced_by_rotation(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut officer = d.conn("officer").await;
        let (s, _) = post(
            &mut officer,
            "/v1/keys",
            json!({"name": "stores/2/ec", "type": "ecdsa-p256", "max_operations": 5}),
        )
        .await;
        assert_eq!(s, 201);
        let mut svc = d.conn("service").await;
        let mut seen = Vec::new();
        for i in 0..12 {
            let msg = b64(format!("op {i}").as_bytes());
            let (s, sig) = post(
                &mut svc,
                "/v1/keys/stores/2/ec:sign",
                json!({"message": msg}),
            )
            .await;
            assert_eq!(s, 200, "{sig}");
            let version = sig["key_version"].as_u64().unwrap();
            seen.push(version);
            let (_, v) = post(
                &mut svc,
                "/v1/keys/stores/2/ec:verify",
                json!({"message": msg, "signature": sig["signature"], "key_version": version}),
            )
            .await;
            assert_eq!(v["valid"], true);
        }
        assert_eq!(seen, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3]);
        let k = key(&d, "stores/2/ec").await;
        let ops: Vec<u64> = k["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["operations"].as_u64().unwrap())
            .collect();
        assert_eq!(ops, [5, 5, 2]);
        assert_eq!(k["versions"][0]["reason"], "max_operations reached");
        assert_eq!(
            (state(&k, 1), state(&k, 2), state(&k, 3)),
            ("verify-only".into(), "verify-only".into(), "active".into())
        );
    }
}

on_each_backend! {
    async fn every_signature_made_during_rotations_verifies_with_the_version_it_names(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        for (name, t) in [
            ("stores/3/mac", "hmac-sha256"),
            ("stores/3/ec", "ecdsa-p256"),
        ] {
            create(&d, name, t).await;
        }
        let mut signers = Vec::new();
        for i in 0..16 {
            let client = d.client("service");
            signers.push(tokio::spawn(async move {
                let name = if i % 2 == 0 {
                    "stores/3/mac"
                } else {
                    "stores/3/ec"
                };
                let mut c = client.connect().await.unwrap();
                let mut made = Vec::new();
                for j in 0..40 {
                    let msg = b64(format!("{i}/{j}").as_bytes());
                    let (s, sig) = post(
                        &mut c,
                        &format!("/v1/keys/{name}:sign"),
                        json!({"message": msg}),
                    )
                    .await;
                    assert_eq!(s, 200, "{sig}");
                    made.push((name, msg, sig));
                }
                made
            }));
        }
        let mut officer = d.conn("officer").await;
        for _ in 0..4 {
            for name in ["stores/3/mac", "stores/3/ec"] {
                let (s, k) = post(
                    &mut officer,
                    &format!("/v1/keys/{name}:rotate"),
                    json!({"reason": "drill"}),
                )
                .await;
                assert_eq!(s, 200, "{k}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut svc = d.conn("service").await;
        let mut versions = std::collections::BTreeSet::new();
        for s in signers {
            for (name, msg, sig) in s.await.unwrap() {
                let version = sig["key_version"].as_u64().unwrap();
                versions.insert(version);
                let (_, v) = post(
                    &mut svc,
                    &format!("/v1/keys/{name}:verify"),
                    json!({"message": msg, "signature": sig["signature"], "key_version": version}),
                )
                .await;
                assert_eq!(v["valid"], true, "{name} v{version}");
            }
        }
        assert!(
            versions.len() >= 2,
            "signing never crossed a rotation: {versions:?}"
        );
        let k = key(&d, "stores/3/mac").await;
        assert_eq!(k["active_version"], 5);
        assert_eq!(k["versions"][0]["reason"], "drill");
    }
}

#[tokio::test]
async fn revocation_takes_effect_on_the_next_request() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/4/mac", "hmac-sha256").await;
    create(&d, "stores/4/aes", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let mut officer = d.conn("officer").await;
    let msg = b64(b"paid");
    let (_, sig) = post(
        &mut svc,
        "/v1/keys/stores/4/mac:sign",
        json!({"message": msg}),
    )
    .await;
    let (_, ct) = post(
        &mut svc,
        "/v1/keys/stores/4/aes:encrypt",
        json!({"plaintext": msg}),
    )
    .await;

    // Rotate the AES key: v1 ciphertexts still decrypt during grace.
    post(&mut officer, "/v1/keys/stores/4/aes:rotate", json!({})).await;
    let (s, pt) = post(
        &mut svc,
        "/v1/keys/stores/4/aes:decrypt",
        json!({"ciphertext": ct["ciphertext"]}),
    )
    .await;
    assert_eq!((s, pt["key_version"].clone()), (200, json!(1)), "{pt}");

    let (s, k) = post(
        &mut officer,
        "/v1/keys/stores/4/mac:revoke",
        json!({"version": 1, "reason": "POS 4 stolen"}),
    )
    .await;
    assert_eq!(s, 200, "{k}");
    assert_eq!(state(&k, 1), "revoked");
    assert_eq!(k["versions"][0]["reason"], "POS 4 stolen");
    assert_eq!(
        k["versions"][0]["changed_by"],
        "spiffe://tillkey.test/officer/alice"
    );
    assert!(k["active_version"].is_null());
    // The very next requests are refused.
    let r = post(
        &mut svc,
        "/v1/keys/stores/4/mac:verify",
        json!({"message": msg, "signature": sig["signature"], "key_version": 1}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    let r = post(
        &mut svc,
        "/v1/keys/stores/4/mac:verify",
        json!({"message": msg, "signature": sig["signature"]}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    let r = post(
        &mut svc,
        "/v1/keys/stores/4/mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    // Revoking again changes nothing; rotating gives the key a new active version.
    let (_, again) = post(
        &mut officer,
        "/v1/keys/stores/4/mac:revoke",
        json!({"version": 1, "reason": "again"}),
    )
    .await;
    assert_eq!(again["versions"][0]["reason"], "POS 4 stolen");
    post(&mut officer, "/v1/keys/stores/4/mac:rotate", json!({})).await;
    let (s, sig2) = post(
        &mut svc,
        "/v1/keys/stores/4/mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_eq!((s, sig2["key_version"].clone()), (200, json!(2)));

    // Revoking every version of the AES key stops decryption of old ciphertexts at once.
    post(
        &mut officer,
        "/v1/keys/stores/4/aes:revoke",
        json!({"reason": "vault retired"}),
    )
    .await;
    let r = post(
        &mut svc,
        "/v1/keys/stores/4/aes:decrypt",
        json!({"ciphertext": ct["ciphertext"]}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
}

on_each_backend! {
    async fn prefix_actions_cover_hundreds_of_keys_in_one_call(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let officer = d.client("officer");
        let mut tasks = Vec::new();
        for chunk in 0..4 {
            let officer = officer.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = officer.connect().await.unwrap();
                for pos in (chunk * 75)..(chunk * 75 + 75) {
                    let (s, v) = post(&mut c, "/v1/keys", json!({"name": format!("stores/77/pos/{pos:04}/qr-mac"), "type": "hmac-sha256"})).await;
                    assert_eq!(s, 201, "{v}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        create(&d, "stores/78/pos/0001/qr-mac", "hmac-sha256").await;
        let mut c = officer.connect().await.unwrap();

        let (s, out) = post(
            &mut c,
            "/v1/keys:rotatePrefix",
            json!({"prefix": "stores/77/", "reason": "quarterly"}),
        )
        .await;
        assert_eq!((s, out["versions"].clone()), (200, json!(300)), "{out}");
        let (s, out) = post(
            &mut c,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/77/", "reason": "store 77 breach"}),
        )
        .await;
        assert_eq!(s, 200, "{out}");
        assert_eq!(out["keys"].as_array().unwrap().len(), 300);
        assert_eq!(out["versions"], 600);

        let mut svc = d.conn("service").await;
        let r = post(
            &mut svc,
            "/v1/keys/stores/77/pos/0123/qr-mac:sign",
            json!({"message": "aGk="}),
        )
        .await;
        assert_error(&r, 422, "unsupported_operation");
        let (s, _) = post(
            &mut svc,
            "/v1/keys/stores/78/pos/0001/qr-mac:sign",
            json!({"message": "aGk="}),
        )
        .await;
        assert_eq!(s, 200, "a key outside the prefix was touched");
        let k = key(&d, "stores/77/pos/0299/qr-mac").await;
        assert_eq!(
            (state(&k, 1), state(&k, 2)),
            ("revoked".into(), "revoked".into())
        );

        // Not an officer: refused, nothing changed.
        let r = post(
            &mut svc,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/78/", "reason": "x"}),
        )
        .await;
        assert_error(&r, 403, "permission_denied");
        assert!(r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"));
        let (s, _) = post(
            &mut svc,
            "/v1/keys/stores/78/pos/0001/qr-mac:sign",
            json!({"message": "aGk="}),
        )
        .await;
        assert_eq!(s, 200);
        for body in [
            json!({"prefix": "", "reason": "x"}),
            json!({"prefix": "stores/78/"}),
            json!({"prefix": "Stores/", "reason": "x"}),
        ] {
            let r = post(&mut c, "/v1/keys:revokePrefix", body).await;
            assert_error(&r, 400, "invalid_argument");
        }
        let r = post(
            &mut c,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/99/", "reason": "x"}),
        )
        .await;
        assert_error(&r, 404, "not_found");
        // Whole segments only: "stores/7/" is not a prefix of "stores/77/...".
        let r = post(
            &mut c,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/7", "reason": "x"}),
        )
        .await;
        assert_error(&r, 400, "invalid_argument");
        let r = post(
            &mut c,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/7/", "reason": "x"}),
        )
        .await;
        assert_error(&r, 404, "not_found");
        // Without any revoke grant, an empty prefix is a refusal, not a hint that nothing is there.
        let mut stranger = d.conn("stranger").await;
        let r = post(
            &mut stranger,
            "/v1/keys:revokePrefix",
            json!({"prefix": "stores/99/", "reason": "x"}),
        )
        .await;
        assert_error(&r, 403, "permission_denied");
    }
}

#[tokio::test]
async fn lifecycle_settings_are_validated_and_changeable_by_officers_only() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    let mut svc = d.conn("service").await;
    for bad in [
        json!({"name": "stores/5/a", "type": "hmac-sha256", "rotation_period": "soon"}),
        json!({"name": "stores/5/a", "type": "hmac-sha256", "verify_grace": "0s"}),
        json!({"name": "stores/5/a", "type": "ed25519", "exportable": true}),
        json!({"name": "stores/5/a", "type": "hmac-sha256", "max_operations": -1}),
        json!({"name": "stores/5/a", "type": "hmac-sha256", "max_operations": 9223372036854775808u64}),
    ] {
        let r = post(&mut officer, "/v1/keys", bad.clone()).await;
        assert_error(&r, 400, "invalid_argument");
    }
    let (s, k) = post(
        &mut officer,
        "/v1/keys",
        json!({"name": "stores/5/a", "type": "hmac-sha256", "exportable": true}),
    )
    .await;
    assert_eq!(
        (s, k["exportable"].clone(), k["verify_grace"].clone()),
        (201, json!(true), json!("7d"))
    );

    let patch = |body: Value| hyper_patch("/v1/keys/stores/5/a", body);
    let (s, k) = patch(json!({"rotation_period": "90d", "max_operations": 1000000}))
        .call(&mut officer)
        .await;
    assert_eq!(
        (s, k["rotation_period"].clone(), k["max_operations"].clone()),
        (200, json!("90d"), json!(1000000))
    );
    let (_, k) = patch(json!({"rotation_period": "none", "max_operations": 0}))
        .call(&mut officer)
        .await;
    assert_eq!(
        (k["rotation_period"].clone(), k["max_operations"].clone()),
        (Value::Null, Value::Null)
    );
    let r = patch(json!({"exportable": false})).call(&mut officer).await;
    assert_error(&r, 400, "invalid_argument");
    // Beyond what is stored (a signed 64-bit integer): refused, not clamped.
    let r = patch(json!({"max_operations": u64::MAX}))
        .call(&mut officer)
        .await;
    assert_error(&r, 400, "invalid_argument");
    let (s, k) = get(&mut officer, "/v1/keys/stores/5/a").await;
    assert_eq!((s, k["max_operations"].clone()), (200, Value::Null));
    let r = get(&mut officer, "/v1/audit?since=9223372036854775808").await;
    assert_error(&r, 400, "invalid_argument");
    let (s, _) = get(&mut officer, "/v1/audit?since=9223372036854775807").await;
    assert_eq!(s, 200);
    let r = patch(json!({"verify_grace": "1d"})).call(&mut svc).await;
    assert_error(&r, 403, "permission_denied");
    for op in ["rotate", "revoke"] {
        let r = post(
            &mut svc,
            &format!("/v1/keys/stores/5/a:{op}"),
            json!({"reason": "x"}),
        )
        .await;
        assert_error(&r, 403, "permission_denied");
    }
    let r = post(&mut officer, "/v1/keys/stores/5/a:revoke", json!({})).await;
    assert_error(&r, 400, "invalid_argument");
    let r = post(
        &mut officer,
        "/v1/keys/stores/5/a:revoke",
        json!({"reason": "  "}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let r = post(
        &mut officer,
        "/v1/keys/stores/5/a:revoke",
        json!({"version": 9, "reason": "x"}),
    )
    .await;
    assert_error(&r, 404, "not_found");
    let r = post(
        &mut officer,
        "/v1/keys/stores/5/a:rotate",
        json!({"reason": "x", "when": "now"}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
}

struct Patch {
    path: String,
    body: Value,
}

fn hyper_patch(path: &str, body: Value) -> Patch {
    Patch {
        path: path.to_owned(),
        body,
    }
}

impl Patch {
    async fn call(&self, c: &mut tillkey::client::Connection) -> (u16, Value) {
        call(c, hyper::Method::PATCH, &self.path, Some(self.body.clone())).await
    }
}

/// A small cap under a burst: 60 signs released together (every client connected first) on a
/// key with `max_operations: 5` are all answered 200, each version signs at most 5 of them, and
/// the key rotates as often as that takes. The cap rotates; it is never a 503.
#[tokio::test]
async fn a_small_cap_under_a_burst_rotates_and_never_refuses() {
    let env = Env::new();
    let d = env.start();
    let (s, k) = post(
        &mut d.conn("officer").await,
        "/v1/keys",
        json!({"name": "stores/2/burst", "type": "hmac-sha256", "max_operations": 5}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(60));
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut c = d.conn("service").await;
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            post(
                &mut c,
                "/v1/keys/stores/2/burst:sign",
                json!({"message": b64(format!("m{i}").as_bytes())}),
            )
            .await
        }));
    }
    let mut per_version = std::collections::BTreeMap::<u64, u64>::new();
    for t in tasks {
        let (s, v) = t.await.expect("client");
        assert_eq!(s, 200, "{v}");
        *per_version
            .entry(v["key_version"].as_u64().expect("version"))
            .or_default() += 1;
    }
    assert!(per_version.values().all(|n| *n <= 5), "{per_version:?}");
    assert!(per_version.len() >= 12, "{per_version:?}");
}
