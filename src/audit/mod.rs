//! The tamper-evident audit trail.
//!
//! Every request and every change the daemon makes on its own appends one entry. Entries form a
//! hash chain (each carries the SHA-256 of the previous entry's canonical form) and the last
//! entry of every transaction is sealed with HMAC-SHA256 under an audit key that never leaves
//! the token, so an entry cannot be edited, removed or moved without `tillkey audit verify`
//! noticing and naming it (the format is described in `chain`).
//!
//! One writer task appends in batches (group commit): a request waits until its entry is
//! durable, but concurrent requests share one transaction. When the store refuses a write the
//! request fails with 503 and readiness says why; nothing is answered without its entry.

mod chain;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

pub use self::chain::{verify_chain, ChainFault, ChainReport, Entry};
use crate::backend::{KeyRef, ObjectRef, SharedBackend};
use crate::error::ServiceError;
use crate::keys::KeyType;

/// Most entries one transaction takes.
const BATCH: usize = 512;
/// Requests waiting for the writer before new ones are refused.
const QUEUE: usize = 8192;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    identity TEXT NOT NULL,
    operation TEXT NOT NULL,
    key_name TEXT NOT NULL,
    version BIGINT,
    outcome TEXT NOT NULL,
    request_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    audit_key_version BIGINT NOT NULL,
    prev TEXT NOT NULL,
    mac TEXT NOT NULL)";

/// What a caller records; the writer adds sequence, time, chain and MAC.
#[derive(Debug, Clone)]
pub struct Record {
    pub identity: String,
    pub operation: &'static str,
    pub key: String,
    pub version: Option<u32>,
    pub outcome: &'static str,
    pub request_id: String,
    pub detail: String,
}

/// The audit key: an HMAC key in the token, named in the registry under `tillkey/`.
#[derive(Clone)]
pub struct AuditKey {
    pub object: ObjectRef,
    pub version: u32,
}

struct Pending {
    record: Record,
    done: oneshot::Sender<Result<u64, String>>,
}

pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
    failure: Arc<Mutex<Option<String>>>,
    /// Sequence number of the last durable entry.
    head: Arc<AtomicU64>,
}

