//! A small mutual-TLS client for tillkey's API, shared by the CLI, the benchmark and the tests.
//!
//! One [`Connection`] is one keep-alive HTTP/1.1 connection; callers that want concurrency open
//! several.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the response is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    host_header: String,
}

impl Client {
    /// `url` is `https://HOST:PORT`; `identity` is a client certificate and key (PEM), or `None`
    /// to connect without one (only useful to test that the server refuses that).
    pub fn new(
        url: &str,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("https://")
            .map(|r| r.trim_end_matches('/'))
            .ok_or_else(|| ClientError::Setup(format!("'{url}' is not an https:// URL")))?;
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| ClientError::Setup(format!("'{url}' has no port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| ClientError::Setup(format!("'{url}': bad port")))?;
        let addr = match host {
            "localhost" => SocketAddr::from(([127, 0, 0, 1], port)),
            _ => SocketAddr::new(
                host.parse().map_err(|_| {
                    ClientError::Setup(format!("'{host}': use an IP address or localhost"))
                })?,
                port,
            ),
        };
        let roots = tls::load_roots(ca).map_err(ClientError::Setup)?;
        let builder = ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Setup(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    tls::load_certs(cert).map_err(ClientError::Setup)?,
                    tls::load_key(key).map_err(ClientError::Setup)?,
                )
                .map_err(|e| ClientError::Setup(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| ClientError::Setup(format!("'{host}': {e}")))?;
        Ok(Self {
            config: Arc::new(config),
            addr,
            server_name,
            host_header: authority.to_owned(),
        })
    }

    /// `HOST:PORT` as the `Host` header carries it.
    pub fn authority(&self) -> &str {
        &self.host_header
    }

    /// The bare mutual-TLS stream, for callers that speak HTTP themselves (slow-client tests).
    pub async fn connect_tls(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ClientError::Tls)
    }

    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tls = self.connect_tls().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection {
            sender,
            host: self.host_header.clone(),
        })
    }
}

pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    /// Send a JSON request (or none) and parse the JSON answer.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let (status, body) = self.call_raw(method, path, bytes).await?;
        Ok((status, serde_json::from_slice(&body)?))
    }

    /// Send raw bytes as the body; for tests of malformed input.
    pub async fn call_raw(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (status, _, body) = self.call_with_headers(method, path, body).await?;
        Ok((status, body))
    }

    /// Like [`Connection::call_raw`], with the response headers (receipts, request ids).
    pub async fn call_with_headers(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        self.send(method, path, &[], body).await
    }

    /// Like [`Connection::call_with_headers`], with request headers of its own (an
    /// `Idempotency-Key`); values are raw bytes, so tests can send malformed ones.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &[u8])],
        body: Vec<u8>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            let value = hyper::header::HeaderValue::from_bytes(value)
                .map_err(|e| ClientError::Setup(format!("header {name}: {e}")))?;
            req = req.header(*name, value);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, body))
    }
}
