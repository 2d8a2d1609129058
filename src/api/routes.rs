//! Routing, body limits, the response envelope, and the one log event and metric per request.
//!
//! Paths follow the custom-method style: `/v1/keys/{name}:{method}`. Key names cannot contain
//! `:`, so the method is whatever follows the last colon.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use ring::rand::SecureRandom;

use super::handlers;
use super::AppState;
use crate::audit;
use crate::error::ServiceError;
use crate::logging::Throttle;
use crate::metrics::{OperationLabel, RequestLabels};
use crate::service::Caller;

/// The audit sequence number of the request's entry: a receipt tying the answer to the trail.
pub const RECEIPT_HEADER: &str = "x-tillkey-receipt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    CreateKey,
    BatchCreate,
    ListKeys,
    GetKey,
    UpdateKey,
    Rotate,
    Revoke,
    RevokePrefix,
    RotatePrefix,
    Audit,
    Destroy,
    ListApprovals,
    Approve,
    CancelApproval,
    Export,
    Import,
    WrappingKey,
    StatusList,
    PosRequestIssue,
    PosRequestVerify,
    PosPaidIssue,
    PosPaidVerify,
    OtpIssue,
    OtpRedeem,
    DeviceRegister,
    DeviceRevoke,
    DeviceTokenVerify,
    ChallengeIssue,
    ChallengeVerify,
    Seal,
    Open,
    GiftIssue,
    GiftCheck,
    GiftReissue,
    GiftRevoke,
    GiftUnlock,
    Sign,
    Verify,
    Encrypt,
    Decrypt,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::CreateKey => "create",
            Route::BatchCreate => "batch_create",
            Route::ListKeys => "list",
            Route::GetKey => "get",
            Route::UpdateKey => "update",
            Route::Rotate => "rotate",
            Route::Revoke => "revoke",
            Route::RevokePrefix => "revoke_prefix",
            Route::RotatePrefix => "rotate_prefix",
            Route::Audit => "audit_read",
            Route::Destroy => "destroy",
            Route::ListApprovals => "list_approvals",
            Route::Approve => "approve",
            Route::CancelApproval => "cancel_approval",
            Route::Export => "export",
            Route::Import => "import",
            Route::WrappingKey => "wrapping_key",
            Route::StatusList => "status_list",
            Route::PosRequestIssue => "pos_request_issue",
            Route::PosRequestVerify => "pos_request_verify",
            Route::PosPaidIssue => "pos_paid_issue",
            Route::PosPaidVerify => "pos_paid_verify",
            Route::OtpIssue => "customer_otp_issue",
            Route::OtpRedeem => "customer_otp_redeem",
            Route::DeviceRegister => "device_register",
            Route::DeviceRevoke => "device_revoke",
            Route::DeviceTokenVerify => "customer_signed_verify",
            Route::ChallengeIssue => "challenge_issue",
            Route::ChallengeVerify => "challenge_verify",
            Route::Seal => "seal",
            Route::Open => "open",
            Route::GiftIssue => "giftcode_issue",
            Route::GiftCheck => "giftcode_check",
            Route::GiftReissue => "giftcode_reissue",
            Route::GiftRevoke => "giftcode_revoke",
            Route::GiftUnlock => "giftcode_unlock",
            Route::Sign => "sign",
            Route::Verify => "verify",
            Route::Encrypt => "encrypt",
            Route::Decrypt => "decrypt",
        }
    }

    fn has_body(self) -> bool {
        !matches!(
            self,
            Route::ListKeys
                | Route::GetKey
                | Route::Audit
                | Route::ListApprovals
                | Route::WrappingKey
                | Route::StatusList
        )
    }
}

