//! The tamper-evident audit trail.
//!
//! Every request and every change the daemon makes on its own appends one entry. Entries form a
//! hash chain, and the last entry of every transaction is sealed with HMAC-SHA256 under an audit
//! key that never leaves the token, so `tillkey audit verify` notices and names an edited,
//! removed or moved entry (the format is described in `chain`). One writer thread appends in
//! group commits (`group` says how a group forms); a request waits until its entry is durable,
//! and fails with 503 when the store refuses the write. Why the writer is built so, with the
//! measurements: BENCHMARKS.md, "Design measurements moved from module headers".

mod chain;
mod group;
mod side;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sqlx::{AnyPool, Row};
use tokio::sync::oneshot;

pub use self::chain::{verify_chain, ChainFault, ChainReport, Entry};
pub use self::group::Admission;
use self::group::{Admitted, Linger};
pub use self::side::{SideWrite, SqlValue};
use crate::backend::{KeyRef, ObjectRef};
use crate::device::Device;
use crate::error::ServiceError;
use crate::keys::KeyType;
use crate::metrics::AuditMetrics;

/// The error line for failed group commits (see `Writer::finish`).
static APPEND_FAILED_LOG: crate::logging::Throttle = crate::logging::Throttle::new();

/// The outcome of an intent entry: written, durable, before a change begins, so that no change
/// is ever without its entry (the outcome's entry follows once the change is made or refused).
pub const STARTED: &str = "started";

/// Name of the writer's thread.
pub const WRITER_THREAD: &str = "audit-writer";

/// Most entries one transaction takes.
const BATCH: usize = 512;
/// Requests waiting for the writer before new ones are refused.
const QUEUE: usize = 8192;

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
    /// Committed with the entry, or not at all.
    side: Option<SideWrite>,
    done: oneshot::Sender<Result<Appended, String>>,
}

/// What the writer answers: the entry's receipt, and whether its side write changed a row.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub receipt: u64,
    pub side_changed: bool,
}

pub struct AuditLog {
    queue: SyncSender<Pending>,
    admitted: Arc<Admitted>,
    failure: Arc<Failure>,
    /// Sequence number of the last durable entry this process wrote.
    head: Arc<AtomicU64>,
    /// The database, when instances share the chain (PostgreSQL): its head is the chain's.
    shared: Option<AnyPool>,
}

