//! Entry encoding and chain verification, shared by the daemon and `tillkey audit verify`.
//!
//! Format: every entry carries `prev`, the SHA-256 of the entry before it (canonical form plus
//! MAC text). The writer seals each group commit: the last entry of every transaction carries an
//! HMAC-SHA256 under the audit key in the token over the SHA-256 of its canonical form (a fixed
//! 32-byte input, which every backend can MAC in one call); the other entries of
//! that transaction carry an empty `mac`. Because the sealed entry's canonical form holds `prev`,
//! the seal covers every entry before it through the chain. (An entry whose `mac` is set is a
//! seal wherever it stands, so a trail with a MAC on every entry verifies too.) The seal is what costs a device call, so one per transaction instead of one per
//! entry is most of what makes auditing every request affordable.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::encoding::hex_encode;

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: i64,
    pub identity: String,
    pub operation: String,
    pub key: String,
    pub version: Option<u32>,
    pub outcome: String,
    pub request_id: String,
    pub detail: String,
    pub audit_key_version: u32,
    /// SHA-256 (hex) of the previous entry's canonical form including its MAC.
    pub prev: String,
    /// HMAC-SHA256 (hex) over the canonical form's SHA-256, under the audit key in the token, on the last
    /// entry of each transaction (the seal); empty on the others.
    #[serde(skip)]
    pub mac: String,
}

/// The MACed form: every field but the MAC, as compact JSON in declaration order.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    at_ms: i64,
    identity: &'a str,
    operation: &'a str,
    key: &'a str,
    version: Option<u32>,
    outcome: &'a str,
    request_id: &'a str,
    detail: &'a str,
    audit_key_version: u32,
    prev: &'a str,
}

impl Entry {
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(&Canonical {
            seq: self.seq,
            at_ms: self.at_ms,
            identity: &self.identity,
            operation: &self.operation,
            key: &self.key,
            version: self.version,
            outcome: &self.outcome,
            request_id: &self.request_id,
            detail: &self.detail,
            audit_key_version: self.audit_key_version,
            prev: &self.prev,
        })
        .unwrap_or_default()
    }

    /// What a seal MACs: the SHA-256 of the canonical form, so the input has a fixed size
    /// whatever an entry holds (a TPM MACs at most 1024 bytes in one command, and a long revoke
    /// reason must not make the trail unwritable).
    pub fn seal_input(&self) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, &self.canonical())
            .as_ref()
            .to_vec()
    }

    /// What the next entry's `prev` must be.
    pub fn hash(&self) -> String {
        let mut data = self.canonical();
        data.extend_from_slice(self.mac.as_bytes());
        hex_encode(ring::digest::digest(&ring::digest::SHA256, &data).as_ref())
    }

    /// JSON for export and the API, MAC included.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["mac"] = serde_json::Value::String(self.mac.clone());
        v
    }

    pub fn from_row(row: &AnyRow) -> Result<Self, String> {
        let get_i64 = |c: &str| row.try_get::<i64, _>(c).map_err(|e| e.to_string());
        let get_s = |c: &str| row.try_get::<String, _>(c).map_err(|e| e.to_string());
        let version: Option<i64> = row.try_get("version").map_err(|e| e.to_string())?;
        Ok(Self {
            seq: u64::try_from(get_i64("seq")?).map_err(|e| e.to_string())?,
            at_ms: get_i64("at_ms")?,
            identity: get_s("identity")?,
            operation: get_s("operation")?,
            key: get_s("key_name")?,
            version: version.and_then(|v| u32::try_from(v).ok()),
            outcome: get_s("outcome")?,
            request_id: get_s("request_id")?,
            detail: get_s("detail")?,
            audit_key_version: u32::try_from(get_i64("audit_key_version")?)
                .map_err(|e| e.to_string())?,
            prev: get_s("prev")?,
            mac: get_s("mac")?,
        })
    }

    /// Insert a whole group commit with one statement: one round trip to the database, and
    /// atomic without an explicit transaction. `numbered` placeholders (`$1`) are for
    /// PostgreSQL; SQLite gets plain `?`, which it binds without looking names up.
    pub async fn insert_all<'c>(
        rows: &[Entry],
        numbered: bool,
        db: impl sqlx::Executor<'c, Database = sqlx::Any>,
    ) -> Result<(), sqlx::Error> {
        let mut sql = String::with_capacity(160 + rows.len() * COLUMNS * 5);
        sql.push_str(INSERT);
        sql.push_str(" VALUES ");
        push_values(&mut sql, rows.len(), numbered.then_some(1));
        bind_rows(sqlx::query(&sql), rows).execute(db).await?;
        Ok(())
    }

    /// Insert a group on the shared chain (PostgreSQL) and move its head, in one statement and
    /// so one round trip, if the head is still where this writer left it: answers whether it
    /// was. When another instance appended meanwhile, nothing is written.
    pub async fn insert_moving_head<'c>(
        rows: &[Entry],
        head: HeadMove<'_>,
        db: impl sqlx::Executor<'c, Database = sqlx::Any>,
    ) -> Result<bool, sqlx::Error> {
        let mut sql = String::with_capacity(320 + rows.len() * COLUMNS * 5);
        sql.push_str(
            "WITH head AS (UPDATE audit_head SET seq = $1, hash = $2 \
             WHERE id = 1 AND seq = $3 AND hash = $4 RETURNING id) ",
        );
        sql.push_str(INSERT);
        sql.push_str(" SELECT * FROM (VALUES ");
        push_values(&mut sql, rows.len(), Some(5));
        sql.push_str(") AS v WHERE EXISTS (SELECT 1 FROM head)");
        let q = sqlx::query(&sql)
            .bind(head.to_seq)
            .bind(head.to_hash)
            .bind(head.from_seq)
            .bind(head.from_hash);
        let done = bind_rows(q, rows).execute(db).await?;
        Ok(done.rows_affected() == rows.len() as u64)
    }
}

