//! `Idempotency-Key`: a client that retries a POST or PATCH (after a timeout, or on another
//! instance after a failover) with the same key gets the first attempt's answer instead of a
//! second effect or an "already used".
//!
//! The answers are kept in the registry's database, so every instance on it sees them. A key
//! belongs to one caller identity (another identity's same key is simply another key) and to
//! one request: a fingerprint of method, path, query and body is kept with it, and the key
//! sent with a different request is refused. The row is claimed by one atomic insert before
//! the handler runs, so of any number of simultaneous attempts exactly one runs; the others
//! get 409 until the answer is stored, then the answer.
//!
//! What makes this exactly once across a dying instance is that the claim moves only together
//! with the audit trail (see `audit::SideWrite`): the commit that writes a state-changing
//! request's intent entry marks its claim `started`, and the commit that writes its final entry
//! stores its answer. So an answer is kept if and only if its entry is, and a claim without an
//! answer that is not `started` belonged to an attempt that changed nothing. Such a claim older
//! than [`ABANDONED_AFTER`] (its instance died) is taken over by the next retry, which runs. A
//! `started` claim without an answer belonged to an attempt that may have changed state and
//! died before its outcome was recorded: running it again could do it twice (a second version,
//! a second token, "already redeemed" for a redemption that succeeded), so its retries are told
//! exactly that (409 `outcome_unknown`, naming the intent's receipt) and the caller looks at the
//! state. Answers of 5xx are not kept: a 503, and any server error of an attempt that had not
//! begun a change, release the claim with the final entry, so a retry after an outage runs
//! again; another server error of a begun attempt leaves it claimed (see [`Claim::settle_write`]). Rows are deleted [`RETENTION`] after the first attempt (see
//! [`Idempotency::expire`]).

use std::borrow::Cow;

use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method, StatusCode};
use sqlx::{AnyPool, Row};

use super::endpoint::{Note, Outcome};
use crate::audit::{SideWrite, SqlValue};
use crate::encoding::{hex_decode, hex_encode};
use crate::error::ServiceError;
use crate::service::unix_now;

/// The request header naming the key.
pub const HEADER: &str = "idempotency-key";
/// Sent (`true`) on an answer that was stored for an earlier attempt, not made now.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A claim without an answer this old (seconds) was left by an attempt that died (its
/// instance stopped, or the client went away mid-request); a retry then runs again. Far above
/// any request's running time, so a live attempt is never overtaken.
pub const ABANDONED_AFTER: i64 = 60;
/// Keys and their answers are kept this long (seconds) after the first attempt.
pub const RETENTION: i64 = 24 * 3600;
/// Longest key accepted, in bytes.
const MAX_KEY_LEN: usize = 255;

/// The idempotency table on the registry's database.
pub struct Idempotency {
    pool: AnyPool,
}

/// Where a request with a key stands.
pub enum Step {
    /// This attempt holds the key and runs; its answer is kept by [`Idempotency::settle`].
    Run(Claim),
    /// An earlier attempt's answer, to be sent again instead of running.
    Replay(Stored),
}

/// What became of a request's key, for the router's steps after the handler: a claim to
/// settle with the answer, or the replay whose headers the answer carries.
#[derive(Default)]
pub enum Standing {
    /// No key (or a GET), or refused before claiming.
    #[default]
    None,
    Claimed(Claim),
    Replayed {
        receipt: u64,
        outcome: &'static str,
    },
}

impl Standing {
    /// The audit outcome of a replayed answer (the original's); `None` when not a replay.
    pub fn replayed_outcome(&self) -> Option<&'static str> {
        match self {
            Self::Replayed { outcome, .. } => Some(outcome),
            _ => None,
        }
    }

    /// A replay answers with the original receipt and says that it is a replay.
    pub fn mark(&self, headers: &mut HeaderMap) {
        if let Self::Replayed { receipt, .. } = self {
            headers.insert(super::endpoint::RECEIPT_HEADER, HeaderValue::from(*receipt));
            headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
    }
}

