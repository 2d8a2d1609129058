//! POS payment QR codes: request and paid tokens through the real daemon, checked by an
//! independent COSE stack (pycose) and refused when tampered, misdirected, stale or replayed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tillkey::client::Connection;

fn pycose(token: &str, key_flag: &str, key: &str) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo().join("tests/interop/verify_cwt.py"))
        .args([token, key_flag, key])
        .output()
        .expect("python3");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn request_body(purchase: &str, amount: i64) -> Value {
    json!({"store_id": "1212", "pos_id": "0001", "purchase_id": purchase, "amount": amount, "currency": "EUR", "description": "2 coffees"})
}

async fn issue_request(c: &mut Connection, purchase: &str, amount: i64) -> Value {
    let (s, v) = post(
        c,
        "/v1/tokens/pos-request:issue",
        request_body(purchase, amount),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn verify(c: &mut Connection, kind: &str, token: &str) -> Value {
    let (s, v) = post(
        c,
        &format!("/v1/tokens/{kind}:verify"),
        json!({"token": token}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Re-encode a token after flipping one byte of its COSE body.
fn tamper(token: &str) -> String {
    let (prefix, body) = token.split_at(5);
    let mut bytes = base45::decode(body).unwrap();
    let i = bytes.len() - 40;
    bytes[i] ^= 0x01;
    format!("{prefix}{}", base45::encode(&bytes))
}

#[tokio::test]
async fn request_then_paid_with_per_pos_keys_verifies_independently_and_once() {
    let env = Env::new();
    let d = env.start();
    let request_key = [0x11u8; 32];
    let paid_key = [0x22u8; 32];
    import_known(
        &d,
        "stores/1212/pos/0001/qr-request",
        "hmac-sha256",
        &request_key,
    )
    .await;
    import_known(&d, "stores/1212/pos/0001/qr-paid", "hmac-sha256", &paid_key).await;
    let mut svc = d.conn("service").await;

    let req = issue_request(&mut svc, "P-000042", 1250).await;
    let token = req["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("TKR1:"));
    assert_eq!(
        (req["kid"].as_str(), req["key"].as_str()),
        (Some("req#1"), Some("stores/1212/pos/0001/qr-request"))
    );
    let v = verify(&mut svc, "pos-request", &token).await;
    assert_eq!(
        (
            v["valid"].clone(),
            v["amount"].clone(),
            v["currency"].clone()
        ),
        (json!(true), json!(1250), json!("EUR")),
        "{v}"
    );
    assert_eq!(v["description"], "2 coffees");
    // Request tokens may be shown and checked again; they are not consumed.
    assert_eq!(verify(&mut svc, "pos-request", &token).await["valid"], true);

    let (ok, out) = pycose(&token, "--hmac-hex", &hex(&request_key));
    assert!(ok, "pycose refused the request token: {out}");
    let claims: Value = serde_json::from_str(out.trim()).unwrap();
    let fields = &claims["-65537"];
    assert_eq!(
        (
            fields["0"].as_str(),
            fields["3"].clone(),
            fields["4"].as_str()
        ),
        (Some("pos-request"), json!(1250), Some("EUR"))
    );
    assert_eq!(
        claims["7"].as_str(),
        Some(hex(b"P-000042").as_str()),
        "cti is the purchase id"
    );
    assert!(
        claims["6"].as_i64().is_some() && claims["4"].as_i64() > claims["6"].as_i64(),
        "iat and exp"
    );
    assert!(
        !pycose(&token, "--hmac-hex", &hex(&paid_key)).0,
        "the paid key must not verify a request"
    );

    let (s, paid) = post(
        &mut svc,
        "/v1/tokens/pos-paid:issue",
        json!({"request_token": token, "payment_ref": "PSP-991"}),
    )
    .await;
    assert_eq!(s, 200, "{paid}");
    let paid_token = paid["token"].as_str().unwrap().to_owned();
    assert!(paid_token.starts_with("TKP1:"));
    assert!(
        paid["qr_version"].as_i64().unwrap() <= 10,
        "paid token needs QR version {}",
        paid["qr_version"]
    );
    let (ok, out) = pycose(&paid_token, "--hmac-hex", &hex(&paid_key));
    assert!(ok, "pycose refused the paid token: {out}");
    let claims: Value = serde_json::from_str(out.trim()).unwrap();
    let fields = &claims["-65537"];
    assert_eq!(
        (fields["0"].as_str(), fields["6"].as_str()),
        (Some("pos-paid"), Some("PSP-991"))
    );
    assert_eq!(
        fields["7"].as_str().unwrap().len(),
        32,
        "bound to the request by a 16-byte hash"
    );
    println!(
        "paid token (HMAC): {} characters, QR version {}",
        paid["chars"], paid["qr_version"]
    );

    // Paying again: the same token; for another amount: refused.
    let (_, again) = post(
        &mut svc,
        "/v1/tokens/pos-paid:issue",
        json!({"request_token": token, "payment_ref": "PSP-991"}),
    )
    .await;
    assert_eq!(
        (again["token"].as_str(), again["repeated"].clone()),
        (Some(paid_token.as_str()), json!(true))
    );
    let other = issue_request(&mut svc, "P-000042", 9999).await;
    let r = post(
        &mut svc,
        "/v1/tokens/pos-paid:issue",
        json!({"request_token": other["token"], "payment_ref": "PSP-992"}),
    )
    .await;
    assert_error(&r, 409, "failed_precondition");

    // Types never cross over.
    let v = verify(&mut svc, "pos-paid", &token).await;
    assert_eq!(v["valid"], false);
    assert!(v["reason"]
        .as_str()
        .unwrap()
        .contains("not a pos-paid token"));
    let v = verify(&mut svc, "pos-request", &paid_token).await;
    assert_eq!(v["valid"], false);

    // The online check consumes the paid token: once.
    let v = verify(&mut svc, "pos-paid", &paid_token).await;
    assert_eq!(
        (v["valid"].clone(), v["payment_ref"].clone()),
        (json!(true), json!("PSP-991")),
        "{v}"
    );
    let v = verify(&mut svc, "pos-paid", &paid_token).await;
    assert_eq!(v["valid"], false);
    assert!(v["reason"].as_str().unwrap().contains("replayed"));

    // QR image.
    let (s, h, body) = svc
        .call_with_headers(
            hyper::Method::POST,
            "/v1/tokens/pos-request:issue?format=svg",
            request_body("P-000043", 100).to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        (s.as_u16(), h.get("content-type").unwrap().to_str().unwrap()),
        (200, "image/svg+xml")
    );
    assert!(String::from_utf8_lossy(&body).contains("<svg"));
}

on_each_backend! {
    async fn a_store_signing_key_makes_paid_tokens_a_pos_cannot_forge(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/1212/pos/0001/qr-request", "hmac-sha256").await;
        let store_key = create(&d, "stores/1212/paid-sign", "ecdsa-p256").await;
        let pem = store_key["versions"][0]["public_key_pem"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut svc = d.conn("service").await;
        let req = issue_request(&mut svc, "P-7", 420).await;
        let (s, paid) = post(
            &mut svc,
            "/v1/tokens/pos-paid:issue",
            json!({"request_token": req["token"], "payment_ref": "R-7"}),
        )
        .await;
        assert_eq!(s, 200, "{paid}");
        assert_eq!(
            (paid["kid"].as_str(), paid["key"].as_str()),
            (Some("store#1"), Some("stores/1212/paid-sign"))
        );
        let pem_path = env.path("store.pem");
        write(&pem_path, &pem);
        let paid_token = paid["token"].as_str().unwrap();
        let (ok, out) = pycose(paid_token, "--pem", pem_path.to_str().unwrap());
        assert!(ok, "{out}");
        println!(
            "paid token (ES256): {} characters, QR version {}",
            paid["chars"], paid["qr_version"]
        );
        assert!(paid["qr_version"].as_i64().unwrap() <= 10);
        let (ok, _) = pycose(&tamper(paid_token), "--pem", pem_path.to_str().unwrap());
        assert!(!ok, "a tampered signed token verified");
        assert_eq!(
            verify(&mut svc, "pos-paid", paid_token).await["valid"],
            true
        );
    }
}

#[tokio::test]
async fn tampered_misdirected_revoked_expired_and_malformed_tokens_are_refused() {
    let env = Env::new();
    let d = env.start();
    let other_pos_key = [0x33u8; 32];
    create(&d, "stores/1212/pos/0001/qr-request", "hmac-sha256").await;
    import_known(
        &d,
        "stores/1212/pos/0002/qr-request",
        "hmac-sha256",
        &other_pos_key,
    )
    .await;
    let mut svc = d.conn("service").await;
    let mut officer = d.conn("officer").await;
    let token = issue_request(&mut svc, "P-1", 100).await["token"]
        .as_str()
        .unwrap()
        .to_owned();

    let v = verify(&mut svc, "pos-request", &tamper(&token)).await;
    assert_eq!(v["valid"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("does not verify"),
        "{v}"
    );

    // POS 0002's key vouching for a token that claims to come from POS 0001.
    let now = tillkey::service::unix_now();
    let forged = |pos_claim: &str, iat: i64| {
        let claims = tillkey::retail::cwt::Claims {
            kind: "pos-request".into(),
            store: "1212".into(),
            pos: pos_claim.into(),
            purchase: "P-9".into(),
            amount: 1,
            currency: "EUR".into(),
            description: None,
            payment_ref: None,
            request: None,
            issued_at: iat,
            expires_at: iat + 300,
        };
        let cose = tillkey::retail::cwt::seal_mac0(claims.to_cbor().unwrap(), "req#1", |tbm| {
            Ok(ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &other_pos_key),
                tbm,
            )
            .as_ref()
            .to_vec())
        })
        .unwrap();
        tillkey::retail::cwt::to_text("TKR1:", &cose)
    };
    let v = verify(&mut svc, "pos-request", &forged("0001", now)).await;
    assert_eq!(v["valid"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("does not verify"),
        "{v}"
    );
    assert_eq!(
        v["key"], "stores/1212/pos/0001/qr-request",
        "checked with the claimed POS's own key"
    );
    // The same key on its own POS is fine; from the future it is not.
    assert_eq!(
        verify(&mut svc, "pos-request", &forged("0002", now)).await["valid"],
        true
    );
    let v = verify(&mut svc, "pos-request", &forged("0002", now + 3600)).await;
    assert!(v["reason"].as_str().unwrap().contains("future"), "{v}");

    // Expired.
    let (_, short) = post(&mut svc, "/v1/tokens/pos-request:issue", json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P-2", "amount": 5, "currency": "EUR", "ttl": 1})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let v = verify(&mut svc, "pos-request", short["token"].as_str().unwrap()).await;
    assert_eq!(v["reason"], "expired");

    // Revoked version: refused with the reason.
    post(
        &mut officer,
        "/v1/keys/stores/1212/pos/0001/qr-request:revoke",
        json!({"reason": "POS stolen"}),
    )
    .await;
    let v = verify(&mut svc, "pos-request", &token).await;
    assert_eq!(v["valid"], false);
    assert!(v["reason"].as_str().unwrap().contains("revoked"), "{v}");
    assert_error(
        &post(
            &mut svc,
            "/v1/tokens/pos-request:issue",
            request_body("P-3", 1),
        )
        .await,
        422,
        "unsupported_operation",
    );

    // Malformed.
    for bad in [
        "",
        "TKR1:",
        "TKR1:!!!!",
        "XXXX:ABC",
        "TKR1:0000",
        &format!("TKR1:{}", base45::encode(b"not cbor at all")),
    ] {
        let r = post(
            &mut svc,
            "/v1/tokens/pos-request:verify",
            json!({"token": bad}),
        )
        .await;
        assert_error(&r, 400, "invalid_argument");
    }
    for body in [
        json!({"store_id": "Big", "pos_id": "0001", "purchase_id": "P", "amount": 1, "currency": "EUR"}),
        json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P", "amount": 0, "currency": "EUR"}),
        json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P", "amount": 1, "currency": "euro"}),
        json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P P", "amount": 1, "currency": "EUR"}),
        json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P", "amount": 1, "currency": "EUR", "ttl": 0}),
    ] {
        assert_error(
            &post(&mut svc, "/v1/tokens/pos-request:issue", body).await,
            400,
            "invalid_argument",
        );
    }
    // Without a grant on the POS key: refused.
    let mut stranger = d.conn("stranger").await;
    assert_error(
        &post(
            &mut stranger,
            "/v1/tokens/pos-request:verify",
            json!({"token": token}),
        )
        .await,
        403,
        "permission_denied",
    );
}

on_each_backend! {
    async fn concurrent_checks_of_one_paid_token_succeed_exactly_once(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/1212/pos/0001/qr-request", "hmac-sha256").await;
        create(&d, "stores/1212/pos/0001/qr-paid", "hmac-sha256").await;
        let mut svc = d.conn("service").await;
        let req = issue_request(&mut svc, "P-CONC", 100).await;
        let (_, paid) = post(
            &mut svc,
            "/v1/tokens/pos-paid:issue",
            json!({"request_token": req["token"], "payment_ref": "X"}),
        )
        .await;
        let token = paid["token"].as_str().unwrap().to_owned();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (client, token) = (d.client("service"), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.unwrap();
                verify(&mut c, "pos-paid", &token).await["valid"] == true
            }));
        }
        let mut valid = 0;
        for t in tasks {
            valid += usize::from(t.await.unwrap());
        }
        assert_eq!(valid, 1);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refusing a paid token does not tell whether the store has its own signing key: a caller
/// that may verify requests but sign nothing gets one message, naming neither key, with and
/// without `stores/{s}/paid-sign`.
#[tokio::test]
async fn refusing_a_paid_token_does_not_reveal_the_store_key() {
    let env = Env::new();
    write(
        &env.path("policies/verify-only.toml"),
        "[[grant]]\ndescription = \"checks requests, signs nothing\"\n\
         identities = [\"spiffe://tillkey.test/svc/stranger\"]\n\
         operations = [\"read\", \"verify\"]\nkeys = [\"stores/**\"]\n",
    );
    let d = env.start();
    create(&d, "stores/1212/pos/0001/qr-request", "hmac-sha256").await;
    create(&d, "stores/1313/pos/0001/qr-request", "hmac-sha256").await;
    create(&d, "stores/1313/paid-sign", "ecdsa-p256").await;
    let mut svc = d.conn("service").await;
    let mut stranger = d.conn("stranger").await;
    let mut answers = Vec::new();
    for store in ["1212", "1313"] {
        let (s, req) = post(
            &mut svc,
            "/v1/tokens/pos-request:issue",
            json!({"store_id": store, "pos_id": "0001", "purchase_id": "P-1", "amount": 100,
                   "currency": "EUR"}),
        )
        .await;
        assert_eq!(s, 200, "{req}");
        let r = post(
            &mut stranger,
            "/v1/tokens/pos-paid:issue",
            json!({"request_token": req["token"], "payment_ref": "R-1"}),
        )
        .await;
        assert_error(&r, 403, "permission_denied");
        let message = r.1["error"]["message"].as_str().unwrap_or("").to_owned();
        assert!(
            !message.contains("paid-sign") && !message.contains("paid-mac"),
            "{message}"
        );
        answers.push(message.replace(store, "S"));
    }
    assert_eq!(answers[0], answers[1]);
}
