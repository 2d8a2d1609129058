//! Work that one instance should do for all (the scheduler's timed rotations) goes to whoever
//! holds a lease, kept on the database's clock, so instances need not agree on the time. The
//! lease only saves duplicated work: every change is still compare-and-set (`change`), so two
//! holders at once, or a holder that stalls past its term, cannot make a wrong change.

use sqlx::Row;

use super::{Registry, RegistryError};

impl Registry {
    /// Take or renew the lease `name` for `term_ms` if it is free, expired or already this
    /// instance's; whether this instance holds it now. On SQLite this instance is the only one.
    pub async fn hold_lease(&self, name: &str, term_ms: i64) -> Result<bool, RegistryError> {
        if self.is_sqlite {
            return Ok(true);
        }
        let held = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE
               SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
               WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now()
             RETURNING holder",
        )
        .bind(name)
        .bind(self.instance.as_str())
        .bind(term_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(held
            .map(|r| r.try_get::<String, _>("holder"))
            .transpose()?
            .as_deref()
            == Some(self.instance.as_str()))
    }

    /// Give up every lease this instance holds (at a clean shutdown, once its scheduler has
    /// stopped), so another instance takes over at its next pass rather than when the term
    /// runs out. A process that dies without this still loses its leases with their term.
    pub async fn release_leases(&self) -> Result<(), RegistryError> {
        if self.is_sqlite {
            return Ok(());
        }
        sqlx::query("DELETE FROM leases WHERE holder = $1")
            .bind(self.instance.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
