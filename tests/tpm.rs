//! What only the TPM backend has to show: refusals for what a TPM cannot do, recovery from a
//! swtpm restart while clients sign, and keys that outlive both tillkeyd and the TPM's power.
//! (Everything both backends do alike runs on both through `on_each_backend!` elsewhere.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn key_types_and_operations_a_tpm_cannot_do_are_refused_by_name() {
    let env = Env::on(Backend::Tpm);
    let d = env.start();
    let mut officer = d.conn("officer").await;
    for t in ["aes256-gcm", "ed25519", "aes256-kw"] {
        let r = post(
            &mut officer,
            "/v1/keys",
            json!({"name": format!("stores/1/{t}"), "type": t}),
        )
        .await;
        assert_error(&r, 422, "unsupported_operation");
        let msg = r.1["error"]["message"].as_str().unwrap();
        assert!(msg.contains("tpm") && msg.contains(t), "{msg}");
    }
    // Keys are bound to the TPM: none can be made exportable.
    let r = post(
        &mut officer,
        "/v1/keys",
        json!({"name": "stores/1/terminal-mac", "type": "hmac-sha256", "exportable": true}),
    )
    .await;
    assert_error(&r, 422, "unsupported_operation");
    assert!(r.1["error"]["message"].as_str().unwrap().contains("tpm"));
    // BYOK: there is no wrapping key, and an import that gets as far as approval is refused.
    let r = get(&mut officer, "/v1/wrapping-key").await;
    assert_error(&r, 422, "unsupported_operation");
    assert!(r.1["error"]["message"].as_str().unwrap().contains("tpm"));
    let body = json!({"name": "stores/1/imported", "type": "hmac-sha256",
        "encrypted_kek": b64(&[1u8; 384]), "wrapped_key": b64(&[2u8; 40])});
    // Refused when asked, before a second officer spends an approval on it.
    let r = post(&mut officer, "/v1/keys:import", body).await;
    assert_error(&r, 422, "unsupported_operation");
    assert!(r.1["error"]["message"].as_str().unwrap().contains("tpm"));
    let (_, pending) = get(&mut officer, "/v1/approvals").await;
    assert_eq!(
        pending["approvals"].as_array().map(Vec::len),
        Some(0),
        "{pending}"
    );
    let r = get(&mut officer, "/v1/keys/stores/1/imported").await;
    assert_error(&r, 404, "not_found");
    // None of that hurt the daemon.
    assert_eq!(d.admin_get("/readyz").0, 200);
    let created = create(&d, "stores/1/mac", "hmac-sha256").await;
    assert_eq!(created["versions"][0]["kcv"].as_str().unwrap().len(), 6);
    // An audit entry far longer than one TPM2_HMAC command takes is still sealed: seals MAC the
    // entry's digest, not the entry.
    // (The longest name and the longest reason the API accepts, escaped where JSON must.)
    let long = format!("stores/{}/{}", "a".repeat(60), "b".repeat(60));
    create(&d, &long, "hmac-sha256").await;
    let reason = "\"".repeat(500);
    let r = post(
        &mut officer,
        &format!("/v1/keys/{long}:revoke"),
        json!({"version": 1, "reason": reason}),
    )
    .await;
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(d.admin_get("/readyz").0, 200);
}