impl Stored {
    /// The stored answer as this request's outcome. The replay's own audit entry names the
    /// key and version the original named, and the original's receipt in its detail.
    pub fn replay(self, note: &mut Note) -> (Outcome, Standing) {
        note.key = Some(self.key);
        note.detail = format!(
            "Idempotency-Key replay of the answer with receipt {}",
            self.receipt
        );
        let outcome = Outcome {
            status: self.status,
            body: self.body,
            version: self.version,
            content_type: self.content_type,
        };
        (
            outcome,
            Standing::Replayed {
                receipt: self.receipt,
                outcome: self.outcome,
            },
        )
    }
}

/// An attempt's hold on a key.
pub struct Claim {
    identity: String,
    key: String,
    claimed_at: i64,
    /// Its intent entry is durable and marked the row: from here on it may change state.
    pub started: bool,
}

impl Claim {
    /// Marks the row `started` in the commit of the intent entry (`$1`, its receipt); changes
    /// no row when another attempt has taken the claim over meanwhile.
    pub fn start_write(&self) -> SideWrite {
        SideWrite {
            sql: "UPDATE idempotency SET started = $1
                  WHERE identity = $2 AND idem_key = $3 AND created_at = $4 AND status IS NULL",
            params: self.row_params(),
        }
    }

    /// Keeps the answer in the commit of the final entry (`$1`, the receipt sent with it), or
    /// releases the key when the answer is a server error that changed nothing, so a retry runs
    /// again: any server error of an attempt that never began a change, and a 503 (the device,
    /// the database or this instance's view of the others was unavailable, which is found
    /// before anything is changed). Another server error of a begun attempt (a 500: a database
    /// error, possibly on a commit that succeeded, or a bug) may have come after its change:
    /// the claim stays, and its retries get `outcome_unknown` once it is abandoned.
    pub fn settle_write(&self, answer: &Answer<'_>) -> Option<SideWrite> {
        if answer.status.is_server_error() {
            if self.started && answer.status != StatusCode::SERVICE_UNAVAILABLE {
                return None;
            }
            // `$1 > 0` only uses the receipt (always positive): parameters go in order.
            return Some(SideWrite {
                sql: "DELETE FROM idempotency WHERE $1 > 0 AND identity = $2 AND idem_key = $3
                      AND created_at = $4 AND status IS NULL",
                params: self.row_params(),
            });
        }
        let mut params = vec![
            SqlValue::Int(i64::from(answer.status.as_u16())),
            SqlValue::Text(answer.content_type.to_owned()),
            SqlValue::Text(hex_encode(answer.body)),
            SqlValue::Text(answer.outcome.to_owned()),
            SqlValue::Text(answer.key.to_owned()),
            SqlValue::OptInt(answer.version.map(i64::from)),
        ];
        params.extend(self.row_params());
        Some(SideWrite {
            sql: "UPDATE idempotency SET receipt = $1, status = $2, content_type = $3, body = $4,
                    outcome = $5, key_name = $6, version = $7
                  WHERE identity = $8 AND idem_key = $9 AND created_at = $10 AND status IS NULL",
            params,
        })
    }

    fn row_params(&self) -> Vec<SqlValue> {
        vec![
            SqlValue::Text(self.identity.clone()),
            SqlValue::Text(self.key.clone()),
            SqlValue::Int(self.claimed_at),
        ]
    }
}

/// An answer as stored, and what the original request's audit entry said about it (a
/// replay's own entry repeats the key, version and outcome).
pub struct Stored {
    pub status: StatusCode,
    pub content_type: Cow<'static, str>,
    pub body: Vec<u8>,
    /// The original request's audit receipt, sent again in `x-tillkey-receipt`.
    pub receipt: u64,
    pub outcome: &'static str,
    pub key: String,
    pub version: Option<u32>,
}

/// The answer an attempt gave, to keep for its retries.
pub struct Answer<'a> {
    pub status: StatusCode,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub outcome: &'a str,
    pub key: &'a str,
    pub version: Option<u32>,
}

