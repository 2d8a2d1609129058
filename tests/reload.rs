//! SIGHUP reloads of the TLS material: server certificate and key, client CA bundle and CRL.
//! Valid files take effect for new connections, established ones keep going, invalid files are
//! refused with the old material kept.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use tillkey::client::Client;

fn pki(env: &Env, args: &[&str]) {
    let out = Command::new(TILLKEY)
        .arg("pki")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = env;
}

async fn server_cert(d: &Daemon) -> Vec<u8> {
    let tls = d.client("service").connect_tls().await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

fn file_cert(env: &Env) -> Vec<u8> {
    tillkey::tls::load_certs(&env.path("server.crt")).unwrap()[0]
        .as_ref()
        .to_vec()
}

fn reloads(d: &Daemon, needle: &str) -> usize {
    d.logs().iter().filter(|l| l.contains(needle)).count()
}

fn hup_and_wait(d: &Daemon, needle: &str) {
    let before = reloads(d, needle);
    d.signal("HUP");
    d.wait_for(needle, Duration::from_secs(10), || {
        reloads(d, needle) > before
    });
}

async fn signs(client: &Client) -> bool {
    match client.connect().await {
        Ok(mut c) => {
            matches!(c.call(hyper::Method::POST, "/v1/keys/stores/1/mac:sign", Some(&json!({"message": "aGk="}))).await, Ok((s, _)) if s.as_u16() == 200)
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn server_certificate_reloads_for_new_connections_and_invalid_files_are_refused() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let mut established = d.conn("service").await;
    let old = file_cert(&env);
    assert_eq!(server_cert(&d).await, old);

    let dir = env.dir.path().to_str().unwrap().to_owned();
    pki(
        &env,
        &[
            "issue",
            &dir,
            "--out",
            &format!("{dir}/server"),
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    );
    let new = file_cert(&env);
    assert_ne!(new, old);
    hup_and_wait(&d, "TLS certificate, client CA and CRL reloaded");
    assert_eq!(
        server_cert(&d).await,
        new,
        "new connections see the new certificate"
    );
    let (s, _) = post(
        &mut established,
        "/v1/keys/stores/1/mac:sign",
        json!({"message": "aGk="}),
    )
    .await;
    assert_eq!(s, 200, "an established connection survives the reload");

    // A broken certificate file: refused, the reloaded one stays in force.
    write(&env.path("server.crt"), "not a certificate");
    hup_and_wait(&d, "TLS reload refused");
    assert_eq!(server_cert(&d).await, new);
    assert!(signs(&d.client("service")).await);
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains(r#"tillkey_tls_reloads_total{outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tillkey_tls_reloads_total{outcome="invalid"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_ca_bundle_and_crl_reload() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let foreign = d.client("foreign");
    assert!(!signs(&foreign).await, "another CA's client is refused");

    // Trusting a second CA: with a CRL configured, revocation is checked fail-closed, so the CA
    // alone is not enough: a client of a CA without a CRL has an unknown revocation status.
    let read = |p: &str| std::fs::read_to_string(env.path(p)).unwrap();
    let bundle = [read("ca.crt"), read("foreign-ca/ca.crt")].concat();
    write(&env.path("ca.crt"), &bundle);
    hup_and_wait(&d, "TLS certificate, client CA and CRL reloaded");
    assert!(
        !signs(&foreign).await,
        "accepted a client whose revocation status is unknown"
    );
    d.wait_for(
        "the refusal to name the unknown revocation status",
        Duration::from_secs(5),
        || {
            d.logs()
                .iter()
                .any(|l| l.contains("UnknownRevocationStatus"))
        },
    );
    // With the CA's CRL as well, its clients get in (with whatever policy grants them).
    let crls = [read("crl.pem"), read("foreign-ca/crl.pem")].concat();
    write(&env.path("crl.pem"), &crls);
    hup_and_wait(&d, "TLS certificate, client CA and CRL reloaded");
    if !signs(&foreign).await {
        let refused: Vec<String> = d
            .logs()
            .into_iter()
            .filter(|l| l.contains("handshake"))
            .collect();
        panic!("the added CA's client is refused after reload: {refused:?}");
    }
    // A broken bundle is refused; the two-CA bundle stays.
    write(&env.path("ca.crt"), "garbage");
    hup_and_wait(&d, "TLS reload refused");
    assert!(signs(&foreign).await);
    write(&env.path("ca.crt"), &bundle);

    // Revoking the payments service's certificate shuts it out at the next reload; officers and
    // connections already established are unaffected.
    let service = d.client("service");
    let mut established = d.conn("service").await;
    assert!(signs(&service).await);
    let dir = env.dir.path().to_str().unwrap().to_owned();
    pki(
        &env,
        &["revoke", &dir, "--cert", &format!("{dir}/service.crt")],
    );
    assert!(signs(&service).await, "not applied before SIGHUP");
    hup_and_wait(&d, "TLS certificate, client CA and CRL reloaded");
    assert!(
        !signs(&service).await,
        "a revoked certificate still connects"
    );
    let mut officer = d.conn("officer").await;
    assert_eq!(get(&mut officer, "/v1/keys/stores/1/mac").await.0, 200);
    let (s, _) = post(
        &mut established,
        "/v1/keys/stores/1/mac:sign",
        json!({"message": "aGk="}),
    )
    .await;
    assert_eq!(s, 200);
    // A broken CRL is refused and the revocation stays in force.
    write(&env.path("crl.pem"), "garbage");
    hup_and_wait(&d, "TLS reload refused");
    assert!(!signs(&service).await);
}
