//! What the token itself holds, checked with standard tools (pkcs11-tool, OpenSSL), and recovery
//! when the token goes away and comes back under a running daemon.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn generated_keys_are_sensitive_never_extractable_and_labelled() {
    let env = Env::new();
    let d = env.start();
    for t in ["hmac-sha256", "ecdsa-p256", "ed25519", "aes256-gcm"] {
        create(&d, &format!("stores/1/{t}"), t).await;
    }
    let (ok, listing) = pkcs11_tool(&env, &["--list-objects"]);
    assert!(ok, "{listing}");
    // One block per object; every private and secret key is locked down and labelled.
    let mut blocks: Vec<String> = Vec::new();
    for line in listing.lines() {
        if line.contains("Object;") {
            blocks.push(String::new());
        }
        if let Some(last) = blocks.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    let secret: Vec<&String> = blocks
        .iter()
        .filter(|b| b.starts_with("Secret Key Object") || b.starts_with("Private Key Object"))
        // The daemon's own keys (audit, status feed) are checked the same way, counted apart.
        .filter(|b| !b.contains("tillkey:tillkey/"))
        .collect();
    assert_eq!(secret.len(), 4, "{listing}");
    for service_key in ["tillkey:tillkey/audit#1", "tillkey:tillkey/status-list#1"] {
        let block = blocks
            .iter()
            .find(|b| b.contains(service_key) && !b.starts_with("Public Key Object"))
            .unwrap_or_else(|| panic!("{service_key} is in the token"));
        assert!(
            block.contains("Access:     sensitive, always sensitive, never extractable, local"),
            "{block}"
        );
    }
    for b in &secret {
        assert!(
            b.contains("Access:     sensitive, always sensitive, never extractable, local"),
            "{b}"
        );
        assert!(b.contains("label:      tillkey:stores/1/"), "{b}");
        assert!(b.contains("ID:"), "{b}");
    }
    let publics = blocks
        .iter()
        .filter(|b| b.starts_with("Public Key Object") && !b.contains("tillkey:tillkey/"))
        .count();
    assert_eq!(publics, 2, "{listing}");
    for b in blocks.iter().filter(|b| b.starts_with("Public Key Object")) {
        assert!(
            b.contains("Usage:      verify\n"),
            "public keys only verify: {b}"
        );
    }

    // The secret value cannot be read out, even by the logged-in user.
    let hmac_block = secret
        .iter()
        .find(|b| b.contains("#1") && b.contains("hmac-sha256"))
        .unwrap();
    let id = hmac_block
        .lines()
        .find_map(|l| l.trim().strip_prefix("ID:"))
        .unwrap()
        .trim();
    let (ok, out) = pkcs11_tool(&env, &["--read-object", "--type", "secrkey", "--id", id]);
    assert!(!ok, "the secret key value was readable: {out}");
}

on_each_backend! {
    async fn openssl_verifies_signatures_against_the_published_public_keys(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut svc = d.conn("service").await;
        let work = tempfile::tempdir().unwrap();
        let msg = b"paid: purchase 0007, 4.20 EUR".to_vec();
        let msg_path = work.path().join("msg");
        write(&msg_path, &msg);
        let other_path = work.path().join("other");
        write(&other_path, b"paid: purchase 0007, 400.20 EUR");

        for &t in backend.signing_types().iter().filter(|t| **t != "hmac-sha256") {
            let name = format!("stores/1/{t}");
            let created = create(&d, &name, t).await;
            let pem = created["versions"][0]["public_key_pem"].as_str().unwrap();
            let pub_path = work.path().join(format!("{t}.pem"));
            write(&pub_path, pem);
            let (_, signed) = post(
                &mut svc,
                &format!("/v1/keys/{name}:sign"),
                json!({"message": b64(&msg)}),
            )
            .await;
            let sig_path = work.path().join(format!("{t}.sig"));
            write(&sig_path, unb64(signed["signature"].as_str().unwrap()));

            let verify = |m: &std::path::Path| {
                let mut cmd = Command::new("openssl");
                if t == "ecdsa-p256" {
                    cmd.args(["dgst", "-sha256", "-verify"])
                        .arg(&pub_path)
                        .arg("-signature")
                        .arg(&sig_path)
                        .arg(m);
                } else {
                    cmd.args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
                        .arg(&pub_path)
                        .arg("-sigfile")
                        .arg(&sig_path)
                        .arg("-in")
                        .arg(m);
                }
                let out = cmd.output().expect("openssl");
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            };
            let (ok, out) = verify(&msg_path);
            assert!(
                ok && out.contains("Verified"),
                "{t}: openssl refused: {out}"
            );
            let (ok, _) = verify(&other_path);
            assert!(
                !ok,
                "{t}: openssl accepted a signature over another message"
            );
        }
    }
}

