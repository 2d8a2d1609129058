//! `tillkey bench`, issue 7's measuring tool, run end to end against the real daemon on a real
//! SoftHSM token. What it reports is checked for shape and consistency, never for speed.

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn bench(env: &Env, daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(TILLKEY)
        .arg("bench")
        .arg("--dev-dir")
        .arg(env.dir.path())
        .args(["--port", &daemon.api.port().to_string()])
        .args(["--admin-port", &daemon.admin.port().to_string()])
        .args(["--daemon-pid", &daemon.pid().to_string()])
        .args(args)
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .output()
        .expect("run tillkey bench")
}

#[test]
fn bench_measures_raw_token_and_daemon_side_by_side_and_writes_json() {
    let env = Env::new();
    let daemon = env.start();
    let json = env.path("bench.json");
    let out = bench(
        &env,
        &daemon,
        &[
            "--phases",
            "tls-floor,null,hmac-sign,hmac-batch,otp-issue",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--clients",
            "4",
            "--batch-size",
            "8",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The floor server has no audit trail, so no row in the table of audit commits.
    for (phase, tables) in [
        ("tls-floor", 2),
        ("null", 3),
        ("hmac-sign", 3),
        ("hmac-batch", 3),
        ("otp-issue", 3),
    ] {
        let lines = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("| {phase} |")))
            .count();
        assert_eq!(lines, tables, "{phase}: one row in each table\n{stdout}");
    }

    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    let row = |phase: &str| {
        rows.iter()
            .find(|r| r["phase"] == phase)
            .unwrap_or_else(|| panic!("no {phase} row in {doc}"))
    };
    let num = |r: &Value, k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    for r in rows {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(num(r, "daemon_ops_per_s") > 0.0, "{r}");
        assert!(num(r, "p99_ms") >= num(r, "p50_ms"), "{r}");
    }
    for phase in ["hmac-sign", "hmac-batch"] {
        let r = row(phase);
        let (raw, daemon) = (num(r, "raw_ops_per_s"), num(r, "daemon_ops_per_s"));
        assert!(raw > 0.0, "{r}");
        assert!((num(r, "ratio") - daemon / raw).abs() < 1e-9, "{r}");
        // tls-floor ran in the same run, so every token phase has its ceiling.
        let ceiling = num(r, "ceiling_ratio");
        assert!(ceiling > 0.0 && ceiling < 1.0, "{r}");
        // So did null: the audited ceiling is the same model with null's rate as the
        // per-request time (compared exactly, not against the floor's: two noisy rates).
        let null = row("null");
        let audited = num(r, "audited_ceiling_ratio");
        let per_request = 1.0 / (num(null, "daemon_ops_per_s") * num(r, "batch"));
        let expected = (1.0 / raw) / (1.0 / raw + per_request);
        assert!(audited > 0.0 && audited < 1.0, "{r}");
        assert!((audited - expected).abs() < 1e-9 * expected, "{r}");
        // SoftHSM computes in the caller's process, so the CPU bound applies. It counts the
        // raw call's CPU and the null request's, daemon and load generator, on every CPU.
        let us_per_op = num(r, "raw_cpu_us_per_op")
            + (num(null, "daemon_cpu_us_per_op") + num(null, "client_cpu_us_per_op"))
                / num(r, "batch");
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let bound = num(r, "cpu_bound_ratio");
        assert!(
            (bound - cpus * 1e6 / us_per_op / raw).abs() < 1e-9 * bound,
            "{r}"
        );
        // Little's law over the 4 clients, each request carrying `batch` messages.
        let messages = 4.0 * num(r, "batch");
        let least_mean_ms = num(r, "mean_ms_at_raw_rate");
        assert!(
            (least_mean_ms - 1e3 * messages / raw).abs() < 1e-9 * least_mean_ms,
            "{r}"
        );
    }
    assert_eq!(row("null")["mean_ms_at_raw_rate"], Value::Null);
    assert_eq!(row("hmac-batch")["batch"], 8);
    assert_eq!(row("null")["raw_ops_per_s"], Value::Null);

    // The daemon's CPU is split by thread, and the split adds up to the process's figure (up
    // to clock-tick rounding: the total and the threads are separate reads).
    let split = &row("null")["daemon_cpu_us_by_thread"];
    let part = |k: &str| {
        split[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {split}"))
    };
    assert!(
        part("workers") > 0.0,
        "TLS and HTTP ran on the workers: {split}"
    );
    assert_eq!(part("device"), 0.0, "null makes no token call: {split}");
    let sum = part("workers") + part("device") + part("audit") + part("other");
    let total = num(row("null"), "daemon_cpu_us_per_op");
    assert!(
        (sum - total).abs() <= 0.05 * total,
        "{split} against {total}"
    );

    // The audit commits, read from the daemon's metrics: one entry per request, two for a
    // request that changes lasting state (its intent, then its outcome), so over a window the
    // entries per second match the request rate times that (up to the requests in flight at
    // the window's edges).
    assert_eq!(row("tls-floor")["audit_commits"], Value::Null);
    for (phase, entries) in [("null", 1.0), ("hmac-sign", 1.0), ("otp-issue", 2.0)] {
        let r = row(phase);
        let commits = &r["audit_commits"];
        let figure = |k: &str| {
            commits[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} missing in {r}"))
        };
        assert!(figure("per_s") > 0.0, "{r}");
        assert!(figure("entries_per_commit") >= 1.0, "{r}");
        assert!(figure("write_ms") > 0.0, "{r}");
        assert!(figure("open_ms") >= 0.0, "{r}");
        let entries_per_s = figure("per_s") * figure("entries_per_commit");
        let expected = entries * num(r, "daemon_ops_per_s");
        assert!(
            (entries_per_s - expected).abs() <= 0.1 * expected + 20.0,
            "{entries_per_s} entries/s, {expected} expected: {r}"
        );
    }

    // Every request the bench made went through the audit trail, which still verifies.
    let stopped = daemon.stop();
    assert!(stopped.success(), "{stopped:?}");
    let (code, report) = env.audit_verify();
    assert_eq!(code, Some(0), "{report}");
}

#[test]
fn the_scale_phase_signs_with_derived_and_stored_keys_and_reads_the_daemons_figures() {
    let env = Env::new();
    let daemon = env.start();
    let json = env.path("scale.json");
    let out = bench(
        &env,
        &daemon,
        &[
            "--scale-hot",
            "4",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--clients",
            "4",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for side in ["daemon_stored", "daemon_derived"] {
        assert_eq!(doc[side]["errors"], 0, "{doc}");
        assert!(doc[side]["ops_per_s"].as_f64().unwrap() > 0.0, "{doc}");
    }
    // Read from the daemon's admin listener on the port given with --admin-port (the test
    // daemon's, not its config file's): the master, the stored key and the four derived keys
    // are registered, and the four derived keys are held in the token.
    let keys = doc["registered_keys"]
        .as_f64()
        .expect("registered keys read");
    assert_eq!(Some(keys), daemon.metric("tillkey_keys"), "{doc}");
    assert!(keys >= 6.0, "{doc}");
    assert_eq!(doc["derived_keys_held"], 4.0, "{doc}");
    assert!(doc["rss_kib"].as_u64().unwrap() > 0, "{doc}");
    assert!(doc["registry_bytes"].as_u64().unwrap() > 0, "{doc}");
}

#[test]
fn bench_refuses_an_unknown_phase_and_a_bad_batch_size() {
    let env = Env::new();
    let daemon = env.start();
    for (args, says) in [
        (
            &["--phases", "null,warp-speed"][..],
            "unknown phase 'warp-speed'",
        ),
        (
            &["--phases", "hmac-batch", "--batch-size", "0"][..],
            "--batch-size must be",
        ),
    ] {
        let out = bench(&env, &daemon, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
