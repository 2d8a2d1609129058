//! Routing, body limits, the response envelope, and the one log event and metric per request.
//!
//! Paths follow the custom-method style: `/v1/keys/{name}:{method}`. Key names cannot contain
//! `:`, so the method is whatever follows the last colon. The endpoints themselves are declared
//! in the areas' tables (see [`super::endpoints`]).

use std::borrow::Cow;
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

use super::endpoint::{Endpoint, Note, Outcome, Req, RECEIPT_HEADER};
use super::idempotency::{self, Answer, Standing, Step};
use super::AppState;
use crate::audit;
use crate::error::ServiceError;
use crate::logging::Throttle;
use crate::metrics::{OperationLabel, RequestLabels};
use crate::service::Caller;

/// Every endpoint with the `Allow` value of its path, built on first use: `Allow` lists every
/// method on the path, and the error carries it as a `&'static str`.
fn table() -> &'static [(&'static Endpoint, String)] {
    static TABLE: OnceLock<Vec<(&'static Endpoint, String)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        super::endpoints()
            .map(|e| {
                let methods: Vec<&str> = super::endpoints()
                    .filter(|other| other.path == e.path)
                    .map(|other| other.method.as_str())
                    .collect();
                (e, methods.join(", "))
            })
            .collect()
    })
}

/// The endpoint for method and path, and the path parameter (empty if none). A path that some
/// endpoint serves under another method is 405, not 404, so clients learn what is allowed.
fn route<'p>(method: &Method, path: &'p str) -> Result<(&'static Endpoint, &'p str), ServiceError> {
    let mut allow = None;
    for (endpoint, methods) in table() {
        if let Some(param) = endpoint.matches(path) {
            if endpoint.method == *method {
                return Ok((endpoint, param));
            }
            allow = Some(methods.as_str());
        }
    }
    Err(match allow {
        Some(allow) => ServiceError::MethodNotAllowed { allow },
        None => ServiceError::NotFound(format!("no such endpoint: {method} {path}")),
    })
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
    let operation = routed.as_ref().map_or("unknown", |(e, _)| e.label);
    let path_key = routed.as_ref().map_or("", |(_, name)| *name);
    let mut note = Note {
        request_id: request_id.clone(),
        ..Default::default()
    };
    let mut standing = Standing::None;

    let result = match (routed, state.service.core.audit().failing()) {
        (Err(e), _) => Err(e),
        // Fail closed: while the audit store refuses writes, nothing is done, so no action can
        // take effect without its entry. This request's own entry is still attempted below;
        // once one is written again (or the scheduler's probe is), requests are served.
        (Ok(_), true) => Err(ServiceError::Unavailable {
            detail: format!(
                "audit trail: {}",
                state.service.core.audit().failure().unwrap_or_default()
            ),
        }),
        (Ok(routed), false) => {
            run(
                &state,
                &caller,
                routed,
                &parts,
                body,
                &mut note,
                &mut standing,
            )
            .await
        }
    };

    let key = note.key.clone().unwrap_or_else(|| path_key.to_owned());
    let record = audit::Record {
        identity: caller.identity.clone(),
        operation,
        key: key.clone(),
        version: result.as_ref().ok().and_then(|o| o.version),
        outcome: match &result {
            Ok(_) => standing.replayed_outcome().unwrap_or("ok"),
            Err(e) => e.code(),
        },
        request_id: request_id.clone(),
        detail: std::mem::take(&mut note.detail),
    };
    let reply = Reply::of(&state, &request_id, result, &standing);
    let (reply, receipt) = settle(
        &state,
        &caller,
        &request_id,
        record,
        reply,
        &standing,
        note.admission.take(),
    )
    .await;
    let Reply {
        status,
        body,
        version,
        outcome,
        content_type,
        allow,
    } = reply;
    let elapsed = started.elapsed();
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
    let mut resp = respond(status, body, &content_type, &request_id);
    if let Some(a) = allow {
        resp.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static(a));
    }
    if let Some(seq) = receipt {
        resp.headers_mut()
            .insert(RECEIPT_HEADER, HeaderValue::from(seq));
    }
    standing.mark(resp.headers_mut());
    Ok(resp)
}

/// Write the request's entry and, in the same commit, settle its claimed `Idempotency-Key`
/// (see `idempotency`). Nothing is answered without its entry: a failed append turns any answer
/// into 503 (and releases a claim whose attempt never began a change).
async fn settle(
    state: &AppState,
    caller: &Caller,
    request_id: &str,
    record: audit::Record,
    reply: Reply,
    standing: &Standing,
    admission: Option<audit::Admission>,
) -> (Reply, Option<u64>) {
    let claim = match standing {
        Standing::Claimed(claim) => Some(claim),
        _ => None,
    };
    let side = claim.and_then(|c| {
        c.settle_write(&Answer {
            status: reply.status,
            content_type: &reply.content_type,
            body: &reply.body,
            outcome: reply.outcome,
            key: &record.key,
            version: reply.version,
        })
    });
    let side_given = side.is_some();
    let appended = state
        .service
        .core
        .audit()
        .append_with(record, side, admission)
        .await;
    match appended {
        Ok(a) => {
            if side_given && !a.side_changed {
                tracing::warn!(identity = %caller.identity, "an Idempotency-Key claim was taken over before its answer was stored");
            }
            (reply, Some(a.receipt))
        }
        Err(e) => {
            if let Some(claim) = claim {
                state.idempotency.release_unstarted(claim).await;
            }
            (Reply::of(state, request_id, Err(e), standing), None)
        }
    }
}

