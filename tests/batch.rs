//! Batched `:sign` and `:verify` through the real daemon, real SoftHSM and the mTLS client:
//! per-item results and errors, limits, policy, max_operations and the audit entry.

mod common;

use common::*;
use serde_json::{json, Value};

fn items(v: &Value) -> &Vec<Value> {
    v["batch"].as_array().expect("a batch answer")
}

#[tokio::test]
async fn batch_sign_and_verify_every_signing_type_with_per_item_errors() {
    let env = Env::new();
    let d = env.start();
    let mut svc = d.conn("service").await;
    for t in ["hmac-sha256", "ecdsa-p256", "ed25519"] {
        let name = format!("stores/7/pos/1/{t}");
        create(&d, &name, t).await;
        let messages: Vec<String> = (0..5).map(|i| b64(format!("m{i}").as_bytes())).collect();
        let mut batch: Vec<Value> = messages.iter().map(|m| json!({ "message": m })).collect();
        batch.insert(2, json!({"message": "not base64!"}));
        let (s, signed) = post(
            &mut svc,
            &format!("/v1/keys/{name}:sign"),
            json!({ "batch": batch, "signature_format": "raw" }),
        )
        .await;
        assert_eq!(s, 200, "{t}: {signed}");
        assert_eq!(signed["key_version"], 1);
        let results = items(&signed);
        assert_eq!(results.len(), 6, "{signed}");
        assert_eq!(results[2]["error"]["code"], "invalid_argument", "{signed}");
        assert!(results[2].get("signature").is_none());
        let sigs: Vec<String> = results
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, r)| {
                assert_eq!(r["key_version"], 1, "{r}");
                r["signature"].as_str().expect("signature").to_owned()
            })
            .collect();
        let want = if t == "hmac-sha256" { 32 } else { 64 };
        assert!(sigs.iter().all(|s| unb64(s).len() == want), "{t}");

        // Each signature checks out against its own message (and the single call agrees).
        let (s, single) = post(
            &mut svc,
            &format!("/v1/keys/{name}:verify"),
            json!({"message": messages[0], "signature": sigs[0], "signature_format": "raw"}),
        )
        .await;
        assert_eq!((s, single["valid"].clone()), (200, json!(true)), "{single}");
        let mut checks: Vec<Value> = messages
            .iter()
            .zip(&sigs)
            .map(|(m, s)| json!({"message": m, "signature": s}))
            .collect();
        // Swapped signature: well formed, not valid. Unknown version: that item's 404.
        // Bad base64: that item's 400.
        checks.push(json!({"message": messages[0], "signature": sigs[1]}));
        checks.push(json!({"message": messages[0], "signature": sigs[0], "key_version": 9}));
        checks.push(json!({"message": messages[0], "signature": "%%"}));
        let (s, verified) = post(
            &mut svc,
            &format!("/v1/keys/{name}:verify"),
            json!({ "batch": checks, "signature_format": "raw" }),
        )
        .await;
        assert_eq!(s, 200, "{t}: {verified}");
        let results = items(&verified);
        assert_eq!(results.len(), 8, "{verified}");
        for r in &results[..5] {
            assert_eq!(
                (r["valid"].clone(), r["key_version"].clone()),
                (json!(true), json!(1)),
                "{t}: {verified}"
            );
        }
        assert_eq!(results[5]["valid"], false, "{verified}");
        assert_eq!(results[6]["error"]["code"], "not_found", "{verified}");
        assert_eq!(
            results[7]["error"]["code"], "invalid_argument",
            "{verified}"
        );
    }
}

