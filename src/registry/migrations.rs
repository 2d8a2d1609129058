//! The database's schema, in numbered versions. Every table of the registry's database (keys,
//! audit trail, approvals, the retail flows' records, the instances' change feed and leases) is
//! made here, by migrations applied in order and recorded in `schema_migrations`; a released
//! migration never changes, a change of schema is a new one.
//!
//! `tillkey db migrate` applies them, as does a daemon at start when its configuration says so
//! (`[registry] migrate_at_start`, the default on SQLite); otherwise a daemon whose database is
//! not at its version refuses to start. On PostgreSQL the whole run is one transaction under an
//! advisory lock, so instances or operators migrating at the same moment take turns and the
//! second finds nothing left to do; a failed migration leaves the schema as it was.

use sqlx::{AnyPool, Row};

use super::RegistryError;

/// The schema version this build reads and writes.
pub const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

struct Migration {
    version: i64,
    what: &'static str,
    steps: fn(Engine) -> Vec<Step>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

enum Step {
    Sql(String),
    /// A column added to a table that may already have it (made before migrations were
    /// numbered, when columns were added at start).
    Column {
        table: &'static str,
        column: &'static str,
        ty: &'static str,
    },
}

fn sql(s: &str) -> Step {
    Step::Sql(s.to_owned())
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "keys, versions, approvals, audit trail, retail records, change feed, leases",
        steps: first,
    },
    Migration {
        version: 2,
        what: "max_operations leased to instances (key_versions.leased)",
        steps: |_| {
            vec![
                Step::Column {
                    table: "key_versions",
                    column: "leased",
                    ty: "BIGINT NOT NULL DEFAULT 0",
                },
                // What was done before leases counts as leased: no version goes past its cap.
                sql("UPDATE key_versions SET leased = operations WHERE leased < operations"),
            ]
        },
    },
    Migration {
        version: 3,
        what: "answers kept for Idempotency-Key retries",
        steps: |_| {
            vec![
                sql("CREATE TABLE idempotency (
                    identity TEXT NOT NULL, idem_key TEXT NOT NULL, fingerprint TEXT NOT NULL,
                    created_at BIGINT NOT NULL, status BIGINT, content_type TEXT, body TEXT,
                    receipt BIGINT, outcome TEXT, key_name TEXT, version BIGINT,
                    PRIMARY KEY (identity, idem_key))"),
                sql("CREATE INDEX idempotency_created_at ON idempotency (created_at)"),
            ]
        },
    },
    Migration {
        version: 4,
        what: "per-identity throttles shared by instances",
        steps: |_| {
            vec![sql(
                "CREATE TABLE throttles (
                name TEXT PRIMARY KEY, tokens BIGINT NOT NULL, at_ms BIGINT NOT NULL)",
            )]
        },
    },
    Migration {
        version: 5,
        what: "Idempotency-Key claims marked when their attempt began a change",
        steps: |_| {
            // The receipt of the attempt's intent entry, written in the same commit.
            vec![Step::Column {
                table: "idempotency",
                column: "started",
                ty: "BIGINT",
            }]
        },
    },
];

