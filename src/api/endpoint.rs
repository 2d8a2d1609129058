//! What handlers give back to the router: the answer and the note for the audit entry.
//! This module imports no other part of `api`, so every handler module can depend on it
//! without the handler modules depending on each other.

use hyper::StatusCode;
use serde::Serialize;

use crate::audit::Admission;
use crate::error::ServiceError;

/// A successful answer, plus the key version it used for the operations log.
pub struct Outcome {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub version: Option<u32>,
    pub content_type: &'static str,
}

/// What the audit entry and the log record about a request beyond its path, filled in by the
/// handler as soon as it is known, so refused requests carry it too.
#[derive(Default)]
pub struct Note {
    /// The key (or prefix) when it comes from the body rather than the path.
    pub key: Option<String>,
    /// Reasons and summaries; never message contents.
    pub detail: String,
    /// Tells the audit writer this request's entry follows shortly (see `audit`); a handler
    /// that will wait long before its entry drops it.
    pub admission: Option<Admission>,
    /// The request's own id (set before the handler runs), for handlers that write audit
    /// entries of their own, so those entries lead back to the request.
    pub request_id: String,
}

pub fn ok<T: Serialize>(
    status: StatusCode,
    value: &T,
    version: Option<u32>,
) -> Result<Outcome, ServiceError> {
    let body = serde_json::to_vec(value).map_err(|e| ServiceError::Internal {
        detail: format!("serializing response: {e}"),
    })?;
    Ok(Outcome {
        status,
        body,
        version,
        content_type: "application/json",
    })
}
