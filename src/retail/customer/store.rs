//! One-time customer tokens (stored by keyed index, never in the clear), registered device keys and the nonces each device has used. Every "use once" is one conditional UPDATE or a primary-key INSERT, so of many
//! concurrent attempts exactly one wins.

use sqlx::{AnyPool, Row};

use crate::registry::{unique, RegistryError};

#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub realm: String,
    pub subject: String,
    pub alg: String,
    pub public_key: String,
    pub state: String,
}

pub struct CustomerStore {
    pool: AnyPool,
}

impl CustomerStore {
    /// The store on the registry's database (its tables are made by the migrations).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    fn pool(&self) -> &AnyPool {
        &self.pool
    }

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
}
