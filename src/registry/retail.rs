//! Single-use and counting state for the retail flows: one-time customer tokens, challenges,
//! device keys and their nonces, message counters and gift-card codes. Every "use once" is one
//! conditional UPDATE or a primary-key INSERT, so of many concurrent attempts exactly one wins.

use sqlx::Row;

use super::{Registry, RegistryError};

pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS otps (
        idx TEXT PRIMARY KEY, key_name TEXT NOT NULL, subject TEXT NOT NULL,
        expires_at BIGINT NOT NULL, redeemed_at BIGINT)",
    "CREATE TABLE IF NOT EXISTS challenges (
        id TEXT PRIMARY KEY, key_name TEXT NOT NULL, subject TEXT NOT NULL, challenge TEXT NOT NULL,
        expires_at BIGINT NOT NULL, used_at BIGINT)",
    "CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY, realm TEXT NOT NULL, subject TEXT NOT NULL, alg TEXT NOT NULL,
        public_key TEXT NOT NULL, state TEXT NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS nonces (
        device TEXT NOT NULL, nonce TEXT NOT NULL, expires_at BIGINT NOT NULL,
        PRIMARY KEY (device, nonce))",
    "CREATE TABLE IF NOT EXISTS counters (
        key_name TEXT NOT NULL, sender TEXT NOT NULL, side TEXT NOT NULL, value BIGINT NOT NULL,
        PRIMARY KEY (key_name, sender, side))",
    "CREATE TABLE IF NOT EXISTS giftcodes (
        id TEXT PRIMARY KEY, key_name TEXT NOT NULL, code_idx TEXT NOT NULL UNIQUE, pin_idx TEXT,
        state TEXT NOT NULL, failed_pins BIGINT NOT NULL, created_at BIGINT NOT NULL,
        superseded_by TEXT)",
];

#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub realm: String,
    pub subject: String,
    pub alg: String,
    pub public_key: String,
    pub state: String,
}

#[derive(Debug, Clone)]
pub struct GiftCode {
    pub id: String,
    pub key: String,
    pub pin_idx: Option<String>,
    pub state: String,
    pub failed_pins: i64,
}

fn unique(e: sqlx::Error) -> RegistryError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => RegistryError::Exists,
        other => other.into(),
    }
}

impl Registry {
    pub async fn insert_otp(
        &self,
        idx: &str,
        key: &str,
        subject: &str,
        expires_at: i64,
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO otps (idx, key_name, subject, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(idx)
        .bind(key)
        .bind(subject)
        .bind(expires_at)
        .execute(self.pool())
        .await
        .map_err(unique)?;
        Ok(())
    }

    /// Consume an unexpired, unredeemed one-time token; its subject if this call won.
    pub async fn redeem_otp(
        &self,
        idx: &str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, RegistryError> {
        let res = sqlx::query("UPDATE otps SET redeemed_at = $1 WHERE idx = $2 AND key_name = $3 AND redeemed_at IS NULL AND expires_at > $1")
            .bind(now).bind(idx).bind(key)
            .execute(self.pool()).await?;
        if res.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT subject FROM otps WHERE idx = $1")
            .bind(idx)
            .fetch_one(self.pool())
            .await?;
        Ok(Some(row.try_get("subject")?))
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

    /// Register a device key and, in the same transaction, revoke the subject's earlier ones.
    pub async fn register_device(&self, d: &Device, now: i64) -> Result<(), RegistryError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("UPDATE devices SET state = 'revoked' WHERE realm = $1 AND subject = $2 AND state = 'active'")
            .bind(&d.realm).bind(&d.subject).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO devices (id, realm, subject, alg, public_key, state, created_at) VALUES ($1, $2, $3, $4, $5, 'active', $6)")
            .bind(&d.id).bind(&d.realm).bind(&d.subject).bind(&d.alg).bind(&d.public_key).bind(now)
            .execute(&mut *tx).await.map_err(unique)?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn device(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        let row = sqlx::query(
            "SELECT id, realm, subject, alg, public_key, state FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(Device {
                id: r.try_get("id")?,
                realm: r.try_get("realm")?,
                subject: r.try_get("subject")?,
                alg: r.try_get("alg")?,
                public_key: r.try_get("public_key")?,
                state: r.try_get("state")?,
            })
        })
        .transpose()
    }

