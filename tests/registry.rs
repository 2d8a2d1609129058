//! The registry on its own (a real SQLite file): start-up loading, clean-up of half-created
//! keys, the scheduler's agenda and batched inserts.

use tillkey::backend::{Kdf, ObjectRef};
use tillkey::keys::{KeyName, KeyType, Lifecycle, VersionState};
use tillkey::registry::{Derivation, KeyRecord, Registry, VersionRecord};

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display())
}

fn record(name: &str, created_at: i64, rotation: Option<u64>) -> KeyRecord {
    let mut v = VersionRecord::new(1, created_at, "tester", ObjectRef(vec![1, 2, 3]), None);
    v.derivation = Some(Derivation {
        master_version: 3,
        kdf: Kdf::AesCbcEncryptData,
    });
    KeyRecord {
        name: KeyName::parse(name).unwrap(),
        key_type: KeyType::HmacSha256,
        lifecycle: Lifecycle {
            rotation_period: rotation,
            ..Lifecycle::default()
        },
        created_at,
        created_by: "tester".into(),
        derive_from: Some(KeyName::parse("groups/g/master").unwrap()),
        versions: vec![v],
    }
}

#[tokio::test]
async fn loads_in_order_drops_half_created_keys_and_keeps_the_agenda() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(&url(&dir)).await.unwrap();
    let recs = vec![
        record("stores/2/pos/1/mac", 1000, Some(50)),
        record("stores/1/pos/1/mac", 1000, None),
        record("stores/10/pos/1/mac", 1000, Some(10)),
    ];
    let made = r.insert_new_keys(recs.clone()).await.unwrap();
    assert!(made.iter().all(Option::is_some));
    // A second insert of the same names is refused per key, not as a whole.
    let again = r
        .insert_new_keys(vec![recs[0].clone(), record("stores/3/a", 1000, None)])
        .await
        .unwrap();
    assert!(again[0].is_none() && again[1].is_some());
    // Reserved but never given a version: what a crash between the two steps leaves.
    let orphan = KeyName::parse("stores/9/orphan").unwrap();
    r.reserve(
        &orphan,
        KeyType::HmacSha256,
        &Lifecycle::default(),
        1000,
        "t",
    )
    .await
    .unwrap();
    assert_eq!(r.due(1009), Vec::<KeyName>::new());
    let due: Vec<String> = r.due(1050).iter().map(|n| n.to_string()).collect();
    assert_eq!(due, ["stores/10/pos/1/mac", "stores/2/pos/1/mac"]);
    r.close().await;

    let r = Registry::open(&url(&dir)).await.unwrap();
    assert_eq!(r.len(), 4);
    assert!(r.get(&orphan).is_none());
    // The name is free again.
    r.reserve(
        &orphan,
        KeyType::HmacSha256,
        &Lifecycle::default(),
        1000,
        "t",
    )
    .await
    .unwrap();
    let (page, more) = r.list("stores/", None, 10, |_| true);
    let names: Vec<&str> = page.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        (names, more),
        (
            vec![
                "stores/1/pos/1/mac",
                "stores/10/pos/1/mac",
                "stores/2/pos/1/mac",
                "stores/3/a"
            ],
            false
        )
    );
    let k = r
        .get(&KeyName::parse("stores/2/pos/1/mac").unwrap())
        .unwrap();
    assert_eq!(
        k.derive_from.as_ref().map(KeyName::as_str),
        Some("groups/g/master")
    );
    assert_eq!(
        k.versions[0].derivation,
        Some(Derivation {
            master_version: 3,
            kdf: Kdf::AesCbcEncryptData
        })
    );
    assert_eq!(k.versions[0].object, ObjectRef(vec![1, 2, 3]));
    let due: Vec<String> = r.due(1050).iter().map(|n| n.to_string()).collect();
    assert_eq!(due, ["stores/10/pos/1/mac", "stores/2/pos/1/mac"]);
}