/// The schema as it stood when migrations were first numbered. Every statement tolerates
/// objects that exist, so databases made by earlier releases are brought to version 1 too.
fn first(engine: Engine) -> Vec<Step> {
    let sqlite = engine == Engine::Sqlite;
    // SQLite: key rows stored in name order (the primary key is the table), so the start-up
    // read in name order is a sequential scan, and names are stored once.
    let rowid = if sqlite { " WITHOUT ROWID" } else { "" };
    // SQLite: the audit sequence is the rowid itself, one b-tree per insert.
    let audit_seq = if sqlite {
        "INTEGER PRIMARY KEY"
    } else {
        "BIGINT PRIMARY KEY"
    };
    let mut steps = vec![
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS keys (
                name TEXT PRIMARY KEY, key_type TEXT NOT NULL, created_at BIGINT NOT NULL,
                created_by TEXT NOT NULL, rotation_period BIGINT, verify_grace BIGINT NOT NULL,
                max_operations BIGINT, exportable BIGINT NOT NULL, derive_from TEXT){rowid}"
        )),
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS key_versions (
                name TEXT NOT NULL REFERENCES keys(name), version BIGINT NOT NULL,
                state TEXT NOT NULL, created_at BIGINT NOT NULL, state_changed_at BIGINT NOT NULL,
                changed_by TEXT NOT NULL, reason TEXT, grace_until BIGINT,
                operations BIGINT NOT NULL, object_ref TEXT NOT NULL, public_key TEXT, kcv TEXT,
                kdf TEXT, master_version BIGINT, PRIMARY KEY (name, version)){rowid}"
        )),
        Step::Column {
            table: "keys",
            column: "derive_from",
            ty: "TEXT",
        },
        Step::Column {
            table: "key_versions",
            column: "kdf",
            ty: "TEXT",
        },
        Step::Column {
            table: "key_versions",
            column: "master_version",
            ty: "BIGINT",
        },
        sql("CREATE TABLE IF NOT EXISTS approvals (
            id TEXT PRIMARY KEY, action TEXT NOT NULL, key_name TEXT NOT NULL, version BIGINT,
            params TEXT NOT NULL, requested_by TEXT NOT NULL, requested_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL, state TEXT NOT NULL, decided_by TEXT, decided_at BIGINT,
            result TEXT)"),
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS audit (
                seq {audit_seq}, at_ms BIGINT NOT NULL, identity TEXT NOT NULL,
                operation TEXT NOT NULL, key_name TEXT NOT NULL, version BIGINT,
                outcome TEXT NOT NULL, request_id TEXT NOT NULL, detail TEXT NOT NULL,
                audit_key_version BIGINT NOT NULL, prev TEXT NOT NULL, mac TEXT NOT NULL)"
        )),
        sql("CREATE TABLE IF NOT EXISTS purchases (
            store TEXT NOT NULL, pos TEXT NOT NULL, purchase TEXT NOT NULL,
            amount BIGINT NOT NULL, currency TEXT NOT NULL, payment_ref TEXT NOT NULL,
            paid_token TEXT NOT NULL, issued_at BIGINT NOT NULL, consumed_at BIGINT,
            PRIMARY KEY (store, pos, purchase))"),
        sql("CREATE TABLE IF NOT EXISTS otps (
            idx TEXT PRIMARY KEY, key_name TEXT NOT NULL, subject TEXT NOT NULL,
            expires_at BIGINT NOT NULL, redeemed_at BIGINT)"),
        sql("CREATE TABLE IF NOT EXISTS devices (
            id TEXT PRIMARY KEY, realm TEXT NOT NULL, subject TEXT NOT NULL, alg TEXT NOT NULL,
            public_key TEXT NOT NULL, state TEXT NOT NULL, created_at BIGINT NOT NULL)"),
        sql("CREATE TABLE IF NOT EXISTS nonces (
            device TEXT NOT NULL, nonce TEXT NOT NULL, expires_at BIGINT NOT NULL,
            PRIMARY KEY (device, nonce))"),
        sql("CREATE TABLE IF NOT EXISTS challenges (
            id TEXT PRIMARY KEY, key_name TEXT NOT NULL, subject TEXT NOT NULL,
            challenge TEXT NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT)"),
        sql("CREATE TABLE IF NOT EXISTS counters (
            key_name TEXT NOT NULL, sender TEXT NOT NULL, side TEXT NOT NULL,
            value BIGINT NOT NULL, PRIMARY KEY (key_name, sender, side))"),
        sql("CREATE TABLE IF NOT EXISTS giftcodes (
            id TEXT PRIMARY KEY, key_name TEXT NOT NULL, code_idx TEXT NOT NULL UNIQUE,
            pin_idx TEXT, state TEXT NOT NULL, failed_pins BIGINT NOT NULL,
            created_at BIGINT NOT NULL, superseded_by TEXT)"),
    ];
    steps.extend(
        super::schema::state_trigger(sqlite)
            .into_iter()
            .map(Step::Sql),
    );
    if !sqlite {
        // What instances sharing the database need (a SQLite registry serves one process).
        steps.extend([
            sql("CREATE TABLE IF NOT EXISTS audit_head (
                id BIGINT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL)"),
            sql("CREATE TABLE IF NOT EXISTS key_changes (
                seq BIGSERIAL PRIMARY KEY, name TEXT NOT NULL)"),
            sql("CREATE TABLE IF NOT EXISTS leases (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at TIMESTAMPTZ NOT NULL)"),
        ]);
    }
    steps
}

/// Which migrations a run applied.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub from: i64,
    pub to: i64,
}

/// Bring the database to [`LATEST`].
pub async fn migrate(pool: &AnyPool, sqlite: bool) -> Result<Applied, RegistryError> {
    let engine = if sqlite {
        Engine::Sqlite
    } else {
        Engine::Postgres
    };
    let mut tx = pool.begin().await?;
    if engine == Engine::Postgres {
        // Held to the end of the transaction: one migrating process at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(7411207301)")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, what TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let from = current(&mut tx).await?;
    if from > LATEST {
        return Err(newer(from));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        for step in (m.steps)(engine) {
            apply(&mut tx, engine, step).await?;
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, what, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.what)
        .bind(unix_now())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Applied { from, to: LATEST })
}

/// The database's schema version (0 before any migration).
pub async fn version(pool: &AnyPool) -> Result<i64, RegistryError> {
    let mut conn = pool.acquire().await?;
    let exists = sqlx::query("SELECT version FROM schema_migrations LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
        .is_ok();
    if !exists {
        return Ok(0);
    }
    Ok(
        sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await?
            .try_get("v")?,
    )
}

/// Refuse a database that is not at [`LATEST`], saying what to do.
pub async fn require_latest(pool: &AnyPool) -> Result<(), RegistryError> {
    match version(pool).await? {
        LATEST => Ok(()),
        v if v > LATEST => Err(newer(v)),
        v => Err(RegistryError::Schema(format!(
            "the database's schema is at version {v}, this tillkeyd needs {LATEST}: run \
             `tillkey db migrate --config FILE` (or set [registry] migrate_at_start = true)"
        ))),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn newer(v: i64) -> RegistryError {
    RegistryError::Schema(format!(
        "the database's schema is at version {v}, newer than this tillkeyd knows ({LATEST}): \
         upgrade tillkeyd"
    ))
}

async fn current(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64, RegistryError> {
    Ok(
        sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&mut **tx)
            .await?
            .try_get("v")?,
    )
}

async fn apply(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    engine: Engine,
    step: Step,
) -> Result<(), RegistryError> {
    match step {
        Step::Sql(s) => {
            sqlx::query(&s).execute(&mut **tx).await?;
        }
        Step::Column { table, column, ty } => {
            // Asked of the catalogue: a failed probe would abort a PostgreSQL transaction.
            let probe = match engine {
                Engine::Sqlite => format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = $1"),
                Engine::Postgres => format!(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() \
                     AND table_name = '{table}' AND column_name = $1"
                ),
            };
            let has = sqlx::query(&probe)
                .bind(column)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
            if !has {
                sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
                    .execute(&mut **tx)
                    .await?;
            }
        }
    }
    Ok(())
}
