//! The intent entry: written before a request that may change lasting state runs its handler.
//!
//! A request's outcome entry is written after its change has committed, so a process that dies
//! between the two (or an audit store that fails just then) would leave a change the trail
//! never mentions. The intent entry closes that gap: it is durable before the handler runs, so
//! every change has at least its intent in the trail (who, what, on which key, with the request
//! id that also names the outcome entry, if one follows). It costs a second group commit for
//! these requests only; signing, verifying and other operations that change nothing lasting do
//! not write one.
//!
//! With an `Idempotency-Key`, the same commit marks the claim `started` (see `idempotency`), so
//! a retry after the attempt died knows whether it may run again.

use serde::Deserialize;

use super::endpoint::{Endpoint, Note};
use super::idempotency::{self, Standing};
use super::AppState;
use crate::audit::{Record, STARTED};
use crate::error::ServiceError;
use crate::service::Caller;

/// Write the intent of `endpoint` for this request and wait until it is durable. Refused (503)
/// when the trail refuses it: nothing has been done then. Refused (409 in progress) when the
/// request's `Idempotency-Key` claim was taken over by another attempt meanwhile.
pub async fn record(
    state: &AppState,
    caller: &Caller,
    endpoint: &Endpoint,
    name: &str,
    body: &[u8],
    note: &Note,
    standing: &mut Standing,
) -> Result<(), ServiceError> {
    if !endpoint.changes {
        return Ok(());
    }
    let record = Record {
        identity: caller.identity.clone(),
        operation: endpoint.label,
        key: subject(name, body),
        version: None,
        outcome: STARTED,
        request_id: note.request_id.clone(),
        detail: String::new(),
    };
    let claim = match standing {
        Standing::Claimed(claim) => Some(claim),
        _ => None,
    };
    let side = claim.as_ref().map(|c| c.start_write());
    let appended = state
        .service
        .core
        .audit()
        .append_with(record, side, None)
        .await?;
    if let Some(claim) = claim {
        if !appended.side_changed {
            return Err(idempotency::in_progress());
        }
        claim.started = true;
    }
    Ok(())
}

/// What the request names: its path's key or id, or else the `name`, `key` or `prefix` of its
/// body, so a search by key finds the intent as it finds the outcome. The handler has not
/// judged the body yet; a body that is not such JSON, or a name longer than any key name, gives
/// an empty name here and is refused by the handler as usual.
fn subject(name: &str, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Named {
        name: Option<String>,
        key: Option<String>,
        prefix: Option<String>,
    }
    if !name.is_empty() {
        return name.to_owned();
    }
    serde_json::from_slice::<Named>(body)
        .ok()
        .and_then(|n| n.name.or(n.key).or(n.prefix))
        .filter(|n| n.len() <= crate::keys::MAX_NAME_LEN + 1)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_is_the_path_name_or_the_body_name() {
        assert_eq!(subject("stores/1/mac", br#"{"name":"x"}"#), "stores/1/mac");
        assert_eq!(subject("", br#"{"name":"stores/1/new"}"#), "stores/1/new");
        assert_eq!(subject("", br#"{"key":"k","subject":"s"}"#), "k");
        assert_eq!(subject("", br#"{"prefix":"stores/1/"}"#), "stores/1/");
        let long = format!("{{\"name\":\"{}\"}}", "a".repeat(300));
        for unnamed in [
            &b""[..],
            b"[]",
            b"{\"name\": 5}",
            b"not json",
            long.as_bytes(),
        ] {
            assert_eq!(subject("", unnamed), "", "{unnamed:?}");
        }
    }
}
