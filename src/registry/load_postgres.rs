//! The start-up read of a PostgreSQL registry: every key through the native driver on a
//! connection of its own. Rows arrive in the binary format and are decoded straight into the
//! columns' types, each handed to the caller's conversion as it comes. Through `sqlx::Any` each
//! row was kept whole, every value converted on the way: a million keys took 6.5-7 s and 2.8 GB
//! to read that way. (`load` turns the rows into records, as it does SQLite's.)

use futures_util::TryStreamExt;
use sqlx::Connection;

use super::RegistryError;

/// A `keys` row, in `load::KEYS` column order.
pub(super) type KeyRow = (
    String,
    String,
    i64,
    String,
    Option<i64>,
    i64,
    Option<i64>,
    i64,
    Option<String>,
);

/// A `key_versions` row, in `load::VERSIONS` column order.
pub(super) type VersionRow = (
    String,
    i64,
    String,
    i64,
    i64,
    String,
    Option<String>,
    Option<i64>,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

/// The rows of `keys_sql` and `versions_sql`, each converted as it arrives.
pub(super) async fn read<K, V>(
    url: &str,
    (keys_sql, versions_sql): (&str, &str),
    key: impl Fn(KeyRow) -> K,
    version: impl Fn(VersionRow) -> V,
) -> Result<(Vec<K>, Vec<V>), RegistryError> {
    let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
    let mut keys = Vec::new();
    let mut rows = sqlx::query_as::<_, KeyRow>(keys_sql).fetch(&mut conn);
    while let Some(r) = rows.try_next().await? {
        keys.push(key(r));
    }
    drop(rows);
    let mut versions = Vec::with_capacity(keys.len());
    let mut rows = sqlx::query_as::<_, VersionRow>(versions_sql).fetch(&mut conn);
    while let Some(r) = rows.try_next().await? {
        versions.push(version(r));
    }
    drop(rows);
    let _ = conn.close().await;
    Ok((keys, versions))
}
