//! Key metadata: names, types, versions, states and the backend object each version lives in.
//!
//! The database (SQLite by default, PostgreSQL through the same `sqlx::Any` code) is the record;
//! an in-memory index mirrors it so the signing path never waits on SQL. Every change is written
//! to the database first and reaches the index only after it is durable.
//!
//! Columns are portable SQL (`TEXT`, `BIGINT`): binary values are stored hex-encoded so the same
//! schema serves both engines.

pub mod approvals;

mod cap;
mod change;
mod deadlines;
mod feed;
mod lease;
mod load;
mod load_postgres;
pub mod migrations;
mod records;
mod reload;
mod schema;

pub use feed::{CaughtUp, MAX_BEHIND};
use schema::claim;

pub use records::{Derivation, KeyRecord, Usage, VersionRecord};

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use crate::encoding::{hex_decode, hex_encode};
use crate::keys::{KeyName, KeyType, Lifecycle};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("key already exists")]
    Exists,
    #[error("corrupt row for key '{name}': {what}")]
    Corrupt { name: String, what: String },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("loading the registry: {0}")]
    Load(String),
    /// The key changed in the database since this index read it (another instance, or an
    /// operator): nothing was written, and the index now holds the key as the database does.
    #[error("key '{0}' was changed elsewhere meanwhile; nothing was changed here, retry")]
    Conflict(String),
    /// The database's schema is not the version this build needs (see `migrations`).
    #[error("{0}")]
    Schema(String),
    /// Another daemon holds the SQLite file (see [`Registry::open`]).
    #[error("{0}")]
    InUse(String),
}

/// A unique-key violation is `Exists`: the row was there already (or a concurrent insert won).
pub(crate) fn unique(e: sqlx::Error) -> RegistryError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => RegistryError::Exists,
        other => other.into(),
    }
}

/// Names this process among instances: the host and process id, for people reading the
/// leases table, plus a random part, so a restarted process is a new holder.
fn instance_id() -> String {
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}/{}/{}",
        host.trim(),
        std::process::id(),
        crate::encoding::hex_encode(&r)
    )
}

/// What opening the registry does about the database's schema (see `migrations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Apply the migrations this build has that the database lacks.
    Migrate,
    /// Refuse a database that is not at this build's version.
    RequireLatest,
}

/// A process's hold on a SQLite registry file (see [`Registry::claim`]).
pub struct Claim(std::fs::File);

pub struct Registry {
    pool: AnyPool,
    is_sqlite: bool,
    /// The database file, read directly at start-up (see `load`).
    sqlite_file: Option<std::path::PathBuf>,
    index: RwLock<BTreeMap<KeyName, Arc<KeyRecord>>>,
    /// Held from reading or writing a key's rows until the index holds the result, so a
    /// reload that read the rows before this process's own change committed cannot put that
    /// older record over the change (nor a change its older record over a newer reload).
    /// Per key (see `key_locks`): one key's commit does not hold up another's, nor the change
    /// feed's re-reads of other keys.
    publishing: crate::key_locks::KeyLocks,
    /// When each key next needs the scheduler, so a pass visits only keys that are due.
    deadlines: Mutex<deadlines::Deadlines>,
    /// Versions used since the last usage flush.
    used: Mutex<Vec<(KeyName, u32, Arc<Usage>)>>,
    /// Versions with operations leased to this process (see `cap`).
    leases: cap::Leases,
    /// A daemon's hold on its SQLite file, released by [`Registry::close`] or when the process
    /// ends, however it ends.
    claim: Mutex<Option<std::fs::File>>,
    /// Other instances' changes (PostgreSQL only; see `feed`).
    feed: Option<feed::Feed>,
    /// This process among the instances on a shared database (for leases).
    instance: String,
}

impl Registry {
    /// Open for the daemon (or a tool that writes, `provision init`): create the schema if
    /// needed and clear half-created keys. A SQLite file is claimed for this process first: a
    /// second daemon on the same file would keep its own index and audit head, and clear the
    /// first one's keys in creation, so it is refused before it writes anything. Several
    /// instances share PostgreSQL instead.
    pub async fn open(url: &str) -> Result<Self, RegistryError> {
        Self::open_claimed(url, Self::claim(url)?, Schema::Migrate).await
    }

    /// The claim [`Registry::open`] takes, on its own: the daemon takes it before anything
    /// else (before the device, whose opening can disturb another daemon's objects, as a TPM
    /// owner flushing loaded objects does). Nothing to claim for PostgreSQL.
    pub fn claim(url: &str) -> Result<Option<Claim>, RegistryError> {
        load::sqlite_file(url)
            .map(|path| claim(&path).map(Claim))
            .transpose()
    }

