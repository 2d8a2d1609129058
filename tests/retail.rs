//! Customer QR (one-time and device-signed), challenge-response, counter-sealed messages and
//! gift-card codes through the real daemon and token.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn device(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo().join("tests/interop/device_token.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

on_each_backend! {
    async fn one_time_customer_tokens_redeem_once_with_uniform_refusals(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/1212/loyalty/otp", "hmac-sha256").await;
        let mut svc = d.conn("service").await;
        let (s, t) = post(
            &mut svc,
            "/v1/tokens/customer-otp:issue",
            json!({"key": "stores/1212/loyalty/otp", "subject": "customer-42"}),
        )
        .await;
        assert_eq!(s, 200, "{t}");
        let token = t["token"].as_str().unwrap().to_owned();
        assert!(
            token.starts_with("TKC1:") && base45::decode(&token[5..]).unwrap().len() == 16,
            "128 random bits"
        );
        let redeem = |tok: String| json!({"key": "stores/1212/loyalty/otp", "token": tok});
        let (_, r) = post(
            &mut svc,
            "/v1/tokens/customer-otp:redeem",
            redeem(token.clone()),
        )
        .await;
        assert_eq!(
            (r["redeemed"].clone(), r["subject"].clone()),
            (json!(true), json!("customer-42"))
        );

        // Reused, unknown, expired and malformed tokens all get the very same answer.
        let (_, expired) = post(
            &mut svc,
            "/v1/tokens/customer-otp:issue",
            json!({"key": "stores/1212/loyalty/otp", "subject": "c", "ttl": 1}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let refusal = json!({"redeemed": false, "reason": "invalid"});
        for bad in [
            token,
            format!("TKC1:{}", base45::encode([7u8; 16])),
            expired["token"].as_str().unwrap().to_owned(),
            "TKC1:%%%".into(),
            "nonsense".into(),
        ] {
            let (s, r) = post(
                &mut svc,
                "/v1/tokens/customer-otp:redeem",
                redeem(bad.clone()),
            )
            .await;
            assert_eq!((s, &r), (200, &refusal), "{bad}");
        }

        // Many clients redeeming one token: exactly one wins.
        let (_, t) = post(
            &mut svc,
            "/v1/tokens/customer-otp:issue",
            json!({"key": "stores/1212/loyalty/otp", "subject": "race"}),
        )
        .await;
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (client, body) = (
                d.client("service"),
                redeem(t["token"].as_str().unwrap().to_owned()),
            );
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.unwrap();
                post(&mut c, "/v1/tokens/customer-otp:redeem", body).await.1["redeemed"] == true
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await.unwrap());
        }
        assert_eq!(wins, 1);
        assert_error(
            &post(
                &mut svc,
                "/v1/tokens/customer-otp:issue",
                json!({"key": "stores/1212/loyalty/otp", "subject": ""}),
            )
            .await,
            400,
            "invalid_argument",
        );
    }
}

