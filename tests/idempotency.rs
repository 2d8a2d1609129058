//! `Idempotency-Key`: a retried POST or PATCH gets the first attempt's answer (status, body and
//! receipt, marked `idempotent-replayed: true`) instead of a second effect, on the same
//! instance or another one on the same database; the key sent with another request is
//! refused; simultaneous attempts run once.

mod common;

use std::time::Duration;

use common::postgres::{env_on, Postgres};
use common::*;
use hyper::{HeaderMap, Method};
use serde_json::{json, Value};
use tillkey::client::Connection;

const RECEIPT: &str = "x-tillkey-receipt";
const REPLAYED: &str = "idempotent-replayed";

/// One answer: status, response headers, JSON body.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn receipt(&self) -> u64 {
        self.headers
            .get(RECEIPT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no receipt: {}", self.body))
    }

    fn replayed(&self) -> bool {
        match self.headers.get(REPLAYED) {
            None => false,
            Some(v) => {
                assert_eq!(v, "true");
                true
            }
        }
    }

    fn error(&self) -> (u16, Value) {
        (self.status, self.body.clone())
    }
}

/// `method path` with `body`, and the raw `Idempotency-Key` value if any.
async fn send(
    c: &mut Connection,
    method: Method,
    path: &str,
    key: Option<&[u8]>,
    body: Value,
) -> Answer {
    let headers: Vec<(&str, &[u8])> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    let body = if method == Method::GET {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (s, headers, b) = c.send(method, path, &headers, body).await.expect("call");
    Answer {
        status: s.as_u16(),
        headers,
        body: serde_json::from_slice(&b).expect("answers are JSON"),
    }
}

async fn post_key(c: &mut Connection, path: &str, key: &str, body: Value) -> Answer {
    send(c, Method::POST, path, Some(key.as_bytes()), body).await
}

/// The key's versions, as the API lists them.
async fn versions(c: &mut Connection, name: &str) -> usize {
    let (s, k) = get(c, &format!("/v1/keys/{name}")).await;
    assert_eq!(s, 200, "{k}");
    k["versions"].as_array().expect("versions").len()
}

#[tokio::test]
async fn a_repeated_create_gets_the_original_answer_and_makes_one_key() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    let body = json!({"name": "stores/7/mac", "type": "hmac-sha256"});
    let first = post_key(&mut officer, "/v1/keys", "create-7", body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!first.replayed());
    // On a new connection too (a client retrying after a timeout reconnects).
    let mut again = d.conn("officer").await;
    let second = post_key(&mut again, "/v1/keys", "create-7", body.clone()).await;
    assert_eq!(
        (second.status, &second.body, second.receipt()),
        (first.status, &first.body, first.receipt())
    );
    assert!(second.replayed());
    assert_eq!(versions(&mut officer, "stores/7/mac").await, 1);
    let (_, list) = get(&mut officer, "/v1/keys").await;
    let named: Vec<&Value> = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["name"] == "stores/7/mac")
        .collect();
    assert_eq!(named.len(), 1, "{list}");
    // Without the key the same request is a new one, and the name is taken.
    let plain = send(&mut officer, Method::POST, "/v1/keys", None, body).await;
    assert_error(&plain.error(), 409, "already_exists");

    // The retry is in the trail too, naming the original receipt.
    let mut auditor = d.conn("auditor").await;
    let (s, all) = get(&mut auditor, "/v1/audit?limit=1000").await;
    assert_eq!(s, 200, "{all}");
    let entries = all["entries"].as_array().expect("entries");
    let replay = entries
        .iter()
        .find(|e| e["request_id"] == second.headers["x-request-id"].to_str().unwrap())
        .unwrap_or_else(|| panic!("no entry for the replay: {all}"));
    assert_eq!(
        (&replay["operation"], &replay["key"], &replay["outcome"]),
        (&json!("create"), &json!("stores/7/mac"), &json!("ok"))
    );
    assert!(
        replay["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("receipt {}", first.receipt())),
        "{replay}"
    );
    assert!(replay["seq"].as_u64().unwrap() > first.receipt());

    // Keys are per identity: another officer's same key is another key.
    let mut other = d.conn("officer2").await;
    let theirs = post_key(
        &mut other,
        "/v1/keys",
        "create-7",
        json!({"name": "stores/8/mac", "type": "hmac-sha256"}),
    )
    .await;
    assert_eq!(theirs.status, 201, "{}", theirs.body);
    assert!(!theirs.replayed());
}

