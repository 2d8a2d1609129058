//! Paid purchases: one row per (store, POS, purchase id). Makes paying idempotent (the same
//! purchase paid again gets the same "paid" token, never a second one for another amount) and
//! makes the online check of a "paid" token single-use.

use sqlx::{AnyPool, Row};

use crate::registry::RegistryError;

#[derive(Debug, Clone)]
pub struct PurchaseRecord {
    pub amount: i64,
    pub currency: String,
    pub paid_token: String,
    pub consumed_at: Option<i64>,
}

/// The purchases table on the registry's database.
pub struct PurchaseStore {
    pool: AnyPool,
}

impl PurchaseStore {
    /// The store on the registry's database (its tables are made by the migrations).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// `Err(Exists)` when the purchase was already paid (possibly by a concurrent request).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_purchase(
        &self,
        store: &str,
        pos: &str,
        purchase: &str,
        amount: i64,
        currency: &str,
        payment_ref: &str,
        paid_token: &str,
        issued_at: i64,
    ) -> Result<(), RegistryError> {
        let res = sqlx::query(
            "INSERT INTO purchases (store, pos, purchase, amount, currency, payment_ref, paid_token, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(store)
        .bind(pos)
        .bind(purchase)
        .bind(amount)
        .bind(currency)
        .bind(payment_ref)
        .bind(paid_token)
        .bind(issued_at)
        .execute(self.pool())
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(RegistryError::Exists),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn purchase(
        &self,
        store: &str,
        pos: &str,
        purchase: &str,
    ) -> Result<Option<PurchaseRecord>, RegistryError> {
        let row = sqlx::query("SELECT amount, currency, paid_token, consumed_at FROM purchases WHERE store = $1 AND pos = $2 AND purchase = $3")
            .bind(store)
            .bind(pos)
            .bind(purchase)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| {
            Ok(PurchaseRecord {
                amount: r.try_get("amount")?,
                currency: r.try_get("currency")?,
                paid_token: r.try_get("paid_token")?,
                consumed_at: r.try_get("consumed_at")?,
            })
        })
        .transpose()
    }

    /// Mark the "paid" token used; `false` if it already was (a replay). Atomic, so of many
    /// concurrent checks exactly one succeeds.
    pub async fn consume_purchase(
        &self,
        store: &str,
        pos: &str,
        purchase: &str,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let res = sqlx::query(
            "UPDATE purchases SET consumed_at = $1 WHERE store = $2 AND pos = $3 AND purchase = $4 AND consumed_at IS NULL",
        )
        .bind(now)
        .bind(store)
        .bind(pos)
        .bind(purchase)
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() == 1)
    }
}