#[tokio::test]
async fn device_signed_customer_tokens_from_an_independent_signer() {
    let env = Env::new();
    let d = env.start();
    let work = tempfile::tempdir().unwrap();
    let key1 = work.path().join("phone1.pem");
    let pem1 = device(&["keygen", "ed25519", key1.to_str().unwrap()]);
    let mut officer = d.conn("officer").await;
    let realm = "stores/1212/devices";
    let (s, reg) = post(
        &mut officer,
        "/v1/devices",
        json!({"realm": realm, "subject": "alice", "public_key_pem": pem1}),
    )
    .await;
    assert_eq!(s, 201, "{reg}");
    let id1 = reg["device_id"].as_str().unwrap().to_owned();
    assert_eq!(reg["alg"], "ed25519");

    let mut svc = d.conn("service").await;
    let check = |token: String| json!({"realm": realm, "token": token});
    let token = device(&["sign", key1.to_str().unwrap(), &id1, "alice"]);
    let (s, v) = post(
        &mut svc,
        "/v1/tokens/customer-signed:verify",
        check(token.clone()),
    )
    .await;
    assert_eq!(
        (s, v["valid"].clone(), v["subject"].clone()),
        (200, json!(true), json!("alice")),
        "{v}"
    );
    let (_, v) = post(
        &mut svc,
        "/v1/tokens/customer-signed:verify",
        check(token.clone()),
    )
    .await;
    assert!(v["reason"].as_str().unwrap().contains("replayed"), "{v}");

    // Outside the clock window, either way.
    for offset in ["-120", "120"] {
        let t = device(&["sign", key1.to_str().unwrap(), &id1, "alice", offset]);
        let (_, v) = post(&mut svc, "/v1/tokens/customer-signed:verify", check(t)).await;
        assert_eq!(v["valid"], false, "{offset}");
        assert!(
            v["reason"].as_str().unwrap().contains("clock window"),
            "{v}"
        );
    }
    // Another subject's claim with this device: refused.
    let t = device(&["sign", key1.to_str().unwrap(), &id1, "mallory"]);
    assert!(
        post(&mut svc, "/v1/tokens/customer-signed:verify", check(t))
            .await
            .1["reason"]
            .as_str()
            .unwrap()
            .contains("not registered")
    );

    // Re-registration replaces the key at once; a P-256 phone works as well.
    let key2 = work.path().join("phone2.pem");
    let pem2 = device(&["keygen", "es256", key2.to_str().unwrap()]);
    let (_, reg2) = post(
        &mut officer,
        "/v1/devices",
        json!({"realm": realm, "subject": "alice", "public_key_pem": pem2}),
    )
    .await;
    let id2 = reg2["device_id"].as_str().unwrap().to_owned();
    assert_eq!(reg2["alg"], "es256");
    let old = device(&["sign", key1.to_str().unwrap(), &id1, "alice"]);
    let (_, v) = post(&mut svc, "/v1/tokens/customer-signed:verify", check(old)).await;
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("revoked or replaced"),
        "{v}"
    );
    let new = device(&["sign", key2.to_str().unwrap(), &id2, "alice"]);
    assert_eq!(
        post(&mut svc, "/v1/tokens/customer-signed:verify", check(new))
            .await
            .1["valid"],
        true
    );
    // A token signed by one key but naming the other device is refused (its alg does not fit).
    let crossed = device(&["sign", key1.to_str().unwrap(), &id2, "alice"]);
    let (_, v) = post(
        &mut svc,
        "/v1/tokens/customer-signed:verify",
        check(crossed),
    )
    .await;
    assert_eq!(v["valid"], false);
    assert!(v["reason"].as_str().unwrap().contains("algorithm"), "{v}");

    let (s, _) = post(
        &mut officer,
        &format!("/v1/devices/{id2}:revoke"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    let after = device(&["sign", key2.to_str().unwrap(), &id2, "alice"]);
    assert_eq!(
        post(&mut svc, "/v1/tokens/customer-signed:verify", check(after))
            .await
            .1["valid"],
        false
    );

    // Malformed tokens and keys are clear 400s; the service may not register devices.
    for bad in ["", "TKD1:", "TKD1:!!", "XXXX:123"] {
        assert_error(
            &post(
                &mut svc,
                "/v1/tokens/customer-signed:verify",
                check(bad.into()),
            )
            .await,
            400,
            "invalid_argument",
        );
    }
    assert_error(
        &post(
            &mut officer,
            "/v1/devices",
            json!({"realm": realm, "subject": "bob", "public_key_pem": "junk"}),
        )
        .await,
        400,
        "invalid_argument",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/devices",
            json!({"realm": realm, "subject": "bob", "public_key_pem": pem1}),
        )
        .await,
        403,
        "permission_denied",
    );
}