/// Where a group expects the shared chain's head, and where it leaves it.
pub struct HeadMove<'a> {
    pub from_seq: i64,
    pub from_hash: &'a str,
    pub to_seq: i64,
    pub to_hash: &'a str,
}

const INSERT: &str = "INSERT INTO audit (seq, at_ms, identity, operation, key_name, version, outcome, request_id, detail, audit_key_version, prev, mac)";

/// `(..),(..)` for `rows` rows: `$n` placeholders from `first`, or `?` when `None`.
fn push_values(sql: &mut String, rows: usize, first: Option<usize>) {
    for i in 0..rows {
        sql.push_str(if i == 0 { "(" } else { ",(" });
        for c in 0..COLUMNS {
            if c > 0 {
                sql.push(',');
            }
            match first {
                Some(first) => {
                    sql.push('$');
                    sql.push_str(&(first + i * COLUMNS + c).to_string());
                }
                None => sql.push('?'),
            }
        }
        sql.push(')');
    }
}

fn bind_rows<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rows: &'q [Entry],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for e in rows {
        q = q
            .bind(i64::try_from(e.seq).unwrap_or(i64::MAX))
            .bind(e.at_ms)
            .bind(e.identity.as_str())
            .bind(e.operation.as_str())
            .bind(e.key.as_str())
            .bind(e.version.map(i64::from))
            .bind(e.outcome.as_str())
            .bind(e.request_id.as_str())
            .bind(e.detail.as_str())
            .bind(i64::from(e.audit_key_version))
            .bind(e.prev.as_str())
            .bind(e.mac.as_str());
    }
    q
}

/// The writer's own SQLite connection: waits up to 5 s for the registry's writers, and a commit
/// is on disk (WAL fsynced) before it returns, as with sqlx's defaults.
pub fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, String> {
    let conn = rusqlite::Connection::open(path)
        .map_err(|e| format!("audit store {}: {e}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|e| format!("audit store {}: {e}", path.display()))?;
    Ok(conn)
}

/// Insert a group commit in one transaction with one prepared statement, with the side writes
/// of its requests (see `side`); answers which of those changed a row.
pub fn insert_sqlite(
    conn: &mut rusqlite::Connection,
    rows: &[Entry],
    sides: &[(u64, &super::side::SideWrite)],
) -> Result<Vec<bool>, String> {
    write_rows(conn, rows, sides).map_err(|e| e.to_string())
}

fn write_rows(
    conn: &mut rusqlite::Connection,
    rows: &[Entry],
    sides: &[(u64, &super::side::SideWrite)],
) -> rusqlite::Result<Vec<bool>> {
    // Immediate: take the write lock (waiting out the registry's writers) before anything.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(
                "INSERT INTO audit (seq, at_ms, identity, operation, key_name, version, outcome, request_id, detail, audit_key_version, prev, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
        for e in rows {
            insert.execute(rusqlite::params![
                i64::try_from(e.seq).unwrap_or(i64::MAX),
                e.at_ms,
                e.identity,
                e.operation,
                e.key,
                e.version.map(i64::from),
                e.outcome,
                e.request_id,
                e.detail,
                i64::from(e.audit_key_version),
                e.prev,
                e.mac,
            ])?;
        }
    }
    let changed = super::side::run_sqlite(&tx, sides)?;
    tx.commit()?;
    Ok(changed)
}

/// Columns of one audit row; with at most 512 rows per group commit a statement binds at most
/// 6144 parameters, within SQLite's (32766) and PostgreSQL's (65535) limits.
const COLUMNS: usize = 12;

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFault {
    /// The entry does not match what the sealed chain after it recorded (or it is a seal whose
    /// MAC fails): it was edited, forged or moved.
    Altered { seq: u64 },
    /// A sequence number is missing: the entry was deleted.
    Removed { seq: u64 },
    /// The entry does not follow the one before it: moved, or its predecessor was replaced.
    OutOfOrder { seq: u64 },
    /// The seal on `to` does not match and the chain from `from` to `to` is consistent: the
    /// chain was recomputed after an edit somewhere in that range, or the seal was forged.
    SealBroken { from: u64, to: u64 },
    /// The entries from `from` on carry no seal: the end of the trail was cut inside a
    /// transaction or its seal was removed.
    Unsealed { from: u64 },
}

impl std::fmt::Display for ChainFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainFault::Altered { seq } => write!(
                f,
                "entry {seq} was altered or moved (its content does not match its seal and position)"
            ),
            ChainFault::Removed { seq } => write!(f, "entry {seq} was removed (sequence gap)"),
            ChainFault::OutOfOrder { seq } => {
                write!(
                    f,
                    "entry {seq} is out of order (it does not chain to the entry before it)"
                )
            }
            ChainFault::SealBroken { from, to } => write!(
                f,
                "the seal on entry {to} does not match: entry {to}, or an entry from {from} on with the chain recomputed after it, was altered or forged"
            ),
            ChainFault::Unsealed { from } => write!(
                f,
                "entries from {from} on carry no seal: the trail was cut or its last seal removed"
            ),
        }
    }
}

