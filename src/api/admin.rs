//! The admin listener: `/healthz` (the process runs), `/readyz` (the backend answers) and
//! `/metrics` (Prometheus text). Plain HTTP, loopback by default: it carries no key operation.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::AppState;
use crate::backend::Health;

pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(state.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn answer(
    state: Arc<AppState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            // Ready only while the token answers, the audit trail accepts writes and the
            // registry has caught up with the other instances (on a shared database).
            let backend = match state.service.core.device().health() {
                Health::Ready => None,
                Health::NotReady(reason) => Some(reason),
            };
            let audit = state.service.core.audit().failure();
            let registry = state
                .service
                .core
                .current()
                .err()
                .and_then(|e| e.internal_detail().map(str::to_owned));
            if backend.is_none() && audit.is_none() && registry.is_none() {
                (
                    StatusCode::OK,
                    "application/json",
                    r#"{"ready":true}"#.to_string(),
                )
            } else {
                let mut v = serde_json::json!({ "ready": false });
                if let Some(r) = backend {
                    v["backend"] = r.into();
                }
                if let Some(r) = audit {
                    v["audit"] = r.into();
                }
                if let Some(r) = registry {
                    v["registry"] = r.into();
                }
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    v.to_string(),
                )
            }
        }
        "/metrics" => {
            let m = &state.metrics;
            m.backend_ready.set(i64::from(
                state.service.core.device().health() == Health::Ready,
            ));
            m.keys.set(state.service.core.key_count() as i64);
            if let Some(c) = state.service.core.device().derived_cache() {
                for (what, n) in [
                    ("held", c.held as i64),
                    ("capacity", c.capacity as i64),
                    (
                        "derivations",
                        i64::try_from(c.derivations).unwrap_or(i64::MAX),
                    ),
                ] {
                    m.derived_keys
                        .get_or_create(&crate::metrics::DerivedLabel { what })
                        .set(n);
                }
            }
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                m.render(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}