impl AuditLog {
    /// Start the writer, continuing the chain found in the store. `sqlite_file` is the
    /// store's file when it is SQLite (see the module note); `metrics` get every group.
    pub async fn start(
        pool: AnyPool,
        sqlite_file: Option<&Path>,
        device: Arc<Device>,
        key: AuditKey,
        metrics: AuditMetrics,
    ) -> Result<Self, String> {
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
        let mut shared = None;
        let store = match sqlite_file {
            Some(path) => Store::Sqlite(chain::open_sqlite(path)?),
            None => {
                let numbered = pool
                    .acquire()
                    .await
                    .map_err(|e| format!("audit store: {e}"))?
                    .backend_name()
                    != "SQLite";
                if numbered {
                    start_shared_head(&pool, next_seq - 1, &prev).await?;
                    shared = Some(pool.clone());
                }
                Store::Sqlx {
                    pool,
                    numbered,
                    runtime: tokio::runtime::Handle::current(),
                }
            }
        };
        let (tx, rx) = sync_channel(QUEUE);
        let failure = Arc::new(Failure::default());
        let head = Arc::new(AtomicU64::new(next_seq - 1));
        let admitted = Arc::new(Admitted::default());
        let writer = Writer {
            device,
            key,
            next_seq,
            prev,
            failure: failure.clone(),
            head: head.clone(),
            admitted: admitted.clone(),
            metrics,
            others_appending: std::cell::Cell::new(false),
        };
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || writer.run(rx, store))
            .map_err(|e| format!("starting the audit writer: {e}"))?;
        admitted.woken_by_last(thread.thread().clone());
        Ok(Self {
            queue: tx,
            admitted,
            failure,
            head,
            shared,
        })
    }

    /// Announce a request whose entry will follow; pass it to [`AuditLog::append_admitted`].
    pub fn admit(&self) -> Admission {
        Admission::new(&self.admitted)
    }

    /// Append and wait until the entry is durable; the answer is the receipt (sequence number).
    pub async fn append(&self, record: Record) -> Result<u64, ServiceError> {
        self.append_admitted(record, None).await
    }

    /// [`AuditLog::append`] for an admitted request: the admission ends once the entry is
    /// queued, so the writer stops waiting for it.
    pub async fn append_admitted(
        &self,
        record: Record,
        admission: Option<Admission>,
    ) -> Result<u64, ServiceError> {
        Ok(self.append_with(record, None, admission).await?.receipt)
    }

    /// [`AuditLog::append_admitted`] with a statement committed in the entry's transaction
    /// (see `side`).
    pub async fn append_with(
        &self,
        record: Record,
        side: Option<SideWrite>,
        admission: Option<Admission>,
    ) -> Result<Appended, ServiceError> {
        let (done, wait) = oneshot::channel();
        let unavailable = |detail: String| ServiceError::Unavailable { detail };
        let queued = self.queue.try_send(Pending { record, side, done });
        drop(admission);
        queued.map_err(|_| unavailable("audit writer is saturated or stopped".into()))?;
        wait.await
            .map_err(|_| unavailable("audit writer stopped".into()))?
            .map_err(|e| unavailable(format!("audit trail: {e}")))
    }

    /// Sequence number of the newest durable entry: it only grows, across restarts too, so it
    /// orders anything issued from the daemon's state (the status list's `seq`).
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::SeqCst)
    }

    /// The sequence number of the newest durable entry of the whole chain, read now: on a
    /// shared database the chain's head row (other instances append too, so this process's own
    /// [`AuditLog::head`] may lag far behind), else this process's head. It only grows, and a
    /// later read is never lower, whichever instance reads it.
    pub async fn chain_head(&self) -> Result<u64, ServiceError> {
        let Some(pool) = &self.shared else {
            return Ok(self.head());
        };
        let row = sqlx::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(pool)
            .await
            .map_err(|e| ServiceError::Unavailable {
                detail: format!("reading the audit head: {e}"),
            })?;
        let seq: i64 = row.try_get("seq").map_err(|e| ServiceError::Internal {
            detail: format!("audit head: {e}"),
        })?;
        u64::try_from(seq).map_err(|_| ServiceError::Internal {
            detail: "audit head: negative sequence".into(),
        })
    }

    /// `Some(reason)` while the last write failed.
    pub fn failure(&self) -> Option<String> {
        if !self.failing() {
            return None;
        }
        self.failure
            .why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the last write failed: one atomic load, asked by every request.
    pub fn failing(&self) -> bool {
        self.failure.failing.load(Ordering::Acquire)
    }
}

/// The outcome of the last write, set by the writer after each group.
#[derive(Default)]
struct Failure {
    failing: AtomicBool,
    why: Mutex<Option<String>>,
}

/// Where entries go.
enum Store {
    Sqlite(rusqlite::Connection),
    /// `numbered`: `$1` placeholders (PostgreSQL) rather than `?` (SQLite).
    Sqlx {
        pool: AnyPool,
        numbered: bool,
        runtime: tokio::runtime::Handle,
    },
}

impl Store {
    fn insert(
        &mut self,
        entries: &[Entry],
        sides: &[(u64, &SideWrite)],
    ) -> Result<Vec<bool>, String> {
        match self {
            Store::Sqlite(conn) => chain::insert_sqlite(conn, entries, sides),
            Store::Sqlx {
                pool,
                numbered,
                runtime,
            } => runtime
                .block_on(async {
                    let mut tx = pool.begin().await?;
                    Entry::insert_all(entries, *numbered, &mut *tx).await?;
                    let changed = side::run_sqlx(&mut tx, sides).await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(changed)
                })
                .map_err(|e| e.to_string()),
        }
    }
}