impl AuditLog {
    /// Start the writer, continuing the chain found in the store.
    pub async fn start(
        pool: AnyPool,
        backend: SharedBackend,
        key: AuditKey,
    ) -> Result<Self, String> {
        sqlx::query(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| format!("audit table: {e}"))?;
        let last = sqlx::query("SELECT * FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&pool)
            .await
            .map_err(|e| format!("reading the audit head: {e}"))?;
        let (next_seq, prev) = match last {
            Some(row) => {
                let e = Entry::from_row(&row).map_err(|e| format!("audit head: {e}"))?;
                (e.seq + 1, e.hash())
            }
            None => (1, chain::GENESIS.to_string()),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let failure = Arc::new(Mutex::new(None));
        let head = Arc::new(AtomicU64::new(next_seq - 1));
        let numbered = pool
            .acquire()
            .await
            .map_err(|e| format!("audit store: {e}"))?
            .backend_name()
            != "SQLite";
        let writer = Writer {
            pool,
            numbered,
            backend,
            key,
            next_seq,
            prev,
            failure: failure.clone(),
            head: head.clone(),
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            queue: tx,
            failure,
            head,
        })
    }

    /// Append and wait until the entry is durable; the answer is the receipt (sequence number).
    pub async fn append(&self, record: Record) -> Result<u64, ServiceError> {
        let (done, wait) = oneshot::channel();
        let unavailable = |detail: String| ServiceError::Unavailable { detail };
        self.queue
            .try_send(Pending { record, done })
            .map_err(|_| unavailable("audit writer is saturated or stopped".into()))?;
        wait.await
            .map_err(|_| unavailable("audit writer stopped".into()))?
            .map_err(|e| unavailable(format!("audit trail: {e}")))
    }

    /// Sequence number of the newest durable entry: it only grows, across restarts too, so it
    /// orders anything issued from the daemon's state (the status list's `seq`).
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    /// `Some(reason)` while the last write failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Writer {
    pool: AnyPool,
    /// `$1` placeholders (PostgreSQL) rather than `?` (SQLite).
    numbered: bool,
    backend: SharedBackend,
    key: AuditKey,
    next_seq: u64,
    prev: String,
    failure: Arc<Mutex<Option<String>>>,
    head: Arc<AtomicU64>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            // Let requests the workers are already handling reach the queue first: a larger
            // group shares one seal, one statement and one fsync, and waits no timer.
            tokio::task::yield_now().await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let result = self.write(&batch).await;
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) =
                result.as_ref().err().cloned();
            if let Err(e) = &result {
                tracing::error!(error = %e, entries = batch.len(), "audit append failed; refusing the requests that needed it");
            }
            for (i, p) in batch.drain(..).enumerate() {
                let _ = p.done.send(
                    result
                        .as_ref()
                        .map(|first| first + i as u64)
                        .map_err(Clone::clone),
                );
            }
        }
    }

    /// Write the batch in one transaction, sealed by one MAC in the token on its last entry (see
    /// `chain`); on success the chain advances, on failure it stays.
    async fn write(&mut self, batch: &[Pending]) -> Result<u64, String> {
        let first = self.next_seq;
        let mut prev = self.prev.clone();
        let at_ms = now_ms();
        let mut entries = Vec::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            let r = &p.record;
            let mut e = Entry {
                seq: first + i as u64,
                at_ms,
                identity: r.identity.clone(),
                operation: r.operation.to_owned(),
                key: r.key.clone(),
                version: r.version,
                outcome: r.outcome.to_owned(),
                request_id: r.request_id.clone(),
                detail: r.detail.clone(),
                audit_key_version: self.key.version,
                prev,
                mac: String::new(),
            };
            if i + 1 == batch.len() {
                let mac = self
                    .backend
                    .sign(
                        KeyRef {
                            key_type: KeyType::HmacSha256,
                            object: &self.key.object,
                        },
                        &e.seal_input(),
                    )
                    .map_err(|e| format!("MAC in the token: {e}"))?;
                e.mac = chain::hex(&mac);
            }
            prev = e.hash();
            entries.push(e);
        }
        Entry::insert_all(&entries, self.numbered, &self.pool)
            .await
            .map_err(|e| e.to_string())?;
        self.next_seq = first + entries.len() as u64;
        self.prev = prev;
        self.head.store(self.next_seq - 1, Ordering::SeqCst);
        Ok(first)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Filters for reading the trail.
#[derive(Debug, Default)]
pub struct Query {
    pub since: u64,
    pub key: Option<String>,
    pub identity: Option<String>,
    pub limit: usize,
}

/// Entries after `since`, oldest first, filtered.
pub async fn read(pool: &AnyPool, q: &Query) -> Result<Vec<Entry>, String> {
    let rows = sqlx::query(
        "SELECT * FROM audit WHERE seq > $1 AND ($2 = '' OR key_name = $2) AND ($3 = '' OR identity = $3) ORDER BY seq LIMIT $4",
    )
    .bind(i64::try_from(q.since).unwrap_or(i64::MAX))
    .bind(q.key.clone().unwrap_or_default())
    .bind(q.identity.clone().unwrap_or_default())
    .bind(i64::try_from(q.limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    rows.iter().map(Entry::from_row).collect()
}

/// Every entry in sequence order, for verification and export.
pub async fn read_all(pool: &AnyPool) -> Result<Vec<Entry>, String> {
    let rows = sqlx::query("SELECT * FROM audit ORDER BY seq")
        .fetch_all(pool)
        .await
        .map_err(|e| e.to_string())?;
    rows.iter().map(Entry::from_row).collect()
}

/// Row count without decoding, for metrics.
pub async fn count(pool: &AnyPool) -> Result<i64, String> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM audit")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    row.try_get("n").map_err(|e| e.to_string())
}