/// Sign continuously from several clients while the TPM dies and comes back: every answer is a
/// good signature or a clean 503, readiness follows the TPM, and signing resumes (with the same
/// keys) without restarting tillkeyd.
#[tokio::test]
async fn a_swtpm_restart_mid_signing_fails_cleanly_then_recovers() {
    let env = Env::on(Backend::Tpm);
    let d = env.start();
    let pid = d.pid();
    create(&d, "stores/2/mac", "hmac-sha256").await;
    create(&d, "stores/2/ec", "ecdsa-p256").await;
    let mut svc = d.conn("service").await;
    let msg = b64(b"purchase 7");
    let (_, before) = post(
        &mut svc,
        "/v1/keys/stores/2/mac:sign",
        json!({"message": msg}),
    )
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (client, stop) = (d.client("service"), stop.clone());
        let key = if i % 2 == 0 {
            "stores/2/mac"
        } else {
            "stores/2/ec"
        };
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.unwrap();
            let (mut ok, mut unavailable) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, v) = c
                    .call(
                        Method::POST,
                        &format!("/v1/keys/{key}:sign"),
                        Some(&json!({"message": b64(b"x")})),
                    )
                    .await
                    .unwrap();
                match s.as_u16() {
                    200 => ok += 1,
                    503 => {
                        assert_eq!(v["error"]["code"], "unavailable", "{v}");
                        unavailable += 1;
                    }
                    other => panic!("{key}: {other} {v}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, unavailable)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.swtpm_kill();
    let not_ready = || d.admin_get("/readyz").0 == 503;
    d.wait_for("readiness to drop", Duration::from_secs(10), not_ready);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.swtpm_start();
    d.wait_for("readiness to return", Duration::from_secs(20), || {
        d.admin_get("/readyz").0 == 200
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut unavailable) = (0, 0);
    for t in tasks {
        let (o, u) = t.await.unwrap();
        ok += o;
        unavailable += u;
    }
    assert!(unavailable > 0, "nothing saw the TPM gone");
    assert!(ok > 0);

    // Same daemon, same key: the tag over the same message is the same as before.
    assert_eq!(d.pid(), pid);
    let mut svc = d.conn("service").await;
    let (s, after) = post(
        &mut svc,
        "/v1/keys/stores/2/mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["signature"], before["signature"]);
    let (s, _) = post(
        &mut svc,
        "/v1/keys/stores/2/ec:sign",
        json!({"message": msg}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, metrics) = d.admin_get("/metrics");
    assert!(metrics.contains("tillkey_backend_ready 1"), "{metrics}");
}

/// Once a command fails on the way to the TPM, ESAPI refuses every later call on that context
/// (`TSS2_ESYS_RC_BAD_SEQUENCE`), even after the TPM is back: the context has to be rebuilt.
/// With one context this is forced every time: to load `b` the context first flushes the key it
/// holds, that flush is the first command to meet the dead swtpm, and its failure is not
/// reported (a flush is best effort), so the next call meets the refusal instead of a transport
/// error. The race in the test above hits the same path now and then.
#[tokio::test]
async fn a_context_the_tss_gave_up_on_is_rebuilt_not_reused() {
    let env = Env::on(Backend::Tpm);
    env.configure("backend", "contexts = 1");
    let d = env.start();
    create(&d, "stores/3/a", "hmac-sha256").await;
    create(&d, "stores/3/b", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let msg = json!({"message": b64(b"purchase 9")});
    let (s, before) = post(&mut svc, "/v1/keys/stores/3/a:sign", msg.clone()).await;
    assert_eq!(s, 200, "{before}");

    env.swtpm_kill();
    let r = post(&mut svc, "/v1/keys/stores/3/b:sign", msg.clone()).await;
    assert_error(&r, 503, "unavailable");
    env.swtpm_start();
    d.wait_for("readiness to return", Duration::from_secs(20), || {
        d.admin_get("/readyz").0 == 200
    });

    let mut svc = d.conn("service").await;
    let (s, after) = post(&mut svc, "/v1/keys/stores/3/a:sign", msg.clone()).await;
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["signature"], before["signature"]);
    let (s, v) = post(&mut svc, "/v1/keys/stores/3/b:sign", msg).await;
    assert_eq!(s, 200, "{v}");
    let (code, report) = env.audit_verify();
    assert_eq!(code, Some(0), "{report}");
}

#[tokio::test]
async fn keys_survive_a_tillkeyd_restart_and_a_swtpm_restart() {
    let env = Env::on(Backend::Tpm);
    let d = env.start();
    create(&d, "stores/3/mac", "hmac-sha256").await;
    let ec = create(&d, "stores/3/ec", "ecdsa-p256").await;
    let mut svc = d.conn("service").await;
    let msg = b64(b"before both restarts");
    let (_, tag) = post(
        &mut svc,
        "/v1/keys/stores/3/mac:sign",
        json!({"message": msg}),
    )
    .await;
    let (_, sig) = post(
        &mut svc,
        "/v1/keys/stores/3/ec:sign",
        json!({"message": msg}),
    )
    .await;
    drop(svc);
    assert!(d.stop().success());
    env.swtpm_kill();
    env.swtpm_start();

    let d = env.start();
    let mut svc = d.conn("service").await;
    let (_, again) = post(
        &mut svc,
        "/v1/keys/stores/3/mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_eq!(again["signature"], tag["signature"]);
    let (_, v) = post(
        &mut svc,
        "/v1/keys/stores/3/ec:verify",
        json!({"message": msg, "signature": sig["signature"]}),
    )
    .await;
    assert_eq!(v["valid"], true);
    let (s, new_sig) = post(
        &mut svc,
        "/v1/keys/stores/3/ec:sign",
        json!({"message": msg}),
    )
    .await;
    assert_eq!(s, 200, "{new_sig}");
    let (_, k) = get(&mut svc, "/v1/keys/stores/3/ec").await;
    assert_eq!(
        k["versions"][0]["public_key_pem"],
        ec["versions"][0]["public_key_pem"]
    );
    drop(svc);
    assert!(d.stop().success());

    // The audit trail, MACed under a TPM key before and after, still verifies.
    let (code, text) = env.audit_verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("audit trail intact"), "{text}");
}

/// Transient objects the TPM holds, as `tpm2_getcap` (tpm2-tools) lists them.
fn loaded_objects(env: &Env) -> usize {
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();
    let tcti = config
        .lines()
        .find_map(|l| l.strip_prefix("tcti = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let out = Command::new("tpm2_getcap")
        .arg("handles-transient")
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .expect("tpm2_getcap (package tpm2-tools)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("- 0x"))
        .count()
}

/// swtpm has no resource manager: at most one key per context stays loaded while in use, idle
/// keys are unloaded, and a stopped daemon leaves nothing behind.
#[tokio::test]
async fn the_tpm_holds_few_objects_and_none_after_a_stop() {
    let env = Env::on(Backend::Tpm);
    let d = env.start();
    let mut svc = d.conn("service").await;
    for i in 0..4 {
        let name = format!("stores/4/pos/{i}/mac");
        create(&d, &name, "hmac-sha256").await;
        let (s, _) = post(
            &mut svc,
            &format!("/v1/keys/{name}:sign"),
            json!({"message": b64(b"m")}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let busy = loaded_objects(&env);
    assert!((1..=2).contains(&busy), "{busy} objects loaded");
    d.wait_for("idle keys to be unloaded", Duration::from_secs(5), || {
        loaded_objects(&env) == 0
    });
    let (s, _) = post(
        &mut svc,
        "/v1/keys/stores/4/pos/0/mac:sign",
        json!({"message": b64(b"m")}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(loaded_objects(&env) >= 1);
    drop(svc);
    assert!(d.stop().success());
    assert_eq!(loaded_objects(&env), 0, "the daemon left objects loaded");
}

/// `tillkey provision init` on a TPM: nothing to initialise (no labels, no SO PIN), the
/// daemon's service keys are made before its first start, BYOK is reported unavailable, the
/// daemon then runs on those keys, and the tool leaves nothing loaded in the TPM.
#[tokio::test]
async fn provision_init_prepares_a_tpm_before_the_first_start() {
    let env = Env::on(Backend::Tpm);
    let init = |extra: &[&str]| {
        Command::new(TILLKEY)
            .args(["provision", "init", "--config"])
            .arg(env.path("tillkeyd.toml"))
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = init(&["--so-pin-file", "/dev/null"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("a TPM has no SO PIN"));
    let out = init(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["device"]["tpm"]
        .as_str()
        .is_some_and(|t| t.starts_with("swtpm:")));
    assert_eq!(report["service_keys"][0]["name"], "tillkey/audit");
    let kcv = report["service_keys"][0]["kcv"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(kcv.len(), 6);
    assert!(report["import_wrapping_key"]["unavailable"]
        .as_str()
        .is_some_and(|m| m.contains("tpm")));
    assert_eq!(
        loaded_objects(&env),
        0,
        "provision init left objects loaded"
    );

    // The daemon runs on the keys init made (no second audit key), and its trail, sealed
    // under that key, verifies.
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    assert!(d.stop().success());
    let versions = Command::new("sqlite3")
        .arg(env.path("registry.db"))
        .arg("SELECT COUNT(*) FROM key_versions WHERE name = 'tillkey/audit'")
        .output()
        .expect("sqlite3");
    assert_eq!(String::from_utf8_lossy(&versions.stdout).trim(), "1");
    let (code, text) = env.audit_verify();
    assert_eq!(code, Some(0), "{text}");
}

/// Every TPM command waits for the TPM, so none may run on an async worker: the service reaches
/// the backend only through its device gate, which keeps such calls on its own threads. In test
/// builds the backend refuses a call made on an async worker (and logs it), so any token flow
/// that bypassed the gate would fail here: POS request and paid tokens (HMAC seal and verify),
/// one-time customer tokens and gift codes (keyed indexes), challenges (verify), key creation,
/// rotation (generate, check value), the signed status list and plain sign and verify.
#[tokio::test]
async fn no_tpm_command_runs_on_an_async_worker() {
    let env = Env::on(Backend::Tpm);
    let d = env.start();
    for k in [
        "stores/1212/pos/0001/qr-request",
        "stores/1212/pos/0001/qr-paid",
        "stores/1212/customers/otp",
        "stores/1212/giftcodes/pepper",
        "stores/1212/cards/card-7",
    ] {
        create(&d, k, "hmac-sha256").await;
    }
    let mut svc = d.conn("service").await;
    let mut officer = d.conn("officer").await;
    let ok = |r: &(u16, serde_json::Value), what: &str| {
        assert!(r.0 < 300, "{what}: {} {}", r.0, r.1);
    };

    let req = post(
        &mut svc,
        "/v1/tokens/pos-request:issue",
        json!({"store_id": "1212", "pos_id": "0001", "purchase_id": "P-1", "amount": 1250,
               "currency": "EUR", "description": "2 coffees"}),
    )
    .await;
    ok(&req, "pos-request:issue");
    let token = req.1["token"].as_str().unwrap().to_owned();
    let checked = post(
        &mut svc,
        "/v1/tokens/pos-request:verify",
        json!({"token": token}),
    )
    .await;
    assert_eq!(checked.1["valid"], true, "{}", checked.1);
    let paid = post(
        &mut svc,
        "/v1/tokens/pos-paid:issue",
        json!({"request_token": token, "payment_ref": "PSP-1"}),
    )
    .await;
    ok(&paid, "pos-paid:issue");
    let paid_token = paid.1["token"].as_str().unwrap().to_owned();
    let checked = post(
        &mut svc,
        "/v1/tokens/pos-paid:verify",
        json!({"token": paid_token}),
    )
    .await;
    assert_eq!(checked.1["valid"], true, "{}", checked.1);

    let otp = post(
        &mut svc,
        "/v1/tokens/customer-otp:issue",
        json!({"key": "stores/1212/customers/otp", "subject": "customer-1"}),
    )
    .await;
    ok(&otp, "customer-otp:issue");
    let redeemed = post(
        &mut svc,
        "/v1/tokens/customer-otp:redeem",
        json!({"key": "stores/1212/customers/otp", "token": otp.1["token"]}),
    )
    .await;
    assert_eq!(redeemed.1["redeemed"], true, "{}", redeemed.1);

    let key = "stores/1212/giftcodes/pepper";
    let g = post(
        &mut svc,
        "/v1/giftcodes:issue",
        json!({"key": key, "pin": true}),
    )
    .await;
    ok(&g, "giftcodes:issue");
    let check = json!({"key": key, "code": g.1["code"], "pin": g.1["pin"]});
    let checked = post(&mut svc, "/v1/giftcodes:check", check).await;
    assert_eq!(checked.1["valid"], true, "{}", checked.1);

    let c = post(
        &mut svc,
        "/v1/challenges",
        json!({"key": "stores/1212/cards/card-7", "subject": "card-7"}),
    )
    .await;
    ok(&c, "challenges");
    // The card's key never left the TPM, so no answer can match; the check still runs there.
    let answer = post(
        &mut svc,
        &format!("/v1/challenges/{}:verify", c.1["id"].as_str().unwrap()),
        json!({"response": b64(&[0u8; 32])}),
    )
    .await;
    assert_eq!(
        answer.1["reason"], "the response does not match",
        "{}",
        answer.1
    );

    let name = "stores/1212/pos/0001/qr-paid";
    let signed = post(
        &mut svc,
        &format!("/v1/keys/{name}:sign"),
        json!({"message": b64(b"m")}),
    )
    .await;
    ok(&signed, "sign");
    let verified = post(
        &mut svc,
        &format!("/v1/keys/{name}:verify"),
        json!({"message": b64(b"m"), "signature": signed.1["signature"]}),
    )
    .await;
    assert_eq!(verified.1["valid"], true, "{}", verified.1);
    ok(
        &post(&mut officer, &format!("/v1/keys/{name}:rotate"), json!({})).await,
        "rotate",
    );
    ok(&get(&mut svc, "/v1/status-list").await, "status-list");

    let on_worker: Vec<String> = d
        .logs()
        .into_iter()
        .filter(|l| l.contains("async worker"))
        .collect();
    assert!(on_worker.is_empty(), "{on_worker:#?}");
}
