//! `tillkey bench`: raw token speed and tillkeyd's speed over mutual TLS, measured in one run on
//! one token, so the ratio between them means something on a noisy shared machine.
//!
//! Expects a running daemon from `softhsm-ci/dev-env` / `quickstart` (`softhsm-ci/bench` does the
//! whole thing with release builds). Keys it makes live under `stores/bench/<run>/`.
//!
//! Each phase is one function returning one [`Row`]: it measures the raw token doing the same
//! device operation (`raw_threads` threads, one session each), then the daemon under `clients`
//! concurrent keep-alive connections. New phases add a function and a name in [`PHASES`].

mod ceilings;
mod floor;
mod load;
mod raw;
mod scale;
mod scrape;
mod table;
mod threads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backend::Settings;
use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::keys::KeyType;

pub use self::floor::{serve as serve_floor, FloorArgs};
use self::load::{drive, Load, Sample, Server, Target};
use self::raw::timing::RawRate;
use self::raw::RawOp;

/// Every phase, in the order they run by default. `tls-floor` and `null` measure no token
/// operation: the first is the mutual-TLS front alone (see `floor`), the second the daemon's
/// whole request path without a token call (an authenticated, audited `GET` of a key).
/// `otp-issue` is the one request among them that changes lasting state.
pub const PHASES: &[&str] = &[
    "tls-floor",
    "null",
    "hmac-sign",
    "hmac-verify",
    "ecdsa-sign",
    "ed25519-sign",
    "hmac-batch",
    "otp-issue",
];

#[derive(Args)]
pub struct BenchArgs {
    /// Environment made by softhsm-ci/dev-env: config, certificates, tillkeyd.pid.
    #[arg(long)]
    dev_dir: PathBuf,
    /// Concurrent keep-alive mTLS clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Threads (one session each) for the raw token measurement.
    #[arg(long, default_value_t = 2)]
    raw_threads: usize,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Unmeasured warm-up seconds per phase.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Phases to run (comma-separated): tls-floor, null, hmac-sign, hmac-verify, ecdsa-sign,
    /// ed25519-sign, hmac-batch, otp-issue.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tls-floor,null,hmac-sign,hmac-verify,ecdsa-sign,ed25519-sign,hmac-batch,otp-issue"
    )]
    phases: Vec<String>,
    /// Alternating raw/daemon windows per phase (their lengths add up to `seconds` each).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Bytes per signed message.
    #[arg(long, default_value_t = 64)]
    message_size: usize,
    /// Messages per request in the batch phases.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// tillkeyd's pid, for its CPU time per operation (default: DIR/tillkeyd.pid).
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// tillkeyd's API port, if it was started with another `--listen` than its config's.
    #[arg(long)]
    port: Option<u16>,
    /// tillkeyd's admin port (for its audit figures), if it was started with another
    /// `--admin-listen` than its config's.
    #[arg(long)]
    admin_port: Option<u16>,
    /// Measure only the daemon (no raw token windows), e.g. when several load generators drive
    /// several instances at once and a raw window of one would overlap another's daemon window.
    #[arg(long)]
    daemon_only: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Instead of the per-type phases, the scale phase over this many derived keys (see
    /// `bench/scale.rs`).
    #[arg(long)]
    scale_hot: Option<usize>,
}