/// The side writes of a batch whose first entry is `first`, with their entries' numbers.
fn sides(batch: &[Pending], first: u64) -> Vec<(u64, &SideWrite)> {
    batch
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.side.as_ref().map(|s| (first + i as u64, s)))
        .collect()
}

/// Make the shared chain's head row if this is the first instance on the database, from the
/// newest entry (`seq`, `hash`) already there. The head is the one chain every instance on a
/// shared database (PostgreSQL) appends to: each group commit locks this row, chains on it,
/// and moves it in the same transaction, so instances take turns and never write the same
/// sequence number; a dead instance's lock goes with its connection.
async fn start_shared_head(pool: &AnyPool, seq: u64, hash: &str) -> Result<(), String> {
    sqlx::query(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(i64::try_from(seq).unwrap_or(i64::MAX))
    .bind(hash)
    .execute(pool)
    .await
    .map_err(|e| format!("audit head: {e}"))?;
    Ok(())
}

struct Writer {
    /// Called from the writer's own thread, which may wait on the device.
    device: Arc<Device>,
    key: AuditKey,
    next_seq: u64,
    prev: String,
    failure: Arc<Failure>,
    head: Arc<AtomicU64>,
    admitted: Arc<Admitted>,
    metrics: AuditMetrics,
    /// Whether the last locked group found the shared head moved by another instance: while
    /// others append, the one-statement attempt would only fail first (see `append_shared`).
    others_appending: std::cell::Cell<bool>,
}

impl Writer {
    /// Until every sender is gone: gather a group, write it, answer it.
    fn run(mut self, rx: Receiver<Pending>, mut store: Store) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(open) = group::gather(&rx, &self.admitted, &Linger::DEFAULT, &mut batch) {
            let closed = Instant::now();
            let stored = match &store {
                Store::Sqlx {
                    pool,
                    numbered: true,
                    runtime,
                } => runtime.block_on(self.append_shared(&batch, pool)),
                _ => self
                    .entries(&batch, self.next_seq, self.prev.clone())
                    .and_then(|(entries, last)| {
                        store
                            .insert(&entries, &sides(&batch, self.next_seq))
                            .map(|changed| Group {
                                first: self.next_seq,
                                entries,
                                last,
                                changed,
                            })
                    }),
            };
            self.metrics
                .group(batch.len(), open, closed.elapsed(), stored.is_ok());
            self.finish(&mut batch, stored);
        }
    }

    /// The batch's entries chained on from the last durable one, the last sealed by one MAC in
    /// the token (see `chain`), with the hash the next batch chains on.
    fn entries(
        &self,
        batch: &[Pending],
        first: u64,
        mut prev: String,
    ) -> Result<(Vec<Entry>, String), String> {
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
                let key = KeyRef {
                    key_type: KeyType::HmacSha256,
                    object: &self.key.object,
                };
                let mac = self
                    .device
                    .call_blocking(|b| b.sign(key, &e.seal_input()))
                    .map_err(|e| format!("MAC in the token: {e}"))?;
                e.mac = crate::encoding::hex_encode(&mac);
            }
            prev = e.hash();
            entries.push(e);
        }
        Ok((entries, prev))
    }

    /// A group on the shared chain. First as if this writer appended the chain's last group
    /// (one instance, or the others idle): chained on the head it left, inserted with the head
    /// moved in one statement that finds the head still there (one round trip instead of five,
    /// which set the sign rate of an instance on PostgreSQL). If another instance appended
    /// meanwhile, that statement writes nothing, and the group is written the careful way:
    /// in one transaction, lock the head row, chain the entries on it (sealed in the token while
    /// the row is held), insert them and move the head. Another instance's group waits for the
    /// lock; none can take the same sequence numbers. While the careful way keeps finding the
    /// head moved by others, it is taken straight away.
    async fn append_shared(&self, batch: &[Pending], pool: &AnyPool) -> Result<Group, String> {
        let db = |e: sqlx::Error| format!("audit store: {e}");
        if !self.others_appending.get() {
            if let Some(group) = self.append_after_own_head(batch, pool).await? {
                return Ok(group);
            }
        }
        let mut tx = pool.begin().await.map_err(db)?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let seq: i64 = head.try_get("seq").map_err(db)?;
        let first = u64::try_from(seq).map_err(|_| "audit head: negative sequence".to_owned())? + 1;
        self.others_appending.set(first != self.next_seq);
        let (entries, last) = self.entries(batch, first, head.try_get("hash").map_err(db)?)?;
        Entry::insert_all(&entries, true, &mut *tx)
            .await
            .map_err(db)?;
        let changed = side::run_sqlx(&mut tx, &sides(batch, first))
            .await
            .map_err(db)?;
        let last_seq = i64::try_from(first + entries.len() as u64 - 1).unwrap_or(i64::MAX);
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(last_seq)
            .bind(last.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Group {
            first,
            entries,
            last,
            changed,
        })
    }

    /// The optimistic half of [`Writer::append_shared`]: `None` when the head has moved.
    async fn append_after_own_head(
        &self,
        batch: &[Pending],
        pool: &AnyPool,
    ) -> Result<Option<Group>, String> {
        let db = |e: sqlx::Error| format!("audit store: {e}");
        let first = self.next_seq;
        let (entries, last) = self.entries(batch, first, self.prev.clone())?;
        let head = chain::HeadMove {
            from_seq: i64::try_from(first - 1).unwrap_or(i64::MAX),
            from_hash: &self.prev,
            to_seq: i64::try_from(first + entries.len() as u64 - 1).unwrap_or(i64::MAX),
            to_hash: &last,
        };
        let sides = sides(batch, first);
        let changed = if sides.is_empty() {
            if !Entry::insert_moving_head(&entries, head, pool)
                .await
                .map_err(db)?
            {
                return Ok(None);
            }
            Vec::new()
        } else {
            // Side writes commit with the entries: a transaction (dropped, so rolled back, when
            // the head has moved).
            let mut tx = pool.begin().await.map_err(db)?;
            if !Entry::insert_moving_head(&entries, head, &mut *tx)
                .await
                .map_err(db)?
            {
                return Ok(None);
            }
            let changed = side::run_sqlx(&mut tx, &sides).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            changed
        };
        Ok(Some(Group {
            first,
            entries,
            last,
            changed,
        }))
    }

    /// After the store answered: on success the chain advances, on failure it stays and
    /// readiness says why; every request of the batch gets its receipt or the error.
    fn finish(&mut self, batch: &mut Vec<Pending>, stored: Result<Group, String>) {
        let result = stored.map(|g| {
            self.next_seq = g.first + g.entries.len() as u64;
            self.prev = g.last;
            self.head.store(self.next_seq - 1, Ordering::SeqCst);
            (g.first, g.changed)
        });
        if result.is_err() || self.failure.failing.load(Ordering::Relaxed) {
            *self.failure.why.lock().unwrap_or_else(|p| p.into_inner()) =
                result.as_ref().err().cloned();
            self.failure
                .failing
                .store(result.is_err(), Ordering::Release);
        }
        if let Err(e) = &result {
            // A store that is down fails every group the same way: once a second is enough.
            if let Some(held_back) = APPEND_FAILED_LOG.admit() {
                tracing::error!(error = %e, entries = batch.len(), held_back, "audit append failed; refusing the requests that needed it");
            }
        }
        // The side writes' answers are in batch order, one per request that had one.
        let mut changed = result.as_ref().ok().map(|(_, c)| c.iter().copied());
        for (i, p) in batch.drain(..).enumerate() {
            let answer = match &result {
                Ok((first, _)) => Ok(Appended {
                    receipt: first + i as u64,
                    side_changed: p.side.is_some()
                        && changed.as_mut().and_then(Iterator::next).unwrap_or(false),
                }),
                Err(e) => Err(e.clone()),
            };
            let _ = p.done.send(answer);
        }
    }
}

/// A durable group: its first sequence number, its entries, the hash the next group chains on,
/// and whether each side write changed a row.
struct Group {
    first: u64,
    entries: Vec<Entry>,
    last: String,
    changed: Vec<bool>,
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
