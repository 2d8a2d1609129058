//! `tillkey bench --scale-hot N`: what derived keys and a large registry cost.
//!
//! Makes a master, one stored HMAC key and N keys derived from the master (through
//! `batchCreate`), then measures in one run: the raw token rate of a stored-key HMAC and of an
//! uncached derived key (derive + HMAC + destroy), and the daemon's signing rate and latency on
//! the stored key and on the N derived keys (a random one per request, so with N within the
//! cache every request is a cache hit). It also reports how many keys are registered, the
//! daemon's resident memory and the registry's size on disk, so running it before and after
//! enrolling a million terminals compares the same hot set at two registry sizes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use bytes::Bytes;

use super::load::{drive, Load, Server, Target};
use super::raw;
use super::scrape;
use super::BenchArgs;
use crate::backend::pkcs11::Pkcs11Settings;
use crate::client::Client;
use crate::config::Config;
use crate::keys::KeyType;

/// What the scale phase needs from the shared bench set-up.
pub(super) struct Setup<'a> {
    pub args: &'a BenchArgs,
    pub config: &'a Config,
    pub settings: &'a Pkcs11Settings,
    pub officer: &'a Client,
    pub service: &'a Client,
    pub pid: Option<u32>,
    /// The daemon's admin listener (`--admin-port` applied), for its key counts.
    pub admin: SocketAddr,
    pub run_id: &'a str,
    pub rt: &'a tokio::runtime::Runtime,
}

pub(super) fn run(s: &Setup<'_>, hot: usize) -> Result<(), String> {
    let args = s.args;
    let message = vec![0x5a_u8; args.message_size];
    let (warmup, measured) = (
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
    );
    let base = format!("stores/bench/{}", s.run_id);
    let master = format!("{base}/master");
    let stored = format!("{base}/stored");
    eprintln!("bench scale: creating a master, a stored key and {hot} derived keys ...");
    let made = Instant::now();
    let names =
        s.rt.block_on(make_keys(s.officer, &master, &stored, &base, hot))?;
    let make_s = made.elapsed().as_secs_f64();

    eprintln!("bench scale: raw token, {} threads ...", args.raw_threads);
    let raw_stored = raw::measure_pkcs11(
        s.settings,
        KeyType::HmacSha256,
        args.raw_threads,
        warmup,
        measured,
        &message,
    )?;
    let raw_derived =
        raw::measure_derived(s.settings, args.raw_threads, warmup, measured, &message)?;

    eprintln!("bench scale: tillkeyd, {} clients ...", args.clients);
    let body = json!({"message": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &message)});
    let target = |paths: Vec<String>| Target {
        client: s.service.clone(),
        method: "POST",
        paths,
        body: Bytes::from(body.to_string()),
        per_call: 1,
        check: |_| true,
    };
    let run = |paths| {
        let daemon = Server {
            pid: s.pid,
            admin: None,
        };
        drive(s.rt, target(paths), args.clients, warmup, measured, daemon)
            .map(|sample| Load::from_samples(vec![sample]))
    };
    let stored_load = run(vec![format!("/v1/keys/{stored}:sign")])?;
    let derived_load = run(names.iter().map(|n| format!("/v1/keys/{n}:sign")).collect())?;

    let metrics = scrape::metrics(s.admin).unwrap_or_default();
    let keys = scrape::series(&metrics, "tillkey_keys");
    let derived_held = scrape::series(&metrics, "tillkey_derived_keys{what=\"held\"}");
    let rss_kib = s.pid.and_then(rss_kib);
    let db = registry_bytes(&s.config.registry_url);
    out!(
        "scale: {} clients over mTLS vs {} raw token threads; {} s measured after {} s warm-up; {}-byte messages",
        args.clients, args.raw_threads, args.seconds, args.warmup, args.message_size
    );
    out!("| what | raw ops/s | daemon ops/s | p50 ms | p99 ms | errors |");
    out!("|---|---:|---:|---:|---:|---:|");
    out!(
        "| HMAC, 1 stored key | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
        raw_stored.per_second(),
        stored_load.ops_per_s,
        stored_load.p50_ms,
        stored_load.p99_ms,
        stored_load.errors
    );
    out!(
        "| HMAC, {hot} derived keys (daemon: cached; raw: derive+HMAC+destroy each) | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
        raw_derived.per_second(),
        derived_load.ops_per_s,
        derived_load.p50_ms,
        derived_load.p99_ms,
        derived_load.errors
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    out!(
        "registered keys: {}; derived keys held in the token: {}; daemon RSS: {} KiB; registry on disk: {} bytes; {hot} derived keys created in {make_s:.1} s",
        opt(keys),
        opt(derived_held),
        rss_kib.map_or("-".to_string(), |v| v.to_string()),
        db.map_or("-".to_string(), |v| v.to_string()),
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "clients": args.clients, "raw_threads": args.raw_threads, "seconds": args.seconds,
            "hot_keys": hot, "registered_keys": keys, "derived_keys_held": derived_held,
            "rss_kib": rss_kib, "registry_bytes": db,
            "raw_stored_hmac_per_s": raw_stored.per_second(),
            "raw_derive_hmac_destroy_per_s": raw_derived.per_second(),
            "daemon_stored": {"ops_per_s": stored_load.ops_per_s, "p50_ms": stored_load.p50_ms, "p99_ms": stored_load.p99_ms, "errors": stored_load.errors},
            "daemon_derived": {"ops_per_s": derived_load.ops_per_s, "p50_ms": derived_load.p50_ms, "p99_ms": derived_load.p99_ms, "errors": derived_load.errors},
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The master, the stored key and `hot` derived keys; returns the derived keys' names.
async fn make_keys(
    officer: &Client,
    master: &str,
    stored: &str,
    base: &str,
    hot: usize,
) -> Result<Vec<String>, String> {
    let mut c = officer.connect().await.map_err(|e| e.to_string())?;
    for (name, ty) in [(master, "aes256-derive"), (stored, "hmac-sha256")] {
        let (st, v) = c
            .call(
                hyper::Method::POST,
                "/v1/keys",
                Some(&json!({"name": name, "type": ty})),
            )
            .await
            .map_err(|e| e.to_string())?;
        if st.as_u16() != 201 {
            return Err(format!("creating {name}: {v}"));
        }
    }
    let names: Vec<String> = (0..hot).map(|i| format!("{base}/pos/{i}/mac")).collect();
    for chunk in names.chunks(250) {
        let keys: Vec<_> = chunk
            .iter()
            .map(|n| json!({"name": n, "type": "hmac-sha256", "derive_from": master}))
            .collect();
        let (st, v) = c
            .call(
                hyper::Method::POST,
                "/v1/keys:batchCreate",
                Some(&json!({ "keys": keys })),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !st.is_success() || v["failed"] != 0 {
            return Err(format!("batch create: {v}"));
        }
    }
    Ok(names)
}

/// The resident memory of process `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bytes of an SQLite registry (database plus write-ahead log).
fn registry_bytes(url: &str) -> Option<u64> {
    let path = url.strip_prefix("sqlite://")?.split('?').next()?;
    let size = |p: &str| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Some(size(path) + size(&format!("{path}-wal")))
}
