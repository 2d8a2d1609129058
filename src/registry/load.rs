//! Reading the whole registry into the in-memory index at start-up.
//!
//! Both tables are read in name order (their primary-key indexes) and merged in one pass, and
//! the index is built from already sorted entries. An SQLite registry is read straight from its
//! file with `rusqlite`: through `sqlx` every row crosses threads and is converted twice, which
//! measured ~20 us per row on a busy 2-core machine, 40 s for a million keys; directly it is
//! about a microsecond. The keys are read on the calling thread and the versions on a second
//! one (start-up at a million keys: ~2.0 -> ~1.75 s warm). PostgreSQL is read through its own
//! driver (`load_postgres`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::Row;

use super::deadlines::Deadlines;
use super::{
    from_i64, hex_decode, Derivation, KeyRecord, Registry, RegistryError, Usage, VersionRecord,
};
use crate::backend::{Kdf, ObjectRef};
use crate::keys::{KeyName, KeyType, Lifecycle, VersionState};

pub(super) const KEYS: &str = "SELECT name, key_type, created_at, created_by, rotation_period, verify_grace, max_operations, exportable, derive_from FROM keys ORDER BY name";
pub(super) const VERSIONS: &str = "SELECT name, version, state, created_at, state_changed_at, changed_by, reason, grace_until, operations, object_ref, public_key, kcv, kdf, master_version FROM key_versions ORDER BY name, version";

/// The file behind an `sqlite://PATH?...` URL (none for in-memory databases).
pub(super) fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(path))
}

/// One `keys` row as stored.
struct KeyCols {
    name: String,
    key_type: String,
    created_at: i64,
    created_by: String,
    rotation_period: Option<i64>,
    verify_grace: i64,
    max_operations: Option<i64>,
    exportable: i64,
    derive_from: Option<String>,
}

/// One `key_versions` row as stored.
struct VersionCols {
    name: String,
    version: i64,
    state: String,
    created_at: i64,
    state_changed_at: i64,
    changed_by: String,
    reason: Option<String>,
    grace_until: Option<i64>,
    operations: i64,
    object_ref: String,
    public_key: Option<String>,
    kcv: Option<String>,
    kdf: Option<String>,
    master_version: Option<i64>,
}

impl KeyCols {
    fn from_pg(r: super::load_postgres::KeyRow) -> Self {
        Self {
            name: r.0,
            key_type: r.1,
            created_at: r.2,
            created_by: r.3,
            rotation_period: r.4,
            verify_grace: r.5,
            max_operations: r.6,
            exportable: r.7,
            derive_from: r.8,
        }
    }
}

impl VersionCols {
    fn from_pg(r: super::load_postgres::VersionRow) -> Self {
        Self {
            name: r.0,
            version: r.1,
            state: r.2,
            created_at: r.3,
            state_changed_at: r.4,
            changed_by: r.5,
            reason: r.6,
            grace_until: r.7,
            operations: r.8,
            object_ref: r.9,
            public_key: r.10,
            kcv: r.11,
            kdf: r.12,
            master_version: r.13,
        }
    }
}

fn corrupt(name: &str, what: &str) -> RegistryError {
    RegistryError::Corrupt {
        name: name.to_owned(),
        what: what.to_owned(),
    }
}

/// One shared copy of each identity and master name, however many keys repeat it.
#[derive(Default)]
struct Interner {
    identities: HashMap<String, Arc<str>>,
    masters: HashMap<String, KeyName>,
    /// Neighbouring rows mostly repeat the identity: checked before hashing.
    last: Option<Arc<str>>,
}

impl Interner {
    fn identity(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.last.as_ref().filter(|a| &***a == s) {
            return a.clone();
        }
        let a = match self.identities.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(s);
                self.identities.insert(s.to_owned(), a.clone());
                a
            }
        };
        self.last = Some(a.clone());
        a
    }

    fn master(&mut self, key: &str, s: &str) -> Result<KeyName, RegistryError> {
        if let Some(m) = self.masters.get(s) {
            return Ok(m.clone());
        }
        let m = KeyName::parse(s).map_err(|_| corrupt(key, "derive_from"))?;
        self.masters.insert(s.to_owned(), m.clone());
        Ok(m)
    }
}

impl KeyCols {
    fn into_record(self, interner: &mut Interner) -> Result<KeyRecord, RegistryError> {
        let n = &self.name;
        Ok(KeyRecord {
            name: KeyName::parse(n).map_err(|_| corrupt(n, "name"))?,
            key_type: KeyType::parse(&self.key_type).ok_or_else(|| corrupt(n, "key_type"))?,
            lifecycle: Lifecycle {
                rotation_period: self.rotation_period.map(from_i64),
                verify_grace: from_i64(self.verify_grace),
                max_operations: self.max_operations.map(from_i64),
                exportable: self.exportable != 0,
            },
            created_at: self.created_at,
            created_by: interner.identity(&self.created_by),
            derive_from: match &self.derive_from {
                Some(m) => Some(interner.master(n, m)?),
                None => None,
            },
            versions: Vec::with_capacity(1),
        })
    }
}