#[tokio::test]
async fn challenges_answer_once_within_their_window() {
    let env = Env::new();
    let d = env.start();
    let card_key = [0x44u8; 32];
    import_known(&d, "stores/1212/cards/card-7", "hmac-sha256", &card_key).await;
    let mut svc = d.conn("service").await;
    let issue = |ttl: Option<u64>| json!({"key": "stores/1212/cards/card-7", "subject": "card-7", "ttl": ttl});
    let respond = |c: &Value, key: &[u8]| {
        let challenge = unb64(c["challenge"].as_str().unwrap());
        let msg = tillkey::retail::challenge::challenge_message(&challenge, "card-7");
        json!({"response": b64(ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &msg).as_ref())})
    };
    let (s, c) = post(&mut svc, "/v1/challenges", issue(None)).await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(unb64(c["challenge"].as_str().unwrap()).len(), 32);
    let path = format!("/v1/challenges/{}:verify", c["id"].as_str().unwrap());
    let (_, v) = post(&mut svc, &path, respond(&c, &[0x45; 32])).await;
    assert_eq!(v["reason"], "the response does not match");
    let (_, v) = post(&mut svc, &path, respond(&c, &card_key)).await;
    assert_eq!(v["valid"], true, "{v}");
    let (_, v) = post(&mut svc, &path, respond(&c, &card_key)).await;
    assert_eq!(v["reason"], "already used");

    let (_, c2) = post(&mut svc, "/v1/challenges", issue(Some(1))).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, v) = post(
        &mut svc,
        &format!("/v1/challenges/{}:verify", c2["id"].as_str().unwrap()),
        respond(&c2, &card_key),
    )
    .await;
    assert_eq!(v["reason"], "expired");

    let (_, c3) = post(&mut svc, "/v1/challenges", issue(Some(30))).await;
    let path3 = format!("/v1/challenges/{}:verify", c3["id"].as_str().unwrap());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, path, body) = (d.client("service"), path3.clone(), respond(&c3, &card_key));
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.unwrap();
            post(&mut c, &path, body).await.1["valid"] == true
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
    assert_error(
        &post(
            &mut svc,
            &format!("/v1/challenges/{}:verify", "ab".repeat(16)),
            respond(&c3, &card_key),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &post(
            &mut svc,
            "/v1/challenges/zz:verify",
            json!({"response": "AA=="}),
        )
        .await,
        400,
        "invalid_argument",
    );
}

#[tokio::test]
async fn sealed_messages_refuse_replayed_and_older_counters() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1212/atm/dispense", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let mut sealed = Vec::new();
    for i in 1..=3 {
        let (s, m) = post(
            &mut svc,
            "/v1/keys/stores/1212/atm/dispense:seal",
            json!({"sender": "atm-7", "plaintext": b64(format!("dispense {i}").as_bytes())}),
        )
        .await;
        assert_eq!((s, m["counter"].clone()), (200, json!(i)), "{m}");
        sealed.push(m);
    }
    let open = |m: &Value, counter: i64| json!({"sender": "atm-7", "counter": counter, "ciphertext": m["ciphertext"]});
    let (s, o) = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:open",
        open(&sealed[0], 1),
    )
    .await;
    assert_eq!(
        (s, o["plaintext"].as_str()),
        (200, Some(b64(b"dispense 1").as_str()))
    );
    let (s, _) = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:open",
        open(&sealed[2], 3),
    )
    .await;
    assert_eq!(s, 200);
    let r = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:open",
        open(&sealed[1], 2),
    )
    .await;
    assert_error(&r, 409, "failed_precondition");
    let r = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:open",
        open(&sealed[2], 3),
    )
    .await;
    assert_error(&r, 409, "failed_precondition");
    // The counter is authenticated: claiming a newer one for an old message fails decryption.
    let r = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:open",
        open(&sealed[1], 4),
    )
    .await;
    assert_error(&r, 400, "invalid_argument");
    // Another sender has its own counter.
    let (_, m) = post(
        &mut svc,
        "/v1/keys/stores/1212/atm/dispense:seal",
        json!({"sender": "atm-8", "plaintext": "aGk="}),
    )
    .await;
    assert_eq!(m["counter"], 1);
}

