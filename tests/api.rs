//! Every endpoint and key type through the real daemon, real SoftHSM and the mTLS client.

mod common;

use common::*;
use hyper::Method;
use serde_json::json;

on_each_backend! {
    async fn sign_and_verify_with_every_signing_type(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut svc = d.conn("service").await;
        for &t in backend.signing_types() {
            let name = format!("stores/1/pos/1/{t}");
            let created = create(&d, &name, t).await;
            assert_eq!(created["type"], t);
            assert_eq!(created["active_version"], 1);
            let msg = b64(b"purchase 42: 12.50 EUR");
            let (s, signed) = post(
                &mut svc,
                &format!("/v1/keys/{name}:sign"),
                json!({"message": msg}),
            )
            .await;
            assert_eq!(s, 200, "{signed}");
            assert_eq!(signed["key_version"], 1);
            let sig = signed["signature"].as_str().unwrap().to_owned();
            let expected_len = match t {
                "hmac-sha256" => 32..=32,
                "ed25519" => 64..=64,
                _ => 8..=72, // DER
            };
            assert!(
                expected_len.contains(&unb64(&sig).len()),
                "{t}: {} bytes",
                unb64(&sig).len()
            );

            let verify = |m: &str, s: &str| json!({"message": m, "signature": s});
            let (s, v) = post(
                &mut svc,
                &format!("/v1/keys/{name}:verify"),
                verify(&msg, &sig),
            )
            .await;
            assert_eq!(
                (s, v["valid"].clone(), v["key_version"].clone()),
                (200, json!(true), json!(1)),
                "{t}"
            );

            // A signature over another message, or a flipped bit, does not verify.
            let other = b64(b"purchase 42: 99.50 EUR");
            let (_, v) = post(
                &mut svc,
                &format!("/v1/keys/{name}:verify"),
                verify(&other, &sig),
            )
            .await;
            assert_eq!(v["valid"], false, "{t}: other message");
            let mut bad = unb64(&sig);
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let (s, v) = post(
                &mut svc,
                &format!("/v1/keys/{name}:verify"),
                verify(&msg, &b64(&bad)),
            )
            .await;
            assert_eq!(
                (s, v["valid"].clone()),
                (200, json!(false)),
                "{t}: tampered signature"
            );
            let (s, v) = post(
                &mut svc,
                &format!("/v1/keys/{name}:verify"),
                verify(&msg, &b64(b"short")),
            )
            .await;
            assert_eq!(
                (s, v["valid"].clone()),
                (200, json!(false)),
                "{t}: truncated signature"
            );

            // Explicit version 1 verifies; an unknown version is a 404.
            let mut body = verify(&msg, &sig);
            body["key_version"] = json!(1);
            let (_, v) = post(&mut svc, &format!("/v1/keys/{name}:verify"), body.clone()).await;
            assert_eq!(v["valid"], true);
            body["key_version"] = json!(7);
            let r = post(&mut svc, &format!("/v1/keys/{name}:verify"), body).await;
            assert_error(&r, 404, "not_found");
        }
    }
}

on_each_backend! {
    async fn ecdsa_raw_format_round_trips_and_differs_from_der(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/2/ec", "ecdsa-p256").await;
        let mut svc = d.conn("service").await;
        let msg = b64(b"raw please");
        let (_, raw) = post(
            &mut svc,
            "/v1/keys/stores/2/ec:sign",
            json!({"message": msg, "signature_format": "raw"}),
        )
        .await;
        let raw_sig = raw["signature"].as_str().unwrap();
        assert_eq!(unb64(raw_sig).len(), 64);
        let (_, v) = post(
            &mut svc,
            "/v1/keys/stores/2/ec:verify",
            json!({"message": msg, "signature": raw_sig, "signature_format": "raw"}),
        )
        .await;
        assert_eq!(v["valid"], true);
        // The same raw bytes read as DER are not a valid signature.
        let (_, v) = post(
            &mut svc,
            "/v1/keys/stores/2/ec:verify",
            json!({"message": msg, "signature": raw_sig}),
        )
        .await;
        assert_eq!(v["valid"], false);
    }
}

