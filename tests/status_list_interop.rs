//! Interop: a status list signed by tillkey must verify under an independent COSE stack (pycose
//! and cbor2, see `tests/interop/verify_status_list.py`), because the POS verifiers that poll the
//! feed are not built from this crate. Needs `python3` with `pycose` and `cbor2`; fails, never
//! skips, when they are missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use tillkey::statuslist::{sign1, StatusEntry, StatusList};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/verify_status_list.py")
}

fn key() -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn public_pem(kp: &EcdsaKeyPair) -> String {
    let der = tillkey::encoding::spki_from_ec_point(
        tillkey::keys::KeyType::EcdsaP256,
        kp.public_key().as_ref(),
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

fn sample() -> StatusList {
    StatusList {
        issuer: "tillkey.test".into(),
        prefix: "pos/".into(),
        sequence: 1_234_567_890_123,
        issued_at: 1_760_000_000,
        expires_at: 1_760_086_400,
        entries: vec![
            StatusEntry {
                kid: "pos/terminal-signing".into(),
                version: 4,
                state: "revoked",
                since: 1_759_990_000,
                reason: Some("key compromise: terminal 17 stolen".into()),
            },
            StatusEntry {
                kid: "pos/receipts".into(),
                version: 2,
                state: "retired",
                since: 1_750_000_000,
                reason: None,
            },
            StatusEntry {
                kid: "pos/receipts".into(),
                version: 1,
                state: "destroyed",
                since: 1_740_000_000,
                reason: None,
            },
        ],
    }
}

fn expected_json(list: &StatusList) -> Value {
    let entries: Vec<Value> = list
        .entries
        .iter()
        .map(|e| {
            let mut m = json!({"kid": e.kid, "v": e.version, "state": e.state, "since": e.since});
            if let Some(r) = &e.reason {
                m["reason"] = json!(r);
            }
            m
        })
        .collect();
    json!({
        "iss": list.issuer,
        "prefix": list.prefix,
        "seq": list.sequence,
        "iat": list.issued_at,
        "exp": list.expires_at,
        "entries": entries,
    })
}

/// Writes the message and key into `dir` and runs the Python verifier on them.
fn run_verifier(dir: &Path, cose: &[u8], pem: &str) -> Output {
    let cose_path = dir.join("status.cose");
    let pem_path = dir.join("feed.pem");
    std::fs::write(&cose_path, cose).unwrap();
    std::fs::write(&pem_path, pem).unwrap();
    Command::new("python3")
        .arg(script())
        .arg(&cose_path)
        .arg(&pem_path)
        .output()
        .expect("python3 must be on PATH (with pycose and cbor2 installed) for this test")
}

fn signed(kp: &EcdsaKeyPair, list: &StatusList) -> Vec<u8> {
    sign1(list, b"feed-key-1", |tbs| {
        Ok(kp
            .sign(&ring::rand::SystemRandom::new(), tbs)
            .unwrap()
            .as_ref()
            .to_vec())
    })
    .unwrap()
}

/// Runs the untampered message and returns the decoded JSON, failing loudly (missing pycose
/// included) so the negative checks below cannot pass for the wrong reason.
fn verify_ok(dir: &Path, cose: &[u8], pem: &str) -> Value {
    let out = run_verifier(dir, cose, pem);
    assert!(
        out.status.success(),
        "pycose refused a tillkey status list (is `pip install pycose cbor2` done?)\nstatus: \
         {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verifier printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn pycose_verifies_and_decodes_a_signed_status_list() {
    let dir = tempfile::tempdir().unwrap();
    let kp = key();
    let list = sample();
    let got = verify_ok(dir.path(), &signed(&kp, &list), &public_pem(&kp));

    assert_eq!(got["seq"], json!(list.sequence));
    assert_eq!(got["exp"], json!(list.expires_at));
    assert_eq!(got["entries"], expected_json(&list)["entries"]);
    assert!(
        got["entries"][1].get("reason").is_none(),
        "reason must be omitted when None"
    );
    assert_eq!(got, expected_json(&list));
}

#[test]
fn pycose_refuses_tampered_or_foreign_lists() {
    let dir = tempfile::tempdir().unwrap();
    let kp = key();
    let list = sample();
    let cose = signed(&kp, &list);
    let pem = public_pem(&kp);
    verify_ok(dir.path(), &cose, &pem);

    let refused = |bytes: &[u8], pem: &str, what: &str| {
        let out = run_verifier(dir.path(), bytes, pem);
        assert!(
            !out.status.success(),
            "{what} was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "{what} printed a payload");
    };

    // A payload byte: still well-formed CBOR, so only the signature catches it.
    let at = cose
        .windows(b"stolen".len())
        .position(|w| w == b"stolen")
        .unwrap();
    let mut bad = cose.clone();
    bad[at] ^= 0x20;
    refused(&bad, &pem, "a flipped payload byte");

    let mut bad = cose.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    refused(&bad, &pem, "a flipped signature byte");

    refused(&cose[..cose.len() - 10], &pem, "a truncated file");
    refused(&cose, &public_pem(&key()), "another key's signature");
}
