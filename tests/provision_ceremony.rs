//! The whole provisioning path on a blank token, as an operator runs it: initialise the token
//! and the daemon's service keys, make a CA whose key stays in the token, issue certificates,
//! start the daemon, enrol a store, sign for a service and check the signature independently,
//! package terminal keys for the vendor's injection facility, and revoke a certificate with a
//! CRL the token signs.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};
use tillkey::exchange::{hmac_kcv, unwrap_export};

/// `tillkey provision init` with the SO PIN, as the ceremony runs it.
const INIT: &[&str] = &[
    "provision",
    "init",
    "--config",
    "tillkeyd.toml",
    "--so-pin-file",
    "so-pin",
];

const LABEL: &str = "tillkey-ceremony";

/// Run the CLI with the environment's SoftHSM; (success, stdout, stderr).
fn tillkey(env: &Env, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TILLKEY)
        .args(args)
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .current_dir(env.dir.path())
        .output()
        .expect("run tillkey");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(env: &Env, args: &[&str]) -> String {
    let (success, out, err) = tillkey(env, args);
    assert!(success, "tillkey {args:?} failed:\n{out}{err}");
    out
}

/// As `officer` (or `officer2`) against the running daemon.
fn as_officer(d: &Daemon, who: &str, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for (flag, file) in [
        ("--ca", "ca.crt".to_string()),
        ("--cert", format!("{who}.crt")),
        ("--key", format!("{who}.key")),
    ] {
        v.push(flag.into());
        v.push(file);
    }
    v.push("--url".into());
    v.push(d.url());
    v
}