#[tokio::test]
async fn usage_counts_are_flushed_once_per_change() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(&url(&dir)).await.unwrap();
    r.insert_new_keys(vec![record("stores/1/a", 1000, None)])
        .await
        .unwrap();
    let name = KeyName::parse("stores/1/a").unwrap();
    let k = r.get(&name).unwrap();
    assert_eq!(r.flush_usage().await.unwrap(), 0);
    for _ in 0..5 {
        r.count_use(&name, &k.versions[0], 1);
    }
    assert_eq!(r.flush_usage().await.unwrap(), 1);
    assert_eq!(r.flush_usage().await.unwrap(), 0);
    r.count_use(&name, &k.versions[0], 1);
    assert_eq!(r.flush_usage().await.unwrap(), 1);
    r.close().await;
    let r = Registry::open(&url(&dir)).await.unwrap();
    let k = r.get(&name).unwrap();
    assert_eq!(k.versions[0].operations.count(), 6);
}

/// A SQLite registry serves one daemon: a second `open` of the same file is refused, with a
/// message that says why and what to do instead, before it writes anything; closing the first
/// frees the file.
#[tokio::test]
async fn a_second_daemon_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Registry::open(&url(&dir)).await.unwrap();
    first
        .reserve(
            &KeyName::parse("stores/1/in-creation").unwrap(),
            KeyType::HmacSha256,
            &Lifecycle::default(),
            1000,
            "t",
        )
        .await
        .unwrap();
    let refused = Registry::open(&url(&dir))
        .await
        .err()
        .expect("a second open is refused");
    let msg = refused.to_string();
    assert!(
        msg.contains("in use by another tillkeyd") && msg.contains("PostgreSQL"),
        "{msg}"
    );
    // The refused open cleared nothing: the first one's key in creation is still reserved.
    assert!(first
        .reserve(
            &KeyName::parse("stores/1/in-creation").unwrap(),
            KeyType::HmacSha256,
            &Lifecycle::default(),
            1001,
            "t",
        )
        .await
        .is_err());
    first.close().await;
    let again = Registry::open(&url(&dir)).await.unwrap();
    again.close().await;
}

/// A version's state only moves forward, and the database itself holds that: a stale writer
/// (another instance, a hand-edited row) cannot turn a revoked or destroyed version back into
/// one that signs or verifies.
#[tokio::test]
async fn the_database_refuses_to_move_a_version_state_back() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(&url(&dir)).await.unwrap();
    r.insert_new_keys(vec![record("stores/1/a", 1000, None)])
        .await
        .unwrap();
    let name = KeyName::parse("stores/1/a").unwrap();
    let active = r.get(&name).unwrap();
    let mut revoked = (*active).clone();
    revoked.versions[0] =
        revoked.versions[0].moved(VersionState::Revoked, 1001, "officer", Some("leak"));
    let revoked = r.commit(&active, revoked).await.unwrap();
    // A writer that reads the revoked row and still writes version 1 back to verify-only (as a
    // stale rotation would): the trigger refuses it whatever the writer compared first.
    let mut stale = (*active).clone();
    stale.versions[0] = stale.versions[0].moved(VersionState::VerifyOnly, 1002, "stale", None);
    let err = r.commit(&revoked, stale).await.expect_err("refused");
    assert!(err.to_string().contains("only move forward"), "{err}");
    // Nor can anyone write the row directly.
    for state in ["active", "verify-only", "retired"] {
        let refused = sqlx::query("UPDATE key_versions SET state = $1 WHERE name = 'stores/1/a'")
            .bind(state)
            .execute(r.pool())
            .await;
        assert!(refused.is_err(), "revoked -> {state} was accepted");
    }
    // Forward still works: revoked -> destroyed.
    sqlx::query("UPDATE key_versions SET state = 'destroyed' WHERE name = 'stores/1/a'")
        .execute(r.pool())
        .await
        .unwrap();
    r.close().await;
    let r = Registry::open(&url(&dir)).await.unwrap();
    assert_eq!(
        r.get(&name).unwrap().versions[0].state,
        VersionState::Destroyed
    );
    r.close().await;
}
