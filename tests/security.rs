//! Who may talk to the daemon and what it refuses to start with.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::json;
use tillkey::client::Client;

fn request_log_count(d: &Daemon) -> usize {
    d.logs()
        .iter()
        .filter(|l| l.contains("tillkey::request"))
        .count()
}

/// The client either cannot complete the handshake or its first request fails; in neither case
/// does a handler run.
async fn assert_refused(client: Client) {
    if let Ok(mut c) = client.connect().await {
        let r = c.call(hyper::Method::GET, "/v1/keys", None).await;
        assert!(
            r.is_err(),
            "request without an acceptable certificate was answered: {r:?}"
        );
    }
}

#[tokio::test]
async fn clients_without_a_valid_certificate_never_reach_a_handler() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    // The create's log line is written by the daemon and read back by a thread: wait for it,
    // so it is not mistaken for a line a refused client caused.
    d.wait_for(
        "the create's request log line",
        Duration::from_secs(10),
        || request_log_count(&d) >= 1,
    );
    let before = request_log_count(&d);

    let ca = env.path("ca.crt");
    assert_refused(Client::new(&d.url(), &ca, None).unwrap()).await;
    assert_refused(d.client("foreign")).await;
    assert_refused(d.client("expired")).await;
    // A client that trusts another CA refuses the server, too.
    let wrong_ca = Client::new(
        &d.url(),
        &env.path("foreign.crt"),
        Some((&env.path("service.crt"), &env.path("service.key"))),
    )
    .unwrap();
    assert!(wrong_ca.connect().await.is_err());

    // Once the refusals are in the log, anything the refused clients caused would be too.
    let refusals = || {
        d.logs()
            .iter()
            .filter(|l| l.contains("TLS handshake refused"))
            .count()
    };
    d.wait_for(
        "three handshake refusals logged",
        Duration::from_secs(10),
        || refusals() >= 3,
    );
    assert_eq!(
        request_log_count(&d),
        before,
        "a refused client produced a request log entry"
    );
}