impl VersionCols {
    fn into_record(self, interner: &mut Interner) -> Result<VersionRecord, RegistryError> {
        let n = &self.name;
        let derivation = match (&self.kdf, self.master_version) {
            (None, None) => None,
            (Some(k), Some(m)) => Some(Derivation {
                kdf: Kdf::parse(k).ok_or_else(|| corrupt(n, "kdf"))?,
                master_version: u32::try_from(m).map_err(|_| corrupt(n, "master_version"))?,
            }),
            _ => return Err(corrupt(n, "kdf and master_version")),
        };
        Ok(VersionRecord {
            version: u32::try_from(self.version).map_err(|_| corrupt(n, "version"))?,
            state: VersionState::parse(&self.state).ok_or_else(|| corrupt(n, "state"))?,
            created_at: self.created_at,
            state_changed_at: self.state_changed_at,
            changed_by: interner.identity(&self.changed_by),
            reason: self.reason,
            grace_until: self.grace_until,
            operations: Arc::new(Usage::new(from_i64(self.operations))),
            kcv: self.kcv,
            derivation,
            object: ObjectRef(
                hex_decode(&self.object_ref).ok_or_else(|| corrupt(n, "object_ref"))?,
            ),
            public_key_der: match &self.public_key {
                Some(p) => Some(hex_decode(p).ok_or_else(|| corrupt(n, "public_key"))?),
                None => None,
            },
        })
    }
}

/// The index's entries in name order and keys without versions.
#[derive(Default)]
pub(super) struct Loaded {
    pub(super) entries: Vec<(KeyName, Arc<KeyRecord>)>,
    orphans: Vec<KeyName>,
}

impl Loaded {
    fn finish(&mut self, mut rec: KeyRecord) {
        // Most keys have one version; a Vec grown by `push` keeps room for four (~180 bytes
        // each), which at a million keys was half the daemon's memory and of its start-up.
        rec.versions.shrink_to_fit();
        if rec.versions.is_empty() {
            self.orphans.push(rec.name);
        } else {
            self.entries.push((rec.name.clone(), Arc::new(rec)));
        }
    }
}

/// Merge keys and versions, both in name order.
fn merge(
    keys: impl Iterator<Item = Result<KeyCols, RegistryError>>,
    versions: impl Iterator<Item = Result<VersionCols, RegistryError>>,
) -> Result<Loaded, RegistryError> {
    let mut out = Loaded::default();
    let mut interner = Interner::default();
    let mut versions = versions.peekable();
    for k in keys {
        let mut rec = k?.into_record(&mut interner)?;
        loop {
            let order = match versions.peek() {
                None => break,
                Some(Err(_)) => Ordering::Equal,
                Some(Ok(v)) => v.name.as_str().cmp(rec.name.as_str()),
            };
            match order {
                // A version whose key row is gone: nothing can use it.
                Ordering::Less => {
                    versions.next();
                }
                Ordering::Equal => {
                    if let Some(v) = versions.next() {
                        rec.versions.push(v?.into_record(&mut interner)?);
                    }
                }
                Ordering::Greater => break,
            }
        }
        if rec.versions.is_empty() {
            out.orphans.push(rec.name);
            continue;
        }
        out.entries.push((rec.name.clone(), Arc::new(rec)));
    }
    Ok(out)
}

/// Keys on the calling thread, versions on a second thread with its own connection, then
/// joined by name (both come in name order). Values are read in place (borrowed from SQLite),
/// so the allocations are the ones the index keeps, plus one name per key for the join.
fn read_sqlite(path: &Path) -> Result<Loaded, RegistryError> {
    std::thread::scope(|scope| {
        let versions = scope.spawn(|| read_versions(path));
        let keys = read_keys(path);
        let versions = versions
            .join()
            .map_err(|_| RegistryError::Load("the version reader panicked".into()))??;
        Ok(join(keys?, versions))
    })
}

fn open_read_only(path: &Path) -> Result<rusqlite::Connection, RegistryError> {
    use rusqlite::OpenFlags;
    Ok(rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?)
}

fn read_keys(path: &Path) -> Result<Vec<KeyRecord>, RegistryError> {
    let db = open_read_only(path)?;
    let mut ks = db.prepare(KEYS)?;
    let mut rows = ks.query([])?;
    let mut interner = Interner::default();
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        keys.push(key_from_sqlite(row, &mut interner)?);
    }
    Ok(keys)
}

/// One key's versions as read, under the key's name.
type VersionGroup = (Box<str>, Vec<VersionRecord>);