#[derive(Serialize)]
pub struct Row {
    phase: String,
    /// None for the phases without a token operation.
    key_type: Option<&'static str>,
    /// Messages per request (1 for single calls).
    batch: usize,
    raw_ops_per_s: Option<f64>,
    raw_cpu_us_per_op: Option<f64>,
    /// The daemon's rate (the floor server's in `tls-floor`).
    daemon_ops_per_s: f64,
    ratio: Option<f64>,
    /// The ratio issue 7 asks for.
    target_ratio: Option<f64>,
    /// The most this phase's ratio can be on this machine through this TLS front (see
    /// `bench/ceilings.rs`). Set when `tls-floor` ran in the same run.
    ceiling_ratio: Option<f64>,
    /// The same with the audited `null` request in place of the bare front: the most a daemon
    /// can reach whose request costs the raw call plus what every request must do anyway.
    /// Set when `null` ran in the same run.
    audited_ceiling_ratio: Option<f64>,
    /// The most every CPU of the machine allows, if each request cost the raw call's CPU plus
    /// the audited `null` request's (daemon and load generator). Set for a token that computes
    /// in its caller's process, as SoftHSM does, when `null` ran in the same run.
    cpu_bound_ratio: Option<f64>,
    /// The mean latency the clients would see if the daemon matched the raw rate exactly
    /// (Little's law: clients x messages per request / raw rate); no daemon's mean is lower.
    /// Above 5 ms, a p99 of 5 ms would need the slowest hundredth of requests to carry the
    /// whole excess (at a 5.4 ms mean, ~45 ms each), which a fair queue does not do.
    mean_ms_at_raw_rate: Option<f64>,
    /// Per request (a whole batch in the batch phases).
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    daemon_cpu_us_per_op: Option<f64>,
    /// The same, by kind of daemon thread (see `bench/threads.rs`).
    daemon_cpu_us_by_thread: Option<threads::ByThread>,
    /// The daemon's audit group commits in its windows (see `bench/scrape.rs`).
    audit_commits: Option<scrape::Commits>,
    /// The load generator's own CPU per operation (it shares the machine).
    client_cpu_us_per_op: Option<f64>,
}