#[tokio::test]
async fn malformed_oversized_mixed_and_unauthorized_batches_are_refused_whole() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/8/mac", "hmac-sha256").await;
    create(&d, "stores/8/gcm", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let path = "/v1/keys/stores/8/mac:sign";
    let m = b64(b"x");

    assert_error(
        &post(&mut svc, path, json!({"batch": []})).await,
        400,
        "invalid_argument",
    );
    let too_many = vec![json!({"message": m}); 257];
    let r = post(&mut svc, path, json!({ "batch": too_many })).await;
    assert_error(&r, 400, "invalid_argument");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 256"),
        "{}",
        r.1
    );
    assert_error(
        &post(
            &mut svc,
            path,
            json!({"batch": [{"message": m}], "message": m}),
        )
        .await,
        400,
        "invalid_argument",
    );
    // The shape of the request is judged whole: a wrong field or type refuses every item.
    assert_error(
        &post(
            &mut svc,
            path,
            json!({"batch": [{"message": m, "extra": 1}]}),
        )
        .await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(&mut svc, path, json!({"batch": [{"message": 5}]})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(&mut svc, path, json!({"batch": {"message": m}})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &raw(&mut svc, path, b"{\"batch\": [").await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            path,
            json!({"batch": [{"message": m}], "signature_format": "pem"}),
        )
        .await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/8/mac:verify",
            json!({"batch": [{"message": m, "signature": m}], "key_version": 1}),
        )
        .await,
        400,
        "invalid_argument",
    );
    // A body over max_body_bytes is 413 before anything is parsed.
    let big = vec![json!({"message": b64(&[7u8; 200])}); 250];
    assert_error(
        &post(&mut svc, path, json!({ "batch": big })).await,
        413,
        "payload_too_large",
    );

    // Policy, existence and key type are judged once, for the whole batch.
    let mut stranger = d.conn("stranger").await;
    assert_error(
        &post(&mut stranger, path, json!({"batch": [{"message": m}]})).await,
        403,
        "permission_denied",
    );
    let judged_once = [
        (
            "/v1/keys/tillkey/audit:sign",
            json!({"message": m}),
            403,
            "permission_denied",
        ),
        (
            "/v1/keys/stores/8/none:sign",
            json!({"message": m}),
            404,
            "not_found",
        ),
        (
            "/v1/keys/stores/8/gcm:sign",
            json!({"message": m}),
            422,
            "unsupported_operation",
        ),
        (
            "/v1/keys/stores/8/gcm:verify",
            json!({"message": m, "signature": m}),
            422,
            "unsupported_operation",
        ),
    ];
    for (p, item, status, code) in judged_once {
        let r = post(&mut svc, p, json!({ "batch": [item] })).await;
        assert_error(&r, status, code);
    }
    // The single form still names what it misses.
    let r = post(&mut svc, path, json!({})).await;
    assert_error(&r, 400, "invalid_argument");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message"),
        "{}",
        r.1
    );
}

#[tokio::test]
async fn a_batch_counts_every_item_against_max_operations_and_is_audited_once() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    let (s, v) = post(
        &mut officer,
        "/v1/keys",
        json!({"name": "stores/9/capped", "type": "hmac-sha256", "max_operations": 4}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let mut svc = d.conn("service").await;
    let path = "/v1/keys/stores/9/capped:sign";
    let batch = |n: usize| json!({ "batch": vec![json!({"message": b64(b"m")}); n] });

    let (s, v) = post(&mut svc, path, batch(3)).await;
    assert_eq!((s, v["key_version"].clone()), (200, json!(1)), "{v}");
    // Two more do not fit in version 1 (3 of 4 used): the key rotates and version 2 signs both.
    let (s, v) = post(&mut svc, path, batch(2)).await;
    assert_eq!((s, v["key_version"].clone()), (200, json!(2)), "{v}");
    assert!(items(&v).iter().all(|r| r["key_version"] == 2), "{v}");
    // More than any version may do is refused outright.
    let r = post(&mut svc, path, batch(5)).await;
    assert_error(&r, 400, "invalid_argument");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_operations"),
        "{}",
        r.1
    );

    // One entry per batch request, its detail counting items and failures.
    let mut bad = vec![json!({"message": b64(b"m")}); 2];
    bad.push(json!({"message": "?"}));
    let (s, v) = post(&mut svc, path, json!({ "batch": bad })).await;
    assert_eq!(s, 200, "{v}");
    let mut auditor = d.conn("auditor").await;
    let (s, trail) = get(&mut auditor, "/v1/audit?key=stores/9/capped&limit=1000").await;
    assert_eq!(s, 200, "{trail}");
    let entries = trail["entries"].as_array().unwrap();
    let signs: Vec<&Value> = entries
        .iter()
        .filter(|e| e["operation"] == "sign")
        .collect();
    assert_eq!(signs.len(), 4, "{trail}");
    assert_eq!(signs[0]["detail"], "batch of 3, 0 failed");
    assert_eq!(signs[2]["outcome"], "invalid_argument");
    assert_eq!(signs[3]["detail"], "batch of 3, 1 failed");
    assert_eq!(signs[3]["outcome"], "ok");
}