fn read_versions(path: &Path) -> Result<Vec<VersionGroup>, RegistryError> {
    let db = open_read_only(path)?;
    let mut vs = db.prepare(VERSIONS)?;
    let mut rows = vs.query([])?;
    let mut interner = Interner::default();
    let mut groups: Vec<VersionGroup> = Vec::new();
    while let Some(v) = rows.next()? {
        let name = v.get_ref(0)?.as_str().map_err(sql)?;
        let rec = version_from_sqlite(v, name, &mut interner)?;
        match groups.last_mut() {
            Some((n, versions)) if **n == *name => versions.push(rec),
            _ => {
                // Most keys have one version; a Vec grown by `push` keeps room for four
                // (~180 bytes each), which at a million keys was half the daemon's memory.
                if let Some((_, done)) = groups.last_mut() {
                    done.shrink_to_fit();
                }
                groups.push((name.into(), vec![rec]));
            }
        }
    }
    if let Some((_, done)) = groups.last_mut() {
        done.shrink_to_fit();
    }
    Ok(groups)
}

/// Give each key its versions; versions whose key row is gone are dropped (nothing can use
/// them), keys without versions become orphans.
fn join(keys: Vec<KeyRecord>, versions: Vec<VersionGroup>) -> Loaded {
    let mut out = Loaded {
        entries: Vec::with_capacity(keys.len()),
        orphans: Vec::new(),
    };
    let mut versions = versions.into_iter().peekable();
    for mut key in keys {
        while versions
            .next_if(|(n, _)| **n < *key.name.as_str())
            .is_some()
        {}
        if let Some((_, v)) = versions.next_if(|(n, _)| **n == *key.name.as_str()) {
            key.versions = v;
        }
        out.finish(key);
    }
    out
}

fn sql(e: rusqlite::types::FromSqlError) -> RegistryError {
    RegistryError::Sqlite(e.into())
}

/// Typed reads of one row's columns, borrowed in place.
struct Cols<'r, 's>(&'r rusqlite::Row<'s>);

impl Cols<'_, '_> {
    fn int(&self, c: usize) -> Result<i64, RegistryError> {
        self.0.get_ref(c)?.as_i64().map_err(sql)
    }

    fn opt(&self, c: usize) -> Result<Option<i64>, RegistryError> {
        self.0.get_ref(c)?.as_i64_or_null().map_err(sql)
    }

    fn str(&self, c: usize) -> Result<&str, RegistryError> {
        self.0.get_ref(c)?.as_str().map_err(sql)
    }

    fn text(&self, c: usize) -> Result<Option<&str>, RegistryError> {
        self.0.get_ref(c)?.as_str_or_null().map_err(sql)
    }
}

fn key_from_sqlite(r: &rusqlite::Row<'_>, i: &mut Interner) -> Result<KeyRecord, RegistryError> {
    let r = Cols(r);
    let n = r.str(0)?;
    Ok(KeyRecord {
        name: KeyName::parse(n).map_err(|_| corrupt(n, "name"))?,
        key_type: KeyType::parse(r.str(1)?).ok_or_else(|| corrupt(n, "key_type"))?,
        created_at: r.int(2)?,
        created_by: i.identity(r.str(3)?),
        lifecycle: Lifecycle {
            rotation_period: r.opt(4)?.map(from_i64),
            verify_grace: from_i64(r.int(5)?),
            max_operations: r.opt(6)?.map(from_i64),
            exportable: r.int(7)? != 0,
        },
        derive_from: match r.text(8)? {
            Some(m) => Some(i.master(n, m)?),
            None => None,
        },
        versions: Vec::new(),
    })
}

fn version_from_sqlite(
    r: &rusqlite::Row<'_>,
    n: &str,
    i: &mut Interner,
) -> Result<VersionRecord, RegistryError> {
    let r = Cols(r);
    let derivation = match (r.text(12)?, r.opt(13)?) {
        (None, None) => None,
        (Some(k), Some(m)) => Some(Derivation {
            kdf: Kdf::parse(k).ok_or_else(|| corrupt(n, "kdf"))?,
            master_version: u32::try_from(m).map_err(|_| corrupt(n, "master_version"))?,
        }),
        _ => return Err(corrupt(n, "kdf and master_version")),
    };
    let object = r.text(9)?.ok_or_else(|| corrupt(n, "object_ref"))?;
    Ok(VersionRecord {
        version: u32::try_from(r.int(1)?).map_err(|_| corrupt(n, "version"))?,
        state: VersionState::parse(r.text(2)?.unwrap_or_default())
            .ok_or_else(|| corrupt(n, "state"))?,
        created_at: r.int(3)?,
        state_changed_at: r.int(4)?,
        changed_by: i.identity(r.text(5)?.unwrap_or_default()),
        reason: r.text(6)?.map(str::to_owned),
        grace_until: r.opt(7)?,
        operations: Arc::new(Usage::new(from_i64(r.int(8)?))),
        object: ObjectRef(hex_decode(object).ok_or_else(|| corrupt(n, "object_ref"))?),
        public_key_der: match r.text(10)? {
            Some(p) => Some(hex_decode(p).ok_or_else(|| corrupt(n, "public_key"))?),
            None => None,
        },
        kcv: r.text(11)?.map(str::to_owned),
        derivation,
    })
}

