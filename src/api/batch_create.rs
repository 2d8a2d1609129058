//! `POST /v1/keys:batchCreate`: up to `MAX_CREATE_BATCH` creates in one request, one result per item
//! in request order. The request answers 200 whenever the batch itself was well-formed; each
//! item carries its own outcome (`created` with the key, or an error with the same code and
//! status a single create would have given).

use hyper::StatusCode;
use serde_json::{json, Value};

use super::endpoint::{Note, Outcome};
use super::json::{self, KeyView};
use crate::error::ServiceError;
use crate::service::{Caller, LifecycleInput, NewKey, Service};

pub async fn create(
    svc: &Service,
    caller: &Caller,
    body: &[u8],
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    let req: json::BatchCreate = json::parse(body)?;
    let items: Vec<NewKey> = req
        .keys
        .into_iter()
        .map(|k| NewKey {
            name: k.name,
            key_type: k.key_type,
            settings: LifecycleInput {
                rotation_period: k.rotation_period,
                verify_grace: k.verify_grace,
                max_operations: k.max_operations,
                exportable: k.exportable,
            },
            derive_from: k.derive_from,
        })
        .collect();
    let total = items.len();
    let done = svc.batch_create(caller, items, &note.request_id).await?;
    let mut created = 0usize;
    let results: Vec<Value> = done
        .iter()
        .map(|item| match &item.result {
            Ok(key) => {
                created += 1;
                json!({ "name": item.name, "outcome": "created", "status": 201, "key": KeyView::of(key) })
            }
            Err(e) => json!({
                "name": item.name,
                "outcome": "error",
                "status": e.status().as_u16(),
                "error": { "code": e.code(), "message": e.to_string() },
            }),
        })
        .collect();
    note.detail = format!("{created} of {total} created");
    let body = serde_json::to_vec(&json!({
        "created": created,
        "failed": total - created,
        "results": results,
    }))
    .map_err(|e| ServiceError::Internal {
        detail: format!("serializing response: {e}"),
    })?;
    Ok(Outcome {
        status: StatusCode::OK,
        body,
        version: None,
        content_type: "application/json",
    })
}