impl Idempotency {
    /// The table on the registry's database (made by migration 3). `status` is NULL while
    /// the claiming attempt runs; `created_at` (unix seconds) is also that attempt's claim,
    /// which a takeover replaces, so a stalled attempt can no longer store or release the row.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Claim `key` for this attempt, or find the answer an earlier attempt stored. Refused:
    /// the key used for another request (422), or still held by a live attempt (409).
    pub async fn begin(
        &self,
        identity: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Step, ServiceError> {
        // A row deleted between the insert and the read (released by a failed attempt, or
        // expired) is claimed again; twice more at most, then the caller retries.
        for _ in 0..3 {
            let now = unix_now();
            let inserted = sqlx::query(
                "INSERT INTO idempotency (identity, idem_key, fingerprint, created_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (identity, idem_key) DO NOTHING",
            )
            .bind(identity)
            .bind(key)
            .bind(fingerprint)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            let claim = |claimed_at| Claim {
                identity: identity.to_owned(),
                key: key.to_owned(),
                claimed_at,
                started: false,
            };
            if inserted.rows_affected() == 1 {
                return Ok(Step::Run(claim(now)));
            }
            let row = sqlx::query(
                "SELECT fingerprint, created_at, started, status, content_type, body, receipt,
                        outcome, key_name, version
                 FROM idempotency WHERE identity = $1 AND idem_key = $2",
            )
            .bind(identity)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            let Some(row) = row else { continue };
            if row.try_get::<String, _>("fingerprint").map_err(db)? != fingerprint {
                return Err(ServiceError::UnsupportedOperation(
                    "this Idempotency-Key was already used for a different request \
                     (method, path, query or body differ); use a new key for a new request"
                        .into(),
                ));
            }
            let created_at: i64 = row.try_get("created_at").map_err(db)?;
            if row
                .try_get::<Option<i64>, _>("status")
                .map_err(db)?
                .is_some()
            {
                return Ok(Step::Replay(stored(&row)?));
            }
            if created_at > now - ABANDONED_AFTER {
                return Err(in_progress());
            }
            if let Some(intent) = row.try_get::<Option<i64>, _>("started").map_err(db)? {
                return Err(ServiceError::OutcomeUnknown(format!(
                    "an earlier attempt with this Idempotency-Key began its change (audit \
                     receipt {intent}) and ended without an answer, its instance having \
                     stopped; it may or may not have taken effect, so it is not run again: \
                     check the state it would have changed, then send a new request with a new \
                     key if it is still needed"
                )));
            }
            // Abandoned: take it over, in one conditional step so that of several retries
            // only one does.
            // Not if its attempt's intent landed meanwhile: that attempt may be changing state.
            let taken = sqlx::query(
                "UPDATE idempotency SET created_at = $1
                 WHERE identity = $2 AND idem_key = $3 AND status IS NULL AND created_at = $4
                   AND started IS NULL",
            )
            .bind(now)
            .bind(identity)
            .bind(key)
            .bind(created_at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            if taken.rows_affected() == 1 {
                tracing::info!(identity, "took over an abandoned Idempotency-Key claim");
                return Ok(Step::Run(claim(now)));
            }
            return Err(in_progress());
        }
        Err(in_progress())
    }

    /// Release the key of an attempt that never started changing anything, when its final
    /// entry (which would have settled it) could not be written: a retry then runs at once
    /// rather than after [`ABANDONED_AFTER`]. Best effort: the store is most likely down too.
    pub async fn release_unstarted(&self, claim: &Claim) {
        if claim.started {
            return;
        }
        let released = sqlx::query(
            "DELETE FROM idempotency WHERE identity = $1 AND idem_key = $2
               AND created_at = $3 AND status IS NULL AND started IS NULL",
        )
        .bind(&claim.identity)
        .bind(&claim.key)
        .bind(claim.claimed_at)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(identity = %claim.identity, error = %e, "could not release an Idempotency-Key; a retry runs once the claim is abandoned");
        }
    }

    /// Delete keys older than [`RETENTION`]; the daemon calls this from its scheduler. Every
    /// instance may: deleting what another already deleted is harmless.
    pub async fn expire(&self) {
        let cutoff = unix_now() - RETENTION;
        match sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
        {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::debug!(deleted = done.rows_affected(), "expired Idempotency-Keys");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not expire Idempotency-Keys; will retry"),
        }
    }
}

/// The request's key: `None` for methods other than POST and PATCH (a GET changes nothing)
/// or without the header. 1 to 255 visible ASCII characters, sent once.
pub fn key(method: &Method, headers: &HeaderMap) -> Result<Option<String>, ServiceError> {
    if *method != Method::POST && *method != Method::PATCH {
        return Ok(None);
    }
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ServiceError::invalid(
            "send at most one Idempotency-Key header",
        ));
    }
    Ok(Some(valid_key(value)?.to_owned()))
}