#[tokio::test]
async fn recovers_by_itself_when_the_token_goes_away_and_comes_back() {
    let client_module = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";
    let mut env = Env::with_env(&[("PKCS11_MODULE", client_module)]);
    let proxy = repo().join("softhsm-ci/hsm-proxy");
    let proxy_cmd = |verb: &str| {
        let out = Command::new(&proxy)
            .arg(verb)
            .arg(env.dir.path())
            .output()
            .expect("hsm-proxy");
        assert!(
            out.status.success(),
            "hsm-proxy {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let address = proxy_cmd("start");
    let (k, v) = address.split_once('=').expect("KEY=VALUE");
    env.daemon_env.push((k.to_owned(), v.to_owned()));

    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let client = d.client("service");
    let sign = |m: &'static [u8]| {
        let client = client.clone();
        async move {
            let mut c = client.connect().await.unwrap();
            post(
                &mut c,
                "/v1/keys/stores/1/mac:sign",
                json!({"message": b64(m)}),
            )
            .await
        }
    };
    let sign_batch = || {
        let client = client.clone();
        async move {
            let mut c = client.connect().await.unwrap();
            let batch: Vec<_> = ["one", "before", "three"]
                .iter()
                .map(|m| json!({"message": b64(m.as_bytes())}))
                .collect();
            post(
                &mut c,
                "/v1/keys/stores/1/mac:sign",
                json!({ "batch": batch }),
            )
            .await
        }
    };
    let (s, before) = sign(b"before").await;
    assert_eq!(s, 200, "{before}");
    assert_eq!(d.admin_get("/readyz").0, 200);

    proxy_cmd("stop");
    // Requests fail fast with a clear 503, and readiness goes red. A batch fails whole, never
    // as a 200 whose items hide the outage.
    let started = std::time::Instant::now();
    let r = sign_batch().await;
    assert_error(&r, 503, "unavailable");
    let r = sign(b"during").await;
    assert_error(&r, 503, "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a request hung on the dead token"
    );
    d.wait_for("readiness to go red", Duration::from_secs(10), || {
        d.admin_get("/readyz").0 == 503
    });
    let (_, why) = d.admin_get("/readyz");
    assert!(why.contains("\"ready\":false"), "{why}");
    let r = sign(b"during").await;
    assert_error(&r, 503, "unavailable");

    let _ = proxy_cmd("start");
    d.wait_for("readiness to come back", Duration::from_secs(30), || {
        d.admin_get("/readyz").0 == 200
    });
    let (s, after) = sign(b"before").await;
    assert_eq!(s, 200, "{after}");
    // Same key as before the outage.
    assert_eq!(after["signature"], before["signature"]);
    let (s, batch) = sign_batch().await;
    assert_eq!(s, 200, "{batch}");
    assert_eq!(
        batch["batch"][1]["signature"], before["signature"],
        "{batch}"
    );
    d.wait_for(
        "the reconnect in the log",
        std::time::Duration::from_secs(10),
        || {
            d.logs()
                .iter()
                .any(|l| l.contains("pkcs11 token reconnected"))
        },
    );
    drop(d);
    proxy_cmd("stop");
}