#[tokio::test]
async fn encrypt_and_decrypt_with_associated_data() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/3/vault", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let pt = b64(b"card token 4111");
    let aad = b64(b"store 3");
    let (s, enc) = post(
        &mut svc,
        "/v1/keys/stores/3/vault:encrypt",
        json!({"plaintext": pt, "associated_data": aad}),
    )
    .await;
    assert_eq!(s, 200, "{enc}");
    assert_eq!(enc["key_version"], 1);
    let ct = enc["ciphertext"].as_str().unwrap().to_owned();
    assert_ne!(unb64(&ct)[17..], *b"card token 4111");

    let (s, dec) = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": ct, "associated_data": aad}),
    )
    .await;
    assert_eq!((s, dec["plaintext"].as_str()), (200, Some(pt.as_str())));
    assert_eq!(dec["key_version"], 1);

    // Two encryptions of the same plaintext differ (fresh nonce).
    let (_, enc2) = post(
        &mut svc,
        "/v1/keys/stores/3/vault:encrypt",
        json!({"plaintext": pt, "associated_data": aad}),
    )
    .await;
    assert_ne!(enc2["ciphertext"], enc["ciphertext"]);

    // Wrong associated data, missing associated data, a flipped ciphertext bit and an edited
    // header all fail authentication with a 400, and the backend stays ready.
    let r = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": ct, "associated_data": b64(b"store 4")}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let r = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": ct}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let mut flipped = unb64(&ct);
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    let r = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": b64(&flipped), "associated_data": aad}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let mut header = unb64(&ct);
    header[0] = 9;
    let r = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": b64(&header), "associated_data": aad}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let mut version = unb64(&ct);
    version[4] = 2;
    let r = post(
        &mut svc,
        "/v1/keys/stores/3/vault:decrypt",
        json!({"ciphertext": b64(&version), "associated_data": aad}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    assert_eq!(d.admin_get("/readyz").0, 200);
}

#[tokio::test]
async fn get_and_list_show_metadata_the_caller_may_read() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/5/pos/1/qr-mac", "hmac-sha256").await;
    create(&d, "stores/5/pos/2/qr-mac", "hmac-sha256").await;
    create(&d, "stores/5/sign", "ed25519").await;
    create(&d, "hq/root", "ecdsa-p256").await;

    let mut officer = d.conn("officer").await;
    let (s, all) = get(&mut officer, "/v1/keys").await;
    assert_eq!(s, 200);
    let names: Vec<_> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "hq/root",
            "stores/5/pos/1/qr-mac",
            "stores/5/pos/2/qr-mac",
            "stores/5/sign"
        ]
    );

    let (_, pos) = get(&mut officer, "/v1/keys?prefix=stores/5/pos/").await;
    assert_eq!(pos["keys"].as_array().unwrap().len(), 2);
    assert!(pos.get("next_page_token").is_none());

    // Pages: two at a time, following next_page_token, yield every key once, in order.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/keys?page_size=2&page_token={t}"),
            None => "/v1/keys?page_size=2".to_string(),
        };
        let (s, page) = get(&mut officer, &path).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(
            page["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["name"].as_str().unwrap().to_owned()),
        );
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, names);
    assert_error(
        &get(&mut officer, "/v1/keys?page_size=0").await,
        400,
        "invalid_argument",
    );
    assert_error(
        &get(&mut officer, "/v1/keys?page_size=1001").await,
        400,
        "invalid_argument",
    );

    // The payments service may read stores/** only; hq/root is left out, not an error.
    let mut svc = d.conn("service").await;
    let (_, mine) = get(&mut svc, "/v1/keys").await;
    assert_eq!(mine["keys"].as_array().unwrap().len(), 3);
    let r = get(&mut svc, "/v1/keys/hq/root").await;
    assert_error(&r, 403, "permission_denied");
    let mut stranger = d.conn("stranger").await;
    let (_, none) = get(&mut stranger, "/v1/keys").await;
    assert_eq!(none["keys"], json!([]));

    let (s, k) = get(&mut officer, "/v1/keys/stores/5/sign").await;
    assert_eq!(s, 200);
    let v1 = &k["versions"][0];
    assert_eq!(
        (v1["version"].clone(), v1["state"].clone()),
        (json!(1), json!("active"))
    );
    assert!(v1["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(v1["public_key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let (_, h) = get(&mut officer, "/v1/keys/stores/5/pos/1/qr-mac").await;
    assert!(
        h["versions"][0].get("public_key_pem").is_none(),
        "secret keys have no public part"
    );
    assert_eq!(h["created_by"], "spiffe://tillkey.test/officer/alice");
}

#[tokio::test]
async fn malformed_oversized_and_misdirected_requests_get_clear_errors() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/9/mac", "hmac-sha256").await;
    create(&d, "stores/9/aes", "aes256-gcm").await;
    let mut officer = d.conn("officer").await;
    let mut svc = d.conn("service").await;
    let sign = "/v1/keys/stores/9/mac:sign";

    assert_error(
        &raw(&mut svc, sign, b"{not json").await,
        400,
        "invalid_argument",
    );
    assert_error(&raw(&mut svc, sign, b"").await, 400, "invalid_argument");
    assert_error(
        &raw(&mut svc, sign, b"[1,2]").await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(&mut svc, sign, json!({"message": "***"})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(&mut svc, sign, json!({"message": 5})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(&mut svc, sign, json!({"message": "aGk=", "extra": 1})).await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            sign,
            json!({"message": "aGk=", "signature_format": "pem"}),
        )
        .await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/9/mac:verify",
            json!({"message": "aGk="}),
        )
        .await,
        400,
        "invalid_argument",
    );

    // 64 KiB is the documented default limit; one byte over is refused before parsing.
    let big = vec![b' '; 64 * 1024 + 1];
    assert_error(&raw(&mut svc, sign, &big).await, 413, "payload_too_large");
    let huge_msg = json!({"message": b64(&vec![0u8; 60 * 1024])});
    assert_error(
        &post(&mut svc, sign, huge_msg).await,
        413,
        "payload_too_large",
    );

    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/9/nope:sign",
            json!({"message": "aGk="}),
        )
        .await,
        404,
        "not_found",
    );
    let long = format!("stores/{}", "a".repeat(200));
    let seg = format!("stores/{}", "b".repeat(65));
    for bad in [
        "stores/../9/mac",
        "Stores/9/mac",
        "stores//9",
        "stores/9/",
        "stores/%2e%2e/x",
        &long,
        &seg,
    ] {
        let r = post(
            &mut svc,
            &format!("/v1/keys/{bad}:sign"),
            json!({"message": "aGk="}),
        )
        .await;
        assert_error(&r, 400, "invalid_argument");
    }
    for bad in ["", "A", "a/../b", "x y"] {
        let r = post(
            &mut officer,
            "/v1/keys",
            json!({"name": bad, "type": "hmac-sha256"}),
        )
        .await;
        assert_error(&r, 400, "invalid_argument");
    }
    let r = post(
        &mut officer,
        "/v1/keys",
        json!({"name": "stores/9/x", "type": "rsa-2048"}),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    let r = post(&mut officer, "/v1/keys", json!({"name": "stores/9/x"})).await;
    assert_error(&r, 400, "invalid_argument");

    // Operations the key type does not have.
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/9/aes:sign",
            json!({"message": "aGk="}),
        )
        .await,
        422,
        "unsupported_operation",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/9/mac:encrypt",
            json!({"plaintext": "aGk="}),
        )
        .await,
        422,
        "unsupported_operation",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/keys/stores/9/mac:decrypt",
            json!({"ciphertext": "aGk="}),
        )
        .await,
        422,
        "unsupported_operation",
    );
    let short = post(
        &mut svc,
        "/v1/keys/stores/9/aes:decrypt",
        json!({"ciphertext": "aGk="}),
    )
    .await;
    assert_error(&short, 400, "invalid_argument");

    // Routing.
    assert_error(
        &post(&mut svc, "/v1/keys/stores/9/mac:explode", json!({})).await,
        404,
        "not_found",
    );
    assert_error(
        &get(&mut svc, "/v1/keys/stores/9/mac:sign").await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &call(&mut svc, Method::DELETE, "/v1/keys/stores/9/mac", None).await,
        405,
        "method_not_allowed",
    );
    assert_error(&get(&mut svc, "/v2/keys").await, 404, "not_found");
    assert_error(
        &get(&mut svc, "/v1/keys?prefix=A").await,
        400,
        "invalid_argument",
    );
    assert_error(
        &get(&mut svc, "/v1/keys?limit=5").await,
        400,
        "invalid_argument",
    );

    // Nothing was lost: the key still signs on the same connection, and the daemon is ready.
    let (s, _) = post(&mut svc, sign, json!({"message": "aGk="})).await;
    assert_eq!(s, 200);
    assert_eq!(d.admin_get("/readyz").0, 200);
    assert!(
        !d.logs().iter().any(|l| l.contains("panicked")),
        "a request panicked"
    );
}

