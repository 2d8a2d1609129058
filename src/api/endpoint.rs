//! The contract between the router and the handlers: what an endpoint declares, what its
//! handler is given and what it answers. This module imports no other part of `api`, so every
//! feature area can depend on it without the areas depending on each other.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use hyper::{Method, StatusCode};
use serde::Serialize;

use crate::audit::Admission;
use crate::error::ServiceError;
use crate::service::{Caller, Service};

/// The audit sequence number of the request's entry: a receipt tying the answer to the trail.
pub const RECEIPT_HEADER: &str = "x-tillkey-receipt";

/// One endpoint, declared once: routing, the audit and metrics label, body reading and the
/// OpenAPI conformance test all read this, so they cannot drift apart.
pub struct Endpoint {
    pub method: Method,
    /// As written in `docs/openapi.yaml`: literal text, at most one `{param}` segment, then
    /// optionally `:custom`. The parameter runs to the last colon, so it may contain `/`.
    pub path: &'static str,
    /// The `operation` of audit entries and metrics: clients and dashboards key on it, so a
    /// label never changes once released.
    pub label: &'static str,
    /// Whether the body is read at all; endpoints without one answer before a slow client
    /// has finished sending.
    pub reads_body: bool,
    /// Whether the handler may change lasting state (keys, tokens, counters, approvals). Such
    /// a request's intent is audited before its handler runs, so no change is ever without
    /// its entry, even when the process dies before the outcome's entry (see `routes`).
    pub changes: bool,
    pub handler: Handler,
}

/// Boxed so that handlers, each an `async fn` with its own future type, fit in one table.
pub type Handler =
    for<'a> fn(Req<'a>, &'a mut Note) -> BoxFuture<'a, Result<Outcome, ServiceError>>;

/// Turns `async fn f(Req<'_>, &mut Note) -> Result<Outcome, ServiceError>` into a [`Handler`].
macro_rules! handler {
    ($f:path) => {
        |req, note| Box::pin($f(req, note))
    };
}
pub(crate) use handler;

impl Endpoint {
    pub const fn get(path: &'static str, label: &'static str, handler: Handler) -> Self {
        Self {
            method: Method::GET,
            path,
            label,
            reads_body: false,
            changes: false,
            handler,
        }
    }

    pub const fn post(path: &'static str, label: &'static str, handler: Handler) -> Self {
        Self {
            method: Method::POST,
            path,
            label,
            reads_body: true,
            changes: false,
            handler,
        }
    }

    /// A POST that changes lasting state (see [`Endpoint::changes`]).
    pub const fn post_change(path: &'static str, label: &'static str, handler: Handler) -> Self {
        let mut endpoint = Self::post(path, label, handler);
        endpoint.changes = true;
        endpoint
    }

    pub const fn patch(path: &'static str, label: &'static str, handler: Handler) -> Self {
        Self {
            method: Method::PATCH,
            path,
            label,
            reads_body: true,
            changes: true,
            handler,
        }
    }

    /// The path parameter (empty if the pattern has none) when `path` fits the pattern,
    /// whatever the method.
    pub fn matches<'p>(&self, path: &'p str) -> Option<&'p str> {
        let Some((prefix, rest)) = self.path.split_once('{') else {
            return (path == self.path).then_some("");
        };
        let custom = rest.split_once('}').map_or("", |(_, custom)| custom);
        let tail = path.strip_prefix(prefix)?;
        match (tail.rsplit_once(':'), custom.strip_prefix(':')) {
            // A bare `{name}` is a resource; any colon would make it a custom method.
            (None, None) if custom.is_empty() => Some(tail),
            (Some((param, method)), Some(wanted)) if method == wanted => Some(param),
            _ => None,
        }
    }
}

/// What a handler is given: the service, the caller and the parts of the request it may read.
pub struct Req<'a> {
    pub svc: &'a Service,
    pub retail: &'a crate::retail::Retail,
    pub caller: &'a Caller,
    /// The `{name}` or `{id}` path segment; empty for endpoints without one.
    pub name: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
}

/// A successful answer, plus the key version it used for the operations log.
pub struct Outcome {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub version: Option<u32>,
    /// Borrowed for the handlers' fixed types; owned for an answer read back from storage.
    pub content_type: Cow<'static, str>,
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
        content_type: Cow::Borrowed("application/json"),
    })
}
