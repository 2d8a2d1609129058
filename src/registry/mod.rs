//! Key metadata: names, types, versions, states and the backend object each version lives in.
//!
//! The database (SQLite by default, PostgreSQL through the same `sqlx::Any` code) is the record;
//! an in-memory index mirrors it so the signing path never waits on SQL. Every change is written
//! to the database first and reaches the index only after it is durable.
//!
//! Columns are portable SQL (`TEXT`, `BIGINT`): binary values are stored hex-encoded so the same
//! schema serves both engines.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::backend::ObjectRef;
use crate::keys::{KeyName, KeyType, VersionState};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("key already exists")]
    Exists,
    #[error("corrupt row for key '{name}': {what}")]
    Corrupt { name: String, what: String },
}

#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub version: u32,
    pub state: VersionState,
    /// Unix time in seconds.
    pub created_at: i64,
    pub object: ObjectRef,
    /// DER SubjectPublicKeyInfo for asymmetric keys.
    pub public_key_der: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub name: KeyName,
    pub key_type: KeyType,
    pub created_at: i64,
    pub created_by: String,
    pub versions: Vec<VersionRecord>,
}

impl KeyRecord {
    pub fn active(&self) -> Option<&VersionRecord> {
        self.versions
            .iter()
            .find(|v| v.state == VersionState::Active)
    }

    pub fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS keys (
        name TEXT PRIMARY KEY,
        key_type TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS key_versions (
        name TEXT NOT NULL REFERENCES keys(name),
        version BIGINT NOT NULL,
        state TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        object_ref TEXT NOT NULL,
        public_key TEXT,
        PRIMARY KEY (name, version))",
];

pub struct Registry {
    pool: AnyPool,
    index: RwLock<BTreeMap<String, Arc<KeyRecord>>>,
}

impl Registry {
    pub async fn open(url: &str) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await?;
        if url.starts_with("sqlite:") {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        // A crash between reserving a name and recording its first version leaves a key with no
        // versions; it never served, so it is dropped to free the name.
        let orphans = sqlx::query(
            "DELETE FROM keys WHERE NOT EXISTS (SELECT 1 FROM key_versions v WHERE v.name = keys.name)",
        )
        .execute(&pool)
        .await?;
        if orphans.rows_affected() > 0 {
            tracing::warn!(
                count = orphans.rows_affected(),
                "dropped keys reserved but never generated"
            );
        }
        let registry = Self {
            pool,
            index: RwLock::new(BTreeMap::new()),
        };
        registry.load().await?;
        Ok(registry)
    }

    async fn load(&self) -> Result<(), RegistryError> {
        let keys = sqlx::query("SELECT name, key_type, created_at, created_by FROM keys")
            .fetch_all(&self.pool)
            .await?;
        let mut map: BTreeMap<String, KeyRecord> = BTreeMap::new();
        for row in keys {
            let rec = key_from_row(&row)?;
            map.insert(rec.name.as_str().to_owned(), rec);
        }
        let versions = sqlx::query(
            "SELECT name, version, state, created_at, object_ref, public_key FROM key_versions ORDER BY name, version",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in versions {
            let name: String = row.try_get("name")?;
            let v = version_from_row(&name, &row)?;
            if let Some(k) = map.get_mut(&name) {
                k.versions.push(v);
            }
        }
        let index = map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        Ok(())
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
            Some(a) if a >= prefix => Bound::Excluded(a.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let mut page: Vec<Arc<KeyRecord>> = index
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, v)| keep(v))
            .take(limit + 1)
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
        created_at: i64,
        created_by: &str,
    ) -> Result<(), RegistryError> {
        let res = sqlx::query(
            "INSERT INTO keys (name, key_type, created_at, created_by) VALUES ($1, $2, $3, $4)",
        )
        .bind(name.as_str())
        .bind(key_type.as_str())
        .bind(created_at)
        .bind(created_by)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(RegistryError::Exists),
            Err(e) => Err(e.into()),
        }
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
        name: &KeyName,
        key_type: KeyType,
        created_at: i64,
        created_by: &str,
        version: VersionRecord,
    ) -> Result<Arc<KeyRecord>, RegistryError> {
        sqlx::query(
            "INSERT INTO key_versions (name, version, state, created_at, object_ref, public_key) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(name.as_str())
        .bind(i64::from(version.version))
        .bind(version.state.as_str())
        .bind(version.created_at)
        .bind(hex_encode(&version.object.0))
        .bind(version.public_key_der.as_deref().map(hex_encode))
        .execute(&self.pool)
        .await?;
        let rec = Arc::new(KeyRecord {
            name: name.clone(),
            key_type,
            created_at,
            created_by: created_by.to_owned(),
            versions: vec![version],
        });
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.as_str().to_owned(), rec.clone());
        Ok(rec)
    }
}

fn key_from_row(row: &AnyRow) -> Result<KeyRecord, RegistryError> {
    let name: String = row.try_get("name")?;
    let corrupt = |what: &str| RegistryError::Corrupt {
        name: name.clone(),
        what: what.to_owned(),
    };
    let key_type: String = row.try_get("key_type")?;
    Ok(KeyRecord {
        name: KeyName::parse(&name).map_err(|_| corrupt("name"))?,
        key_type: KeyType::parse(&key_type).ok_or_else(|| corrupt("key_type"))?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
        versions: Vec::new(),
    })
}

fn version_from_row(name: &str, row: &AnyRow) -> Result<VersionRecord, RegistryError> {
    let corrupt = |what: &str| RegistryError::Corrupt {
        name: name.to_owned(),
        what: what.to_owned(),
    };
    let state: String = row.try_get("state")?;
    let object: String = row.try_get("object_ref")?;
    let public: Option<String> = row.try_get("public_key")?;
    let version: i64 = row.try_get("version")?;
    Ok(VersionRecord {
        version: u32::try_from(version).map_err(|_| corrupt("version"))?,
        state: VersionState::parse(&state).ok_or_else(|| corrupt("state"))?,
        created_at: row.try_get("created_at")?,
        object: ObjectRef(hex_decode(&object).ok_or_else(|| corrupt("object_ref"))?),
        public_key_der: match public {
            Some(p) => Some(hex_decode(&p).ok_or_else(|| corrupt("public_key"))?),
            None => None,
        },
    })
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}
