//! Gift codes by keyed index, their PIN index, state and failed PIN count. Every "use once" is one conditional UPDATE or a primary-key INSERT, so of many
//! concurrent attempts exactly one wins.

use sqlx::{AnyPool, Row};

use crate::registry::{unique, RegistryError};

#[derive(Debug, Clone)]
pub struct GiftCode {
    pub id: String,
    pub key: String,
    pub pin_idx: Option<String>,
    pub state: String,
    pub failed_pins: i64,
}

pub struct GiftCodeStore {
    pool: AnyPool,
}

impl GiftCodeStore {
    /// The store on the registry's database (its tables are made by the migrations).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    fn pool(&self) -> &AnyPool {
        &self.pool
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

    /// Claim one of a code's `limit` PIN attempts before its PIN is compared, counting it as
    /// failed until it proves right: one conditional UPDATE, so however many checks run at once
    /// (here or on other instances) at most `limit` PINs are compared per lock cycle. `false`
    /// when the code is not active or its attempts are all taken.
    pub async fn claim_pin_attempt(&self, id: &str, limit: i64) -> Result<bool, RegistryError> {
        let done = sqlx::query(
            "UPDATE giftcodes SET failed_pins = failed_pins + 1 \
             WHERE id = $1 AND state = 'active' AND failed_pins < $2",
        )
        .bind(id)
        .bind(limit)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A claimed PIN was wrong: its attempt stays counted, and a code whose attempts are all
    /// counted locks (keeping its count). Returns the count.
    pub async fn pin_was_wrong(&self, id: &str, limit: i64) -> Result<i64, RegistryError> {
        sqlx::query(
            "UPDATE giftcodes SET state = 'locked' \
             WHERE id = $1 AND state = 'active' AND failed_pins >= $2",
        )
        .bind(id)
        .bind(limit)
        .execute(self.pool())
        .await?;
        Ok(self.giftcode(id).await?.map_or(0, |g| g.failed_pins))
    }

    /// A claimed PIN was right: the count starts again, unless the code locked meanwhile (other
    /// attempts used up the rest and were wrong), which it then stays, answering `false`.
    pub async fn pin_was_right(&self, id: &str) -> Result<bool, RegistryError> {
        let done =
            sqlx::query("UPDATE giftcodes SET failed_pins = 0 WHERE id = $1 AND state = 'active'")
                .bind(id)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Take one check from `who`'s bucket of `burst` checks, refilled at `per_second`, shared by
    /// every instance on the database: one statement refills and takes, so simultaneous checks
    /// (here or elsewhere) cannot take the same check twice. Buckets hold milli-checks (integers
    /// on both engines); a clock behind the bucket's refills nothing.
    pub async fn take_check(
        &self,
        who: &str,
        now_ms: i64,
        burst: i64,
        per_second: i64,
    ) -> Result<bool, RegistryError> {
        const REFILLED: &str = "(CASE WHEN throttles.tokens + \
            (CASE WHEN $2 > throttles.at_ms THEN $2 - throttles.at_ms ELSE 0 END) * $3 > $4 \
            THEN $4 ELSE throttles.tokens + \
            (CASE WHEN $2 > throttles.at_ms THEN $2 - throttles.at_ms ELSE 0 END) * $3 END)";
        let taken = sqlx::query(&format!(
            "INSERT INTO throttles (name, tokens, at_ms) VALUES ($1, $4 - 1000, $2) \
             ON CONFLICT (name) DO UPDATE SET tokens = {REFILLED} - 1000, \
             at_ms = CASE WHEN $2 > throttles.at_ms THEN $2 ELSE throttles.at_ms END \
             WHERE {REFILLED} >= 1000"
        ))
        .bind(who)
        .bind(now_ms)
        .bind(per_second)
        .bind(burst * 1000)
        .execute(self.pool())
        .await?;
        Ok(taken.rows_affected() == 1)
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