#[tokio::test]
async fn a_key_sent_with_a_different_request_is_refused_and_nothing_is_done() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    let first = post_key(
        &mut officer,
        "/v1/keys",
        "k-1",
        json!({"name": "stores/7/mac", "type": "hmac-sha256"}),
    )
    .await;
    assert_eq!(first.status, 201, "{}", first.body);
    for (path, body) in [
        (
            "/v1/keys",
            json!({"name": "stores/7/other", "type": "hmac-sha256"}),
        ),
        ("/v1/keys/stores/7/mac:rotate", json!({"reason": "r"})),
    ] {
        let other = post_key(&mut officer, path, "k-1", body).await;
        assert_error(&other.error(), 422, "unsupported_operation");
        assert!(
            other.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("different request"),
            "{}",
            other.body
        );
        assert!(!other.replayed());
    }
    let (s, _) = get(&mut officer, "/v1/keys/stores/7/other").await;
    assert_eq!(s, 404);
    assert_eq!(versions(&mut officer, "stores/7/mac").await, 1);
}

#[tokio::test]
async fn a_redeem_retried_with_its_key_gets_the_original_success_not_already_used() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1212/loyalty/otp", "hmac-sha256").await;
    let mut svc = d.conn("service").await;
    let (s, t) = post(
        &mut svc,
        "/v1/tokens/customer-otp:issue",
        json!({"key": "stores/1212/loyalty/otp", "subject": "customer-42"}),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    let redeem = json!({"key": "stores/1212/loyalty/otp", "token": t["token"]});
    let path = "/v1/tokens/customer-otp:redeem";
    let first = post_key(&mut svc, path, "till-3/redeem/1", redeem.clone()).await;
    assert_eq!(
        (
            first.status,
            &first.body["redeemed"],
            &first.body["subject"]
        ),
        (200, &json!(true), &json!("customer-42"))
    );
    // The answer was lost; the till retries (on a new connection) and is told it redeemed.
    let mut retry = d.conn("service").await;
    let second = post_key(&mut retry, path, "till-3/redeem/1", redeem.clone()).await;
    assert_eq!(
        (second.status, &second.body, second.receipt()),
        (200, &first.body, first.receipt())
    );
    assert!(second.replayed());
    // Without the key it is a second redemption, refused as usual.
    let plain = send(&mut retry, Method::POST, path, None, redeem).await;
    assert_eq!(
        (plain.status, plain.body),
        (200, json!({"redeemed": false, "reason": "invalid"}))
    );
}

#[tokio::test]
async fn a_retry_on_another_instance_gets_the_answer_given_on_the_first() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/9/mac", "hmac-sha256").await;
    let b = env.start();
    let rotate = json!({"reason": "scheduled"});
    let path = "/v1/keys/stores/9/mac:rotate";
    let mut on_a = a.conn("officer").await;
    let first = post_key(&mut on_a, path, "rotate-9-2027", rotate.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    // A fails over; the client retries on B.
    assert!(a.stop().success());
    let mut on_b = b.conn("officer").await;
    let second = post_key(&mut on_b, path, "rotate-9-2027", rotate).await;
    assert_eq!(
        (second.status, &second.body, second.receipt()),
        (200, &first.body, first.receipt())
    );
    assert!(second.replayed());
    assert_eq!(
        pg.query("SELECT count(*) FROM key_versions WHERE name = 'stores/9/mac'"),
        "2"
    );
}

