//! Test harness: a fresh SoftHSM token (or a fresh swtpm) and development PKI per test (made by
//! the same `softhsm-ci/dev-env` the quick start uses), the real `tillkeyd` binary on ephemeral
//! ports, and the real mTLS client.
//!
//! Tests that hold for every backend are written once with [`on_each_backend!`], which runs the
//! body against SoftHSM and against swtpm.
#![allow(dead_code)]

pub mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::Value;
use tillkey::client::{Client, Connection};

pub const TILLKEYD: &str = env!("CARGO_BIN_EXE_tillkeyd");
pub const TILLKEY: &str = env!("CARGO_BIN_EXE_tillkey");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SoftHSM token through PKCS#11.
    Pkcs11,
    /// A swtpm on free loopback ports through tss-esapi.
    Tpm,
}

impl Backend {
    /// The key types that sign (or MAC) on this backend.
    pub fn signing_types(self) -> &'static [&'static str] {
        match self {
            Self::Pkcs11 => &["hmac-sha256", "ecdsa-p256", "ed25519"],
            Self::Tpm => &["hmac-sha256", "ecdsa-p256"],
        }
    }
}

/// Run one test body against every backend: each becomes its own test (`NAME::pkcs11`,
/// `NAME::tpm`), so a failure names the backend.
#[macro_export]
macro_rules! on_each_backend {
    ($(#[$meta:meta])* async fn $name:ident($b:ident: Backend) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$meta])*
            async fn body($b: Backend) $body
            #[tokio::test]
            async fn pkcs11() {
                body(Backend::Pkcs11).await
            }
            #[tokio::test]
            async fn tpm() {
                body(Backend::Tpm).await
            }
        }
    };
}

/// A development environment in a temporary directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Extra environment for the daemon (e.g. the p11-kit proxy address).
    pub daemon_env: Vec<(String, String)>,
    pub backend: Backend,
}

impl Env {
    pub fn new() -> Self {
        Self::with_env(&[])
    }

    /// An environment on `backend`; for the TPM a swtpm is started (and stopped on drop).
    pub fn on(backend: Backend) -> Self {
        Self::make(backend, &[])
    }

    /// `vars` are passed to `dev-env` (e.g. `PKCS11_MODULE`).
    pub fn with_env(vars: &[(&str, &str)]) -> Self {
        Self::make(Backend::Pkcs11, vars)
    }

    fn make(backend: Backend, vars: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(repo().join("softhsm-ci/dev-env"));
        if backend == Backend::Tpm {
            cmd.arg("--tpm");
        }
        let out = cmd
            .arg(dir.path())
            .env("TILLKEY_BIN", TILLKEY)
            .envs(vars.iter().copied())
            .output()
            .expect("run dev-env");
        assert!(
            out.status.success(),
            "dev-env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir,
            daemon_env: Vec::new(),
            backend,
        }
    }