on_each_backend! {
    async fn gift_codes_store_no_secret_forgive_typing_lock_and_reissue(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/1212/giftcodes/pepper", "hmac-sha256").await;
        let mut svc = d.conn("service").await;
        let mut officer = d.conn("officer").await;
        let key = "stores/1212/giftcodes/pepper";
        let (s, g) = post(
            &mut svc,
            "/v1/giftcodes:issue",
            json!({"key": key, "pin": true}),
        )
        .await;
        assert_eq!(s, 201, "{g}");
        let code = g["code"].as_str().unwrap().to_owned();
        let pin = g["pin"].as_str().unwrap().to_owned();
        assert_eq!((code.len(), pin.len()), (19, 6));
        assert!(
            code.split('-').all(|p| p.len() == 4
                && p.bytes()
                    .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))),
            "{code}"
        );
        let check = |code: &str, pin: Option<&str>| json!({"key": key, "code": code, "pin": pin});
        let invalid = json!({"valid": false, "reason": "invalid"});

        let (_, v) = post(&mut svc, "/v1/giftcodes:check", check(&code, Some(&pin))).await;
        assert_eq!(
            (v["valid"].clone(), v["id"].clone()),
            (json!(true), g["id"].clone())
        );
        // What people type: lower case, no hyphens, l/I for 1 and o for 0.
        let typed = code
            .replace('-', " ")
            .to_lowercase()
            .replace('1', "l")
            .replace('0', "o");
        assert_eq!(
            post(&mut svc, "/v1/giftcodes:check", check(&typed, Some(&pin)))
                .await
                .1["valid"],
            true
        );
        // The store holds only HMACs: neither the code nor the PIN is in the database file.
        let db = std::fs::read(env.path("registry.db")).unwrap();
        let wal = std::fs::read(env.path("registry.db-wal")).unwrap_or_default();
        for secret in [code.replace('-', ""), pin.clone()] {
            let hay = [&db[..], &wal[..]].concat();
            assert!(
                !hay.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} stored in the clear"
            );
        }

        // Wrong PINs lock the code after 5; then even the right PIN gets the same "invalid".
        for _ in 0..5 {
            assert_eq!(
                post(
                    &mut svc,
                    "/v1/giftcodes:check",
                    check(&code, Some("000000"))
                )
                .await
                .1,
                invalid
            );
        }
        assert_eq!(
            post(&mut svc, "/v1/giftcodes:check", check(&code, Some(&pin)))
                .await
                .1,
            invalid
        );
        let id = g["id"].as_str().unwrap();
        assert_error(
            &post(&mut svc, &format!("/v1/giftcodes/{id}:unlock"), json!({})).await,
            403,
            "permission_denied",
        );
        let (s, _) = post(
            &mut officer,
            &format!("/v1/giftcodes/{id}:unlock"),
            json!({}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            post(&mut svc, "/v1/giftcodes:check", check(&code, Some(&pin)))
                .await
                .1["valid"],
            true
        );

        // After a partial redemption: a new code; the old one stops at once.
        let (s, re) = post(&mut svc, &format!("/v1/giftcodes/{id}:reissue"), json!({})).await;
        assert_eq!(s, 200, "{re}");
        assert_eq!(
            post(&mut svc, "/v1/giftcodes:check", check(&code, Some(&pin)))
                .await
                .1,
            invalid
        );
        let new_code = re["code"].as_str().unwrap();
        let new_pin = re["pin"].as_str().unwrap();
        assert_eq!(
            post(
                &mut svc,
                "/v1/giftcodes:check",
                check(new_code, Some(new_pin))
            )
            .await
            .1["valid"],
            true
        );
        assert_error(
            &post(&mut svc, &format!("/v1/giftcodes/{id}:reissue"), json!({})).await,
            409,
            "failed_precondition",
        );
        let new_id = re["id"].as_str().unwrap();
        post(
            &mut officer,
            &format!("/v1/giftcodes/{new_id}:revoke"),
            json!({}),
        )
        .await;
        assert_eq!(
            post(
                &mut svc,
                "/v1/giftcodes:check",
                check(new_code, Some(new_pin))
            )
            .await
            .1,
            invalid
        );
        // Unknown and malformed codes: the same answer.
        for bad in ["AAAA-BBBB-CCCC-DDDD", "short", "UUUU-UUUU-UUUU-UUUU", ""] {
            assert_eq!(
                post(&mut svc, "/v1/giftcodes:check", check(bad, None))
                    .await
                    .1,
                invalid,
                "{bad}"
            );
        }
    }
}