/// An attempt whose instance died before it began changing anything (no intent entry) leaves
/// its claim without an answer: retries are told to wait while it might still be running, and
/// after 60 s the next retry runs the request.
#[tokio::test]
async fn a_claim_left_by_a_dead_attempt_is_busy_then_taken_over() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let d = env.start();
    create(&d, "stores/9/mac", "hmac-sha256").await;
    let mut officer = d.conn("officer").await;
    let path = "/v1/keys/stores/9/mac:rotate";
    let rotate = json!({"reason": "r"});
    let first = post_key(&mut officer, path, "dead-1", rotate.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    // As if the attempt had claimed the key 10 s ago and died before its intent entry.
    let unanswered = |age: i64| {
        format!(
            "UPDATE idempotency SET status = NULL, started = NULL, \
             created_at = created_at - {age} WHERE idem_key = 'dead-1'"
        )
    };
    pg.query(&unanswered(10));
    let busy = post_key(&mut officer, path, "dead-1", rotate.clone()).await;
    assert_error(&busy.error(), 409, "failed_precondition");
    assert!(
        busy.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("still in progress"),
        "{}",
        busy.body
    );
    pg.query(&unanswered(60));
    let rerun = post_key(&mut officer, path, "dead-1", rotate.clone()).await;
    assert_eq!(rerun.status, 200, "{}", rerun.body);
    assert!(!rerun.replayed());
    assert_eq!(versions(&mut officer, "stores/9/mac").await, 3);
    let replay = post_key(&mut officer, path, "dead-1", rotate).await;
    assert_eq!(
        (&replay.body, replay.receipt()),
        (&rerun.body, rerun.receipt())
    );
    assert!(replay.replayed());
}

/// A rotation whose change committed but whose outcome entry the trail refused (as when its
/// instance dies between the two): the change has its intent entry, written before it began,
/// and a retry with the same key never rotates a second time: 409 while the attempt might
/// still run, then 409 `outcome_unknown` naming the intent's receipt. A sign (which changes
/// nothing lasting) refused the same way releases its key, and its retry runs at once.
#[tokio::test]
async fn a_change_whose_outcome_was_not_recorded_is_never_run_twice() {
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/9/mac", "hmac-sha256").await;
    let b = env.start();
    let refuse = |operation: &str| {
        pg.query(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
               IF NEW.operation = '{operation}' AND NEW.outcome <> 'started' THEN \
                 RAISE EXCEPTION 'audit store refuses writes'; END IF; RETURN NEW; END $f$; \
             CREATE TRIGGER refuse BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse();"
        ));
    };
    let accept = || {
        pg.query("DROP TRIGGER refuse ON audit; DROP FUNCTION refuse();");
        a.wait_for(
            "readiness after the outage",
            Duration::from_secs(10),
            || a.admin_get("/readyz").0 == 200,
        );
    };
    let versions_in_db =
        || pg.query("SELECT count(*) FROM key_versions WHERE name = 'stores/9/mac'");
    let path = "/v1/keys/stores/9/mac:rotate";
    let rotate = json!({"reason": "r"});
    let mut on_a = a.conn("officer").await;

    refuse("rotate");
    let lost = post_key(&mut on_a, path, "lost-1", rotate.clone()).await;
    assert_error(&lost.error(), 503, "unavailable");
    assert!(lost.headers.get(RECEIPT).is_none());
    accept();
    // The rotation took effect, and the trail holds its intent (not its outcome).
    assert_eq!(versions_in_db(), "2");
    let entries = pg.query(
        "SELECT seq || ' ' || outcome FROM audit WHERE operation = 'rotate' \
         AND key_name = 'stores/9/mac' ORDER BY seq",
    );
    let (intent, outcome) = entries.split_once(' ').expect("one rotate entry");
    assert_eq!(outcome, "started", "{entries}");
    assert_eq!(
        pg.query("SELECT started FROM idempotency WHERE idem_key = 'lost-1'"),
        intent
    );

    let mut on_b = b.conn("officer").await;
    let busy = post_key(&mut on_b, path, "lost-1", rotate.clone()).await;
    assert_error(&busy.error(), 409, "failed_precondition");
    pg.query("UPDATE idempotency SET created_at = created_at - 61 WHERE idem_key = 'lost-1'");
    for conn in [&mut on_b, &mut on_a] {
        let unknown = post_key(conn, path, "lost-1", rotate.clone()).await;
        assert_error(&unknown.error(), 409, "outcome_unknown");
        let message = unknown.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("audit receipt {intent}")),
            "{message}"
        );
        // Refused, but audited like any refusal.
        assert!(unknown.receipt() > intent.parse::<u64>().unwrap());
    }
    assert_eq!(versions_in_db(), "2", "the rotation ran a second time");

    // A sign changes nothing lasting: no intent, and its key is released with the 503.
    refuse("sign");
    let sign = json!({"message": b64(b"m")});
    let mut svc = a.conn("service").await;
    let sign_path = "/v1/keys/stores/9/mac:sign";
    let lost = post_key(&mut svc, sign_path, "lost-2", sign.clone()).await;
    assert_error(&lost.error(), 503, "unavailable");
    accept();
    assert_eq!(
        pg.query("SELECT count(*) FROM idempotency WHERE idem_key = 'lost-2'"),
        "0"
    );
    let mut svc = b.conn("service").await;
    let again = post_key(&mut svc, sign_path, "lost-2", sign).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(!again.replayed());
}

