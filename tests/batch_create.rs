//! `POST /v1/keys:batchCreate`: per-item results, one policy check and one audit entry per item,
//! and clear refusals for malformed, oversized, unauthorized and duplicate input.

mod common;

use common::*;
use serde_json::{json, Value};

const PATH: &str = "/v1/keys:batchCreate";

fn outcome(r: &Value, i: usize) -> (String, String) {
    let item = &r["results"][i];
    (
        item["name"].as_str().unwrap_or_default().to_owned(),
        match item["outcome"].as_str() {
            Some("created") => "created".to_owned(),
            _ => item["error"]["code"].as_str().unwrap_or("?").to_owned(),
        },
    )
}

#[tokio::test]
async fn batch_create_reports_each_item_and_audits_each_key() {
    let env = Env::new();
    let d = env.start();
    create(&d, "groups/g/master", "aes256-derive").await;
    create(&d, "stores/1/existing", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let (s, r) = post(
        &mut officer,
        PATH,
        json!({"keys": [
            {"name": "stores/1/pos/1/mac", "type": "hmac-sha256", "derive_from": "groups/g/master", "rotation_period": "365d"},
            {"name": "stores/1/pos/2/mac", "type": "hmac-sha256", "derive_from": "groups/g/master"},
            {"name": "stores/1/pos/1/mac", "type": "hmac-sha256", "derive_from": "groups/g/master"},
            {"name": "stores/1/existing", "type": "hmac-sha256"},
            {"name": "tillkey/sneaky", "type": "hmac-sha256"},
            {"name": "Not A Name", "type": "hmac-sha256"},
            {"name": "stores/1/pos/3/mac", "type": "rsa-1024"},
            {"name": "stores/1/pos/4/mac", "type": "hmac-sha256", "derive_from": "groups/missing"},
            {"name": "stores/1/paid-sign", "type": "ecdsa-p256"},
        ]}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let got: Vec<(String, String)> = (0..9).map(|i| outcome(&r, i)).collect();
    let want = [
        ("stores/1/pos/1/mac", "created"),
        ("stores/1/pos/2/mac", "created"),
        ("stores/1/pos/1/mac", "invalid_argument"),
        ("stores/1/existing", "already_exists"),
        ("tillkey/sneaky", "permission_denied"),
        ("Not A Name", "invalid_argument"),
        ("stores/1/pos/3/mac", "invalid_argument"),
        ("stores/1/pos/4/mac", "not_found"),
        ("stores/1/paid-sign", "created"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(n, o)| (n.to_string(), o.to_string()))
        .collect();
    assert_eq!(got, want, "{r}");
    assert_eq!(
        (r["created"].clone(), r["failed"].clone()),
        (3.into(), 6.into())
    );
    assert_eq!(r["results"][0]["key"]["rotation_period"], "365d");
    assert_eq!(r["results"][0]["key"]["derive_from"], "groups/g/master");
    assert_eq!(r["results"][3]["status"], 409);

    // Made keys work; each item has its own audit entry.
    let mut svc = d.conn("service").await;
    let (s, sig) = post(
        &mut svc,
        "/v1/keys/stores/1/pos/2/mac:sign",
        json!({"message": b64(b"x")}),
    )
    .await;
    assert_eq!(s, 200, "{sig}");
    let mut auditor = d.conn("auditor").await;
    let mut item_ids = Vec::new();
    for (key, outcome) in [
        ("stores/1/pos/1/mac", "ok"),
        ("stores/1/existing", "already_exists"),
        ("stores/1/paid-sign", "ok"),
    ] {
        let (_, a) = get(&mut auditor, &format!("/v1/audit?key={key}")).await;
        let creates: Vec<&Value> = a["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["operation"] == "create" && e["outcome"] == outcome)
            .collect();
        assert!(
            !creates.is_empty(),
            "no {outcome} create entry for {key}: {a}"
        );
        item_ids.push(creates[0]["request_id"].as_str().unwrap().to_owned());
    }
    // Every item's entry leads back to the one batch request that made it.
    let (_, all) = get(&mut auditor, "/v1/audit?limit=1000").await;
    // The batch's own entries: its intent, durable before any key was made, and its outcome.
    let batch: Vec<&Value> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["operation"] == "batch_create")
        .collect();
    let outcomes: Vec<&str> = batch
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["started", "ok"], "{all}");
    let batch_ids: Vec<&str> = batch
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(batch_ids[0], batch_ids[1]);
    assert!(
        item_ids.iter().all(|id| id == batch_ids[0]),
        "{item_ids:?} vs {batch_ids:?}"
    );

    // A caller without grants gets a per-item refusal, not a created key.
    let (s, r) = post(
        &mut svc,
        PATH,
        json!({"keys": [{"name": "stores/2/pos/1/mac", "type": "hmac-sha256"}]}),
    )
    .await;
    assert_eq!(
        (s, outcome(&r, 0).1.as_str()),
        (200, "permission_denied"),
        "{r}"
    );
    let (s, _) = get(&mut officer, "/v1/keys/stores/2/pos/1/mac").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn malformed_and_oversized_batches_are_refused_whole() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    for body in [
        json!({}),
        json!({"keys": []}),
        json!({"keys": "stores/1/a"}),
        json!({"keys": [{"name": "stores/1/a"}]}),
        json!({"keys": [{"name": "stores/1/a", "type": "hmac-sha256", "colour": "red"}]}),
        json!({"keys": [], "extra": 1}),
    ] {
        assert_error(
            &post(&mut officer, PATH, body).await,
            400,
            "invalid_argument",
        );
    }
    assert_error(
        &raw(&mut officer, PATH, b"{\"keys\": [").await,
        400,
        "invalid_argument",
    );
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"name": format!("s/{i}"), "type": "hmac-sha256"}))
        .collect();
    assert_error(
        &post(&mut officer, PATH, json!({ "keys": many })).await,
        400,
        "invalid_argument",
    );
    let long = "x".repeat(60);
    let huge: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("stores/{long}/{i}"), "type": "hmac-sha256"}))
        .collect();
    assert_error(
        &post(&mut officer, PATH, json!({ "keys": huge })).await,
        413,
        "payload_too_large",
    );
    // Nothing was created by any of them.
    let (_, list) = get(&mut officer, "/v1/keys?prefix=s").await;
    assert_eq!(list["keys"].as_array().unwrap().len(), 0, "{list}");
}