#[tokio::test]
async fn gift_code_checks_are_throttled_per_client() {
    let env = Env::new();
    let d = env.start();
    let mut stranger = d.conn("stranger").await;
    let mut limited = 0;
    for _ in 0..40 {
        let (s, v) = post(
            &mut stranger,
            "/v1/giftcodes:check",
            json!({"key": "stores/1/giftcodes/pepper", "code": "AAAA-BBBB-CCCC-DDDD"}),
        )
        .await;
        match s {
            429 => {
                assert_eq!(v["error"]["code"], "rate_limited");
                limited += 1;
            }
            403 => {}
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(
        limited >= 15,
        "only {limited} of 40 rapid checks were throttled"
    );
    // Another identity is not affected.
    create(&d, "stores/1/giftcodes/pepper", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let (s, _) = post(
        &mut svc,
        "/v1/giftcodes:check",
        json!({"key": "stores/1/giftcodes/pepper", "code": "AAAA-BBBB-CCCC-DDDD"}),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn clock_window_and_pin_attempts_follow_the_configuration() {
    let env = Env::new();
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();
    write(
        &env.path("tillkeyd.toml"),
        format!("{config}\n[tokens]\nclock_window = \"5s\"\ngiftcode_pin_attempts = 2\n"),
    );
    let d = env.start();
    create(&d, "stores/1212/giftcodes/pepper", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let key = "stores/1212/giftcodes/pepper";
    let (_, g) = post(
        &mut svc,
        "/v1/giftcodes:issue",
        json!({"key": key, "pin": true}),
    )
    .await;
    let (code, pin) = (g["code"].as_str().unwrap(), g["pin"].as_str().unwrap());
    for _ in 0..2 {
        post(
            &mut svc,
            "/v1/giftcodes:check",
            json!({"key": key, "code": code, "pin": "000000"}),
        )
        .await;
    }
    let (_, v) = post(
        &mut svc,
        "/v1/giftcodes:check",
        json!({"key": key, "code": code, "pin": pin}),
    )
    .await;
    assert_eq!(v["valid"], false, "locked after 2 wrong PINs");

    let work = tempfile::tempdir().unwrap();
    let phone = work.path().join("phone.pem");
    let pem = device(&["keygen", "ed25519", phone.to_str().unwrap()]);
    let mut officer = d.conn("officer").await;
    let (_, reg) = post(
        &mut officer,
        "/v1/devices",
        json!({"realm": "stores/1212/devices", "subject": "al", "public_key_pem": pem}),
    )
    .await;
    let id = reg["device_id"].as_str().unwrap().to_owned();
    // 20 s old: inside the default 30 s window, outside the configured 5 s.
    let t = device(&["sign", phone.to_str().unwrap(), &id, "al", "-20"]);
    let (_, v) = post(
        &mut svc,
        "/v1/tokens/customer-signed:verify",
        json!({"realm": "stores/1212/devices", "token": t}),
    )
    .await;
    assert!(
        v["reason"].as_str().unwrap_or("").contains("clock window"),
        "{v}"
    );
    let t = device(&["sign", phone.to_str().unwrap(), &id, "al", "-2"]);
    let (_, v) = post(
        &mut svc,
        "/v1/tokens/customer-signed:verify",
        json!({"realm": "stores/1212/devices", "token": t}),
    )
    .await;
    assert_eq!(v["valid"], true, "{v}");
}

/// PIN attempts are claimed in the database before a PIN is compared: of ten checks of a
/// fresh code at the same moment, exactly `giftcode_pin_attempts` wrong PINs are compared, the
/// code locks with that count and stays locked, even for the right PIN sent among them; a
/// right PIN that wins an attempt starts the count again, but never unlocks a locked code.
#[tokio::test]
async fn pin_attempts_hold_when_checks_of_one_code_arrive_at_once() {
    const LIMIT: usize = 3;
    let env = Env::new();
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();
    write(
        &env.path("tillkeyd.toml"),
        format!("{config}\n[tokens]\ngiftcode_pin_attempts = {LIMIT}\n"),
    );
    let d = env.start();
    let key = "stores/1212/giftcodes/pepper";
    create(&d, key, "hmac-sha256").await;
    let client = d.client("service");
    let db = env.path("registry.db");
    let row = |id: &str| {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg(format!(
                "SELECT state || ':' || failed_pins FROM giftcodes WHERE id = '{id}'"
            ))
            .output()
            .expect("sqlite3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let compared = |id: &str| {
        d.logs()
            .iter()
            .filter(|l| l.contains("wrong gift-code PIN") && l.contains(id))
            .count()
    };
    // Ten checks at once, the right PIN (if any) at `right`; the answers in order.
    let burst = |code: String, pin: String, right: Option<usize>| {
        let client = client.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..10 {
                let pin = if Some(i) == right {
                    pin.clone()
                } else {
                    "000000".into()
                };
                let body = json!({"key": key, "code": code, "pin": pin});
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = client.connect().await.expect("connect");
                    let (s, v) = post(&mut c, "/v1/giftcodes:check", body).await;
                    assert_eq!(s, 200, "{v}");
                    v["valid"] == true
                }));
            }
            let mut valid = Vec::new();
            for t in tasks {
                valid.push(t.await.expect("check"));
            }
            valid
        }
    };
    let mut svc = d.conn("service").await;
    let issue = || async {
        let (s, g) = post(
            &mut client.connect().await.expect("connect"),
            "/v1/giftcodes:issue",
            json!({"key": key, "pin": true}),
        )
        .await;
        assert_eq!(s, 201, "{g}");
        let field = |f: &str| g[f].as_str().expect("field").to_owned();
        (field("id"), field("code"), field("pin"))
    };

    // Only wrong PINs: exactly LIMIT are compared, and the code locks with that count.
    let (id, code, pin) = issue().await;
    let valid = burst(code.clone(), pin.clone(), None).await;
    assert!(valid.iter().all(|v| !v));
    assert_eq!(compared(&id), LIMIT);
    assert_eq!(row(&id), format!("locked:{LIMIT}"));
    let (_, v) = post(
        &mut svc,
        "/v1/giftcodes:check",
        json!({"key": key, "code": code, "pin": pin}),
    )
    .await;
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(row(&id), format!("locked:{LIMIT}"));

    // The right PIN among wrong ones: never more than LIMIT compared before it or after a
    // lock, and a locked code keeps its count (the defect: locked with its count reset to 0).
    for right in [0, 3, 6, 9] {
        tokio::time::sleep(Duration::from_secs(2)).await; // the per-client throttle refills
        let (id, code, pin) = issue().await;
        let valid = burst(code, pin, Some(right)).await;
        let state = row(&id);
        let wrong = compared(&id);
        if valid[right] {
            // Its attempt came within the first LIMIT; the count restarted with it.
            assert!(wrong <= 2 * LIMIT, "{wrong} wrong PINs compared");
        } else {
            // Either it found every attempt taken, or it held one of them and the wrong ones
            // locked the code before it could restart the count: locked either way.
            assert!(wrong == LIMIT || wrong == LIMIT - 1, "{wrong}: {state}");
            assert_eq!(state, format!("locked:{LIMIT}"));
        }
        assert!(
            !state.starts_with("locked") || state == format!("locked:{LIMIT}"),
            "{state}"
        );
        assert!(valid.iter().enumerate().all(|(i, v)| !v || i == right));
    }
}
