//! Entry encoding and chain verification, shared by the daemon and `tillkey audit verify`.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

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
    /// HMAC-SHA256 (hex) over the canonical form, under the audit key in the token.
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

    /// What the next entry's `prev` must be.
    pub fn hash(&self) -> String {
        let mut data = self.canonical();
        data.extend_from_slice(self.mac.as_bytes());
        crate::registry::hex_encode(ring::digest::digest(&ring::digest::SHA256, &data).as_ref())
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

    pub async fn insert(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit (seq, at_ms, identity, operation, key_name, version, outcome, request_id, detail, audit_key_version, prev, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(i64::try_from(self.seq).unwrap_or(i64::MAX))
        .bind(self.at_ms)
        .bind(&self.identity)
        .bind(&self.operation)
        .bind(&self.key)
        .bind(self.version.map(i64::from))
        .bind(&self.outcome)
        .bind(&self.request_id)
        .bind(&self.detail)
        .bind(i64::from(self.audit_key_version))
        .bind(&self.prev)
        .bind(&self.mac)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFault {
    /// The entry's MAC does not match its content: it was edited (or forged).
    Altered { seq: u64 },
    /// A sequence number is missing: the entry was deleted.
    Removed { seq: u64 },
    /// The entry does not follow the one before it: moved, or its predecessor was replaced.
    OutOfOrder { seq: u64 },
}

impl std::fmt::Display for ChainFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainFault::Altered { seq } => write!(
                f,
                "entry {seq} was altered or moved (its MAC does not match its content and position)"
            ),
            ChainFault::Removed { seq } => write!(f, "entry {seq} was removed (sequence gap)"),
            ChainFault::OutOfOrder { seq } => {
                write!(
                    f,
                    "entry {seq} is out of order (it does not chain to the entry before it)"
                )
            }
        }
    }
}

pub struct ChainReport {
    pub entries: u64,
    pub head: String,
}

/// Check order, links and MACs; `mac_ok(entry)` asks the token. Stops at the first fault.
pub fn verify_chain(
    entries: &[Entry],
    mut mac_ok: impl FnMut(&Entry) -> Result<bool, String>,
) -> Result<Result<ChainReport, ChainFault>, String> {
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 1;
    for e in entries {
        if !mac_ok(e)? {
            return Ok(Err(ChainFault::Altered { seq: e.seq }));
        }
        if e.seq > expected_seq {
            return Ok(Err(ChainFault::Removed { seq: expected_seq }));
        }
        if e.seq != expected_seq || e.prev != prev {
            return Ok(Err(ChainFault::OutOfOrder { seq: e.seq }));
        }
        prev = e.hash();
        expected_seq += 1;
    }
    Ok(Ok(ChainReport {
        entries: expected_seq - 1,
        head: prev,
    }))
}
