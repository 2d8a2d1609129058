//! Issued challenges and the message counters of sealed messages. Every "use once" is one conditional UPDATE or a primary-key INSERT, so of many
//! concurrent attempts exactly one wins.

use sqlx::{AnyPool, Row};

use crate::registry::{unique, RegistryError};

pub struct ChallengeStore {
    pool: AnyPool,
}

impl ChallengeStore {
    /// The store on the registry's database (its tables are made by the migrations).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn insert_challenge(
        &self,
        id: &str,
        key: &str,
        subject: &str,
        challenge: &str,
        expires_at: i64,
    ) -> Result<(), RegistryError> {
        sqlx::query("INSERT INTO challenges (id, key_name, subject, challenge, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(id).bind(key).bind(subject).bind(challenge).bind(expires_at)
            .execute(self.pool()).await.map_err(unique)?;
        Ok(())
    }

    /// (key, subject, challenge hex, expires_at, used) of a challenge.
    pub async fn challenge(
        &self,
        id: &str,
    ) -> Result<Option<(String, String, String, i64, bool)>, RegistryError> {
        let row = sqlx::query("SELECT key_name, subject, challenge, expires_at, used_at FROM challenges WHERE id = $1")
            .bind(id).fetch_optional(self.pool()).await?;
        row.map(|r| {
            let used: Option<i64> = r.try_get("used_at")?;
            Ok((
                r.try_get("key_name")?,
                r.try_get("subject")?,
                r.try_get("challenge")?,
                r.try_get("expires_at")?,
                used.is_some(),
            ))
        })
        .transpose()
    }

    /// Use a challenge once, before it expires.
    pub async fn use_challenge(&self, id: &str, now: i64) -> Result<bool, RegistryError> {
        let res = sqlx::query("UPDATE challenges SET used_at = $1 WHERE id = $2 AND used_at IS NULL AND expires_at > $1")
            .bind(now).bind(id).execute(self.pool()).await?;
        Ok(res.rows_affected() == 1)
    }

    /// The next counter for (key, sender) on the sealing side: strictly increasing, durable.
    pub async fn next_counter(&self, key: &str, sender: &str) -> Result<i64, RegistryError> {
        // One statement: a read and a separate write hand the same value to concurrent seals
        // under READ COMMITTED (PostgreSQL), however the transaction is wrapped.
        let row = sqlx::query(
            "INSERT INTO counters (key_name, sender, side, value) VALUES ($1, $2, 'seal', 1)
             ON CONFLICT (key_name, sender, side) DO UPDATE SET value = counters.value + 1
             RETURNING value",
        )
        .bind(key)
        .bind(sender)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get("value")?)
    }

    /// Accept `counter` on the opening side only if it is above every counter opened before.
    pub async fn advance_counter(
        &self,
        key: &str,
        sender: &str,
        counter: i64,
    ) -> Result<bool, RegistryError> {
        let res = sqlx::query("UPDATE counters SET value = $1 WHERE key_name = $2 AND sender = $3 AND side = 'open' AND value < $1")
            .bind(counter).bind(key).bind(sender).execute(self.pool()).await?;
        if res.rows_affected() == 1 {
            return Ok(true);
        }
        let exists = sqlx::query(
            "SELECT 1 AS one FROM counters WHERE key_name = $1 AND sender = $2 AND side = 'open'",
        )
        .bind(key)
        .bind(sender)
        .fetch_optional(self.pool())
        .await?
        .is_some();
        if exists {
            return Ok(false);
        }
        match sqlx::query(
            "INSERT INTO counters (key_name, sender, side, value) VALUES ($1, $2, 'open', $3)",
        )
        .bind(key)
        .bind(sender)
        .bind(counter)
        .execute(self.pool())
        .await
        .map_err(unique)
        {
            Ok(_) => Ok(true),
            // Someone opened the first message of this sender at the same moment: decide again.
            Err(RegistryError::Exists) => {
                Box::pin(self.advance_counter(key, sender, counter)).await
            }
            Err(e) => Err(e),
        }
    }
}
