//! The database's schema is versioned: `tillkey db migrate` brings a database made by an
//! earlier release (or none) to this build's version, several at once take turns, a daemon on
//! PostgreSQL refuses a database at another version instead of changing it, and a database
//! newer than the build is refused everywhere.

mod common;

use common::postgres::{db, point_at, Postgres};
use common::*;

fn latest() -> String {
    tillkey::registry::migrations::LATEST.to_string()
}

#[test]
fn a_daemon_on_postgresql_refuses_an_unmigrated_database_and_starts_once_migrated() {
    let pg = Postgres::start();
    let env = Env::on(Backend::Pkcs11);
    point_at(&env, &pg.url());
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(
        err.contains("schema is at version 0") && err.contains("tillkey db migrate"),
        "{err}"
    );
    // It changed nothing: no table was made.
    assert_eq!(
        pg.query(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ),
        "0"
    );
    let (ok, out) = db(&env, "version");
    assert!(!ok && out.contains("schema version 0"), "{out}");

    let (ok, out) = db(&env, "migrate");
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("from version 0 to {}", latest())),
        "{out}"
    );
    let (ok, out) = db(&env, "migrate");
    assert!(ok && out.contains("already at version"), "{out}");
    let (ok, out) = db(&env, "version");
    assert!(ok, "{out}");
    let d = env.start();
    assert_eq!(d.admin_get("/readyz").0, 200);
}

/// Operators (or instances told to migrate at start) running migrations at the same moment take
/// turns on an advisory lock: every run succeeds and each migration is applied once.
#[test]
fn concurrent_migrations_take_turns() {
    let pg = Postgres::start();
    let env = Env::on(Backend::Pkcs11);
    point_at(&env, &pg.url());
    let children: Vec<_> = (0..6)
        .map(|_| {
            std::process::Command::new(TILLKEY)
                .args(["db", "migrate", "--config"])
                .arg(env.path("tillkeyd.toml"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn tillkey")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        pg.query("SELECT count(*) || ':' || max(version) FROM schema_migrations"),
        format!("{}:{}", latest(), latest())
    );
}

/// A SQLite registry made before migrations were numbered (no `schema_migrations`, no `leased`
/// column, versions already used) is brought to this build's schema at the daemon's start,
/// and what was already done counts against the cap.
#[test]
fn a_registry_from_before_numbered_migrations_is_upgraded_at_start() {
    let env = Env::new();
    let db_path = env.path("registry.db");
    let old = "
        CREATE TABLE keys (name TEXT PRIMARY KEY, key_type TEXT NOT NULL,
            created_at BIGINT NOT NULL, created_by TEXT NOT NULL, rotation_period BIGINT,
            verify_grace BIGINT NOT NULL, max_operations BIGINT, exportable BIGINT NOT NULL,
            derive_from TEXT) WITHOUT ROWID;
        CREATE TABLE key_versions (name TEXT NOT NULL REFERENCES keys(name),
            version BIGINT NOT NULL, state TEXT NOT NULL, created_at BIGINT NOT NULL,
            state_changed_at BIGINT NOT NULL, changed_by TEXT NOT NULL, reason TEXT,
            grace_until BIGINT, operations BIGINT NOT NULL, object_ref TEXT NOT NULL,
            public_key TEXT, kcv TEXT, kdf TEXT, master_version BIGINT,
            PRIMARY KEY (name, version)) WITHOUT ROWID;
        INSERT INTO keys VALUES ('stores/1/old', 'hmac-sha256', 1, 'x', NULL, 0, 10, 0, NULL);
        INSERT INTO key_versions VALUES ('stores/1/old', 1, 'retired', 1, 1, 'x', NULL, NULL,
            7, '00', NULL, NULL, NULL, NULL);";
    let out = std::process::Command::new("sqlite3")
        .arg(&db_path)
        .arg(old)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = env.start();
    assert!(d.stop().success());
    let q = |sql: &str| {
        let out = std::process::Command::new("sqlite3")
            .arg(&db_path)
            .arg(sql)
            .output()
            .expect("sqlite3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(q("SELECT max(version) FROM schema_migrations"), latest());
    assert_eq!(
        q("SELECT operations || ':' || leased FROM key_versions WHERE name = 'stores/1/old'"),
        "7:7"
    );
}

/// A database migrated by a newer build is refused by this one, before anything is written.
#[test]
fn a_database_newer_than_the_build_is_refused() {
    let env = Env::new();
    let d = env.start();
    assert!(d.stop().success());
    let out = std::process::Command::new("sqlite3")
        .arg(env.path("registry.db"))
        .arg("INSERT INTO schema_migrations VALUES (9999, 'from the future', 0)")
        .output()
        .expect("sqlite3");
    assert!(out.status.success());
    let (status, err) = env.run_to_exit();
    assert_eq!(status.code(), Some(69), "{err}");
    assert!(err.contains("newer than this tillkeyd knows"), "{err}");
}