pub struct ChainReport {
    pub entries: u64,
    pub head: String,
}

/// Check order, links and seals; `mac_ok(entry)` asks the token about a sealed entry. Reports
/// the first fault in sequence order.
///
/// An entry is *authentic* when it is a seal whose MAC verifies, or when the authentic entry
/// after it names its hash as `prev`. A run of entries that are not authentic is explained by
/// where its chain breaks: an entry the authentic successor does not chain to was altered; an
/// entry that does not chain to its predecessor was altered or moved; a consistent run ending in
/// a failing seal was recomputed; a run reaching the end unsealed was cut.
pub fn verify_chain(
    entries: &[Entry],
    mut mac_ok: impl FnMut(&Entry) -> Result<bool, String>,
) -> Result<Result<ChainReport, ChainFault>, String> {
    let hashes: Vec<String> = entries.iter().map(Entry::hash).collect();
    let mut authentic = vec![false; entries.len()];
    for i in (0..entries.len()).rev() {
        let e = &entries[i];
        authentic[i] = if e.mac.is_empty() {
            i + 1 < entries.len() && authentic[i + 1] && entries[i + 1].prev == hashes[i]
        } else {
            mac_ok(e)?
        };
    }
    // Does entry `i` chain to the one before it (or to the genesis)?
    let linked = |i: usize| {
        let before = if i == 0 { GENESIS } else { &hashes[i - 1] };
        entries[i].prev == before
    };
    let mut expected_seq = 1;
    for (i, e) in entries.iter().enumerate() {
        if e.seq > expected_seq {
            return Ok(Err(ChainFault::Removed { seq: expected_seq }));
        }
        if e.seq != expected_seq {
            return Ok(Err(ChainFault::OutOfOrder { seq: e.seq }));
        }
        if !authentic[i] {
            return Ok(Err(explain(entries, &authentic, i, &linked)));
        }
        if !linked(i) {
            return Ok(Err(ChainFault::OutOfOrder { seq: e.seq }));
        }
        expected_seq += 1;
    }
    Ok(Ok(ChainReport {
        entries: expected_seq - 1,
        head: hashes
            .last()
            .cloned()
            .unwrap_or_else(|| GENESIS.to_string()),
    }))
}

