//! The transport floor: tillkeyd's own mutual-TLS front (`api::serve_mtls`, the daemon's
//! certificates, TLS settings and worker count) answering every request with a fixed,
//! signature-sized JSON body, with no token call, policy, audit or log behind it.
//!
//! Measured with the same load generator, it is the most any request through this front can
//! reach on this machine, so `1 / (1/raw + 1/floor)` bounds what the daemon can do for a token
//! operation; the gap between the floor and the daemon's no-op request is the daemon's own
//! work. It runs as a child process (`tillkey bench-floor`), so it competes for the CPUs the
//! way the daemon does.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Response, StatusCode};
use tokio::sync::watch;

use crate::config::{Config, Overrides};

/// What the floor answers: the shape and size of an HMAC `:sign` answer.
const ANSWER: &str = r#"{"signature":"M2Y0ZTRmNDQ2ZjZlMjc3NDIwNjM2ZjcwNzkyMDc0Njg2OTczMjA2MTZlNzM3NzY1NzIuLi4=","version":1}"#;

#[derive(Args)]
pub struct FloorArgs {
    /// Environment made by softhsm-ci/dev-env (its certificates and worker count are used).
    #[arg(long)]
    dev_dir: PathBuf,
}

/// The child process: print the port, serve until standard input closes (the parent is done
/// or gone).
pub fn serve(args: FloorArgs) -> Result<(), String> {
    let config = Config::load(&args.dev_dir.join("tillkeyd.toml"), &Overrides::default())
        .map_err(|e| e.to_string())?;
    let tls = crate::tls::server_config(&config.tls)?;
    let limit = config.max_body_bytes;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name(crate::daemon::WORKER_THREAD)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        out!("{port}");
        let (stop, stopped) = watch::channel(false);
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = stop.send(true);
        });
        let handler = move |_caller, req: hyper::Request<hyper::body::Incoming>| async move {
            // Read the body as the daemon does, so the floor carries the same bytes.
            let status = match Limited::new(req.into_body(), limit).collect().await {
                Ok(_) => StatusCode::OK,
                Err(_) => StatusCode::PAYLOAD_TOO_LARGE,
            };
            let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok::<_, std::convert::Infallible>(resp)
        };
        crate::api::serve_mtls(
            listener,
            move || tls.clone(),
            handler,
            stopped,
            Duration::ZERO,
        )
        .await;
        Ok(())
    })
}

/// A running floor server; killed when dropped.
pub struct FloorServer {
    child: Child,
    pub port: u16,
}

impl FloorServer {
    pub fn start(dev_dir: &Path) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("bench-floor")
            .arg("--dev-dir")
            .arg(dev_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the transport floor server: {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        match line.trim().parse() {
            Ok(port) => Ok(Self { child, port }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err("the transport floor server did not start".into())
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