/// The answer about to be sent, before its audit entry is written.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    version: Option<u32>,
    outcome: &'static str,
    content_type: Cow<'static, str>,
    allow: Option<&'static str>,
}

impl Reply {
    /// A handler's result as the answer; an error is reported (logged and counted) here.
    fn of(
        state: &AppState,
        request_id: &str,
        result: Result<Outcome, ServiceError>,
        standing: &Standing,
    ) -> Self {
        match result {
            Ok(o) => Self {
                status: o.status,
                body: o.body,
                version: o.version,
                outcome: standing.replayed_outcome().unwrap_or("ok"),
                content_type: o.content_type,
                allow: None,
            },
            Err(e) => {
                report(state, request_id, &e);
                Self {
                    status: e.status(),
                    body: e.to_json(),
                    version: None,
                    outcome: e.code(),
                    content_type: "application/json".into(),
                    allow: match e {
                        ServiceError::MethodNotAllowed { allow } => Some(allow),
                        _ => None,
                    },
                }
            }
        }
    }
}

/// A failure inside the service goes to the log (with the request id, as the client sees
/// only a generic message) and to the backend error metric.
fn report(state: &AppState, request_id: &str, e: &ServiceError) {
    let Some(detail) = e.internal_detail() else {
        return;
    };
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

/// Read the body if the endpoint takes one, claim its `Idempotency-Key` if it has one (or
/// answer with the key's stored answer), then run its handler.
async fn run(
    state: &AppState,
    caller: &Caller,
    (endpoint, name): (&Endpoint, &str),
    parts: &hyper::http::request::Parts,
    body: Incoming,
    note: &mut Note,
    standing: &mut Standing,
) -> Result<Outcome, ServiceError> {
    refuse_browser_cross_site(&parts.headers)?;
    let body = if endpoint.reads_body {
        if !is_json(&parts.headers) {
            return Err(ServiceError::UnsupportedMediaType);
        }
        read_body(&parts.headers, body, state.max_body_bytes).await?
    } else {
        Bytes::new()
    };
    let query = parts.uri.query().unwrap_or("");
    if let Some(key) = idempotency::key(&parts.method, &parts.headers)? {
        let print = idempotency::fingerprint(&parts.method, parts.uri.path(), query, &body);
        match state
            .idempotency
            .begin(&caller.identity, &key, &print)
            .await?
        {
            Step::Run(claim) => *standing = Standing::Claimed(claim),
            Step::Replay(stored) => {
                let (outcome, replayed) = stored.replay(note);
                *standing = replayed;
                return Ok(outcome);
            }
        }
    }
    super::intent::record(state, caller, endpoint, name, &body, note, standing).await?;
    // Tells the audit writer an entry is coming, so it can put it in the group it is forming;
    // taken once the body is in (a client slow to send it must not hold up the group).
    note.admission = Some(state.service.core.audit().admit());
    let req = Req {
        svc: &state.service,
        retail: &state.retail,
        caller,
        name,
        query,
        body: &body,
    };
    // A bug must cost one request a 500, not the connection its answer.
    match AssertUnwindSafe((endpoint.handler)(req, note))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(_) => Err(ServiceError::Internal {
            detail: "request handler panicked".into(),
        }),
    }
}

/// A browser holding an officer's client certificate presents it to any page that calls the
/// daemon, so a request the browser marks as coming from another site (`Sec-Fetch-Site`, or an
/// `Origin` that is not this server) is refused whatever it asks. API clients send neither
/// header. No CORS headers are ever sent, so no other origin can read an answer either.
fn refuse_browser_cross_site(headers: &hyper::HeaderMap) -> Result<(), ServiceError> {
    let refused = || {
        ServiceError::PermissionDenied(
            "requests a browser sends from another site are refused".into(),
        )
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(refused());
        }
    }
    if let Some(origin) = headers.get(hyper::header::ORIGIN) {
        let host = headers.get(hyper::header::HOST).map(|h| h.as_bytes());
        let own = host.is_some_and(|h| origin.as_bytes() == [b"https://", h].concat().as_slice());
        if !own {
            return Err(refused());
        }
    }
    Ok(())
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
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

