//! `POST /v1/keys:batchCreate`: up to `MAX_CREATE_BATCH` creates in one request, one result per item
//! in request order. The request answers 200 whenever the batch itself was well-formed; each
//! item carries its own outcome (`created` with the key, or an error with the same code and
//! status a single create would have given).

use hyper::StatusCode;

use super::endpoint::{ok, Note, Outcome, Req};
use super::json::{self, KeyView};
use super::views::{BatchCreated, CreateResult, ItemError};
use crate::error::ServiceError;
use crate::service::{LifecycleInput, NewKey};

pub async fn create(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::BatchCreate = json::parse(r.body)?;
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
    let done = r
        .svc
        .lifecycle
        .batch_create(r.caller, items, &note.request_id)
        .await?;
    let results: Vec<CreateResult> = done
        .iter()
        .map(|item| match &item.result {
            Ok(key) => CreateResult {
                error: None,
                key: Some(KeyView::of(key)),
                name: item.name.clone(),
                outcome: "created",
                status: StatusCode::CREATED.as_u16(),
            },
            Err(e) => CreateResult {
                error: Some(ItemError {
                    code: e.code(),
                    message: e.to_string(),
                }),
                key: None,
                name: item.name.clone(),
                outcome: "error",
                status: e.status().as_u16(),
            },
        })
        .collect();
    let created = results.iter().filter(|r| r.key.is_some()).count();
    note.detail = format!("{created} of {total} created");
    let body = BatchCreated {
        created,
        failed: total - created,
        results,
    };
    ok(StatusCode::OK, &body, None)
}