/// Match method and path; the second value is the key name from the path, if any.
fn route<'p>(method: &Method, path: &'p str) -> Result<(Route, Option<&'p str>), ServiceError> {
    let unknown = || ServiceError::NotFound(format!("no such endpoint: {method} {path}"));
    if path == "/v1/keys" {
        return match *method {
            Method::GET => Ok((Route::ListKeys, None)),
            Method::POST => Ok((Route::CreateKey, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET, POST" }),
        };
    }
    if path == "/v1/audit" {
        return match *method {
            Method::GET => Ok((Route::Audit, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/tokens/") {
        let r = match rest {
            "pos-request:issue" => Route::PosRequestIssue,
            "pos-request:verify" => Route::PosRequestVerify,
            "pos-paid:issue" => Route::PosPaidIssue,
            "pos-paid:verify" => Route::PosPaidVerify,
            "customer-otp:issue" => Route::OtpIssue,
            "customer-otp:redeem" => Route::OtpRedeem,
            "customer-signed:verify" => Route::DeviceTokenVerify,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, None));
    }
    // Flat POST resources and POST custom methods on an id: /v1/{collection}[/{id}]:{method}.
    let simple = |r| {
        if *method == Method::POST {
            Ok(r)
        } else {
            Err(ServiceError::MethodNotAllowed { allow: "POST" })
        }
    };
    match path {
        "/v1/devices" => return simple((Route::DeviceRegister, None)),
        "/v1/challenges" => return simple((Route::ChallengeIssue, None)),
        "/v1/giftcodes:issue" => return simple((Route::GiftIssue, None)),
        "/v1/giftcodes:check" => return simple((Route::GiftCheck, None)),
        _ => {}
    }
    for (collection, methods) in [
        ("/v1/devices/", &[("revoke", Route::DeviceRevoke)][..]),
        ("/v1/challenges/", &[("verify", Route::ChallengeVerify)][..]),
        (
            "/v1/giftcodes/",
            &[
                ("reissue", Route::GiftReissue),
                ("revoke", Route::GiftRevoke),
                ("unlock", Route::GiftUnlock),
            ][..],
        ),
    ] {
        if let Some(rest) = path.strip_prefix(collection) {
            let (id, custom) = rest.rsplit_once(':').ok_or_else(unknown)?;
            let r = methods
                .iter()
                .find(|(m, _)| *m == custom)
                .map(|(_, r)| *r)
                .ok_or_else(unknown)?;
            return simple((r, Some(id)));
        }
    }
    if path == "/v1/status-list" {
        return match *method {
            Method::GET => Ok((Route::StatusList, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if path == "/v1/wrapping-key" {
        return match *method {
            Method::GET => Ok((Route::WrappingKey, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if path == "/v1/approvals" {
        return match *method {
            Method::GET => Ok((Route::ListApprovals, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/approvals/") {
        let (id, custom) = rest.rsplit_once(':').ok_or_else(unknown)?;
        let r = match custom {
            "approve" => Route::Approve,
            "cancel" => Route::CancelApproval,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, Some(id)));
    }
    if let Some(custom) = path.strip_prefix("/v1/keys:") {
        let r = match custom {
            "revokePrefix" => Route::RevokePrefix,
            "rotatePrefix" => Route::RotatePrefix,
            "import" => Route::Import,
            "batchCreate" => Route::BatchCreate,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, None));
    }
    let rest = path.strip_prefix("/v1/keys/").ok_or_else(unknown)?;
    match rest.rsplit_once(':') {
        None => match *method {
            Method::GET => Ok((Route::GetKey, Some(rest))),
            Method::PATCH => Ok((Route::UpdateKey, Some(rest))),
            _ => Err(ServiceError::MethodNotAllowed {
                allow: "GET, PATCH",
            }),
        },
        Some((name, custom)) => {
            let r = match custom {
                "sign" => Route::Sign,
                "verify" => Route::Verify,
                "encrypt" => Route::Encrypt,
                "decrypt" => Route::Decrypt,
                "rotate" => Route::Rotate,
                "revoke" => Route::Revoke,
                "destroy" => Route::Destroy,
                "export" => Route::Export,
                "seal" => Route::Seal,
                "open" => Route::Open,
                _ => return Err(unknown()),
            };
            if *method != Method::POST {
                return Err(ServiceError::MethodNotAllowed { allow: "POST" });
            }
            Ok((r, Some(name)))
        }
    }
}

pub async fn handle(
    state: Arc<AppState>,
    caller: Arc<Caller>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let request_id = request_id();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let routed = route(&parts.method, &path);
    let operation = routed.as_ref().map_or("unknown", |(r, _)| r.label());
    let path_key = routed.as_ref().ok().and_then(|(_, k)| *k).unwrap_or("");
    let mut note = super::endpoint::Note {
        request_id: request_id.clone(),
        ..Default::default()
    };

    let result = match (routed, state.service.audit().failing()) {
        (Err(e), _) => Err(e),
        // Fail closed: while the audit store refuses writes, nothing is done, so no action can
        // take effect without its entry. This request's own entry is still attempted below;
        // once one is written again (or the scheduler's probe is), requests are served.
        (Ok(_), true) => Err(ServiceError::Unavailable {
            detail: format!(
                "audit trail: {}",
                state.service.audit().failure().unwrap_or_default()
            ),
        }),
        (Ok((r, name)), false) => {
            let body = if r.has_body() {
                read_body(&parts.headers, body, state.max_body_bytes).await
            } else {
                Ok(Bytes::new())
            };
            match body {
                Ok(body) => {
                    // Tells the audit writer an entry is coming, so it can put it in the group
                    // it is forming; taken once the body is in (a client slow to send it must
                    // not hold up the group).
                    note.admission = Some(state.service.audit().admit());
                    let query = parts.uri.query().unwrap_or("");
                    // A bug must cost one request a 500, not the connection its answer.
                    let call = handlers::dispatch(
                        &state,
                        &caller,
                        r,
                        name.unwrap_or(""),
                        query,
                        &body,
                        &mut note,
                    );
                    match AssertUnwindSafe(call).catch_unwind().await {
                        Ok(result) => result,
                        Err(_) => Err(ServiceError::Internal {
                            detail: "request handler panicked".into(),
                        }),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };

    let key = note.key.clone().unwrap_or_else(|| path_key.to_owned());
    // Nothing is answered without its audit entry: a failed append turns any answer into 503.
    let record = audit::Record {
        identity: caller.identity.clone(),
        operation,
        key: key.clone(),
        version: result.as_ref().ok().and_then(|o| o.version),
        outcome: match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        },
        request_id: request_id.clone(),
        detail: std::mem::take(&mut note.detail),
    };
    let (result, receipt) = match state
        .service
        .audit()
        .append_admitted(record, note.admission.take())
        .await
    {
        Ok(seq) => (result, Some(seq)),
        Err(e) => (Err(e), None),
    };

    let elapsed = started.elapsed();
    let mut allow = None;
    let mut content_type = "application/json";
    let (status, body, version, outcome) = match result {
        Ok(o) => {
            content_type = o.content_type;
            (o.status, o.body, o.version, "ok")
        }
        Err(e) => {
            if let ServiceError::MethodNotAllowed { allow: a } = e {
                allow = Some(a);
            }
            if let Some(detail) = e.internal_detail() {
                let unavailable = matches!(e, ServiceError::Unavailable { .. });
                // An outage fails every request the same way: report it once a second.
                if !unavailable {
                    tracing::error!(request_id = %request_id, detail, "request failed inside the service");
                } else if let Some(held_back) = UNAVAILABLE_LOG.admit() {
                    tracing::error!(request_id = %request_id, detail, held_back, "request failed inside the service");
                }
                let kind = if unavailable { "unavailable" } else { "failed" };
                state
                    .metrics
                    .backend_errors
                    .get_or_create(&crate::metrics::BackendErrorLabel { kind })
                    .inc();
            }
            (e.status(), e.to_json(), None, e.code())
        }
    };
    // The operations log: who did what to which key, never bodies, signatures or secrets.
    tracing::info!(
        target: "tillkey::request",
        request_id = %request_id,
        identity = %caller.identity,
        operation,
        key,
        version = version.unwrap_or(0),
        outcome,
        status = status.as_u16(),
        receipt = receipt.unwrap_or(0),
        latency_us = elapsed.as_micros() as u64,
    );
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels { operation, outcome })
        .inc();
    state
        .metrics
        .latency
        .get_or_create(&OperationLabel { operation })
        .observe(elapsed.as_secs_f64());
    let mut resp = respond(status, body, &request_id);
    if content_type != "application/json" {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if let Some(a) = allow {
        resp.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static(a));
    }
    if let Some(seq) = receipt {
        resp.headers_mut()
            .insert(RECEIPT_HEADER, HeaderValue::from(seq));
    }
    Ok(resp)
}

/// The error line for requests refused while the token or the audit trail is down.
static UNAVAILABLE_LOG: Throttle = Throttle::new();

/// Bodies up to this many times the limit are read and discarded before the 413 is sent, so
/// a client still writing its body receives the error instead of a reset connection. Larger
/// ones are refused at once and the connection closes.
const DRAIN_FACTOR: u64 = 4;

async fn read_body(
    headers: &hyper::HeaderMap,
    mut body: Incoming,
    limit: usize,
) -> Result<Bytes, ServiceError> {
    let too_large = ServiceError::PayloadTooLarge { limit };
    let limit64 = limit as u64;
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ServiceError::invalid("Content-Length is not a number"))?;
        if len > limit64 * DRAIN_FACTOR {
            return Err(too_large);
        }
    }
    let mut buf = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| ServiceError::invalid("the request body could not be read"))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len() as u64;
            if seen > limit64 * DRAIN_FACTOR {
                return Err(too_large);
            }
            if seen <= limit64 {
                buf.extend_from_slice(&data);
            }
        }
    }
    if seen > limit64 {
        return Err(too_large);
    }
    Ok(Bytes::from(buf))
}

fn respond(status: StatusCode, body: Vec<u8>, request_id: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    resp
}

/// A counter from a random start: unique within the process, unlikely to repeat across
/// restarts, and free of a system call per request. Ids correlate logs; they grant nothing.
fn request_id() -> String {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let mut seed = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut seed);
        AtomicU64::new(u64::from_be_bytes(seed))
    });
    format!("{:016x}", next.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_custom_methods_on_nested_names() {
        let (r, n) = route(&Method::POST, "/v1/keys/stores/1/pos/2/qr-mac:sign").unwrap();
        assert_eq!((r, n), (Route::Sign, Some("stores/1/pos/2/qr-mac")));
        let (r, n) = route(&Method::GET, "/v1/keys/stores/1").unwrap();
        assert_eq!((r, n), (Route::GetKey, Some("stores/1")));
        assert_eq!(route(&Method::GET, "/v1/keys").unwrap().0, Route::ListKeys);
        assert_eq!(
            route(&Method::POST, "/v1/keys:revokePrefix").unwrap().0,
            Route::RevokePrefix
        );
        assert_eq!(
            route(&Method::PATCH, "/v1/keys/a/b").unwrap(),
            (Route::UpdateKey, Some("a/b"))
        );
        assert!(matches!(
            route(&Method::GET, "/v1/keys/a:sign"),
            Err(ServiceError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            route(&Method::POST, "/v1/keys/a:explode"),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/v2/keys"),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            route(&Method::DELETE, "/v1/keys"),
            Err(ServiceError::MethodNotAllowed { .. })
        ));
    }
}