#[tokio::test]
async fn simultaneous_attempts_with_one_key_rotate_once() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/5/mac", "hmac-sha256").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = d.client("officer");
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.expect("connect");
            post_key(
                &mut c,
                "/v1/keys/stores/5/mac:rotate",
                "rotate-5",
                json!({"reason": "r"}),
            )
            .await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("client"));
    }
    let ran: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == 200 && !a.replayed())
        .collect();
    assert_eq!(ran.len(), 1, "exactly one attempt runs");
    for a in &answers {
        match a.status {
            200 => assert_eq!(
                (&a.body, a.receipt()),
                (&ran[0].body, ran[0].receipt()),
                "a replay is the original answer"
            ),
            _ => assert_error(&a.error(), 409, "failed_precondition"),
        }
    }
    let mut officer = d.conn("officer").await;
    assert_eq!(versions(&mut officer, "stores/5/mac").await, 2);
    let late = post_key(
        &mut officer,
        "/v1/keys/stores/5/mac:rotate",
        "rotate-5",
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(
        (&late.body, late.receipt()),
        (&ran[0].body, ran[0].receipt())
    );
    assert!(late.replayed());
}

#[tokio::test]
async fn malformed_keys_are_refused_before_anything_is_done() {
    let env = Env::new();
    let d = env.start();
    let mut officer = d.conn("officer").await;
    let long = "k".repeat(256);
    let max = "k".repeat(255);
    for bad in [
        &b""[..],
        long.as_bytes(),
        b"two words",
        "cl\u{e9}".as_bytes(),
    ] {
        let a = send(
            &mut officer,
            Method::POST,
            "/v1/keys",
            Some(bad),
            json!({"name": "stores/6/mac", "type": "hmac-sha256"}),
        )
        .await;
        assert_error(&a.error(), 400, "invalid_argument");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key"),
            "{}",
            a.body
        );
        // PATCH is checked the same way.
        let a = send(
            &mut officer,
            Method::PATCH,
            "/v1/keys/stores/6/mac",
            Some(bad),
            json!({"verify_grace": "1d"}),
        )
        .await;
        assert_error(&a.error(), 400, "invalid_argument");
    }
    let (s, _) = get(&mut officer, "/v1/keys/stores/6/mac").await;
    assert_eq!(s, 404, "nothing was created");
    // A GET changes nothing: its key is ignored.
    let listed = send(
        &mut officer,
        Method::GET,
        "/v1/keys",
        Some(b"two words"),
        json!(null),
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let ok = post_key(
        &mut officer,
        "/v1/keys",
        &max,
        json!({"name": "stores/6/mac", "type": "hmac-sha256"}),
    )
    .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
}