#[tokio::test]
async fn identities_come_from_uri_san_or_cn_and_policy_is_default_deny() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/2/pos/7/qr-mac", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let msg = b64(b"qr");
    let (_, sig) = post(
        &mut svc,
        "/v1/keys/stores/2/pos/7/qr-mac:sign",
        json!({"message": msg}),
    )
    .await;

    // Same CA, no grants: refused everything, with the identity named.
    let mut stranger = d.conn("stranger").await;
    let r = post(
        &mut stranger,
        "/v1/keys/stores/2/pos/7/qr-mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");
    assert!(r.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("spiffe://tillkey.test/svc/stranger"));
    // Refused before existence is checked: unknown names give 403 too, so names cannot be probed.
    let r = post(
        &mut stranger,
        "/v1/keys/stores/2/nothing:sign",
        json!({"message": msg}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");
    let r = post(
        &mut stranger,
        "/v1/keys",
        json!({"name": "stores/2/mine", "type": "ed25519"}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");

    // The service may not create keys; only officers can.
    let r = post(
        &mut svc,
        "/v1/keys",
        json!({"name": "stores/2/mine", "type": "ed25519"}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");
    // Officers manage keys but do not sign with them.
    let mut officer = d.conn("officer").await;
    let r = post(
        &mut officer,
        "/v1/keys/stores/2/pos/7/qr-mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");

    // A certificate without a URI SAN is known by its CN: verify granted, sign not.
    let mut legacy = d.conn("cn-only").await;
    let (s, v) = post(
        &mut legacy,
        "/v1/keys/stores/2/pos/7/qr-mac:verify",
        json!({"message": msg, "signature": sig["signature"]}),
    )
    .await;
    assert_eq!((s, v["valid"].clone()), (200, json!(true)));
    let r = post(
        &mut legacy,
        "/v1/keys/stores/2/pos/7/qr-mac:sign",
        json!({"message": msg}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");
    d.wait_for(
        "the CN identity in the log",
        Duration::from_secs(10),
        || {
            d.logs()
                .iter()
                .any(|l| l.contains("\"identity\":\"cn:legacy-pos-gateway\""))
        },
    );
}

#[tokio::test]
async fn sighup_reloads_policy_and_keeps_the_old_one_when_the_new_is_invalid() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/3/mac", "hmac-sha256").await;
    let body = json!({"message": b64(b"x")});
    let path = "/v1/keys/stores/3/mac:sign";
    let stranger = d.client("stranger");
    let status = |c: Client| {
        let body = body.clone();
        async move {
            let mut conn = c.connect().await.unwrap();
            post(&mut conn, path, body).await.0
        }
    };
    assert_eq!(status(stranger.clone()).await, 403);

    let extra = env.path("policies/extra.toml");
    write(&extra, "[[grant]]\nidentities = [\"spiffe://tillkey.test/svc/stranger\"]\noperations = [\"sign\"]\nkeys = [\"stores/3/*\"]\n");
    d.signal("HUP");
    let mut granted = false;
    for _ in 0..200 {
        if status(stranger.clone()).await == 200 {
            granted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(granted, "SIGHUP did not apply the new grant");

    // An invalid file: the reload is refused, the previous policy stays in force.
    write(
        &env.path("policies/broken.toml"),
        "[[grant]]\nidentities = [\"x\"]\noperations = [\"sing\"]\nkeys = [\"**\"]\n",
    );
    d.signal("HUP");
    d.wait_for("refused reload log", Duration::from_secs(10), || {
        d.logs().iter().any(|l| {
            l.contains("policy reload refused") && l.contains("broken.toml") && l.contains("sing")
        })
    });
    assert_eq!(status(stranger.clone()).await, 200);

    // Removing both files and reloading withdraws the grant.
    std::fs::remove_file(&extra).unwrap();
    std::fs::remove_file(env.path("policies/broken.toml")).unwrap();
    d.signal("HUP");
    let mut withdrawn = false;
    for _ in 0..200 {
        if status(stranger.clone()).await == 403 {
            withdrawn = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(withdrawn, "SIGHUP did not withdraw the grant");
    let (_, metrics) = d.admin_get("/metrics");
    assert!(
        metrics.contains(r#"tillkey_policy_reloads_total{outcome="ok"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tillkey_policy_reloads_total{outcome="invalid"} 1"#));
}

#[test]
fn refuses_to_start_with_an_invalid_policy_config_or_pin() {
    let env = Env::new();
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();

    write(
        &env.path("policies/bad.toml"),
        "[[grant]]\nidentities = [\"a\"]\nkeys = [\"Stores/*\"]\noperations = [\"sign\"]\n",
    );
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("grant #1"),
        "{err}"
    );
    std::fs::remove_file(env.path("policies/bad.toml")).unwrap();

    write(
        &env.path("tillkeyd.toml"),
        format!("{config}\n[extra]\nx = 1\n"),
    );
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("unknown field") && err.contains("extra"),
        "{err}"
    );
    write(
        &env.path("tillkeyd.toml"),
        config.replace("[tls]", "[tls]\nciphers = \"all\""),
    );
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    write(
        &env.path("tillkeyd.toml"),
        config.replace("pkcs11:token=tillkey-dev", "pkcs11:slot-id=0"),
    );
    let (status, err) = env.run_to_exit();
    assert_eq!(
        (status.code(), err.contains("slot-id")),
        (Some(64), true),
        "{err}"
    );
    write(&env.path("tillkeyd.toml"), &config);

    // A PIN others can read is refused before the token is touched.
    let pin = env.path("pin");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("accessible to other users"), "{err}");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A wrong PIN: the token refuses the login and the daemon does not start.
    let real = env.pin();
    write(&pin, "0000wrong");
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(
        err.contains("login to token 'tillkey-dev' refused"),
        "{err}"
    );
    assert!(
        !err.contains("0000wrong") && !err.contains(&real),
        "a PIN reached the log"
    );
    write(&pin, &real);

    // An unknown token label is named in the error.
    write(
        &env.path("tillkeyd.toml"),
        config.replace("token=tillkey-dev", "token=nope"),
    );
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(err.contains("no token matches pkcs11:token=nope"), "{err}");
}

#[tokio::test]
async fn the_operations_log_has_one_event_per_request_and_no_secrets() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/4/mac", "hmac-sha256").await;
    create(&d, "stores/4/aes", "aes256-gcm").await;
    let mut svc = d.conn("service").await;
    let secret_msg = b"MAGIC-PLAINTEXT-7f3a";
    let (_, sig) = post(
        &mut svc,
        "/v1/keys/stores/4/mac:sign",
        json!({"message": b64(secret_msg)}),
    )
    .await;
    let (_, ct) = post(
        &mut svc,
        "/v1/keys/stores/4/aes:encrypt",
        json!({"plaintext": b64(secret_msg)}),
    )
    .await;
    let (_, pt) = post(
        &mut svc,
        "/v1/keys/stores/4/aes:decrypt",
        json!({"ciphertext": ct["ciphertext"]}),
    )
    .await;
    assert_eq!(pt["plaintext"], b64(secret_msg));
    let _ = post(
        &mut svc,
        "/v1/keys/stores/4/mac:verify",
        json!({"message": b64(secret_msg), "signature": sig["signature"]}),
    )
    .await;
    let _ = post(
        &mut svc,
        "/v1/keys/stores/4/mac:sign",
        json!({"message": "%%%"}),
    )
    .await;
    drop(svc);

    // The log is read from the daemon's stderr by another thread; let it catch up.
    d.wait_for(
        "7 request events",
        std::time::Duration::from_secs(10),
        || request_log_count(&d) >= 7,
    );
    let logs = d.logs();
    let joined = logs.join("\n");
    for needle in [
        "MAGIC-PLAINTEXT".to_string(),
        b64(secret_msg),
        sig["signature"].as_str().unwrap().to_string(),
        ct["ciphertext"].as_str().unwrap().to_string(),
        env.pin(),
    ] {
        assert!(
            !joined.contains(&needle),
            "log contains secret material: {needle}"
        );
    }
    let requests: Vec<serde_json::Value> = logs
        .iter()
        .filter(|l| l.contains("tillkey::request"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 7, "2 creates + 5 calls");
    let sign = &requests[2];
    assert_eq!(sign["identity"], "spiffe://tillkey.test/svc/payments");
    assert_eq!(sign["operation"], "sign");
    assert_eq!(sign["key"], "stores/4/mac");
    assert_eq!(sign["version"], 1);
    assert_eq!(sign["outcome"], "ok");
    assert!(
        sign["latency_us"].as_u64().is_some() && sign["request_id"].as_str().unwrap().len() == 16
    );
    assert_eq!(requests[6]["outcome"], "invalid_argument");
}

#[tokio::test]
async fn the_pin_can_come_from_a_systemd_credential() {
    let mut env = Env::new();
    let creds = env.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    write(&creds.join("hsm-pin"), env.pin());
    std::fs::set_permissions(
        creds.join("hsm-pin"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();
    assert!(config.contains("pin_file = \"pin\""));
    write(
        &env.path("tillkeyd.toml"),
        config.replace("pin_file = \"pin\"", "pin_credential = \"hsm-pin\""),
    );
    // No PIN file to fall back on.
    std::fs::remove_file(env.path("pin")).unwrap();

    // Without $CREDENTIALS_DIRECTORY the daemon says what is missing.
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("CREDENTIALS_DIRECTORY"), "{err}");

    env.daemon_env
        .push(("CREDENTIALS_DIRECTORY".into(), creds.display().to_string()));
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let (s, _) = post(
        &mut svc,
        "/v1/keys/stores/1/mac:sign",
        json!({"message": "aGk="}),
    )
    .await;
    assert_eq!(s, 200);
}

/// A prefix action is judged by the caller's grants alone: a caller without a grant covering
/// the whole prefix gets the same refusal whether the prefix holds keys, holds keys it may not
/// touch or holds none, and the refusal names only the prefix it sent. Each attempt is audited.
#[tokio::test]
async fn prefix_actions_do_not_reveal_key_names() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1212/cards/card-7", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let mut callers = Vec::new();
    for who in ["service", "stranger"] {
        callers.push((who, d.conn(who).await));
    }
    for (who, c) in &mut callers {
        for action in ["revokePrefix", "rotatePrefix"] {
            let mut answers = Vec::new();
            for prefix in [
                "stores/",
                "stores/1212/",
                "stores/1212/cards/",
                "stores/9999/",
            ] {
                let r = post(
                    c,
                    &format!("/v1/keys:{action}"),
                    json!({"prefix": prefix, "reason": "probe"}),
                )
                .await;
                assert_error(&r, 403, "permission_denied");
                let message = r.1["error"]["message"].as_str().unwrap_or("").to_owned();
                assert!(!message.contains("card-7"), "{who} {action}: {message}");
                answers.push(message.replace(prefix, "PREFIX"));
            }
            answers.dedup();
            assert_eq!(answers.len(), 1, "{who} {action}: {answers:?}");
        }
    }
    // The reserved names are refused for everyone, without naming a key.
    let r = post(
        &mut officer,
        "/v1/keys:revokePrefix",
        json!({"prefix": "tillkey/", "reason": "probe"}),
    )
    .await;
    assert_error(&r, 403, "permission_denied");
    // Nothing was revoked, and every attempt is in the trail.
    let (_, k) = get(&mut officer, "/v1/keys/stores/1212/cards/card-7").await;
    assert_eq!(k["versions"][0]["state"], "active", "{k}");
    let (_, audit) = get(&mut officer, "/v1/audit?limit=1000").await;

    let refused = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["outcome"] == "permission_denied")
        .count();
    assert!(refused >= 17, "{refused} refused attempts audited");
}

/// The daemon sets its own umask: started from a shell whose umask lets everyone read new
/// files, the registry and its journal are still readable by the daemon's user alone; and a
/// registry directory every user can write is refused at start.
#[tokio::test]
async fn state_files_are_private_whatever_umask_the_daemon_inherits() {
    let env = Env::new();
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let d = env.start();
    rustix::process::umask(previous);
    create(&d, "stores/1/mac", "hmac-sha256").await;
    for file in [
        "registry.db",
        "registry.db-wal",
        "registry.db-shm",
        "registry.db.lock",
    ] {
        let path = env.path(file);
        if let Ok(meta) = std::fs::metadata(&path) {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{file}: {:o}",
                meta.permissions().mode()
            );
        }
    }
    assert!(std::fs::metadata(env.path("registry.db")).is_ok());
    assert!(d.stop().success());

    let dir = env.path("");
    let old = std::fs::metadata(&dir).unwrap().permissions();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (status, err) = env.run_to_exit();
    std::fs::set_permissions(&dir, old).unwrap();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("writable by every user"), "{err}");
}

/// A page on another site cannot make an officer's browser act: bodies must be JSON (a
/// browser's "simple" cross-site request cannot send that type without a preflight, which gets
/// no CORS answer), and requests the browser marks as cross-site, or whose Origin is another
/// server, are refused whatever they carry.
#[tokio::test]
async fn cross_site_browser_requests_are_refused() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let rotate = br#"{"reason":"csrf"}"#.to_vec();
    let path = "/v1/keys/stores/1/mac:rotate";
    let attempts: [&[(&str, &[u8])]; 5] = [
        &[("content-type", b"text/plain")],
        &[("content-type", b"application/x-www-form-urlencoded")],
        &[("sec-fetch-site", b"cross-site")],
        &[("sec-fetch-site", b"same-site")],
        &[("origin", b"https://evil.example")],
    ];
    for headers in attempts {
        let (s, h, body) = officer
            .send(hyper::Method::POST, path, headers, rotate.clone())
            .await
            .expect("send");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json error");
        let code = v["error"]["code"].as_str().unwrap_or("");
        assert!(
            (s.as_u16(), code) == (415, "unsupported_media_type")
                || (s.as_u16(), code) == (403, "permission_denied"),
            "{headers:?}: {s} {v}"
        );
        assert!(h.get("access-control-allow-origin").is_none());
    }
    let (_, k) = get(&mut officer, "/v1/keys/stores/1/mac").await;
    assert_eq!(k["versions"].as_array().map(Vec::len), Some(1), "{k}");
    // The API's own clients, and a same-origin page, are served.
    let (s, _, _) = officer
        .send(
            hyper::Method::POST,
            path,
            &[
                ("content-type", b"application/json; charset=utf-8"),
                ("sec-fetch-site", b"same-origin"),
            ],
            rotate,
        )
        .await
        .expect("send");
    assert_eq!(s, 200);
}

/// A certificate's CN never passes for a URI identity, and a wildcard never matches an empty
/// segment: a certificate whose CN reads like an officer's URI, and one whose URI ends in an
/// empty segment after `officer/`, both issued by the trusted CA, get no officer rights.
#[tokio::test]
async fn a_cn_or_an_empty_segment_never_passes_for_an_officer() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let issue = |out: &str, args: &[&str]| {
        let status = std::process::Command::new(TILLKEY)
            .args(["pki", "issue"])
            .arg(env.path(""))
            .arg("--out")
            .arg(env.path(out))
            .args(args)
            .status()
            .expect("tillkey pki issue");
        assert!(status.success());
    };
    issue("cn-eve", &["--cn", "spiffe://tillkey.test/officer/eve"]);
    issue("empty-seg", &["--uri", "spiffe://tillkey.test/officer/"]);
    for who in ["cn-eve", "empty-seg"] {
        let client = tillkey::client::Client::new(
            &d.url(),
            &env.path("ca.crt"),
            Some((
                &env.path(&format!("{who}.crt")),
                &env.path(&format!("{who}.key")),
            )),
        )
        .expect("client");
        let mut c = client.connect().await.expect("connect");
        let r = post(
            &mut c,
            "/v1/keys/stores/1/mac:rotate",
            json!({"reason": "impostor"}),
        )
        .await;
        assert_error(&r, 403, "permission_denied");
    }
    // A policy naming a CN without saying so is refused at load.
    write(
        &env.path("policies/bare.toml"),
        "[[grant]]\nidentities = [\"legacy-pos-gateway\"]\noperations = [\"verify\"]\nkeys = [\"stores/**\"]\n",
    );
    assert!(d.stop().success());
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("cn:legacy-pos-gateway"), "{err}");
}
