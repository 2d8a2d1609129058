//! The batch form of `:sign` and `:verify`: `{"batch": [item, ...]}` in, `{"batch": [result,
//! ...]}` out, one result per item in the same order. A result is the single call's answer or
//! `{"error": {"code", "message"}}` for that item alone. The audit trail records the request as
//! one entry whose detail counts the items and the failures.

use hyper::StatusCode;
use serde::Serialize;

use super::endpoint::{ok, Note, Outcome};
use super::json;
use super::views::ItemError;
use crate::error::ServiceError;
use crate::service::batch::{ItemResult, VerifyItem};
use crate::service::{Caller, Service};

pub async fn sign(
    svc: &Service,
    caller: &Caller,
    name: &str,
    single_too: bool,
    items: Vec<json::SignItem>,
    format: Option<&str>,
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    // A batch may queue for a slot and then spends milliseconds in the device: the audit
    // writer must not hold its group open for it.
    note.admission = None;
    let format = check(single_too, items.len(), format)?;
    let decoded = items
        .iter()
        .map(|i| json::b64("message", &i.message))
        .collect();
    note.detail = format!("batch of {}", items.len());
    let (version, results) = svc.keys.sign_batch(caller, name, decoded, format).await?;
    let batch = answer(&results, note, |s| SignedOut {
        signature: json::encode(&s.signature),
        key_version: s.version,
    });
    respond(
        &BatchOut {
            batch,
            key_version: Some(version),
        },
        Some(version),
    )
}

pub async fn verify(
    svc: &Service,
    caller: &Caller,
    name: &str,
    single_too: bool,
    items: Vec<json::VerifyItem>,
    format: Option<&str>,
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    // A batch may queue for a slot and then spends milliseconds in the device: the audit
    // writer must not hold its group open for it.
    note.admission = None;
    let format = check(single_too, items.len(), format)?;
    let decoded = items
        .into_iter()
        .map(|i| {
            Ok(VerifyItem {
                message: json::b64("message", &i.message)?,
                signature: json::b64("signature", &i.signature)?,
                key_version: i.key_version,
            })
        })
        .collect::<Vec<ItemResult<VerifyItem>>>();
    note.detail = format!("batch of {}", decoded.len());
    let results = svc.keys.verify_batch(caller, name, decoded, format).await?;
    let batch = answer(&results, note, |v| VerifiedOut {
        valid: v.valid,
        key_version: v.version,
    });
    respond(
        &BatchOut {
            batch,
            key_version: None,
        },
        None,
    )
}

/// The answer, serialized straight from these types: under load, building a `serde_json::Value`
/// per item (a map, its keys, then freeing it all) was a visible share of a batch's CPU.
#[derive(Serialize)]
struct BatchOut<T> {
    batch: Vec<ItemOut<T>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_version: Option<u32>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ItemOut<T> {
    Ok(T),
    Err { error: ItemError },
}

#[derive(Serialize)]
struct SignedOut {
    signature: String,
    key_version: u32,
}

#[derive(Serialize)]
struct VerifiedOut {
    valid: bool,
    key_version: u32,
}

/// What both forms refuse before any work: a body mixing the two forms, an empty or oversized
/// batch, an unknown signature format.
fn check(
    single_too: bool,
    items: usize,
    format: Option<&str>,
) -> Result<crate::service::SignatureFormat, ServiceError> {
    if single_too {
        return Err(ServiceError::invalid(
            "give either 'batch' or the single-call fields, not both",
        ));
    }
    crate::service::batch::check_size(items)?;
    json::signature_format(format)
}

/// Results as JSON, and the failure count in the audit detail (codes only, never contents).
fn answer<T, O>(
    results: &[ItemResult<T>],
    note: &mut Note,
    ok: impl Fn(&T) -> O,
) -> Vec<ItemOut<O>> {
    let failed = results.iter().filter(|r| r.is_err()).count();
    note.detail = format!("batch of {}, {failed} failed", results.len());
    results
        .iter()
        .map(|r| match r {
            Ok(v) => ItemOut::Ok(ok(v)),
            Err(e) => ItemOut::Err {
                error: ItemError {
                    code: e.code(),
                    message: e.to_string(),
                },
            },
        })
        .collect()
}

fn respond<T: Serialize>(
    body: &BatchOut<T>,
    version: Option<u32>,
) -> Result<Outcome, ServiceError> {
    ok(StatusCode::OK, body, version)
}
