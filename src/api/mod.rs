//! The network front: the mutual-TLS API listener and the plain admin listener.

mod admin;
mod batch;
mod batch_create;
pub mod endpoint;
mod handlers;
pub mod idempotency;
mod intent;
pub mod json;
mod query;
mod routes;
mod views;

#[cfg(test)]
mod openapi_conformance;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::service::{Caller, Service};

pub use admin::serve_admin;

/// Every endpoint of the mTLS API. Each feature area declares its own slice; this is the one
/// place they are joined, and the router, the audit labels and the OpenAPI test all read it.
const AREAS: &[&[endpoint::Endpoint]] = &[handlers::ENDPOINTS, crate::retail::routes::ENDPOINTS];

fn endpoints() -> impl Iterator<Item = &'static endpoint::Endpoint> {
    AREAS.iter().flat_map(|area| area.iter())
}

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends no complete request head for this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AppState {
    pub service: Service,
    pub retail: crate::retail::Retail,
    pub metrics: Metrics,
    /// Answers kept for retries under an `Idempotency-Key`.
    pub idempotency: idempotency::Idempotency,
    pub max_body_bytes: usize,
    /// Swapped whole on reload; each new connection takes the config in force.
    pub tls: RwLock<Arc<ServerConfig>>,
}

/// Accept mTLS connections until `shutdown` turns true, then let in-flight requests finish
/// (idle keep-alive connections close at once) for at most `drain`.
pub async fn serve_api(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let tls_state = state.clone();
    let tls = move || {
        tls_state
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    };
    let handler = move |caller, req| routes::handle(state.clone(), caller, req);
    serve_mtls(listener, tls, handler, shutdown, drain).await;
}

/// The mutual-TLS front itself, with the request handler as a parameter: the daemon passes its
/// router, and `tillkey bench` a fixed answer, so the benchmark's transport floor measures this
/// exact code (handshake, identity, HTTP/1.1 settings) rather than a look-alike.
pub async fn serve_mtls<T, H, F>(
    listener: TcpListener,
    tls: T,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    T: Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    H: Fn(Arc<Caller>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let tls = Arc::new(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (tls, handler) = (tls.clone(), handler.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let config = tls();
            let tls = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsAcceptor::from(config).accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(peer = %peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(crate::tls::identity);
            let Some(identity) = identity else {
                tracing::info!(peer = %peer, "client certificate carries no URI SAN or CN; closing");
                return;
            };
            let caller = Arc::new(Caller { identity });
            let svc = service_fn(move |req| handler(caller.clone(), req));
            // One buffer per response (not a vectored write of head and body), so it leaves
            // in one TLS record.
            let conn = http1::Builder::new()
                .writev(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!(connections = open, "drained"),
        Err(_) => tracing::warn!(
            drain_s = drain.as_secs(),
            "drain time over; closing the remaining connections"
        ),
    }
}
