//! Keys crossing the token boundary, always wrapped: import (BYOK) and export for injection,
//! each under dual control, with key check values.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};
use tillkey::client::Connection;
use tillkey::exchange::{hmac_kcv, unwrap_export, wrap_for_import};

fn hmac(material: &[u8], msg: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, material);
    ring::hmac::sign(&key, msg).as_ref().to_vec()
}

async fn import_request(
    c: &mut Connection,
    name: &str,
    key_type: &str,
    material: &[u8],
    kcv: Option<String>,
) -> (u16, Value) {
    let (_, wk) = get(c, "/v1/wrapping-key").await;
    let pem = wk["public_key_pem"].as_str().expect("wrapping key");
    let (kek, wrapped) = wrap_for_import(pem, material).unwrap();
    post(c, "/v1/keys:import", json!({"name": name, "type": key_type, "encrypted_kek": b64(&kek), "wrapped_key": b64(&wrapped), "kcv": kcv})).await
}

async fn approve(c: &mut Connection, requested: &Value) -> (u16, Value) {
    let id = requested["approval"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no approval: {requested}"));
    post(c, &format!("/v1/approvals/{id}:approve"), json!({})).await
}

#[tokio::test]
async fn imported_hmac_key_computes_the_same_mac_as_its_material() {
    let env = Env::new();
    let d = env.start();
    let mut alice = d.conn("officer").await;
    let mut bob = d.conn("officer2").await;
    let material: Vec<u8> = (0u8..32)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();

    let (s, req) = import_request(
        &mut alice,
        "stores/9/pos/1/qr-mac",
        "hmac-sha256",
        &material,
        Some(hmac_kcv(&material)),
    )
    .await;
    assert_eq!(s, 202, "{req}");
    let r = approve(&mut alice, &req).await;
    assert_error(&r, 403, "permission_denied");
    let (s, done) = approve(&mut bob, &req).await;
    assert_eq!(s, 200, "{done}");
    let key = &done["key"];
    assert_eq!(key["versions"][0]["kcv"], hmac_kcv(&material));
    assert_eq!(key["exportable"], false);
    assert!(key["versions"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("imported"));

    let mut svc = d.conn("service").await;
    let msg = b"paid: 0007 4.20 EUR";
    let (_, signed) = post(
        &mut svc,
        "/v1/keys/stores/9/pos/1/qr-mac:sign",
        json!({"message": b64(msg)}),
    )
    .await;
    assert_eq!(
        unb64(signed["signature"].as_str().unwrap()),
        hmac(&material, msg)
    );

    // The imported value cannot be read back out of the token.
    let (_, listing) = pkcs11_tool(&env, &["--list-objects"]);
    let block = listing
        .split("Secret Key Object")
        .find(|b| b.contains("tillkey:stores/9/pos/1/qr-mac#1"))
        .expect("imported key listed");
    // Up to the next object's header line.
    let block = block.split("Object;").next().unwrap_or(block);
    assert!(block.contains("Access:     sensitive"), "{block}");
    assert!(
        !block.contains(" extractable") || block.contains("never extractable"),
        "{block}"
    );
    // pkcs11-tool prints a generic secret's sign+verify as "verify" (generated keys too); what
    // matters is that no other usage (encrypt, wrap, derive...) slipped in from token defaults.
    assert!(block.contains("Usage:      verify\n"), "{block}");
    // Unwrapped keys are honestly not "always sensitive / never extractable / local".
    assert!(!block.contains("local"), "{block}");

    // Material was never sent in the clear: the request's audit entry holds no key bytes.
    let mut auditor = d.conn("auditor").await;
    let (_, trail) = get(&mut auditor, "/v1/audit?key=stores/9/pos/1/qr-mac").await;
    assert!(!trail.to_string().contains(&b64(&material)));
}

#[tokio::test]
async fn bad_imports_are_refused_and_leave_nothing_behind() {
    let env = Env::new();
    let d = env.start();
    let mut alice = d.conn("officer").await;
    let mut bob = d.conn("officer2").await;
    let material = [0x42u8; 32];

    // Wrong check value: refused at approval, name still free.
    let (_, req) = import_request(
        &mut alice,
        "stores/8/mac",
        "hmac-sha256",
        &material,
        Some("000000".into()),
    )
    .await;
    let r = approve(&mut bob, &req).await;
    assert_error(&r, 400, "invalid_argument");
    assert!(r.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("check value"));
    assert_error(
        &get(&mut alice, "/v1/keys/stores/8/mac").await,
        404,
        "not_found",
    );

    // A corrupted blob does not unwrap: a clear 400, not a 500.
    let (_, wk) = get(&mut alice, "/v1/wrapping-key").await;
    let (kek, mut wrapped) =
        wrap_for_import(wk["public_key_pem"].as_str().unwrap(), &material).unwrap();
    wrapped[5] ^= 1;
    let (_, req) = post(&mut alice, "/v1/keys:import", json!({"name": "stores/8/mac", "type": "hmac-sha256", "encrypted_kek": b64(&kek), "wrapped_key": b64(&wrapped)})).await;
    let r = approve(&mut bob, &req).await;
    assert_error(&r, 400, "invalid_argument");
    assert_eq!(d.admin_get("/readyz").0, 200);

    // Now correctly: it imports, and the same name cannot be requested again.
    let (_, req) = import_request(&mut alice, "stores/8/mac", "hmac-sha256", &material, None).await;
    assert_eq!(approve(&mut bob, &req).await.0, 200);
    let r = import_request(&mut alice, "stores/8/mac", "hmac-sha256", &material, None).await;
    assert_error(&r, 409, "already_exists");

    for (t, kcv) in [
        ("ecdsa-p256", None),
        ("hmac-sha256", Some("xyz".to_string())),
    ] {
        let r = import_request(&mut alice, "stores/8/other", t, &material, kcv).await;
        assert_error(&r, 400, "invalid_argument");
    }
    let r = post(&mut alice, "/v1/keys:import", json!({"name": "stores/8/x", "type": "hmac-sha256", "encrypted_kek": "***", "wrapped_key": "AA=="})).await;
    assert_error(&r, 400, "invalid_argument");
    let mut svc = d.conn("service").await;
    let r = import_request(&mut svc, "stores/8/y", "hmac-sha256", &material, None).await;
    assert_error(&r, 403, "permission_denied");
}

#[tokio::test]
async fn export_for_injection_unwraps_under_the_terminal_transport_key() {
    let env = Env::new();
    let d = env.start();
    let mut alice = d.conn("officer").await;
    let mut bob = d.conn("officer2").await;

    // The terminal's transport key arrives by (dual-controlled) import of known bytes.
    let transport = [0x5au8; 32];
    let (_, req) = import_request(
        &mut alice,
        "stores/7/pos/3/transport",
        "aes256-kw",
        &transport,
        None,
    )
    .await;
    let (s, t) = approve(&mut bob, &req).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["key"]["versions"][0]["kcv"].as_str().unwrap().len(), 6);

    let (s, k) = post(
        &mut alice,
        "/v1/keys",
        json!({"name": "stores/7/pos/3/qr-mac", "type": "hmac-sha256", "exportable": true}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let kcv = k["versions"][0]["kcv"].as_str().unwrap().to_owned();

    let (s, req) = post(
        &mut alice,
        "/v1/keys/stores/7/pos/3/qr-mac:export",
        json!({"version": 1, "transport_key": "stores/7/pos/3/transport"}),
    )
    .await;
    assert_eq!(s, 202, "{req}");
    let (s, done) = approve(&mut bob, &req).await;
    assert_eq!(s, 200, "{done}");
    let x = &done["export"];
    assert_eq!(
        (x["kcv"].as_str(), x["transport_version"].clone()),
        (Some(kcv.as_str()), json!(1))
    );
    assert_eq!(x["transport_kcv"], t["key"]["versions"][0]["kcv"]);

    // The terminal unwraps it and computes the same MACs as the daemon.
    let material = unwrap_export(&transport, &unb64(x["wrapped_key"].as_str().unwrap())).unwrap();
    assert_eq!(material.len(), 32);
    assert_eq!(hmac_kcv(&material), kcv);
    let mut svc = d.conn("service").await;
    let msg = b"request 0042";
    let (_, signed) = post(
        &mut svc,
        "/v1/keys/stores/7/pos/3/qr-mac:sign",
        json!({"message": b64(msg)}),
    )
    .await;
    assert_eq!(
        unb64(signed["signature"].as_str().unwrap()),
        hmac(&material, msg)
    );
    assert!(unwrap_export(&[0x5bu8; 32], &unb64(x["wrapped_key"].as_str().unwrap())).is_err());

    // Refusals at request time.
    create(&d, "stores/7/pos/3/locked", "hmac-sha256").await;
    let r = post(
        &mut alice,
        "/v1/keys/stores/7/pos/3/locked:export",
        json!({"version": 1, "transport_key": "stores/7/pos/3/transport"}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    let r = post(
        &mut alice,
        "/v1/keys/stores/7/pos/3/qr-mac:export",
        json!({"version": 1, "transport_key": "stores/7/pos/3/locked"}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    let r = post(
        &mut alice,
        "/v1/keys/stores/7/pos/3/qr-mac:export",
        json!({"version": 2, "transport_key": "stores/7/pos/3/transport"}),
    )
    .await;
    assert_error(&r, 404, "not_found");
    let (s, k) = post(
        &mut alice,
        "/v1/keys",
        json!({"name": "stores/7/vault", "type": "aes256-gcm"}),
    )
    .await;
    assert_eq!(
        (s, k["versions"][0]["kcv"].as_str().map(str::len)),
        (201, Some(6))
    );
}

#[tokio::test]
async fn the_cli_wraps_material_for_import() {
    let env = Env::new();
    let d = env.start();
    let material_file = env.path("material.bin");
    let material = [0x33u8; 32];
    write(&material_file, material);
    let out = Command::new(TILLKEY)
        .args([
            "keys",
            "import",
            "stores/6/mac",
            "--type",
            "hmac-sha256",
            "--material-file",
        ])
        .arg(&material_file)
        .args(["--url", &d.url()])
        .arg("--ca")
        .arg(env.path("ca.crt"))
        .arg("--cert")
        .arg(env.path("officer.crt"))
        .arg("--key")
        .arg(env.path("officer.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let req: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bob = d.conn("officer2").await;
    let (s, done) = approve(&mut bob, &req).await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["key"]["versions"][0]["kcv"], hmac_kcv(&material));
}