fn valid_key(value: &HeaderValue) -> Result<&str, ServiceError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN || !bytes.iter().all(|b| b.is_ascii_graphic())
    {
        return Err(ServiceError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters \
             (0x21 to 0x7E: no spaces, no other characters)"
        )));
    }
    // Visible ASCII is UTF-8.
    value
        .to_str()
        .map_err(|_| ServiceError::invalid("Idempotency-Key is not visible ASCII"))
}

/// SHA-256 (hex) over method, path, query and body, each preceded by its length, so no two
/// different requests have the same input.
pub fn fingerprint(method: &Method, path: &str, query: &str, body: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        method.as_str().as_bytes(),
        path.as_bytes(),
        query.as_bytes(),
        body,
    ] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    hex_encode(ctx.finish().as_ref())
}

fn stored(row: &sqlx::any::AnyRow) -> Result<Stored, ServiceError> {
    let corrupt = || ServiceError::Internal {
        detail: "idempotency row with an unreadable answer".into(),
    };
    let status: i64 = row.try_get("status").map_err(db)?;
    let outcome: String = row.try_get("outcome").map_err(db)?;
    let content_type: String = row.try_get("content_type").map_err(db)?;
    Ok(Stored {
        status: u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(corrupt)?,
        content_type: Cow::Owned(content_type),
        body: hex_decode(&row.try_get::<String, _>("body").map_err(db)?).ok_or_else(corrupt)?,
        receipt: u64::try_from(row.try_get::<i64, _>("receipt").map_err(db)?)
            .map_err(|_| corrupt())?,
        outcome: ServiceError::known_outcome(&outcome).ok_or_else(corrupt)?,
        key: row.try_get("key_name").map_err(db)?,
        version: row
            .try_get::<Option<i64>, _>("version")
            .map_err(db)?
            .map(|v| u32::try_from(v).map_err(|_| corrupt()))
            .transpose()?,
    })
}

pub fn in_progress() -> ServiceError {
    ServiceError::FailedPrecondition(
        "a request with this Idempotency-Key is still in progress; retry later".into(),
    )
}

fn db(e: sqlx::Error) -> ServiceError {
    ServiceError::Unavailable {
        detail: format!("idempotency store: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_bytes(bytes).unwrap());
        h
    }

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters_on_post_and_patch() {
        let ok = |b: &[u8]| key(&Method::POST, &header(b)).map_err(|e| e.code());
        assert_eq!(ok(b"a"), Ok(Some("a".into())));
        assert_eq!(ok(b"!~"), Ok(Some("!~".into())));
        assert_eq!(ok(&[b'k'; 255]).unwrap().unwrap().len(), 255);
        for bad in [&b""[..], &[b'k'; 256], b"a b", b"a\tb", "ключ".as_bytes()] {
            assert_eq!(ok(bad), Err("invalid_argument"), "{bad:?}");
        }
        assert_eq!(
            key(&Method::PATCH, &header(b"k")).unwrap(),
            Some("k".into())
        );
        // A GET changes nothing: its key is ignored, even a malformed one.
        assert_eq!(key(&Method::GET, &header(b"a b")).unwrap(), None);
        assert_eq!(key(&Method::POST, &HeaderMap::new()).unwrap(), None);
        let mut twice = header(b"a");
        twice.append(HEADER, HeaderValue::from_static("b"));
        assert!(key(&Method::POST, &twice).is_err());
    }

    #[test]
    fn fingerprints_separate_the_parts() {
        let f = |p: &str, q: &str, b: &[u8]| fingerprint(&Method::POST, p, q, b);
        assert_eq!(f("/a", "", b"x"), f("/a", "", b"x"));
        assert_ne!(f("/a", "", b"x"), f("/a", "x", b""));
        assert_ne!(f("/a", "", b"x"), f("/ax", "", b""));
        assert_ne!(f("/a", "", b""), fingerprint(&Method::PATCH, "/a", "", b""));
    }
}