    /// [`Registry::open`] with a claim already taken by [`Registry::claim`], doing `schema`.
    pub async fn open_claimed(
        url: &str,
        claim: Option<Claim>,
        schema: Schema,
    ) -> Result<Self, RegistryError> {
        let registry = Self::open_with(url, Some(schema)).await?;
        *registry.claim.lock().unwrap_or_else(|p| p.into_inner()) = claim.map(|c| c.0);
        Ok(registry)
    }

    /// Open for tools running beside the daemon (audit verification): no schema changes and no
    /// clean-up that could race the daemon.
    pub async fn open_for_reading(url: &str) -> Result<Self, RegistryError> {
        Self::open_with(url, None).await
    }

    /// `tillkey db migrate`: bring the database's schema to this build's version, and nothing
    /// else (no keys are read). A SQLite file is claimed as by a daemon.
    pub async fn migrate(url: &str) -> Result<migrations::Applied, RegistryError> {
        let _claim = Self::claim(url)?;
        let pool = Self::connect(url).await?;
        let done = migrations::migrate(&pool, url.starts_with("sqlite:")).await;
        pool.close().await;
        done
    }

    async fn connect(url: &str) -> Result<AnyPool, RegistryError> {
        sqlx::any::install_default_drivers();
        // A database that has gone away fails requests (and their audit entries) in seconds
        // rather than sqlx's default 30 s wait for a connection. Connections: the audit writer
        // holds one per group, the change feed one per poll, and the scheduler's parallel
        // rotations one each while they commit.
        let pool = AnyPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect(url)
            .await?;
        if url.starts_with("sqlite:") {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        Ok(pool)
    }

    /// `schema` is `None` for tools that only read.
    async fn open_with(url: &str, schema: Option<Schema>) -> Result<Self, RegistryError> {
        let pool = Self::connect(url).await?;
        let Some(schema) = schema else {
            let registry = Self::empty(pool, url);
            registry.load(false, url).await?;
            return Ok(registry);
        };
        let sqlite = url.starts_with("sqlite:");
        match schema {
            Schema::Migrate => {
                let done = migrations::migrate(&pool, sqlite).await?;
                if done.from != done.to {
                    tracing::info!(from = done.from, to = done.to, "database schema migrated");
                }
            }
            Schema::RequireLatest => migrations::require_latest(&pool).await?,
        }
        let mut registry = Self::empty(pool, url);
        if !sqlite {
            let high = feed::high_water(&registry.pool).await?;
            registry.feed = Some(feed::Feed::starting_at(high));
        }
        registry.load(true, url).await?;
        Ok(registry)
    }

    fn empty(pool: AnyPool, url: &str) -> Self {
        Self {
            pool,
            is_sqlite: url.starts_with("sqlite:"),
            sqlite_file: load::sqlite_file(url),
            index: RwLock::new(BTreeMap::new()),
            publishing: crate::key_locks::KeyLocks::new(),
            deadlines: Mutex::new(Default::default()),
            used: Mutex::new(Vec::new()),
            leases: Default::default(),
            claim: Mutex::new(None),
            feed: None,
            instance: instance_id(),
        }
    }

    /// Close every connection; SQLite then checkpoints its write-ahead log into the database
    /// file, so a stopped daemon leaves one self-contained file behind.
    pub async fn close(&self) {
        if let Err(e) = self.return_leases().await {
            tracing::warn!(error = %e, "could not return unspent max_operations leases; those operations are lost to their versions");
        }
        if let Err(e) = self.release_leases().await {
            tracing::warn!(error = %e, "could not give up the scheduler lease; another instance takes over when its term ends");
        }
        if self.is_sqlite {
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
            {
                tracing::warn!(error = %e, "could not checkpoint the registry's write-ahead log");
            }
        }
        self.pool.close().await;
        // Released only now: until the pool is closed this process still writes the file.
        self.claim.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The database file when the registry is an SQLite file (the audit writer opens its own
    /// connection to it).
    pub fn sqlite_file(&self) -> Option<&std::path::Path> {
        self.sqlite_file.as_deref()
    }

    /// The database, shared with the audit trail and the features' own tables.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn get(&self, name: &KeyName) -> Option<Arc<KeyRecord>> {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name.as_str())
            .cloned()
    }

    /// Up to `limit` keys whose name starts with `prefix` and sorts after `after`, in name order,
    /// keeping only those `keep` accepts; the flag says whether more would follow.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&KeyRecord) -> bool,
    ) -> (Vec<Arc<KeyRecord>>, bool) {
        use std::ops::Bound;
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut page: Vec<Arc<KeyRecord>> = index
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.as_str().starts_with(prefix))
            .filter(|(_, v)| keep(v))
            .take(limit.saturating_add(1))
            .map(|(_, v)| v.clone())
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    pub fn len(&self) -> usize {
        self.index.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Claim a name before anything is generated, so two concurrent creates of one name cannot
    /// both reach the device.
    pub async fn reserve(
        &self,
        name: &KeyName,
        key_type: KeyType,
        lifecycle: &Lifecycle,
        created_at: i64,
        created_by: &str,
    ) -> Result<(), RegistryError> {
        let res = sqlx::query(INSERT_KEY)
            .bind(name.as_str())
            .bind(key_type.as_str())
            .bind(created_at)
            .bind(created_by)
            .bind(lifecycle.rotation_period.map(to_i64))
            .bind(to_i64(lifecycle.verify_grace))
            .bind(lifecycle.max_operations.map(to_i64))
            .bind(i64::from(lifecycle.exportable))
            .bind(None::<String>)
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(RegistryError::Exists),
            Err(e) => Err(e.into()),
        }
    }

    /// Record many new keys (each with its versions) in one transaction, publishing them after
    /// it commits. A name already taken is reported per key (`None`) and skips only that key.
    pub async fn insert_new_keys(
        &self,
        recs: Vec<KeyRecord>,
    ) -> Result<Vec<Option<Arc<KeyRecord>>>, RegistryError> {
        let _publishing = self
            .publishing
            .lock_many(recs.iter().map(|r| r.name.as_str()))
            .await;
        let mut tx = self.pool.begin().await?;
        let mut fresh = Vec::with_capacity(recs.len());
        let mut fed = Vec::new();
        for rec in recs {
            let l = &rec.lifecycle;
            let done = sqlx::query(&format!("{INSERT_KEY} ON CONFLICT (name) DO NOTHING"))
                .bind(rec.name.as_str())
                .bind(rec.key_type.as_str())
                .bind(rec.created_at)
                .bind(&*rec.created_by)
                .bind(l.rotation_period.map(to_i64))
                .bind(to_i64(l.verify_grace))
                .bind(l.max_operations.map(to_i64))
                .bind(i64::from(l.exportable))
                .bind(rec.derive_from.as_ref().map(KeyName::as_str))
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                fresh.push(None);
                continue;
            }
            for v in &rec.versions {
                insert_version(&mut tx, &rec.name, v).await?;
            }
            if self.feed.is_some() {
                fed.push(feed::record(&mut tx, &rec.name).await?);
            }
            fresh.push(Some(rec));
        }
        tx.commit().await?;
        let published = fresh
            .into_iter()
            .map(|r| r.map(|rec| self.publish(rec)))
            .collect();
        self.seen_own(fed);
        Ok(published)
    }