pub(super) fn from_rows(
    keys: &[sqlx::any::AnyRow],
    versions: &[sqlx::any::AnyRow],
) -> Result<Loaded, RegistryError> {
    let keys = keys.iter().map(|r| {
        Ok(KeyCols {
            name: r.try_get("name")?,
            key_type: r.try_get("key_type")?,
            created_at: r.try_get("created_at")?,
            created_by: r.try_get("created_by")?,
            rotation_period: r.try_get("rotation_period")?,
            verify_grace: r.try_get("verify_grace")?,
            max_operations: r.try_get("max_operations")?,
            exportable: r.try_get("exportable")?,
            derive_from: r.try_get("derive_from")?,
        })
    });
    let versions = versions.iter().map(|r| {
        Ok(VersionCols {
            name: r.try_get("name")?,
            version: r.try_get("version")?,
            state: r.try_get("state")?,
            created_at: r.try_get("created_at")?,
            state_changed_at: r.try_get("state_changed_at")?,
            changed_by: r.try_get("changed_by")?,
            reason: r.try_get("reason")?,
            grace_until: r.try_get("grace_until")?,
            operations: r.try_get("operations")?,
            object_ref: r.try_get("object_ref")?,
            public_key: r.try_get("public_key")?,
            kcv: r.try_get("kcv")?,
            kdf: r.try_get("kdf")?,
            master_version: r.try_get("master_version")?,
        })
    });
    merge(keys, versions)
}

impl Registry {
    /// Fill the index. With `maintain`, on SQLite (one process), keys reserved but never given
    /// a version (a crash between the two steps of a create) are dropped to free their names;
    /// they never served. On a shared database a reservation may be another instance's create
    /// in progress: those are left to [`Registry::drop_stale_reservations`].
    pub(super) async fn load(&self, maintain: bool, url: &str) -> Result<(), RegistryError> {
        let loaded = match &self.sqlite_file {
            // Read on the calling thread, which blocks it: the registry is read once, before
            // anything is served. (On a worker or blocking-pool thread glibc would give the
            // ~1 KB-per-key records a thread arena, grown by an mprotect call per 128 KiB:
            // about a fifth of start-up at a million keys.)
            Some(path) => read_sqlite(path)?,
            None if !self.is_sqlite => {
                let (keys, versions) = super::load_postgres::read(
                    url,
                    (KEYS, VERSIONS),
                    KeyCols::from_pg,
                    VersionCols::from_pg,
                )
                .await?;
                merge(keys.into_iter().map(Ok), versions.into_iter().map(Ok))?
            }
            // An in-memory SQLite database (tests): no file to read beside the pool.
            None => {
                let keys = sqlx::query(KEYS).fetch_all(&self.pool).await?;
                let versions = sqlx::query(VERSIONS).fetch_all(&self.pool).await?;
                from_rows(&keys, &versions)?
            }
        };
        let deadlines = Deadlines::build(loaded.entries.iter().map(|(_, k)| k.as_ref()));
        // Already in order: building the map is linear.
        let index: BTreeMap<KeyName, Arc<KeyRecord>> = loaded.entries.into_iter().collect();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        *self.deadlines.lock().unwrap_or_else(|p| p.into_inner()) = deadlines;
        if maintain && self.is_sqlite && !loaded.orphans.is_empty() {
            for name in &loaded.orphans {
                self.release(name).await?;
            }
            tracing::warn!(
                count = loaded.orphans.len(),
                "dropped keys reserved but never generated"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::sqlite_file;

    #[test]
    fn finds_the_file_of_an_sqlite_url() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/tillkey/registry.db?mode=rwc"),
            Some("/var/lib/tillkey/registry.db".into())
        );
        assert_eq!(sqlite_file("sqlite:r.db"), Some("r.db".into()));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://h/db"), None);
    }

    #[test]
    fn hex_decoding_takes_both_cases_and_refuses_the_rest() {
        use super::hex_decode;
        assert_eq!(hex_decode("00ff9Aa0"), Some(vec![0x00, 0xff, 0x9a, 0xa0]));
        assert_eq!(hex_decode(""), Some(vec![]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("g0"), None);
        assert_eq!(hex_decode("/0"), None);
        assert_eq!(hex_decode(":0"), None);
    }
}