on_each_backend! {
    async fn duplicate_create_is_refused_and_keeps_the_original(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let first = create(&d, "stores/4/sig", "ecdsa-p256").await;
        let mut officer = d.conn("officer").await;
        // Replaying the same create, or the name with another type, changes nothing.
        for t in ["ecdsa-p256", "hmac-sha256"] {
            let r = post(
                &mut officer,
                "/v1/keys",
                json!({"name": "stores/4/sig", "type": t}),
            )
            .await;
            assert_error(&r, 409, "already_exists");
        }
        let (_, now) = get(&mut officer, "/v1/keys/stores/4/sig").await;
        assert_eq!(now["versions"], first["versions"]);
        assert_eq!(now["type"], "ecdsa-p256");
    }
}

on_each_backend! {
    async fn concurrent_creates_of_one_name_yield_exactly_one_key(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let client = d.client("officer");
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.unwrap();
                post(
                    &mut c,
                    "/v1/keys",
                    json!({"name": "stores/7/race", "type": "hmac-sha256"}),
                )
                .await
                .0
            }));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        codes.sort();
        assert_eq!(codes, [201, 409, 409, 409, 409, 409, 409, 409]);
    }
}

on_each_backend! {
    async fn keys_survive_a_daemon_restart(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let created = create(&d, "stores/8/ec", "ecdsa-p256").await;
        let mut svc = d.conn("service").await;
        let msg = b64(b"before restart");
        let (_, signed) = post(
            &mut svc,
            "/v1/keys/stores/8/ec:sign",
            json!({"message": msg}),
        )
        .await;
        drop(svc);
        assert!(d.stop().success());

        let d = env.start();
        let mut svc = d.conn("service").await;
        let (_, mut k) = get(&mut svc, "/v1/keys/stores/8/ec").await;
        // The usage count was persisted on shutdown; everything else is as created.
        assert_eq!(k["versions"][0]["operations"], 1);
        k["versions"][0]["operations"] = json!(0);
        assert_eq!(k["versions"], created["versions"]);
        let (_, v) = post(
            &mut svc,
            "/v1/keys/stores/8/ec:verify",
            json!({"message": msg, "signature": signed["signature"]}),
        )
        .await;
        assert_eq!(v["valid"], true);
    }
}

