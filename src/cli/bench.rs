//! `tillkey bench`: raw token speed and tillkeyd's speed over mutual TLS, measured in one run on
//! one token, so the ratio between them means something on a noisy shared machine.
//!
//! Expects a running daemon from `softhsm-ci/dev-env` / `quickstart` (`softhsm-ci/bench` does the
//! whole thing with release builds). Keys it makes live under `stores/bench/<run>/`.

mod scale;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;

use crate::backend::pkcs11::rawbench;
use crate::client::Client;
use crate::config::{BackendConfig, Config, Overrides};
use crate::keys::KeyType;

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
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hmac-sha256,ecdsa-p256,ed25519"
    )]
    types: Vec<String>,
    /// Bytes per signed message.
    #[arg(long, default_value_t = 64)]
    message_size: usize,
    /// tillkeyd's pid, for its CPU time per operation (default: DIR/tillkeyd.pid).
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Instead of the per-type phases, the scale phase over this many derived keys (see
    /// `bench/scale.rs`).
    #[arg(long)]
    scale_hot: Option<usize>,
}

#[derive(Serialize)]
struct Row {
    key_type: &'static str,
    raw_ops_per_s: f64,
    raw_cpu_us_per_op: Option<f64>,
    daemon_ops_per_s: f64,
    ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    daemon_cpu_us_per_op: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let dir = &args.dev_dir;
    let config = Config::load(&dir.join("tillkeyd.toml"), &Overrides::default())
        .map_err(|e| e.to_string())?;
    let BackendConfig::Pkcs11(settings) = &config.backend;
    let url = format!("https://localhost:{}", config.listen.port());
    let officer = Client::new(
        &url,
        &dir.join("ca.crt"),
        Some((&dir.join("officer.crt"), &dir.join("officer.key"))),
    )
    .map_err(|e| e.to_string())?;
    let service = Client::new(
        &url,
        &dir.join("ca.crt"),
        Some((&dir.join("service.crt"), &dir.join("service.key"))),
    )
    .map_err(|e| e.to_string())?;
    let pid = args.daemon_pid.or_else(|| {
        std::fs::read_to_string(dir.join("tillkeyd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let message = vec![0x5a_u8; args.message_size];
    let (warmup, measured) = (
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
    );
    let run_id = format!("{:x}", crate::service::unix_now());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    if let Some(hot) = args.scale_hot {
        let setup = scale::Setup {
            args: &args,
            config: &config,
            settings,
            officer: &officer,
            service: &service,
            pid,
            run_id: &run_id,
            rt: &rt,
        };
        return scale::run(&setup, hot);
    }

    let mut rows = Vec::new();
    for t in &args.types {
        let key_type = KeyType::parse(t)
            .filter(|k| k.signs())
            .ok_or_else(|| format!("cannot bench '{t}'"))?;
        eprintln!("bench: {t}: raw token, {} threads ...", args.raw_threads);
        let cpu0 = cpu_seconds("self");
        let raw = rawbench::measure(
            settings,
            key_type,
            args.raw_threads,
            warmup,
            measured,
            &message,
        )?;
        let raw_cpu = cpu0
            .zip(cpu_seconds("self"))
            .map(|(a, b)| (b - a) * 1e6 / raw.ops.max(1) as f64);

        eprintln!("bench: {t}: tillkeyd, {} clients ...", args.clients);
        let name = format!("stores/bench/{run_id}/{t}");
        let load = rt.block_on(daemon_load(
            &officer,
            &service,
            &name,
            key_type,
            args.clients,
            warmup,
            measured,
            &message,
            pid,
        ))?;
        rows.push(Row {
            key_type: key_type.as_str(),
            raw_ops_per_s: raw.per_second(),
            raw_cpu_us_per_op: raw_cpu,
            daemon_ops_per_s: load.ops_per_s,
            ratio: load.ops_per_s / raw.per_second(),
            p50_ms: load.p50_ms,
            p99_ms: load.p99_ms,
            errors: load.errors,
            daemon_cpu_us_per_op: load.daemon_cpu_us_per_op,
        });
    }
    print_table(&rows, &args);
    if let Some(path) = &args.json {
        let doc = json!({
            "clients": args.clients, "raw_threads": args.raw_threads, "seconds": args.seconds,
            "message_size": args.message_size, "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

struct Load {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    daemon_cpu_us_per_op: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
async fn daemon_load(
    officer: &Client,
    service: &Client,
    name: &str,
    key_type: KeyType,
    clients: usize,
    warmup: Duration,
    measured: Duration,
    message: &[u8],
    pid: Option<u32>,
) -> Result<Load, String> {
    let mut c = officer.connect().await.map_err(|e| e.to_string())?;
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
    let body = Arc::new(
        json!({"message": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, message)}),
    );
    let path = Arc::new(format!("/v1/keys/{name}:sign"));
    let start = Instant::now() + warmup;
    let end = start + measured;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (service, body, path) = (service.clone(), body.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let Ok(mut conn) = service.connect().await else {
                return (lat, 1);
            };
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = matches!(conn.call(hyper::Method::POST, &path, Some(&body)).await, Ok((s, _)) if s.is_success());
                if t0 >= start {
                    if ok {
                        lat.push(t0.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu0 = pid.and_then(|p| cpu_seconds(&p.to_string()));
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = pid.and_then(|p| cpu_seconds(&p.to_string()));
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let ops = all.len() as f64;
    Ok(Load {
        ops_per_s: ops / measured.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
        daemon_cpu_us_per_op: cpu0.zip(cpu1).map(|(a, b)| (b - a) * 1e6 / ops.max(1.0)),
    })
}

/// User + system CPU seconds of a process (`self` or a pid), from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); index 11 and 12 after the command name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn print_table(rows: &[Row], args: &BenchArgs) {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{} clients over mTLS vs {} raw token threads; {} s measured after {} s warm-up; {}-byte messages",
        args.clients, args.raw_threads, args.seconds, args.warmup, args.message_size
    );
    println!(
        "| key type | raw ops/s | daemon ops/s | ratio | p50 ms | p99 ms | errors | raw CPU us/op | daemon CPU us/op |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            r.key_type,
            r.raw_ops_per_s,
            r.daemon_ops_per_s,
            r.ratio,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            opt(r.raw_cpu_us_per_op),
            opt(r.daemon_cpu_us_per_op)
        );
    }
}