fn respond(
    status: StatusCode,
    body: Vec<u8>,
    content_type: &str,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let json = HeaderValue::from_static("application/json");
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(json),
    );
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
    use std::collections::HashSet;

    use super::*;

    /// The label and path parameter a request routes to.
    fn to(method: Method, path: &str) -> (&'static str, &str) {
        match route(&method, path) {
            Ok((endpoint, name)) => (endpoint.label, name),
            Err(e) => panic!("{method} {path}: {e:?}"),
        }
    }

    fn allow(method: Method, path: &str) -> &'static str {
        match route(&method, path) {
            Err(ServiceError::MethodNotAllowed { allow }) => allow,
            other => panic!("{method} {path}: {:?}", other.map(|(e, n)| (e.label, n))),
        }
    }

    fn not_found(method: Method, path: &str) {
        match route(&method, path) {
            Err(ServiceError::NotFound(m)) => {
                assert_eq!(m, format!("no such endpoint: {method} {path}"))
            }
            other => panic!("{method} {path}: {:?}", other.map(|(e, n)| (e.label, n))),
        }
    }

    #[test]
    fn routes_custom_methods_on_nested_names() {
        assert_eq!(
            to(Method::POST, "/v1/keys/stores/1/pos/2/qr-mac:sign"),
            ("sign", "stores/1/pos/2/qr-mac")
        );
        assert_eq!(to(Method::GET, "/v1/keys/stores/1"), ("get", "stores/1"));
        assert_eq!(to(Method::GET, "/v1/keys"), ("list", ""));
        assert_eq!(to(Method::POST, "/v1/keys:revokePrefix").0, "revoke_prefix");
        assert_eq!(to(Method::PATCH, "/v1/keys/a/b"), ("update", "a/b"));
        // The custom method is what follows the last colon.
        assert_eq!(
            to(Method::POST, "/v1/devices/a:b:revoke"),
            ("device_revoke", "a:b")
        );
        assert_eq!(to(Method::POST, "/v1/keys/a:b:seal"), ("seal", "a:b"));
        assert_eq!(allow(Method::GET, "/v1/keys/a:sign"), "POST");
        assert_eq!(allow(Method::DELETE, "/v1/keys"), "GET, POST");
        assert_eq!(allow(Method::DELETE, "/v1/keys/a/b"), "GET, PATCH");
        assert_eq!(allow(Method::GET, "/v1/tokens/pos-paid:issue"), "POST");
        assert_eq!(allow(Method::POST, "/v1/audit"), "GET");
        not_found(Method::POST, "/v1/keys/a:explode");
        not_found(Method::POST, "/v1/keys/a:");
        not_found(Method::GET, "/v2/keys");
        not_found(Method::POST, "/v1/keys:explode");
        not_found(Method::POST, "/v1/tokens/pos-paid");
        not_found(Method::POST, "/v1/devices/d1");
        not_found(Method::GET, "/v1/giftcodes/g1");
        not_found(Method::POST, "/v1/approvals/a1:explode");
    }

    /// The path an entry serves, its parameter filled with a nested key name.
    fn example(path: &str) -> (String, &'static str) {
        const NAME: &str = "stores/1/pos/2/qr-mac";
        match path.split_once('{') {
            None => (path.to_owned(), ""),
            Some((prefix, rest)) => {
                let (_, custom) = rest.split_once('}').unwrap();
                (format!("{prefix}{NAME}{custom}"), NAME)
            }
        }
    }

    /// The `Allow` values clients received before the table existed.
    fn expected_allow(path: &str) -> &'static str {
        match path {
            "/v1/keys" => "GET, POST",
            "/v1/keys/{name}" => "GET, PATCH",
            "/v1/audit" | "/v1/status-list" | "/v1/wrapping-key" | "/v1/approvals" => "GET",
            _ => "POST",
        }
    }

    #[test]
    fn every_endpoint_routes_to_itself_and_refuses_other_methods() {
        let all: Vec<&Endpoint> = crate::api::endpoints().collect();
        let mut labels = HashSet::new();
        let mut routes = HashSet::new();
        for e in &all {
            assert!(labels.insert(e.label), "label {} used twice", e.label);
            assert!(
                routes.insert((&e.method, e.path)),
                "{} {} twice",
                e.method,
                e.path
            );
            assert!(e.path.starts_with("/v1/"), "{}", e.path);
            // At most one parameter, and after it nothing or a custom method.
            if let Some((_, rest)) = e.path.split_once('{') {
                let (param, custom) = rest.split_once('}').unwrap();
                assert!(param == "name" || param == "id", "{}", e.path);
                assert!(!custom.contains(['{', '/']), "{}", e.path);
                assert!(custom.is_empty() || custom.starts_with(':'), "{}", e.path);
            }
            assert_eq!(e.reads_body, e.method != Method::GET, "{}", e.label);

            let (path, name) = example(e.path);
            let (found, param) = route(&e.method, &path).unwrap();
            assert!(
                std::ptr::eq(found, *e),
                "{} {path} went to {}",
                e.method,
                found.label
            );
            assert_eq!(param, name);
            for m in [
                Method::GET,
                Method::POST,
                Method::PATCH,
                Method::PUT,
                Method::DELETE,
            ] {
                if all.iter().any(|o| o.path == e.path && o.method == m) {
                    continue;
                }
                assert_eq!(
                    allow(m.clone(), &path),
                    expected_allow(e.path),
                    "{m} {path}"
                );
            }
        }
    }
}