on_each_backend! {
    async fn many_concurrent_clients_share_the_session_pool(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/6/mac", "hmac-sha256").await;
        create(&d, "stores/6/ec", "ecdsa-p256").await;
        let mut tasks = Vec::new();
        for i in 0..32 {
            let client = d.client("service");
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.unwrap();
                let key = if i % 2 == 0 {
                    "stores/6/mac"
                } else {
                    "stores/6/ec"
                };
                for j in 0..25 {
                    let msg = b64(format!("{i}-{j}").as_bytes());
                    let (s, sig) = post(
                        &mut c,
                        &format!("/v1/keys/{key}:sign"),
                        json!({"message": msg}),
                    )
                    .await;
                    assert_eq!(s, 200, "{sig}");
                    let (_, v) = post(
                        &mut c,
                        &format!("/v1/keys/{key}:verify"),
                        json!({"message": msg, "signature": sig["signature"]}),
                    )
                    .await;
                    assert_eq!(v["valid"], true);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (_, metrics) = d.admin_get("/metrics");
        assert!(
            metrics.contains(r#"tillkey_requests_total{operation="sign",outcome="ok"} 800"#),
            "{metrics}"
        );
        assert!(metrics.contains(r#"tillkey_requests_total{operation="verify",outcome="ok"} 800"#));
    }
}