/// What every phase needs.
struct Bench<'a> {
    args: &'a BenchArgs,
    backend: &'a Settings,
    officer: Client,
    service: Client,
    pid: Option<u32>,
    /// The daemon's admin listener, for its audit figures.
    admin: SocketAddr,
    message: Vec<u8>,
    warmup: Duration,
    measured: Duration,
    run_id: String,
    rt: tokio::runtime::Runtime,
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let dir = &args.dev_dir;
    let config = Config::load(&dir.join("tillkeyd.toml"), &Overrides::default())
        .map_err(|e| e.to_string())?;
    let settings = Settings::from_config(&config).map_err(|e| e.to_string())?;
    let tpm = matches!(settings, Settings::Tpm(_));
    let url = format!(
        "https://localhost:{}",
        args.port.unwrap_or(config.listen.port())
    );
    let client = |who: &str| {
        Client::new(
            &url,
            &dir.join("ca.crt"),
            Some((
                &dir.join(format!("{who}.crt")),
                &dir.join(format!("{who}.key")),
            )),
        )
        .map_err(|e| e.to_string())
    };
    let bench = Bench {
        args: &args,
        backend: &settings,
        officer: client("officer")?,
        service: client("service")?,
        pid: args.daemon_pid.or_else(|| {
            std::fs::read_to_string(dir.join("tillkeyd.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }),
        admin: SocketAddr::new(
            config.admin_listen.ip(),
            args.admin_port.unwrap_or(config.admin_listen.port()),
        ),
        message: vec![0x5a_u8; args.message_size],
        warmup: Duration::from_secs(args.warmup),
        measured: Duration::from_secs(args.seconds),
        // With the pid: load generators started in the same second against instances sharing
        // one database would otherwise make the same key names.
        run_id: format!("{:x}{:x}", crate::service::unix_now(), std::process::id()),
        rt: tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?,
    };
    // Refused before anything runs, not after the phases before it have taken their time.
    if let Some(other) = args.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
        return Err(format!(
            "unknown phase '{other}'; phases: {}",
            PHASES.join(", ")
        ));
    }
    if args.batch_size == 0 || args.batch_size > crate::service::batch::MAX_BATCH {
        return Err(format!(
            "--batch-size must be 1..={}",
            crate::service::batch::MAX_BATCH
        ));
    }

    if let Some(hot) = args.scale_hot {
        let Settings::Pkcs11(settings) = &settings else {
            return Err(
                "--scale-hot measures derived keys, which only the pkcs11 backend makes".into(),
            );
        };
        let setup = scale::Setup {
            args: &args,
            config: &config,
            settings,
            officer: &bench.officer,
            service: &bench.service,
            pid: bench.pid,
            admin: bench.admin,
            run_id: &bench.run_id,
            rt: &bench.rt,
        };
        return scale::run(&setup, hot);
    }

    let mut rows = Vec::new();
    // Issue 7's targets; on a TPM every phase aims at 0.8 of the raw rate.
    let target = |pkcs11: f64| if tpm { 0.8 } else { pkcs11 };
    for phase in &args.phases {
        if tpm && phase == "ed25519-sign" {
            eprintln!("bench: {phase}: skipped (a TPM cannot hold Ed25519 keys)");
            continue;
        }
        let row = match phase.as_str() {
            "tls-floor" => bench.floor()?,
            "null" => bench.null()?,
            "hmac-sign" => bench.sign(KeyType::HmacSha256, target(0.5))?,
            "hmac-verify" => bench.hmac_verify(target(0.5))?,
            "ecdsa-sign" => bench.sign(KeyType::EcdsaP256, target(0.75))?,
            "ed25519-sign" => bench.sign(KeyType::Ed25519, 0.85)?,
            "hmac-batch" => bench.hmac_batch(target(0.9))?,
            "otp-issue" => bench.otp_issue()?,
            other => return Err(format!("phase '{other}' has no measurement")),
        };
        rows.push(row);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ceilings::add_ceilings(&mut rows, args.clients, cpus, !tpm);
    table::print(&rows, &args);
    if let Some(path) = &args.json {
        let doc = json!({
            "clients": args.clients, "raw_threads": args.raw_threads, "seconds": args.seconds,
            "warmup": args.warmup, "message_size": args.message_size,
            "batch_size": args.batch_size, "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

impl Bench<'_> {
    /// The raw device and the daemon doing the same operation, in `rounds` alternating windows
    /// (raw, daemon, raw, daemon, ...) that add up to the measured time each, so a change in
    /// the machine's speed during the phase (these are shared machines) weighs on both sides.
    fn compare(
        &self,
        phase: String,
        key_type: KeyType,
        op: RawOp,
        request: Target,
        target_ratio: f64,
    ) -> Result<Row, String> {
        let rounds = self.args.rounds.max(1);
        let slice = self.measured / rounds;
        let mut raw = RawRate {
            ops: 0,
            elapsed: Duration::ZERO,
            cpu_seconds: Some(0.0),
        };
        let mut samples = Vec::new();
        for _ in 0..rounds {
            if !self.args.daemon_only {
                let r = self.raw(&phase, key_type, op, slice)?;
                raw.ops += r.ops;
                raw.elapsed += r.elapsed;
                raw.cpu_seconds = raw.cpu_seconds.zip(r.cpu_seconds).map(|(a, b)| a + b);
            }
            samples.push(self.drive(&phase, self.daemon(), request.clone(), slice)?);
        }
        let load = Load::from_samples(samples);
        let batch = request.per_call;
        Ok(row(
            phase,
            Some(key_type),
            batch,
            (!self.args.daemon_only).then_some(&raw),
            &load,
            Some(target_ratio),
        ))
    }

    fn raw(
        &self,
        phase: &str,
        key_type: KeyType,
        op: RawOp,
        measured: Duration,
    ) -> Result<RawRate, String> {
        eprintln!(
            "bench: {phase}: raw token, {} threads ...",
            self.args.raw_threads
        );
        raw::measure(
            self.backend,
            key_type,
            op,
            self.args.raw_threads,
            self.warmup,
            measured,
            &self.message,
        )
    }

    /// The mutual-TLS front alone, answering a fixed body (see `floor`).
    fn floor(&self) -> Result<Row, String> {
        let phase = "tls-floor";
        let server = floor::FloorServer::start(&self.args.dev_dir)?;
        let client = Client::new(
            &format!("https://localhost:{}", server.port),
            &self.args.dev_dir.join("ca.crt"),
            Some((
                &self.args.dev_dir.join("service.crt"),
                &self.args.dev_dir.join("service.key"),
            )),
        )
        .map_err(|e| e.to_string())?;
        let body = json!({ "message": b64(&self.message) });
        let target = self.target(client, "POST", "/v1/keys/floor:sign", &body, 1);
        let floor_server = Server {
            pid: Some(server.pid()),
            admin: None,
        };
        let load = Load::from_samples(vec![self.drive(
            phase,
            floor_server,
            target,
            self.measured,
        )?]);
        Ok(row(phase.into(), None, 1, None, &load, None))
    }

    /// The daemon's whole request path without a token call: an authenticated, policy-checked,
    /// audited and logged `GET` of a key's metadata.
    fn null(&self) -> Result<Row, String> {
        let phase = "null";
        let name = self.make_key(phase, KeyType::HmacSha256)?;
        let target = self.target(
            self.service.clone(),
            "GET",
            &format!("/v1/keys/{name}"),
            &serde_json::Value::Null,
            1,
        );
        let target = Target {
            body: Bytes::new(),
            ..target
        };
        let load = Load::from_samples(vec![self.drive(
            phase,
            self.daemon(),
            target,
            self.measured,
        )?]);
        Ok(row(phase.into(), None, 1, None, &load, None))
    }

    /// `:sign` with one message per request.
    fn sign(&self, key_type: KeyType, target: f64) -> Result<Row, String> {
        let phase = format!("{}-sign", short(key_type));
        let name = self.make_key(&phase, key_type)?;
        let body = json!({ "message": b64(&self.message) });
        let path = format!("/v1/keys/{name}:sign");
        let request = self.target(self.service.clone(), "POST", &path, &body, 1);
        self.compare(phase, key_type, RawOp::Sign, request, target)
    }

    /// `:verify` of a correct HMAC tag, one per request.
    fn hmac_verify(&self, target: f64) -> Result<Row, String> {
        let (phase, key_type) = ("hmac-verify".to_string(), KeyType::HmacSha256);
        let name = self.make_key(&phase, key_type)?;
        let body = json!({ "message": b64(&self.message) });
        let signed = self.call_once(&format!("/v1/keys/{name}:sign"), &body)?;
        let signature = signed["signature"]
            .as_str()
            .ok_or_else(|| format!("no signature in {signed}"))?;
        let body = json!({ "message": b64(&self.message), "signature": signature });
        let path = format!("/v1/keys/{name}:verify");
        let request = self.target(self.service.clone(), "POST", &path, &body, 1);
        self.compare(phase, key_type, RawOp::Verify, request, target)
    }

    /// `:sign` with `batch_size` messages per request.
    fn hmac_batch(&self, target: f64) -> Result<Row, String> {
        let (phase, key_type) = ("hmac-batch".to_string(), KeyType::HmacSha256);
        let name = self.make_key(&phase, key_type)?;
        let item = json!({ "message": b64(&self.message) });
        let body = json!({ "batch": vec![item; self.args.batch_size] });
        let n = self.args.batch_size;
        let path = format!("/v1/keys/{name}:sign");
        let request = Target {
            check: batch_ok,
            ..self.target(self.service.clone(), "POST", &path, &body, n)
        };
        self.compare(phase, key_type, RawOp::Sign, request, target)
    }

    /// `customer-otp:issue`: a request that changes lasting state (it stores a token), so its
    /// audit trail takes an intent entry before the handler runs as well as the outcome's,
    /// where a sign takes one. Its token call is one HMAC, as in `hmac-sign`; no raw side, as
    /// in `null`, since what it measures is the request path around that call.
    fn otp_issue(&self) -> Result<Row, String> {
        let phase = "otp-issue";
        let key = self.make_key(phase, KeyType::HmacSha256)?;
        // One subject for every request is enough: each issue stores a row of its own, indexed
        // by the MAC of a fresh random secret.
        let body = json!({ "key": key, "subject": format!("bench-{}", self.run_id) });
        let path = "/v1/tokens/customer-otp:issue";
        let target = self.target(self.service.clone(), "POST", path, &body, 1);
        let sample = self.drive(phase, self.daemon(), target, self.measured)?;
        let load = Load::from_samples(vec![sample]);
        let key_type = Some(KeyType::HmacSha256);
        Ok(row(phase.into(), key_type, 1, None, &load, None))
    }

    fn target(
        &self,
        client: Client,
        method: &'static str,
        path: &str,
        body: &serde_json::Value,
        per_call: usize,
    ) -> Target {
        Target {
            client,
            method,
            paths: vec![path.to_owned()],
            body: Bytes::from(body.to_string()),
            per_call,
            check: |_| true,
        }
    }

    fn daemon(&self) -> Server {
        Server {
            pid: self.pid,
            admin: Some(self.admin),
        }
    }

    fn drive(
        &self,
        phase: &str,
        server: Server,
        target: Target,
        measured: Duration,
    ) -> Result<Sample, String> {
        eprintln!("bench: {phase}: {} clients ...", self.args.clients);
        drive(
            &self.rt,
            target,
            self.args.clients,
            self.warmup,
            measured,
            server,
        )
    }

    fn make_key(&self, phase: &str, key_type: KeyType) -> Result<String, String> {
        let name = format!("stores/bench/{}/{phase}", self.run_id);
        self.rt.block_on(async {
            let mut c = self.officer.connect().await.map_err(|e| e.to_string())?;
            let (s, v) = c
                .call(
                    hyper::Method::POST,
                    "/v1/keys",
                    Some(&json!({"name": name, "type": key_type.as_str()})),
                )
                .await
                .map_err(|e| e.to_string())?;
            if s.as_u16() != 201 {
                return Err(format!("creating {name}: {v}"));
            }
            Ok(name.clone())
        })
    }

    fn call_once(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        self.rt.block_on(async {
            let mut c = self.service.connect().await.map_err(|e| e.to_string())?;
            let (s, v) = c
                .call(hyper::Method::POST, path, Some(body))
                .await
                .map_err(|e| e.to_string())?;
            if !s.is_success() {
                return Err(format!("{path}: {s} {v}"));
            }
            Ok(v)
        })
    }
}

/// A batch answer counts only when every item carries a result and none an error.
fn batch_ok(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Answer {
        batch: Vec<Item>,
    }
    #[derive(Deserialize)]
    struct Item {
        signature: Option<serde::de::IgnoredAny>,
        error: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Answer>(body).is_ok_and(|a| {
        a.batch
            .iter()
            .all(|i| i.signature.is_some() && i.error.is_none())
    })
}

fn row(
    phase: String,
    key_type: Option<KeyType>,
    batch: usize,
    raw: Option<&RawRate>,
    load: &Load,
    target_ratio: Option<f64>,
) -> Row {
    Row {
        phase,
        key_type: key_type.map(KeyType::as_str),
        batch,
        raw_ops_per_s: raw.map(RawRate::per_second),
        raw_cpu_us_per_op: raw.and_then(|r| r.cpu_seconds.map(|c| c * 1e6 / r.ops.max(1) as f64)),
        daemon_ops_per_s: load.ops_per_s,
        ratio: raw.map(|r| load.ops_per_s / r.per_second()),
        target_ratio,
        ceiling_ratio: None,
        audited_ceiling_ratio: None,
        cpu_bound_ratio: None,
        mean_ms_at_raw_rate: None,
        p50_ms: load.p50_ms,
        p99_ms: load.p99_ms,
        errors: load.errors,
        daemon_cpu_us_per_op: load.server_cpu_us_per_op,
        daemon_cpu_us_by_thread: load.server_threads_us_per_op,
        audit_commits: load.commits,
        client_cpu_us_per_op: load.client_cpu_us_per_op,
    }
}

fn short(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::HmacSha256 => "hmac",
        KeyType::EcdsaP256 => "ecdsa",
        other => other.as_str(),
    }
}

fn b64(data: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, data)
}
