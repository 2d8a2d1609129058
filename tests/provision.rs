//! Enrolling stores and terminals from a manifest and key templates: idempotent, additive,
//! reports what it would retire.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Run `tillkey provision enrol` as the officer with the shipped templates.
fn run_enrol(
    d: &Daemon,
    env: &Env,
    manifest: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(TILLKEY)
        .args(["provision", "enrol", "--manifest"])
        .arg(manifest)
        .arg("--templates")
        .arg(repo().join("policies/templates.toml"))
        .args(["--url", &d.url()])
        .arg("--ca")
        .arg(env.path("ca.crt"))
        .arg("--cert")
        .arg(env.path("officer.crt"))
        .arg("--key")
        .arg(env.path("officer.key"))
        .args(extra)
        .output()
        .unwrap()
}

fn enrol(d: &Daemon, env: &Env, manifest: &str, extra: &[&str]) -> Value {
    let path = env.path("manifest.toml");
    write(&path, manifest);
    let out = run_enrol(d, env, &path, extra);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const FIRST: &str = r#"
[[store]]
id = "1212"
pos = ["0001", "0002"]
templates = ["qr-request", "qr-paid", "paid-sign"]

[[store]]
id = "1213"
pos = ["0001"]
templates = ["qr-request", "qr-paid"]
"#;

const CHANGED: &str = r#"
[[store]]
id = "1212"
pos = ["0001", "0002", "0003"]
templates = ["qr-request", "qr-paid", "paid-sign"]
"#;

#[tokio::test]
async fn enrolment_is_idempotent_additive_and_reports_what_it_would_retire() {
    let env = Env::new();
    let d = env.start();
    let r = enrol(&d, &env, FIRST, &[]);
    assert_eq!(
        (
            r["keys_wanted"].clone(),
            r["created"].clone(),
            r["terminals"].clone()
        ),
        (7.into(), 7.into(), 3.into()),
        "{r}"
    );

    let again = enrol(&d, &env, FIRST, &[]);
    assert_eq!(
        (again["created"].clone(), again["existing"].clone()),
        (0.into(), 7.into()),
        "{again}"
    );

    let dry = enrol(&d, &env, CHANGED, &["--dry-run"]);
    assert_eq!(
        (dry["to_create"].clone(), dry["created"].clone()),
        (2.into(), 0.into()),
        "{dry}"
    );
    let retire: Vec<&str> = dry["would_retire"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        retire,
        [
            "stores/1213/pos/0001/qr-paid",
            "stores/1213/pos/0001/qr-request"
        ]
    );

    let added = enrol(&d, &env, CHANGED, &[]);
    assert_eq!(added["created"], 2, "{added}");
    // Nothing was retired by enrolment itself, and the templates' settings are on the keys.
    let mut officer = d.conn("officer").await;
    let (s, k) = get(&mut officer, "/v1/keys/stores/1213/pos/0001/qr-request").await;
    assert_eq!((s, k["active_version"].clone()), (200, 1.into()));
    let (_, paid) = get(&mut officer, "/v1/keys/stores/1212/pos/0003/qr-paid").await;
    assert_eq!(
        (paid["rotation_period"].as_str(), paid["exportable"].clone()),
        (Some("365d"), true.into())
    );
    let (_, sign) = get(&mut officer, "/v1/keys/stores/1212/paid-sign").await;
    assert_eq!(
        (sign["type"].as_str(), sign["verify_grace"].as_str()),
        (Some("ecdsa-p256"), Some("30d"))
    );

    // A manifest naming an unknown template is refused before anything is created.
    let path = env.path("bad.toml");
    write(
        &path,
        "[[store]]\nid = \"9\"\npos = [\"1\"]\ntemplates = [\"nope\"]\n",
    );
    let out = run_enrol(&d, &env, &path, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no template named 'nope'"));
}

#[test]
fn the_shipped_templates_do_not_break_the_policy_loader() {
    tillkey::policy::Policy::load_dir(&repo().join("policies"))
        .expect("policies/ with templates.toml loads");
}

const DERIVED: &str = r#"
[[store]]
id = "2001"
group = "north"
pos = ["0001", "0002", "0003"]
templates = ["group-master", "qr-mac-derived"]

[[store]]
id = "2002"
group = "north"
pos = ["0001", "0002"]
templates = ["group-master", "qr-mac-derived"]
"#;

#[tokio::test]
async fn enrolment_of_derived_terminal_keys_is_idempotent_and_needs_a_group() {
    let env = Env::new();
    let d = env.start();
    let r = enrol(&d, &env, DERIVED, &["--batch", "2"]);
    // One master for the group, one derived key per terminal.
    assert_eq!(
        (r["keys_wanted"].clone(), r["created"].clone()),
        (6.into(), 6.into()),
        "{r}"
    );
    let again = enrol(&d, &env, DERIVED, &[]);
    assert_eq!(
        (again["created"].clone(), again["existing"].clone()),
        (0.into(), 6.into()),
        "{again}"
    );
    let mut officer = d.conn("officer").await;
    let (s, k) = get(&mut officer, "/v1/keys/stores/2002/pos/0002/qr-mac").await;
    assert_eq!(s, 200, "{k}");
    assert_eq!(k["derive_from"], "groups/north/pos-master");
    assert_eq!(k["versions"][0]["derivation"]["master_version"], 1);
    let (s, m) = get(&mut officer, "/v1/keys/groups/north/pos-master").await;
    assert_eq!((s, m["type"].as_str()), (200, Some("aes256-derive")));

    let path = env.path("nogroup.toml");
    write(
        &path,
        "[[store]]\nid = \"9\"\npos = [\"1\"]\ntemplates = [\"qr-mac-derived\"]\n",
    );
    let out = run_enrol(&d, &env, &path, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the store's group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
