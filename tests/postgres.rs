//! The registry and the audit trail on PostgreSQL (`registry.url`), not only on SQLite: the
//! daemon runs against a throwaway PostgreSQL cluster started for the test (initdb + pg_ctl;
//! `softhsm-ci/test` installs the server). The same requests as on SQLite must keep their keys,
//! versions and audit entries across a restart, and the trail must verify.

mod common;

use common::postgres::{env_on, Postgres};
use common::*;
use serde_json::json;

#[tokio::test]
async fn keys_versions_and_the_audit_trail_live_in_postgresql() {
    let pg = Postgres::start();
    let env = env_on(&pg);

    let d = env.start();
    create(&d, "stores/7/mac", "hmac-sha256").await;
    create(&d, "stores/7/ec", "ecdsa-p256").await;
    let mut svc = d.conn("service").await;
    let msg = b64(b"kept in postgres");
    let (s, sig1) = post(
        &mut svc,
        "/v1/keys/stores/7/ec:sign",
        json!({ "message": msg }),
    )
    .await;
    assert_eq!(s, 200, "{sig1}");
    let mut officer = d.conn("officer").await;
    let (s, k) = post(
        &mut officer,
        "/v1/keys/stores/7/ec:rotate",
        json!({"reason": "drill"}),
    )
    .await;
    assert_eq!(s, 200, "{k}");
    // A batch goes through the same store.
    let (s, b) = post(
        &mut svc,
        "/v1/keys/stores/7/mac:sign",
        json!({"batch": [{"message": msg}, {"message": "not base64!"}]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["batch"][1]["error"]["code"], "invalid_argument", "{b}");
    drop((svc, officer));
    assert!(d.stop().success());

    // Nothing was written to SQLite: the keys and the trail are in PostgreSQL.
    assert!(!env.path("registry.db").exists());
    assert_eq!(
        pg.query("SELECT count(*) FROM keys WHERE name LIKE 'stores/7/%'"),
        "2"
    );
    let entries: u64 = pg
        .query("SELECT count(*) FROM audit")
        .parse()
        .expect("a count");
    assert!(entries >= 5, "{entries} audit rows");

    // After a restart: both keys, the rotation, and the old version still verifies.
    let d = env.start();
    let mut svc = d.conn("service").await;
    let mut officer = d.conn("officer").await;
    let (s, k) = get(&mut officer, "/v1/keys/stores/7/ec").await;
    assert_eq!(s, 200, "{k}");
    assert_eq!(k["versions"].as_array().map(Vec::len), Some(2), "{k}");
    let (_, v) = post(
        &mut svc,
        "/v1/keys/stores/7/ec:verify",
        json!({"message": msg, "signature": sig1["signature"]}),
    )
    .await;
    assert_eq!(
        (v["valid"].clone(), v["key_version"].clone()),
        (json!(true), json!(1)),
        "{v}"
    );
    let (s, sig2) = post(
        &mut svc,
        "/v1/keys/stores/7/ec:sign",
        json!({ "message": msg }),
    )
    .await;
    assert_eq!((s, sig2["key_version"].clone()), (200, json!(2)), "{sig2}");

    // The trail: the requests of both runs, readable by an auditor.
    let mut auditor = d.conn("auditor").await;
    let (s, a) = get(&mut auditor, "/v1/audit?key=stores/7/ec").await;
    assert_eq!(s, 200, "{a}");
    let ops: Vec<&str> = a["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["operation"].as_str())
        .collect();
    for op in ["create", "sign", "rotate", "get", "verify"] {
        assert!(ops.contains(&op), "no {op} entry: {ops:?}");
    }
    drop((svc, officer, auditor));
    assert!(d.stop().success());

    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "audit verify on PostgreSQL: {out}");
    assert!(out.contains("audit trail intact"), "{out}");
}

/// Sealed-message counters on PostgreSQL: every seal for one sender gets its own counter, also
/// when many arrive at once. (Reading the counter and writing it back in two statements gave
/// 4,000 seals from 8 clients only 599 distinct counters under READ COMMITTED; one
/// `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` cannot hand the same value out twice.)
#[tokio::test]
async fn concurrent_seals_get_distinct_counters() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let d = env.start();
    create(&d, "stores/1212/atm/dispense", "aes256-gcm").await;
    common::postgres::assert_seals_get_distinct_counters(&pg, &[&d]).await;
}

/// The same forward-only rule on PostgreSQL, where several instances write: the database refuses
/// to move a revoked version back, whoever asks.
#[tokio::test]
async fn postgresql_refuses_to_move_a_revoked_version_back() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let d = env.start();
    create(&d, "stores/7/mac", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let (s, k) = post(
        &mut officer,
        "/v1/keys/stores/7/mac:revoke",
        json!({"reason": "leaked"}),
    )
    .await;
    assert_eq!(s, 200, "{k}");
    let refused = pg.try_query(
        "UPDATE key_versions SET state = 'active' WHERE name = 'stores/7/mac' AND version = 1",
    );
    let err = refused.expect_err("revoked -> active was accepted");
    assert!(err.contains("only move forward"), "{err}");
    assert_eq!(
        pg.query("SELECT state FROM key_versions WHERE name = 'stores/7/mac'"),
        "revoked"
    );
}

/// Two registries on one database, as two instances hold it: a change made from a stale copy of
/// a key is refused by the database (compare-and-set on each version's state, a version number
/// taken once), and the stale registry reads the key again; so instance B can never turn A's
/// revocation back into a version that signs, and two rotations at once make one new version.
/// (Two registries make the stale copy deterministic; through the API, with the change feed
/// running, see `tests/cluster.rs`.)
#[tokio::test]
async fn a_change_from_a_stale_copy_is_refused_and_the_key_read_again() {
    use tillkey::backend::ObjectRef;
    use tillkey::keys::VersionState;
    use tillkey::registry::{KeyRecord, RegistryError, VersionRecord};

    let pg = Postgres::start();
    // B opens after the key exists: it holds it as version 1 active.
    let (a, b, name) = two_registries_with_a_key(&pg).await;
    let at_a = a.get(&name).unwrap();
    let at_b = b.get(&name).unwrap();

    let mut revoked = (*at_a).clone();
    revoked.versions[0] =
        revoked.versions[0].moved(VersionState::Revoked, 1001, "officer", Some("leaked"));
    a.commit(&at_a, revoked).await.expect("A revokes");

    // B rotates from its stale copy: version 1 to verify-only, version 2 active.
    let rotated = |from: &KeyRecord, object: u8| {
        let mut r = from.clone();
        for v in &mut r.versions {
            if v.state == VersionState::Active {
                *v = v.moved(VersionState::VerifyOnly, 1002, "officer", None);
            }
        }
        r.versions.push(VersionRecord::new(
            2,
            1002,
            "officer",
            ObjectRef(vec![object]),
            None,
        ));
        r
    };
    let err = b
        .commit(&at_b, rotated(&at_b, 2))
        .await
        .expect_err("stale change refused");
    assert!(matches!(err, RegistryError::Conflict(_)), "{err}");
    assert_eq!(
        pg.query("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM key_versions WHERE name = 'stores/7/mac'"),
        "1:revoked"
    );
    // B has read the key again: version 1 is revoked there too.
    let fresh = b.get(&name).unwrap();
    assert_eq!(fresh.versions[0].state, VersionState::Revoked);
    assert!(fresh.active().is_none());

    // Both rotate the same key at once from the same copy: one new version, one conflict.
    let mut replaced = (*fresh).clone();
    replaced.versions.push(VersionRecord::new(
        2,
        1003,
        "officer",
        ObjectRef(vec![3]),
        None,
    ));
    b.commit(&fresh, replaced)
        .await
        .expect("B rotates the revoked key");
    a.reload(&name).await.expect("A reads again");
    let (at_a, at_b) = (a.get(&name).unwrap(), b.get(&name).unwrap());
    let (ra, rb) = tokio::join!(
        a.commit(&at_a, rotated(&at_a, 4).with_version_number(3)),
        b.commit(&at_b, rotated(&at_b, 5).with_version_number(3)),
    );
    assert!(
        ra.is_ok() != rb.is_ok(),
        "exactly one of two concurrent rotations wins: {:?} / {:?}",
        ra.as_ref().err(),
        rb.as_ref().err()
    );
    for loser in [ra.err(), rb.err()].into_iter().flatten() {
        assert!(matches!(loser, RegistryError::Conflict(_)), "{loser}");
    }
    assert_eq!(
        pg.query("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM key_versions WHERE name = 'stores/7/mac'"),
        "1:revoked,2:verify-only,3:active"
    );

    // The whole key is compared, not only the versions a change touches: after B rotates
    // (3 verify-only, 4 active), A's stale copy may not revoke version 2, which B left alone,
    // nor change the settings; either would publish A's copy with 3 still active.
    a.reload(&name).await.expect("A reads again");
    b.reload(&name).await.expect("B reads again");
    let (at_a, at_b) = (a.get(&name).unwrap(), b.get(&name).unwrap());
    b.commit(&at_b, rotated(&at_b, 6).with_version_number(4))
        .await
        .expect("B rotates");
    let mut revoke_2 = (*at_a).clone();
    revoke_2.versions[1] =
        revoke_2.versions[1].moved(VersionState::Revoked, 1004, "officer", Some("audit"));
    let err = a
        .commit(&at_a, revoke_2)
        .await
        .expect_err("stale copy refused");
    assert!(matches!(err, RegistryError::Conflict(_)), "{err}");
    let fresh = a.get(&name).unwrap();
    assert_eq!(
        fresh.active().map(|v| v.version),
        Some(4),
        "A read the key again"
    );
    let mut settings = (*at_a).clone();
    settings.lifecycle.max_operations = Some(10);
    let err = a
        .commit(&at_a, settings)
        .await
        .expect_err("stale settings refused");
    assert!(matches!(err, RegistryError::Conflict(_)), "{err}");
    assert_eq!(
        pg.query("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM key_versions WHERE name = 'stores/7/mac'"),
        "1:revoked,2:verify-only,3:verify-only,4:active"
    );
    assert_eq!(
        pg.query("SELECT coalesce(max_operations, -1) FROM keys WHERE name = 'stores/7/mac'"),
        "-1"
    );
    a.close().await;
    b.close().await;
}

/// Test helper: the rotation's new version under another number.
trait WithVersion {
    fn with_version_number(self, n: u32) -> Self;
}

impl WithVersion for tillkey::registry::KeyRecord {
    fn with_version_number(mut self, n: u32) -> Self {
        if let Some(v) = self.versions.last_mut() {
            v.version = n;
        }
        self
    }
}

/// Usage counts from two instances add up in the database: each flush adds what its instance
/// counted since its last flush, so neither overwrites the other's operations.
#[tokio::test]
async fn usage_counts_from_two_instances_add_up() {
    let pg = Postgres::start();
    let (a, b, name) = two_registries_with_a_key(&pg).await;
    let (ka, kb) = (a.get(&name).unwrap(), b.get(&name).unwrap());
    for _ in 0..5 {
        a.count_use(&name, &ka.versions[0], 1);
    }
    b.count_use(&name, &kb.versions[0], 7);
    a.flush_usage().await.expect("A flushes");
    b.flush_usage().await.expect("B flushes");
    a.count_use(&name, &ka.versions[0], 1);
    a.flush_usage().await.expect("A flushes again");
    assert_eq!(
        pg.query("SELECT operations FROM key_versions WHERE name = 'stores/7/mac'"),
        "13"
    );
    a.close().await;
    b.close().await;
}

/// An HMAC key with version 1 active, as an officer's create leaves it.
fn one_version_key(name: &tillkey::keys::KeyName) -> tillkey::registry::KeyRecord {
    use tillkey::backend::ObjectRef;
    use tillkey::keys::{KeyType, Lifecycle};
    use tillkey::registry::{KeyRecord, VersionRecord};
    KeyRecord {
        name: name.clone(),
        key_type: KeyType::HmacSha256,
        lifecycle: Lifecycle::default(),
        created_at: 1000,
        created_by: "officer".into(),
        derive_from: None,
        versions: vec![VersionRecord::new(
            1,
            1000,
            "officer",
            ObjectRef(vec![1]),
            None,
        )],
    }
}

/// Two registries on `pg`, as two instances hold it: A makes `stores/7/mac`, then B opens.
async fn two_registries_with_a_key(
    pg: &Postgres,
) -> (
    tillkey::registry::Registry,
    tillkey::registry::Registry,
    tillkey::keys::KeyName,
) {
    use tillkey::registry::Registry;
    let a = Registry::open(&pg.url()).await.expect("A opens");
    let name = tillkey::keys::KeyName::parse("stores/7/mac").unwrap();
    a.insert_new_keys(vec![one_version_key(&name)])
        .await
        .expect("create");
    let b = Registry::open(&pg.url()).await.expect("B opens");
    (a, b, name)
}

/// One instance on PostgreSQL reads its own changes back through the change feed; a read that
/// started before a change committed must never put the key's older state back in the index.
/// (It did: a rotation right after another answered 409 "changed elsewhere" with no other
/// instance, and for a moment the index held the previous active version.)
#[tokio::test]
async fn the_change_feed_never_puts_an_older_state_back() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let d = env.start();
    create(&d, "stores/7/mac", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let mut svc = d.conn("service").await;
    for i in 0..150u64 {
        let (s, k) = post(
            &mut officer,
            "/v1/keys/stores/7/mac:rotate",
            json!({"reason": "routine"}),
        )
        .await;
        assert_eq!(s, 200, "rotation {i}: {k}");
        let (s, v) = post(
            &mut svc,
            "/v1/keys/stores/7/mac:sign",
            json!({"message": b64(b"pay")}),
        )
        .await;
        assert_eq!((s, v["key_version"].as_u64()), (200, Some(i + 2)), "{v}");
    }
}
