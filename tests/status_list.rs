//! The signed status feed from the running daemon, verified by an independent COSE stack
//! (Python pycose, `tests/interop/verify_status_list.py`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn pycose_verify(dir: &std::path::Path, cose: &[u8], pem: &str) -> (bool, String) {
    let (cose_path, pem_path) = (dir.join("list.cose"), dir.join("feed.pem"));
    write(&cose_path, cose);
    write(&pem_path, pem);
    let out = Command::new("python3")
        .arg(repo().join("tests/interop/verify_status_list.py"))
        .arg(&cose_path)
        .arg(&pem_path)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

on_each_backend! {
    async fn the_feed_lists_unusable_versions_and_verifies_independently(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut officer = d.conn("officer").await;
        create(&d, "stores/1/pos/1/qr-mac", "hmac-sha256").await;
        create(&d, "stores/1/pos/2/qr-mac", "hmac-sha256").await;
        create(&d, "stores/2/pos/1/qr-mac", "hmac-sha256").await;
        post(
            &mut officer,
            "/v1/keys",
            json!({"name": "stores/1/pos/3/qr-mac", "type": "hmac-sha256", "verify_grace": "1s"}),
        )
        .await;
        post(
            &mut officer,
            "/v1/keys/stores/1/pos/1/qr-mac:revoke",
            json!({"version": 1, "reason": "POS 1 stolen"}),
        )
        .await;
        post(
            &mut officer,
            "/v1/keys/stores/2/pos/1/qr-mac:revoke",
            json!({"reason": "other store"}),
        )
        .await;
        post(
            &mut officer,
            "/v1/keys/stores/1/pos/3/qr-mac:rotate",
            json!({}),
        )
        .await;
        // Wait for the scheduler to retire v1 of pos/3.
        let mut retired = false;
        for _ in 0..60 {
            let (_, k) = get(&mut officer, "/v1/keys/stores/1/pos/3/qr-mac").await;
            if k["versions"][0]["state"] == "retired" {
                retired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(retired);

        let mut svc = d.conn("service").await;
        let (s, feed) = get(&mut svc, "/v1/status-list?prefix=stores/1/").await;
        assert_eq!(s, 200, "{feed}");
        let cose = unb64(feed["cose_sign1"].as_str().unwrap());
        let pem = feed["public_key_pem"].as_str().unwrap();
        let work = tempfile::tempdir().unwrap();
        let (ok, out) = pycose_verify(work.path(), &cose, pem);
        assert!(ok, "pycose refused the feed: {out}");
        let payload: Value = serde_json::from_str(out.lines().last().unwrap()).expect("payload JSON");
        assert_eq!(payload["iss"], "tillkey");
        assert_eq!(payload["prefix"], "stores/1/");
        assert_eq!(payload["seq"], feed["seq"]);
        assert!(payload["exp"].as_i64().unwrap() > payload["iat"].as_i64().unwrap());
        let entries = payload["entries"].as_array().unwrap();
        let find = |kid: &str| entries.iter().find(|e| e["kid"] == kid).cloned();
        let revoked = find("stores/1/pos/1/qr-mac").expect("revoked version listed");
        assert_eq!(
            (
                revoked["v"].clone(),
                revoked["state"].clone(),
                revoked["reason"].clone()
            ),
            (json!(1), json!("revoked"), json!("POS 1 stolen"))
        );
        assert_eq!(
            find("stores/1/pos/3/qr-mac").expect("retired listed")["state"],
            "retired"
        );
        assert!(
            find("stores/1/pos/2/qr-mac").is_none(),
            "active keys are not listed"
        );
        assert!(
            find("stores/2/pos/1/qr-mac").is_none(),
            "outside the prefix"
        );
        assert_eq!(entries.len(), 2, "{payload}");

        // Tampering with any byte of the signed list is caught by the independent verifier.
        let mut tampered = cose.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 0x01;
        let (ok, _) = pycose_verify(work.path(), &tampered, pem);
        assert!(!ok, "a tampered feed verified");

        // Sequence numbers never go backwards, and later revocations appear in later lists.
        post(
            &mut officer,
            "/v1/keys/stores/1/pos/2/qr-mac:revoke",
            json!({"reason": "POS 2 stolen"}),
        )
        .await;
        let (_, feed2) = get(&mut svc, "/v1/status-list?prefix=stores/1/").await;
        assert!(feed2["seq"].as_u64().unwrap() > feed["seq"].as_u64().unwrap());
        let (ok, out) = pycose_verify(
            work.path(),
            &unb64(feed2["cose_sign1"].as_str().unwrap()),
            pem,
        );
        assert!(ok, "{out}");
        assert!(out.contains("POS 2 stolen"));

        // The feed key is pinned: the same key across requests and restarts.
        assert_eq!(feed2["kid"], "tillkey/status-list#1");
        drop((svc, officer));
        assert!(d.stop().success());
        let d = env.start();
        let mut svc = d.conn("service").await;
        let (_, feed3) = get(&mut svc, "/v1/status-list?prefix=stores/1/").await;
        assert_eq!(feed3["public_key_pem"], feed["public_key_pem"]);
        assert!(feed3["seq"].as_u64().unwrap() > feed2["seq"].as_u64().unwrap());

        // Callers see only keys they may verify or read; bad prefixes are refused.
        let mut stranger = d.conn("stranger").await;
        let (_, theirs) = get(&mut stranger, "/v1/status-list?prefix=stores/").await;
        let (ok, out) = pycose_verify(
            work.path(),
            &unb64(theirs["cose_sign1"].as_str().unwrap()),
            pem,
        );
        assert!(ok && out.contains("\"entries\": []"), "{out}");
        assert_error(
            &get(&mut svc, "/v1/status-list?prefix=Stores").await,
            400,
            "invalid_argument",
        );
    }
}
