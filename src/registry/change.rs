//! Writing one key's change as a compare-and-set: the database is the truth across instances.

use sqlx::Row;

use super::{hex_encode, insert_version, to_i64, unique, KeyRecord, Registry, RegistryError};

impl Registry {
    /// Answers the change feed's row for it, if there is a feed.
    pub(super) async fn write_change(
        &self,
        old: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<Option<i64>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        // SQLite serves one process (see `claim`), whose changes are serialized already; and a
        // read first would make this a read transaction that SQLite refuses to upgrade once
        // the audit writer has committed meanwhile.
        if !self.is_sqlite {
            self.still_as(&mut tx, old).await?;
        }
        if old.lifecycle != new.lifecycle {
            let l = &new.lifecycle;
            sqlx::query("UPDATE keys SET rotation_period = $1, verify_grace = $2, max_operations = $3 WHERE name = $4")
                .bind(l.rotation_period.map(to_i64))
                .bind(to_i64(l.verify_grace))
                .bind(l.max_operations.map(to_i64))
                .bind(new.name.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for v in &new.versions {
            match old.version(v.version) {
                None => insert_version(&mut tx, &new.name, v)
                    .await
                    .map_err(|e| match e {
                        RegistryError::Db(d) => unique(d),
                        other => other,
                    })?,
                Some(o) if !o.same_state(v) => {
                    let res = sqlx::query(
                        "UPDATE key_versions SET state = $1, state_changed_at = $2, changed_by = $3, reason = $4, grace_until = $5, object_ref = $6 WHERE name = $7 AND version = $8 AND state = $9 AND state_changed_at = $10",
                    )
                    .bind(v.state.as_str())
                    .bind(v.state_changed_at)
                    .bind(&*v.changed_by)
                    .bind(v.reason.as_deref())
                    .bind(v.grace_until)
                    .bind(hex_encode(&v.object.0))
                    .bind(new.name.as_str())
                    .bind(i64::from(v.version))
                    .bind(o.state.as_str())
                    .bind(o.state_changed_at)
                    .execute(&mut *tx)
                    .await?;
                    if res.rows_affected() != 1 {
                        return Err(RegistryError::Conflict(new.name.to_string()));
                    }
                }
                Some(_) => {}
            }
        }
        let fed = match self.feed {
            Some(_) => Some(super::feed::record(&mut tx, &new.name).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(fed)
    }

    /// Conflict unless the database holds `old` as this process saw it: the same settings and
    /// the same versions in the same states. The rows stay locked until the transaction ends,
    /// so no other instance changes them between this check and the writes.
    async fn still_as(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        old: &KeyRecord,
    ) -> Result<(), RegistryError> {
        let lock = " FOR UPDATE";
        let stale = || RegistryError::Conflict(old.name.to_string());
        let key = sqlx::query(&format!(
            "SELECT rotation_period, verify_grace, max_operations FROM keys WHERE name = $1{lock}"
        ))
        .bind(old.name.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(stale)?;
        let l = &old.lifecycle;
        let settings: (Option<i64>, i64, Option<i64>) = (
            key.try_get("rotation_period")?,
            key.try_get("verify_grace")?,
            key.try_get("max_operations")?,
        );
        if settings
            != (
                l.rotation_period.map(to_i64),
                to_i64(l.verify_grace),
                l.max_operations.map(to_i64),
            )
        {
            return Err(stale());
        }
        let rows = sqlx::query(&format!(
            "SELECT version, state, state_changed_at FROM key_versions WHERE name = $1 ORDER BY version{lock}"
        ))
        .bind(old.name.as_str())
        .fetch_all(&mut **tx)
        .await?;
        let same = rows.len() == old.versions.len()
            && rows.iter().zip(&old.versions).all(|(r, v)| {
                r.try_get::<i64, _>("version").ok() == Some(i64::from(v.version))
                    && r.try_get::<String, _>("state").ok().as_deref() == Some(v.state.as_str())
                    && r.try_get::<i64, _>("state_changed_at").ok() == Some(v.state_changed_at)
            });
        if same {
            Ok(())
        } else {
            Err(stale())
        }
    }
}
