//! The tamper-evident audit trail: one entry per request with a receipt, readable by auditors,
//! verified by `tillkey audit verify`, and failing closed when the store refuses writes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

const RECEIPT: &str = "x-tillkey-receipt";

async fn post_with_receipt(
    c: &mut tillkey::client::Connection,
    path: &str,
    body: Value,
) -> (u16, Option<u64>, Value) {
    let (s, h, b) = c
        .call_with_headers(Method::POST, path, body.to_string().into_bytes())
        .await
        .unwrap();
    let receipt = h
        .get(RECEIPT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (s.as_u16(), receipt, serde_json::from_slice(&b).unwrap())
}

fn sqlite(env: &Env, sql: &str) {
    let out = Command::new("sqlite3")
        .arg(env.path("registry.db"))
        .arg(sql)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

on_each_backend! {
    async fn every_request_gets_an_entry_and_a_receipt_and_auditors_can_read_them(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut officer = d.conn("officer").await;
        let (s, r1, _) = post_with_receipt(
            &mut officer,
            "/v1/keys",
            json!({"name": "stores/1/mac", "type": "hmac-sha256"}),
        )
        .await;
        assert_eq!(s, 201);
        let mut svc = d.conn("service").await;
        let (s, r2, _) = post_with_receipt(
            &mut svc,
            "/v1/keys/stores/1/mac:sign",
            json!({"message": b64(b"SECRET-BODY")}),
        )
        .await;
        assert_eq!(s, 200);
        let mut stranger = d.conn("stranger").await;
        let (s, r3, _) = post_with_receipt(
            &mut stranger,
            "/v1/keys/stores/1/mac:sign",
            json!({"message": "aGk="}),
        )
        .await;
        assert_eq!(s, 403);
        let (s, r4, _) = post_with_receipt(
            &mut officer,
            "/v1/keys/stores/1/mac:revoke",
            json!({"reason": "till 1 stolen"}),
        )
        .await;
        assert_eq!(s, 200);
        let receipts: Vec<u64> = [r1, r2, r3, r4]
            .iter()
            .map(|r| r.expect("every answer carries a receipt"))
            .collect();
        assert!(receipts.windows(2).all(|w| w[0] < w[1]), "{receipts:?}");

        let mut auditor = d.conn("auditor").await;
        let (s, all) = get(&mut auditor, "/v1/audit?limit=1000").await;
        assert_eq!(s, 200, "{all}");
        let entries = all["entries"].as_array().unwrap();
        let by_seq = |seq: u64| {
            entries
                .iter()
                .find(|e| e["seq"] == seq)
                .unwrap_or_else(|| panic!("no entry {seq}: {all}"))
        };
        let sign = by_seq(receipts[1]);
        assert_eq!(
            (
                sign["identity"].as_str(),
                sign["operation"].as_str(),
                sign["key"].as_str()
            ),
            (
                Some("spiffe://tillkey.test/svc/payments"),
                Some("sign"),
                Some("stores/1/mac")
            )
        );
        assert_eq!(
            (sign["version"].clone(), sign["outcome"].clone()),
            (json!(1), json!("ok"))
        );
        assert_eq!(sign["mac"].as_str().unwrap().len(), 64);
        let refused = by_seq(receipts[2]);
        assert_eq!(
            (refused["identity"].as_str(), refused["outcome"].as_str()),
            (
                Some("spiffe://tillkey.test/svc/stranger"),
                Some("permission_denied")
            )
        );
        assert_eq!(by_seq(receipts[3])["detail"], "till 1 stolen");
        assert!(
            !all.to_string().contains(&b64(b"SECRET-BODY")),
            "a message body reached the audit trail"
        );

        // Filters.
        let (_, mine) = get(
            &mut auditor,
            &format!(
                "/v1/audit?identity=spiffe://tillkey.test/svc/stranger&since={}",
                receipts[0]
            ),
        )
        .await;
        assert_eq!(mine["entries"].as_array().unwrap().len(), 1);
        let (_, keyed) = get(&mut auditor, "/v1/audit?key=stores/1/mac").await;
        let keyed = keyed["entries"].as_array().unwrap();
        // The create and the revoke change state: each wrote its intent first, durable before
        // the change began, with the same request id as its outcome. Signs write one entry.
        let outcomes: Vec<_> = keyed
            .iter()
            .map(|e| (e["operation"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("create", "started"),
                ("create", "ok"),
                ("sign", "ok"),
                ("sign", "permission_denied"),
                ("revoke", "started"),
                ("revoke", "ok")
            ]
        );
        for pair in [&keyed[0..2], &keyed[4..6]] {
            assert_eq!(pair[0]["request_id"], pair[1]["request_id"]);
            assert_eq!(pair[0]["identity"], pair[1]["identity"]);
            assert!(pair[0]["seq"].as_u64() < pair[1]["seq"].as_u64());
        }
        assert_eq!(keyed[1]["seq"], receipts[0]);
        let (_, since) = get(&mut auditor, &format!("/v1/audit?since={}", receipts[3])).await;
        assert!(since["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["seq"].as_u64().unwrap() > receipts[3]));
        assert_error(
            &get(&mut auditor, "/v1/audit?limit=0").await,
            400,
            "invalid_argument",
        );
        assert_error(
            &get(&mut auditor, "/v1/audit?since=x").await,
            400,
            "invalid_argument",
        );
        assert_error(
            &get(&mut auditor, "/v1/audit?order=desc").await,
            400,
            "invalid_argument",
        );

        // The auditor reads and does nothing else; others may not read the trail.
        assert_error(
            &post(&mut auditor, "/v1/keys/stores/1/mac:rotate", json!({})).await,
            403,
            "permission_denied",
        );
        assert_error(
            &get(&mut auditor, "/v1/keys/stores/1/mac").await,
            403,
            "permission_denied",
        );
        assert_error(&get(&mut svc, "/v1/audit").await, 403, "permission_denied");
        // The service's own keys are out of every client's reach.
        assert_error(
            &get(&mut officer, "/v1/keys/tillkey/audit").await,
            403,
            "permission_denied",
        );
        assert_error(
            &post(&mut officer, "/v1/keys/tillkey/audit:rotate", json!({})).await,
            403,
            "permission_denied",
        );
        assert_error(
            &post(
                &mut officer,
                "/v1/keys:revokePrefix",
                json!({"prefix": "tillkey/", "reason": "x"}),
            )
            .await,
            403,
            "permission_denied",
        );
        assert_error(
            &post(
                &mut officer,
                "/v1/keys",
                json!({"name": "tillkey/mine", "type": "ed25519"}),
            )
            .await,
            403,
            "permission_denied",
        );
    }
}

on_each_backend! {
    async fn scheduled_changes_are_audited_too(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        let mut officer = d.conn("officer").await;
        post(&mut officer, "/v1/keys", json!({"name": "stores/2/mac", "type": "hmac-sha256", "rotation_period": "1s", "verify_grace": "1s"})).await;
        let mut auditor = d.conn("auditor").await;
        let mut found = false;
        for _ in 0..100 {
            let (_, v) = get(
                &mut auditor,
                "/v1/audit?key=stores/2/mac&identity=tillkeyd:scheduler",
            )
            .await;
            let ops: Vec<&str> = v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["operation"].as_str().unwrap())
                .collect();
            if ops.contains(&"rotate") && ops.contains(&"retire") {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(found, "scheduler rotation and retirement were not audited");
    }
}

on_each_backend! {
    async fn audit_verify_names_the_first_altered_removed_or_moved_entry(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/3/mac", "hmac-sha256").await;
        let mut svc = d.conn("service").await;
        for i in 0..20 {
            post(
                &mut svc,
                "/v1/keys/stores/3/mac:sign",
                json!({"message": b64(format!("m{i}").as_bytes())}),
            )
            .await;
        }
        drop(svc);
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(0), "{out}");
        // The create's intent and outcome, and the 20 signs.
        assert!(out.contains("audit trail intact: 22 entries"), "{out}");
        assert!(d.stop().success());
        let wal = env.path("registry.db-wal");
        assert!(
            !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
            "a clean stop leaves everything in the database file"
        );
        let db = env.path("registry.db");
        let pristine = env.path("pristine.db");
        std::fs::copy(&db, &pristine).unwrap();
        let restore = || std::fs::copy(&pristine, &db).unwrap();

        sqlite(
            &env,
            "UPDATE audit SET identity = 'spiffe://tillkey.test/svc/innocent' WHERE seq = 5",
        );
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("entry 5 was altered"), "{out}");

        restore();
        sqlite(&env, "DELETE FROM audit WHERE seq = 7");
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("entry 7 was removed"), "{out}");

        restore();
        sqlite(&env, "UPDATE audit SET seq = -1 WHERE seq = 9; UPDATE audit SET seq = 9 WHERE seq = 10; UPDATE audit SET seq = 10 WHERE seq = -1;");
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("entry 9 was altered or moved"), "{out}");

        // A forged entry with a recomputed chain but no access to the token's key is caught too.
        restore();
        sqlite(&env, "UPDATE audit SET outcome = 'permission_denied', mac = '00' || substr(mac, 3) WHERE seq = 12");
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("entry 12"), "{out}");

        restore();
        let (code, out) = env.audit_verify();
        assert_eq!(code, Some(0), "{out}");
        let export = Command::new(TILLKEY)
            .args(["audit", "export", "--config"])
            .arg(env.path("tillkeyd.toml"))
            .output()
            .unwrap();
        let lines: Vec<Value> = String::from_utf8_lossy(&export.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 22);
        assert_eq!(
            (&lines[0]["operation"], &lines[0]["outcome"]),
            (&json!("create"), &json!("started"))
        );
        assert_eq!(lines[2]["operation"], "sign");
    }
}

/// Concurrent requests share group commits: one seal (MAC in the token) per transaction, the
/// other entries covered through the chain. An edit to an unsealed entry is still named.
#[tokio::test]
async fn group_commits_are_sealed_once_and_edits_inside_them_are_named() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/4/mac", "hmac-sha256").await;
    let client = d.client("service");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.unwrap();
            for i in 0..10 {
                let (s, v) = post(
                    &mut c,
                    "/v1/keys/stores/4/mac:sign",
                    json!({"message": b64(format!("m{i}").as_bytes())}),
                )
                .await;
                assert_eq!(s, 200, "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every request was answered after its group was counted.
    let figure = |series: &str| d.metric(series).unwrap_or_else(|| panic!("no {series}"));
    let commits = figure("tillkey_audit_group_entries_count");
    let counted_entries = figure("tillkey_audit_group_entries_sum");
    assert_eq!(figure("tillkey_audit_group_wait_seconds_count"), commits);
    assert_eq!(figure("tillkey_audit_write_seconds_count"), commits);
    assert!(figure("tillkey_audit_write_seconds_sum") > 0.0);
    assert_eq!(figure("tillkey_audit_failed_groups_total"), 0.0);
    assert!(d.stop().success());
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    // 2 for the create (intent and outcome), 320 signs.
    assert!(out.contains("audit trail intact: 322 entries"), "{out}");
    assert_eq!(counted_entries, 322.0);

    let query = |sql: &str| {
        let out = Command::new("sqlite3")
            .arg(env.path("registry.db"))
            .arg(sql)
            .output()
            .expect("sqlite3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let sealed: u64 = query("SELECT COUNT(*) FROM audit WHERE mac != ''")
        .parse()
        .unwrap();
    assert!(
        sealed < 321,
        "320 concurrent requests were never grouped: {sealed} seals"
    );
    // One seal per transaction: the metrics counted the same commits.
    assert_eq!(commits, sealed as f64);
    // The last entry of every transaction is sealed, so the trail's last entry is.
    assert_ne!(query("SELECT mac FROM audit ORDER BY seq DESC LIMIT 1"), "");
    // An unsealed entry followed (in its batch) by another entry.
    let seq: u64 = query("SELECT MIN(seq) FROM audit WHERE mac = '' AND seq < 321")
        .parse()
        .unwrap();
    sqlite(
        &env,
        &format!(
            "UPDATE audit SET identity = 'spiffe://tillkey.test/svc/innocent' WHERE seq = {seq}"
        ),
    );
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("entry {seq} was altered")), "{out}");
}

on_each_backend! {
    async fn nothing_is_answered_without_its_audit_entry(backend: Backend) {
        let env = Env::on(backend);
        let d = env.start();
        create(&d, "stores/4/mac", "hmac-sha256").await;
        let mut svc = d.conn("service").await;
        let sign = json!({"message": b64(b"fail closed")});
        assert_eq!(
            post(&mut svc, "/v1/keys/stores/4/mac:sign", sign.clone())
                .await
                .0,
            200
        );

        // The store starts refusing writes (as a full disk or broken volume would).
        sqlite(&env, "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit store refuses writes'); END;");
        let outage = std::time::Instant::now();
        let r = post(&mut svc, "/v1/keys/stores/4/mac:sign", sign.clone()).await;
        assert_error(&r, 503, "unavailable");
        assert!(r.1.get("signature").is_none());
        // The client learns that the trail may be the cause, not the store's own error text.
        let message = r.1["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("audit trail"), "{message}");
        assert!(!message.contains("refuses writes"), "{message}");
        let mut officer = d.conn("officer").await;
        let r = post(
            &mut officer,
            "/v1/keys",
            json!({"name": "stores/4/other", "type": "hmac-sha256"}),
        )
        .await;
        assert_error(&r, 503, "unavailable");
        let (status, why) = d.admin_get("/readyz");
        assert_eq!(status, 503, "{why}");
        assert!(
            why.contains("audit") && why.contains("refuses writes"),
            "{why}"
        );
        d.wait_for("the audit failure in the log", Duration::from_secs(10), || {
            d.logs().iter().any(|l| l.contains("audit append failed"))
        });
        let refused = d
            .metric("tillkey_audit_failed_groups_total")
            .expect("refused groups are counted");
        assert!(refused >= 2.0, "{refused}");

        // Each refused request has its own request line, but the outage's error line is
        // written at most once a second, so a flood of refusals cannot flood the journal.
        for _ in 0..40 {
            let r = post(&mut svc, "/v1/keys/stores/4/mac:sign", sign.clone()).await;
            assert_error(&r, 503, "unavailable");
        }
        let seconds = outage.elapsed().as_secs();
        let count = |needle: &str| d.logs().iter().filter(|l| l.contains(needle)).count();
        d.wait_for("a request line per refusal", Duration::from_secs(10), || {
            count("\"status\":503") >= 42
        });
        let errors = count("request failed inside the service");
        assert!(
            (1..=seconds as usize + 2).contains(&errors),
            "{errors} error lines in {seconds} s of outage"
        );
        // The writer's own line for each failed group is held back the same way (the defect:
        // one ERROR per group, over a thousand in five seconds).
        let groups = count("audit append failed");
        assert!(
            (1..=seconds as usize + 2).contains(&groups),
            "{groups} failed-group lines in {seconds} s of outage"
        );

        // The store accepts writes again: the scheduler's probe is written and readiness returns.
        sqlite(&env, "DROP TRIGGER refuse_audit;");
        d.wait_for(
            "readiness after the audit store recovers",
            Duration::from_secs(10),
            || d.admin_get("/readyz").0 == 200,
        );
        assert_eq!(
            post(&mut svc, "/v1/keys/stores/4/mac:sign", sign).await.0,
            200
        );
        // The create refused during the outage was never carried out.
        assert_eq!(get(&mut officer, "/v1/keys/stores/4/other").await.0, 404);
        drop((svc, officer));
        assert!(d.stop().success());
        let (code, out) = env.audit_verify();
        assert_eq!(
            code,
            Some(0),
            "the trail stays intact across the outage: {out}"
        );
    }
}

/// A reader that stops early (`tillkey audit export | head`) ends the export quietly: no panic
/// on the closed pipe, exit 0. (More than a pipe buffer of entries, so the export really writes
/// into a closed pipe.)
#[tokio::test]
async fn audit_export_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    for i in 0..400 {
        let (s, v) = post(
            &mut svc,
            "/v1/keys/stores/1/mac:sign",
            serde_json::json!({"message": b64(format!("m{i}").as_bytes())}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    drop(svc);
    assert!(d.stop().success());
    let mut export = Command::new(TILLKEY)
        .args(["audit", "export", "--config"])
        .arg(env.path("tillkeyd.toml"))
        .env("SOFTHSM2_CONF", env.softhsm_conf())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tillkey audit export");
    let mut first = String::new();
    BufReader::new(export.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("a first entry");
    // The reader goes away here, with more than 64 KiB still to come.
    assert!(first.contains("\"seq\""), "{first}");
    let out = export.wait_with_output().expect("export ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