    /// Kill the environment's swtpm (SIGKILL: gone at once, as in a crash or power loss) and
    /// wait until its port is closed.
    pub fn swtpm_kill(&self) {
        let pid = std::fs::read_to_string(self.path("swtpm.pid")).expect("swtpm.pid");
        let pid = pid.trim().to_owned();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        // An exited swtpm can stay a zombie until init reaps it (~1.6 s seen here); its sockets
        // and state lock are released by then, so it counts as dead.
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.split(' ').nth(2) != Some("Z"))
        };
        while running() {
            assert!(Instant::now() < deadline, "swtpm {pid} did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.path("swtpm.pid"));
    }

    /// Start the environment's swtpm again, on the same ports and state.
    pub fn swtpm_start(&self) {
        let ok = Command::new(self.path("swtpm-start"))
            .status()
            .expect("swtpm-start");
        let log = std::fs::read_to_string(self.path("swtpm.log")).unwrap_or_default();
        assert!(ok.success(), "swtpm did not start again; its log:\n{log}");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Put `lines` at the top of the dev config's `[section]`.
    pub fn configure(&self, section: &str, lines: &str) {
        let path = self.path("tillkeyd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let header = format!("[{section}]\n");
        assert!(text.contains(&header), "no {header} in the dev config");
        write(
            &path,
            text.replacen(&header, &format!("{header}{lines}\n"), 1),
        );
    }

    pub fn softhsm_conf(&self) -> PathBuf {
        self.path("softhsm2.conf")
    }

    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.path("pin"))
            .expect("pin")
            .trim()
            .to_owned()
    }

    /// `tillkey audit verify` on this environment's store and token: exit code, stdout+stderr.
    pub fn audit_verify(&self) -> (Option<i32>, String) {
        let out = Command::new(TILLKEY)
            .args(["audit", "verify", "--config"])
            .arg(self.path("tillkeyd.toml"))
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .output()
            .expect("run tillkey audit verify");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(TILLKEYD);
        cmd.arg("--config")
            .arg(self.path("tillkeyd.toml"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Start the daemon and wait (bounded) until it logs that it listens.
    pub fn start(&self) -> Daemon {
        let mut child = self.command().spawn().expect("spawn tillkeyd");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("\"listening\"") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "tillkeyd did not start; log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let v: Value = serde_json::from_str(&line).expect("listening line is JSON");
        let addr = |k: &str| -> SocketAddr { v[k].as_str().expect(k).parse().expect(k) };
        Daemon {
            api: addr("api_addr"),
            admin: addr("admin_addr"),
            child,
            logs,
            dir: self.dir.path().to_owned(),
        }
    }

    /// Run the daemon expecting it to refuse to start; returns its exit status and stderr.
    pub fn run_to_exit(&self) -> (ExitStatus, String) {
        let mut child = self.command().spawn().expect("spawn tillkeyd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tillkeyd kept running although it should have refused to start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Daemon {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Daemon {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.api.port())
    }

    /// Client with the dev certificate `who` (officer, service, stranger, foreign, ...).
    pub fn client(&self, who: &str) -> Client {
        let cert = self.dir.join(format!("{who}.crt"));
        let key = self.dir.join(format!("{who}.key"));
        Client::new(&self.url(), &self.dir.join("ca.crt"), Some((&cert, &key))).expect("client")
    }

    pub async fn conn(&self, who: &str) -> Connection {
        self.client(who).connect().await.expect("connect")
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Stop with SIGTERM and return the exit status.
    pub fn stop(mut self) -> ExitStatus {
        // It may already be on its way out (a TERM sent earlier): then just collect it.
        if self.child.try_wait().expect("wait").is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "tillkeyd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One series of `/metrics` (its name and labels exactly as exposed), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (status, text) = self.admin_get("/metrics");
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().expect("a number"))
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).expect("admin connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp[9..12].parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Poll until `cond` holds (bounded); panics with `what` otherwise.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.path("swtpm.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failing test shows what the daemon said, errors first.
        if std::thread::panicking() {
            let logs = self.logs();
            for line in logs
                .iter()
                .filter(|l| l.contains("\"ERROR\"") || l.contains("\"WARN\""))
            {
                eprintln!("tillkeyd: {line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

/// One JSON call; returns (status, body).
pub async fn call(
    conn: &mut Connection,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, v) = conn.call(method, path, body.as_ref()).await.expect("call");
    (status.as_u16(), v)
}

/// POST raw bytes; the answer must still be JSON.
pub async fn raw(conn: &mut Connection, path: &str, body: &[u8]) -> (u16, Value) {
    let (s, b) = conn
        .call_raw(Method::POST, path, body.to_vec())
        .await
        .expect("call");
    (
        s.as_u16(),
        serde_json::from_slice(&b).expect("answers are JSON"),
    )
}

pub async fn post(conn: &mut Connection, path: &str, body: Value) -> (u16, Value) {
    call(conn, Method::POST, path, Some(body)).await
}

/// Ask, as one officer, for the destruction of `version` of `name`: 202, pending a second
/// officer's approval. Answers the approval's id.
pub async fn request_destroy(officer: &mut Connection, name: &str, version: u32) -> String {
    let (s, req) = post(
        officer,
        &format!("/v1/keys/{name}:destroy"),
        serde_json::json!({ "version": version }),
    )
    .await;
    assert_eq!(s, 202, "{req}");
    req["approval"]["id"]
        .as_str()
        .expect("approval id")
        .to_owned()
}

pub async fn get(conn: &mut Connection, path: &str) -> (u16, Value) {
    call(conn, Method::GET, path, None).await
}

/// Create a key as the officer; panics unless 201.
pub async fn create(d: &Daemon, name: &str, key_type: &str) -> Value {
    let mut c = d.conn("officer").await;
    let (s, v) = post(
        &mut c,
        "/v1/keys",
        serde_json::json!({"name": name, "type": key_type}),
    )
    .await;
    assert_eq!(s, 201, "create {name}: {v}");
    v
}

/// Assert an error answer with this status and stable code.
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "expected {status} {code}, got {}", got.1);
    assert_eq!(got.1["error"]["code"], code, "body: {}", got.1);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without message: {}",
        got.1
    );
}

/// Run OpenSC's `pkcs11-tool` as the token's user against the environment's SoftHSM token:
/// (succeeded, stdout + stderr).
pub fn pkcs11_tool(env: &Env, args: &[&str]) -> (bool, String) {
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            "tillkey-dev",
            "--login",
            "--pin",
        ])
        .arg(env.pin())
        .args(args)
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .output()
        .expect("pkcs11-tool (package opensc)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::write(path, data).expect("write");
}

/// Import known key material under `name` (officer requests, officer2 approves), so a test can
/// compute what the token computes. Panics unless both steps succeed.
pub async fn import_known(d: &Daemon, name: &str, key_type: &str, material: &[u8]) {
    let mut alice = d.conn("officer").await;
    let (_, wk) = get(&mut alice, "/v1/wrapping-key").await;
    let (kek, wrapped) =
        tillkey::exchange::wrap_for_import(wk["public_key_pem"].as_str().expect("pem"), material)
            .expect("wrap");
    let body = serde_json::json!({"name": name, "type": key_type, "encrypted_kek": b64(&kek), "wrapped_key": b64(&wrapped)});
    let (s, req) = post(&mut alice, "/v1/keys:import", body).await;
    assert_eq!(s, 202, "{req}");
    let id = req["approval"]["id"]
        .as_str()
        .expect("approval id")
        .to_owned();
    let mut bob = d.conn("officer2").await;
    let (s, done) = post(
        &mut bob,
        &format!("/v1/approvals/{id}:approve"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(s, 200, "{done}");
}
