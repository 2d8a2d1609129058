//! Statements committed in the same transaction as an audit entry.
//!
//! A request's entry and what the daemon keeps about its answer must be durable together: an
//! `Idempotency-Key` claim is marked as "may have changed state" by the same commit that writes
//! the request's intent entry, and its answer is stored by the commit that writes its final
//! entry (see `api::idempotency`). Were they separate commits, a process dying between them
//! would leave an answer without its entry, or a retry that runs a second time.
//!
//! The writer knows the entry's sequence number only inside the group transaction, so it binds
//! it as `$1`; a side write's own parameters are `$2` onwards, each used once and in order (so
//! SQLite's positional `?N` and PostgreSQL's `$N` read them alike).

use sqlx::Any;

/// One statement and its parameters after `$1`.
#[derive(Debug, Clone)]
pub struct SideWrite {
    pub sql: &'static str,
    pub params: Vec<SqlValue>,
}

#[derive(Debug, Clone)]
pub enum SqlValue {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
}

/// Run each `(seq, write)` inside the group's transaction; answers, per write, whether it
/// changed a row.
pub async fn run_sqlx(
    tx: &mut sqlx::Transaction<'_, Any>,
    writes: &[(u64, &SideWrite)],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut changed = Vec::with_capacity(writes.len());
    for (seq, w) in writes {
        let mut q = sqlx::query(w.sql).bind(i64::try_from(*seq).unwrap_or(i64::MAX));
        for p in &w.params {
            q = match p {
                SqlValue::Int(v) => q.bind(*v),
                SqlValue::OptInt(v) => q.bind(*v),
                SqlValue::Text(v) => q.bind(v.as_str()),
            };
        }
        changed.push(q.execute(&mut **tx).await?.rows_affected() > 0);
    }
    Ok(changed)
}

/// [`run_sqlx`] on the writer's own SQLite connection.
pub fn run_sqlite(
    tx: &rusqlite::Transaction<'_>,
    writes: &[(u64, &SideWrite)],
) -> rusqlite::Result<Vec<bool>> {
    let mut changed = Vec::with_capacity(writes.len());
    for (seq, w) in writes {
        // `$N` is a named parameter to SQLite; `?N` is the same position, bound by number.
        let mut stmt = tx.prepare_cached(&w.sql.replace('$', "?"))?;
        stmt.raw_bind_parameter(1, i64::try_from(*seq).unwrap_or(i64::MAX))?;
        for (i, p) in w.params.iter().enumerate() {
            let at = i + 2;
            match p {
                SqlValue::Int(v) => stmt.raw_bind_parameter(at, v)?,
                SqlValue::OptInt(v) => stmt.raw_bind_parameter(at, v)?,
                SqlValue::Text(v) => stmt.raw_bind_parameter(at, v)?,
            }
        }
        changed.push(stmt.raw_execute()? > 0);
    }
    Ok(changed)
}