    /// Give back a reserved name whose generation failed.
    pub async fn release(&self, name: &KeyName) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM keys WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM key_versions v WHERE v.name = $1)")
            .bind(name.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record the first version of a reserved key and publish it in the index.
    pub async fn insert_first_version(
        &self,
        rec: KeyRecord,
    ) -> Result<Arc<KeyRecord>, RegistryError> {
        let _publishing = self.publishing.lock(rec.name.as_str()).await;
        let mut tx = self.pool.begin().await?;
        for v in &rec.versions {
            insert_version(&mut tx, &rec.name, v).await?;
        }
        let fed = match self.feed {
            Some(_) => Some(feed::record(&mut tx, &rec.name).await?),
            None => None,
        };
        tx.commit().await?;
        let published = self.publish(rec);
        self.seen_own(fed);
        Ok(published)
    }

    /// Make `new` the record of its key: versions it adds are inserted, versions whose state
    /// changed are updated, changed settings are written; all in one transaction, and the index
    /// changes only after it commits. Callers serialize changes to one key in this process; the
    /// database is the truth across processes: each version changes only from the state `old`
    /// saw (compare-and-set), and a version number already taken is refused. When either finds
    /// `old` stale, nothing is written, the key is read again and the answer is
    /// [`RegistryError::Conflict`].
    pub async fn commit(
        &self,
        old: &KeyRecord,
        new: KeyRecord,
    ) -> Result<Arc<KeyRecord>, RegistryError> {
        let _publishing = self.publishing.lock(new.name.as_str()).await;
        match self.write_change(old, &new).await {
            Ok(fed) => {
                let published = self.publish(new);
                self.seen_own(fed);
                Ok(published)
            }
            Err(RegistryError::Conflict(_)) | Err(RegistryError::Exists) => {
                // The answer is the conflict either way; a failed read leaves the stale copy,
                // which the next change finds stale again.
                if let Err(e) = self.read_again(&new.name).await {
                    tracing::warn!(key = %new.name, error = %e, "could not read a changed key again");
                }
                Err(RegistryError::Conflict(new.name.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    fn forget(&self, name: &KeyName) {
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name.as_str());
    }

    pub(crate) fn publish(&self, rec: KeyRecord) -> Arc<KeyRecord> {
        let rec = Arc::new(rec);
        // Deadlines first: a scheduler pass that sees the new record due finds it in the index.
        let mut deadlines = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        let old = self
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.name.clone(), rec.clone());
        deadlines.update(old.as_deref(), &rec);
        rec
    }

    /// Keys with a scheduled change (rotation, end of grace) due at or before `now`.
    pub fn due(&self, now: i64) -> Vec<KeyName> {
        self.deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(now)
    }

    /// Count `uses` operations on `v` of `name`, queueing the version for the next usage flush.
    pub fn count_use(&self, name: &KeyName, v: &VersionRecord, uses: u64) {
        let u = &v.operations;
        u.unflushed.fetch_add(uses, Ordering::Relaxed);
        if !u.queued.load(Ordering::Relaxed) && !u.queued.swap(true, Ordering::AcqRel) {
            self.used.lock().unwrap_or_else(|p| p.into_inner()).push((
                name.clone(),
                v.version,
                u.clone(),
            ));
        }
    }

    /// Every key: a snapshot of the whole index, O(keys). The scheduler uses [`Registry::due`]
    /// instead; this is for rare whole-registry tasks.
    pub fn all(&self) -> Vec<Arc<KeyRecord>> {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Write operation counts that changed since the last flush. Counts are kept in memory on
    /// the hot path; a crash loses at most the operations since the last flush (a cap does not
    /// depend on them: see `cap`). Only versions used since the last flush are visited.
    pub async fn flush_usage(&self) -> Result<usize, RegistryError> {
        let queued = std::mem::take(&mut *self.used.lock().unwrap_or_else(|p| p.into_inner()));
        let mut changed = Vec::new();
        for (name, version, u) in queued {
            // Unqueue before taking the count, so an operation from now on queues it again.
            u.queued.store(false, Ordering::Release);
            let delta = u.unflushed.swap(0, Ordering::AcqRel);
            if delta > 0 {
                changed.push((name, version, delta, u));
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        // Rows in key and version order, as a change locks them (`still_as`): two transactions
        // that lock in one order cannot deadlock.
        changed.sort_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        let written = async {
            let mut tx = self.pool.begin().await?;
            for (name, version, delta, _) in &changed {
                sqlx::query(
                    "UPDATE key_versions SET operations = operations + $1 WHERE name = $2 AND version = $3",
                )
                .bind(to_i64(*delta))
                .bind(name.as_str())
                .bind(i64::from(*version))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }
        .await;
        let failed = written.is_err();
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for (name, version, delta, u) in &changed {
            if failed {
                // Back into the count and the queue for the next attempt.
                u.unflushed.fetch_add(*delta, Ordering::AcqRel);
                if !u.queued.swap(true, Ordering::AcqRel) {
                    used.push((name.clone(), *version, u.clone()));
                }
            } else {
                u.base.fetch_add(*delta, Ordering::AcqRel);
            }
        }
        written?;
        Ok(changed.len())
    }
}

const INSERT_KEY: &str = "INSERT INTO keys (name, key_type, created_at, created_by, rotation_period, verify_grace, max_operations, exportable, derive_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &KeyName,
    v: &VersionRecord,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO key_versions (name, version, state, created_at, state_changed_at, changed_by, reason, grace_until, operations, object_ref, public_key, kcv, kdf, master_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(name.as_str())
    .bind(i64::from(v.version))
    .bind(v.state.as_str())
    .bind(v.created_at)
    .bind(v.state_changed_at)
    .bind(&*v.changed_by)
    .bind(v.reason.as_deref())
    .bind(v.grace_until)
    .bind(to_i64(v.operations.count()))
    .bind(hex_encode(&v.object.0))
    .bind(v.public_key_der.as_deref().map(hex_encode))
    .bind(v.kcv.as_deref())
    .bind(v.derivation.map(|d| d.kdf.as_str()))
    .bind(v.derivation.map(|d| i64::from(d.master_version)))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
