//! Pending dual-control approvals, in the same database as the keys.

use sqlx::Row;

use super::{Registry, RegistryError};

#[derive(Debug, Clone)]
pub struct ApprovalRecord {
    pub id: String,
    /// `destroy`, `import` or `export`.
    pub action: String,
    pub key: String,
    pub version: Option<u32>,
    /// Action-specific parameters (JSON), never secret material in the clear.
    pub params: String,
    pub requested_by: String,
    pub requested_at: i64,
    pub expires_at: i64,
    /// `pending`, `executing`, `executed`, `failed`, `expired` or `cancelled`.
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    pub result: Option<String>,
}

impl Registry {
    pub async fn insert_approval(&self, a: &ApprovalRecord) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO approvals (id, action, key_name, version, params, requested_by, requested_at, expires_at, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending')",
        )
        .bind(&a.id)
        .bind(&a.action)
        .bind(&a.key)
        .bind(a.version.map(i64::from))
        .bind(&a.params)
        .bind(&a.requested_by)
        .bind(a.requested_at)
        .bind(a.expires_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, RegistryError> {
        let row = sqlx::query("SELECT * FROM approvals WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn pending_approvals(&self, now: i64) -> Result<Vec<ApprovalRecord>, RegistryError> {
        let rows = sqlx::query("SELECT * FROM approvals WHERE state = 'pending' AND expires_at > $1 ORDER BY requested_at")
            .bind(now)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Move a pending approval to `state` if it is still pending (and, when `now` is given,
    /// unexpired). `false` when someone else decided first: an approval executes at most once.
    pub async fn decide_approval(
        &self,
        id: &str,
        state: &str,
        by: &str,
        now: i64,
        require_unexpired: bool,
    ) -> Result<bool, RegistryError> {
        let res = sqlx::query(
            "UPDATE approvals SET state = $1, decided_by = $2, decided_at = $3 WHERE id = $4 AND state = 'pending' AND ($5 = 0 OR expires_at > $3)",
        )
        .bind(state)
        .bind(by)
        .bind(now)
        .bind(id)
        .bind(i64::from(require_unexpired))
        .execute(self.pool())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Record how an executing approval ended.
    pub async fn finish_approval(
        &self,
        id: &str,
        state: &str,
        result: &str,
    ) -> Result<(), RegistryError> {
        sqlx::query("UPDATE approvals SET state = $1, result = $2 WHERE id = $3")
            .bind(state)
            .bind(result)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<ApprovalRecord, RegistryError> {
    let version: Option<i64> = row.try_get("version")?;
    Ok(ApprovalRecord {
        id: row.try_get("id")?,
        action: row.try_get("action")?,
        key: row.try_get("key_name")?,
        version: version.and_then(|v| u32::try_from(v).ok()),
        params: row.try_get("params")?,
        requested_by: row.try_get("requested_by")?,
        requested_at: row.try_get("requested_at")?,
        expires_at: row.try_get("expires_at")?,
        state: row.try_get("state")?,
        decided_by: row.try_get("decided_by")?,
        decided_at: row.try_get("decided_at")?,
        result: row.try_get("result")?,
    })
}