    pub async fn revoke_device(&self, id: &str) -> Result<bool, RegistryError> {
        let res =
            sqlx::query("UPDATE devices SET state = 'revoked' WHERE id = $1 AND state = 'active'")
                .bind(id)
                .execute(self.pool())
                .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Record a device nonce; `false` if it was seen before (a replay).
    pub async fn use_nonce(
        &self,
        device: &str,
        nonce: &str,
        expires_at: i64,
    ) -> Result<bool, RegistryError> {
        match sqlx::query("INSERT INTO nonces (device, nonce, expires_at) VALUES ($1, $2, $3)")
            .bind(device)
            .bind(nonce)
            .bind(expires_at)
            .execute(self.pool())
            .await
            .map_err(unique)
        {
            Ok(_) => Ok(true),
            Err(RegistryError::Exists) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next counter for (key, sender) on the sealing side: strictly increasing, durable.
    pub async fn next_counter(&self, key: &str, sender: &str) -> Result<i64, RegistryError> {
        let mut tx = self.pool().begin().await?;
        let current: Option<i64> = sqlx::query(
            "SELECT value FROM counters WHERE key_name = $1 AND sender = $2 AND side = 'seal'",
        )
        .bind(key)
        .bind(sender)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get("value"))
        .transpose()?;
        let next = current.unwrap_or(0) + 1;
        if current.is_some() {
            sqlx::query("UPDATE counters SET value = $1 WHERE key_name = $2 AND sender = $3 AND side = 'seal'")
                .bind(next).bind(key).bind(sender).execute(&mut *tx).await?;
        } else {
            sqlx::query(
                "INSERT INTO counters (key_name, sender, side, value) VALUES ($1, $2, 'seal', $3)",
            )
            .bind(key)
            .bind(sender)
            .bind(next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(next)
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

    pub async fn insert_giftcode(
        &self,
        id: &str,
        key: &str,
        code_idx: &str,
        pin_idx: Option<&str>,
        now: i64,
    ) -> Result<(), RegistryError> {
        sqlx::query("INSERT INTO giftcodes (id, key_name, code_idx, pin_idx, state, failed_pins, created_at) VALUES ($1, $2, $3, $4, 'active', 0, $5)")
            .bind(id).bind(key).bind(code_idx).bind(pin_idx).bind(now)
            .execute(self.pool()).await.map_err(unique)?;
        Ok(())
    }

    fn giftcode_from(r: &sqlx::any::AnyRow) -> Result<GiftCode, RegistryError> {
        Ok(GiftCode {
            id: r.try_get("id")?,
            key: r.try_get("key_name")?,
            pin_idx: r.try_get("pin_idx")?,
            state: r.try_get("state")?,
            failed_pins: r.try_get("failed_pins")?,
        })
    }

    pub async fn giftcode_by_index(
        &self,
        code_idx: &str,
    ) -> Result<Option<GiftCode>, RegistryError> {
        let row = sqlx::query(
            "SELECT id, key_name, pin_idx, state, failed_pins FROM giftcodes WHERE code_idx = $1",
        )
        .bind(code_idx)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(Self::giftcode_from).transpose()
    }

    pub async fn giftcode(&self, id: &str) -> Result<Option<GiftCode>, RegistryError> {
        let row = sqlx::query(
            "SELECT id, key_name, pin_idx, state, failed_pins FROM giftcodes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(Self::giftcode_from).transpose()
    }

    /// Count a wrong PIN; at `limit` the code locks. Returns the new count.
    pub async fn giftcode_wrong_pin(&self, id: &str, limit: i64) -> Result<i64, RegistryError> {
        sqlx::query("UPDATE giftcodes SET failed_pins = failed_pins + 1, state = CASE WHEN failed_pins + 1 >= $2 THEN 'locked' ELSE state END WHERE id = $1 AND state = 'active'")
            .bind(id).bind(limit).execute(self.pool()).await?;
        Ok(self.giftcode(id).await?.map_or(0, |g| g.failed_pins))
    }

    pub async fn giftcode_reset_pins(&self, id: &str) -> Result<(), RegistryError> {
        sqlx::query("UPDATE giftcodes SET failed_pins = 0 WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Set the state of a code that is in one of `from`; `false` when it was not.
    pub async fn giftcode_state(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
    ) -> Result<bool, RegistryError> {
        let mut changed = false;
        for f in from {
            let res = sqlx::query("UPDATE giftcodes SET state = $1, failed_pins = CASE WHEN $1 = 'active' THEN 0 ELSE failed_pins END WHERE id = $2 AND state = $3")
                .bind(to).bind(id).bind(*f).execute(self.pool()).await?;
            changed |= res.rows_affected() == 1;
        }
        Ok(changed)
    }

    /// Replace a code: the new one is inserted and the old one superseded in one transaction, and
    /// only if the old one was still active.
    pub async fn reissue_giftcode(
        &self,
        old: &str,
        new_id: &str,
        key: &str,
        code_idx: &str,
        pin_idx: Option<&str>,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let mut tx = self.pool().begin().await?;
        let res = sqlx::query("UPDATE giftcodes SET state = 'superseded', superseded_by = $1 WHERE id = $2 AND state = 'active'")
            .bind(new_id).bind(old).execute(&mut *tx).await?;
        if res.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO giftcodes (id, key_name, code_idx, pin_idx, state, failed_pins, created_at) VALUES ($1, $2, $3, $4, 'active', 0, $5)")
            .bind(new_id).bind(key).bind(code_idx).bind(pin_idx).bind(now)
            .execute(&mut *tx).await.map_err(unique)?;
        tx.commit().await?;
        Ok(true)
    }
}