fn token_objects(env: &Env) -> String {
    let out = Command::new("pkcs11-tool")
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so"])
        .args(["--token-label", LABEL, "--login", "--pin"])
        .arg(env.pin())
        .arg("--list-objects")
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .output()
        .expect("pkcs11-tool (package opensc)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory with a SoftHSM whose only slot is blank, PIN files and a daemon configuration.
fn blank_site() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    std::fs::create_dir_all(p("tokens")).unwrap();
    std::fs::create_dir_all(p("policies")).unwrap();
    write(
        &p("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            p("tokens").display()
        ),
    );
    for (f, pin) in [("pin", "a7c1-user"), ("so-pin", "5e2b-officer")] {
        write(&p(f), pin);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::copy(repo().join("policies/dev.toml"), p("policies/dev.toml")).unwrap();
    write(
        &p("tillkeyd.toml"),
        format!(
            r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
allow_root = true

[tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
crl = "crl.pem"

[backend]
type = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token = "pkcs11:token={LABEL}"
pin_file = "pin"

[registry]
sqlite = "registry.db"

[policy]
dir = "policies"
"#
        ),
    );
    Env {
        dir,
        daemon_env: Vec::new(),
        backend: Backend::Pkcs11,
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap()
}

#[tokio::test]
async fn a_blank_token_becomes_a_working_service() {
    let env = blank_site();

    // 1. The token. Without the SO PIN nothing can be initialised, and the error says why.
    let (success, _, err) = tillkey(&env, &["provision", "init", "--config", "tillkeyd.toml"]);
    assert!(!success && err.contains("--so-pin-file"), "{err}");
    let first: Value = serde_json::from_str(&ok(&env, INIT)).unwrap();
    assert_eq!(
        first["device"],
        json!({"token": LABEL, "initialised_now": true})
    );
    assert_eq!(first["service_keys"][0]["name"], "tillkey/audit");
    assert_eq!(
        first["service_keys"][0]["kcv"].as_str().map(str::len),
        Some(6)
    );
    assert_eq!(first["import_wrapping_key"]["type"], "rsa-3072");
    let objects = token_objects(&env);
    // Re-running changes nothing: same keys, no new objects.
    let again: Value = serde_json::from_str(&ok(&env, INIT)).unwrap();
    assert_eq!(again["device"]["initialised_now"], false);
    assert_eq!(again["service_keys"], first["service_keys"]);
    assert_eq!(token_objects(&env), objects);

    // 2. The CA, its key made in the token; certificates for the server and the identities.
    ok(
        &env,
        &[
            "pki",
            "ca",
            ".",
            "--hsm",
            "tillkeyd.toml",
            "--name",
            "Ceremony CA",
        ],
    );
    assert!(
        !env.path("ca.key").exists(),
        "the CA key must not be in a file"
    );
    assert!(token_objects(&env).contains("tillkey:pki-ca:Ceremony CA"));
    let (again, _, err) = tillkey(&env, &["pki", "ca", ".", "--hsm", "tillkeyd.toml"]);
    assert!(!again && err.contains("already holds a CA"), "{err}");
    ok(
        &env,
        &[
            "pki",
            "issue",
            ".",
            "--out",
            "server",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    );
    for (out, uri) in [
        ("officer", "spiffe://tillkey.test/officer/alice"),
        ("officer2", "spiffe://tillkey.test/officer/bob"),
        ("service", "spiffe://tillkey.test/svc/payments"),
    ] {
        ok(&env, &["pki", "issue", ".", "--out", out, "--uri", uri]);
    }
    // A reference that names another key than ca.crt is refused before anything is signed.
    let reference = std::fs::read_to_string(env.path("ca-key.toml")).unwrap();
    let (before, after) = reference.split_once("public_key = \"").unwrap();
    let flipped = if after.starts_with('3') { "4" } else { "3" };
    write(
        &env.path("ca-key.toml"),
        format!("{before}public_key = \"{flipped}{}", &after[1..]),
    );
    let (issued, _, err) = tillkey(
        &env,
        &["pki", "issue", ".", "--out", "x", "--uri", "spiffe://x/y"],
    );
    assert!(!issued && err.contains("names a different key"), "{err}");
    write(&env.path("ca-key.toml"), &reference);
    // An independent verifier accepts what the token signed.
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.crt", "server.crt", "service.crt"])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // 3. The daemon on the prepared token, and a store enrolled from a manifest.
    let d = env.start();
    write(
        &env.path("manifest.toml"),
        "[[store]]\nid = \"0100\"\npos = [\"01\", \"02\"]\ntemplates = [\"qr-paid\", \"paid-sign\", \"pos-transport\"]\n",
    );
    let templates = repo().join("policies/templates.toml");
    let templates = templates.to_str().unwrap();
    let enrol = as_officer(
        &d,
        "officer",
        &[
            "provision",
            "enrol",
            "--manifest",
            "manifest.toml",
            "--templates",
            templates,
        ],
    );
    let report: Value = serde_json::from_str(&ok(
        &env,
        &enrol.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .unwrap();
    assert_eq!(report["created"], 5, "{report}");

    // 4. A service signs; the signature verifies with the published public key alone.
    let mut svc = d.conn("service").await;
    let msg = b"paid: purchase 0100-01-0042, 12.30 EUR";
    let (s, signed) = post(
        &mut svc,
        "/v1/keys/stores/0100/paid-sign:sign",
        json!({"message": b64(msg)}),
    )
    .await;
    assert_eq!(s, 200, "{signed}");
    let (_, key) = get(&mut svc, "/v1/keys/stores/0100/paid-sign").await;
    write(
        &env.path("paid.pem"),
        key["versions"][0]["public_key_pem"].as_str().unwrap(),
    );
    write(
        &env.path("paid.sig"),
        unb64(signed["signature"].as_str().unwrap()),
    );
    write(&env.path("paid.msg"), msg);
    let checked = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "paid.pem",
            "-signature",
            "paid.sig",
            "paid.msg",
        ])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&checked.stdout).contains("Verified OK"),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // 5. Injection packages. The vendor's key-encryption key arrives once, by dual-controlled
    // import; the terminals' transport keys go out under it, their working keys under those.
    let vendor_kek = [0x3cu8; 32];
    import_known(&d, "vendors/acme/kek", "aes256-kw", &vendor_kek).await;
    let package = |keys: &str, under: &str, dir: &str| {
        let req = as_officer(
            &d,
            "officer",
            &[
                "provision",
                "package",
                "request",
                "--manifest",
                "manifest.toml",
                "--templates",
                templates,
                "--keys",
                keys,
                "--under",
                under,
                "--dir",
                dir,
            ],
        );
        ok(&env, &req.iter().map(String::as_str).collect::<Vec<_>>());
        // A second request over a pending one is refused rather than doubling the exports.
        let (twice, _, err) = tillkey(&env, &req.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!twice && err.contains("exists"), "{err}");
        // The requesting officer cannot approve their own exports.
        let self_approve = as_officer(
            &d,
            "officer",
            &["provision", "package", "approve", "--dir", dir],
        );
        let (success, out, _) = tillkey(
            &env,
            &self_approve.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(!success && out.contains("dual control"), "{out}");
        std::fs::rename(
            env.path(dir).join("approved.json"),
            env.path(dir).join("pending.json"),
        )
        .unwrap();
        let approve = as_officer(
            &d,
            "officer2",
            &["provision", "package", "approve", "--dir", dir],
        );
        ok(
            &env,
            &approve.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    };
    package("pos-transport", "vendors/acme/kek", "to-vendor");
    let transports = read_json(&env.path("to-vendor/vendors_acme_kek.json"));
    assert_eq!(
        transports["keys"].as_array().unwrap().len(),
        2,
        "{transports}"
    );
    let t01 = transports["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "stores/0100/pos/01/transport")
        .expect("transport key of terminal 01");
    let transport_01 = unwrap_export(
        &vendor_kek,
        &tillkey::encoding::hex_decode(t01["wrapped_key"].as_str().unwrap()).unwrap(),
    )
    .expect("the vendor unwraps the transport key");

    package("qr-paid", "pos-transport", "inject");
    let p = read_json(&env.path("inject/stores_0100_pos_01_transport.json"));
    assert_eq!(p["format"], "tillkey-injection-1");
    assert_eq!(p["pos"], "01");
    assert_eq!(p["transport_key"]["kcv"], t01["kcv"]);
    let k = &p["keys"][0];
    assert_eq!(k["name"], "stores/0100/pos/01/qr-paid");
    let material = unwrap_export(
        &transport_01,
        &tillkey::encoding::hex_decode(k["wrapped_key"].as_str().unwrap()).unwrap(),
    )
    .expect("the terminal unwraps its working key");
    assert_eq!(Some(hmac_kcv(&material).as_str()), k["kcv"].as_str());
    // The injected key computes exactly what the daemon computes.
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &material),
        msg,
    );
    let (s, v) = post(
        &mut svc,
        "/v1/keys/stores/0100/pos/01/qr-paid:verify",
        json!({"message": b64(msg), "signature": b64(tag.as_ref())}),
    )
    .await;
    assert_eq!((s, v["valid"].clone()), (200, json!(true)), "{v}");

    // 6. Revocation with a CRL the token signs, applied on SIGHUP.
    ok(&env, &["pki", "revoke", ".", "--cert", "service.crt"]);
    d.signal("HUP");
    d.wait_for(
        "the CRL to apply",
        std::time::Duration::from_secs(10),
        || {
            d.logs()
                .iter()
                .any(|l| l.contains("TLS certificate, client CA and CRL reloaded"))
        },
    );
    let refused = d.client("service").connect().await;
    let still = match refused {
        Err(_) => false,
        Ok(mut c) => c
            .call(hyper::Method::GET, "/v1/keys/stores/0100/paid-sign", None)
            .await
            .is_ok(),
    };
    assert!(!still, "a revoked service certificate was still accepted");
    let (s, _) = get(
        &mut d.conn("officer").await,
        "/v1/keys/stores/0100/paid-sign",
    )
    .await;
    assert_eq!(s, 200);
}