/// Name the culprit in the run of unauthenticated entries starting at `start`.
fn explain(
    entries: &[Entry],
    authentic: &[bool],
    start: usize,
    linked: &dyn Fn(usize) -> bool,
) -> ChainFault {
    let mut i = start;
    loop {
        let seq = entries[i].seq;
        if !linked(i) {
            return ChainFault::Altered { seq };
        }
        if !entries[i].mac.is_empty() {
            // A seal that fails over a consistent chain.
            return if i == start {
                ChainFault::Altered { seq }
            } else {
                ChainFault::SealBroken {
                    from: entries[start].seq,
                    to: seq,
                }
            };
        }
        let next = i + 1;
        if next < entries.len() && entries[next].seq != seq + 1 {
            // The sequence breaks before the successor that would explain this run.
            return if entries[next].seq > seq + 1 {
                ChainFault::Removed { seq: seq + 1 }
            } else {
                ChainFault::OutOfOrder {
                    seq: entries[next].seq,
                }
            };
        }
        if next == entries.len() {
            return ChainFault::Unsealed {
                from: entries[start].seq,
            };
        }
        if authentic[next] {
            // The authentic successor recorded another hash for this entry.
            return ChainFault::Altered { seq };
        }
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-in for the token's MAC in these unit tests: SHA-256 of the canonical form.
    fn seal_of(e: &Entry) -> String {
        hex_encode(ring::digest::digest(&ring::digest::SHA256, &e.canonical()).as_ref())
    }

    fn mac_ok(e: &Entry) -> Result<bool, String> {
        Ok(e.mac == seal_of(e))
    }

    /// A trail of `batches` transactions (sizes given), each sealed on its last entry.
    fn trail(batches: &[usize]) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        let mut prev = GENESIS.to_string();
        for &n in batches {
            for j in 0..n {
                let mut e = Entry {
                    seq: out.len() as u64 + 1,
                    at_ms: 1,
                    identity: "svc".into(),
                    operation: "sign".into(),
                    key: "k".into(),
                    version: Some(1),
                    outcome: "ok".into(),
                    request_id: format!("r{}", out.len()),
                    detail: String::new(),
                    audit_key_version: 1,
                    prev: prev.clone(),
                    mac: String::new(),
                };
                if j + 1 == n {
                    e.mac = seal_of(&e);
                }
                prev = e.hash();
                out.push(e);
            }
        }
        out
    }

    fn fault(entries: &[Entry]) -> Option<ChainFault> {
        verify_chain(entries, mac_ok).unwrap().err()
    }

    /// Recompute every link from `from` (index) on, as a forger without the key would.
    fn relink(entries: &mut [Entry], from: usize) {
        for i in from..entries.len() {
            let prev = if i == 0 {
                GENESIS.to_string()
            } else {
                entries[i - 1].hash()
            };
            entries[i].prev = prev;
        }
    }

    #[test]
    fn intact_trail_verifies() {
        let t = trail(&[1, 5, 3, 1]);
        let report = verify_chain(&t, mac_ok).unwrap().unwrap();
        assert_eq!(report.entries, 10);
        assert_eq!(report.head, t[9].hash());
    }

    #[test]
    fn an_edited_entry_inside_a_batch_is_named() {
        let mut t = trail(&[2, 6, 2]);
        t[4].identity = "innocent".into(); // seq 5, not a seal
        assert_eq!(fault(&t), Some(ChainFault::Altered { seq: 5 }));
        // An edited seal: the seal cannot tell its own edit from an edit before it with the
        // chain recomputed, so the whole batch up to it is named.
        let mut t = trail(&[2, 6, 2]);
        t[7].outcome = "permission_denied".into(); // seq 8, the seal
        let f = fault(&t).unwrap();
        assert_eq!(f, ChainFault::SealBroken { from: 3, to: 8 });
        assert!(f.to_string().starts_with("the seal on entry 8"), "{f}");
        // A batch of one is named exactly, as before seals.
        let mut t = trail(&[2, 1, 2]);
        t[2].outcome = "permission_denied".into();
        assert_eq!(fault(&t), Some(ChainFault::Altered { seq: 3 }));
    }

    #[test]
    fn moved_and_removed_entries_are_named() {
        let mut t = trail(&[2, 6, 2]);
        t.swap(3, 4);
        t[3].seq = 4;
        t[4].seq = 5;
        assert_eq!(fault(&t), Some(ChainFault::Altered { seq: 4 }));
        let mut t = trail(&[2, 6, 2]);
        t.remove(4);
        assert_eq!(fault(&t), Some(ChainFault::Removed { seq: 5 }));
    }

    #[test]
    fn a_recomputed_chain_breaks_the_seal() {
        let mut t = trail(&[2, 6, 2]);
        t[3].detail = "forged".into();
        relink(&mut t, 4);
        // The edited batch's seal fails; nothing after it links any more either.
        assert_eq!(fault(&t), Some(ChainFault::SealBroken { from: 3, to: 8 }));
    }

    #[test]
    fn a_cut_or_unsealed_end_is_detected() {
        let mut t = trail(&[2, 6]);
        t.truncate(5);
        assert_eq!(fault(&t), Some(ChainFault::Unsealed { from: 3 }));
        let mut t = trail(&[2, 6]);
        t[7].mac.clear();
        assert_eq!(fault(&t), Some(ChainFault::Unsealed { from: 3 }));
        // A whole transaction cut from the end leaves a valid (shorter) trail, as before.
        let mut t = trail(&[2, 6]);
        t.truncate(2);
        assert!(fault(&t).is_none());
    }

    #[test]
    fn trails_with_a_mac_on_every_entry_still_verify() {
        let t = trail(&[1, 1, 1, 1]);
        assert!(fault(&t).is_none());
    }
}
