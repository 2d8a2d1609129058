//! Failures under load, on real PostgreSQL and real daemons sharing one SoftHSM token: an
//! instance killed with SIGKILL mid-load (its answered requests are audited and done, its
//! retries on another instance get the first answers or run once), and the database failing
//! over to a synchronous streaming replica (nothing acknowledged is lost, the instances serve
//! again without a restart).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::{env_on, use_registry, Postgres, Vip};
use common::*;
use hyper::{HeaderMap, Method};
use serde_json::{json, Value};
use tillkey::client::{Client, Connection};

const RECEIPT: &str = "x-tillkey-receipt";
const REPLAYED: &str = "idempotent-replayed";
const OTP_KEY: &str = "stores/1/loyalty/otp";

/// One answer: status, response headers, JSON body.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn receipt(&self) -> Option<i64> {
        self.headers
            .get(RECEIPT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    fn replayed(&self) -> bool {
        self.headers.get(REPLAYED).is_some_and(|v| v == "true")
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn busy(&self) -> bool {
        self.status == 409
            && self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("still in progress"))
    }
}

/// What a request did, to find its audit entry and its effect.
#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Rotate(String),
    Sign(String, String),
    OtpIssue(String),
    OtpRedeem(String),
}

impl Op {
    fn operation(&self) -> &'static str {
        match self {
            Op::Create(_) => "create",
            Op::Rotate(_) => "rotate",
            Op::Sign(..) => "sign",
            Op::OtpIssue(_) => "customer_otp_issue",
            Op::OtpRedeem(_) => "customer_otp_redeem",
        }
    }

    fn key(&self) -> &str {
        match self {
            Op::Create(k) | Op::Rotate(k) | Op::Sign(k, _) => k,
            Op::OtpIssue(_) | Op::OtpRedeem(_) => OTP_KEY,
        }
    }
}

/// One request sent with its own Idempotency-Key, and the answer if one came.
#[derive(Clone)]
struct Sent {
    instance: usize,
    who: &'static str,
    path: String,
    body: Value,
    idem: String,
    op: Op,
    answer: Option<Answer>,
}

async fn send(c: &mut Connection, path: &str, idem: &str, body: &Value) -> Option<Answer> {
    let headers: Vec<(&str, &[u8])> = vec![("Idempotency-Key", idem.as_bytes())];
    let (s, headers, b) = c
        .send(Method::POST, path, &headers, body.to_string().into_bytes())
        .await
        .ok()?;
    Some(Answer {
        status: s.as_u16(),
        headers,
        body: serde_json::from_slice(&b).expect("answers are JSON"),
    })
}

/// The request `n` of client `t` on instance `i`: a create, a rotate, a sign, or a customer
/// one-time token issued (and then redeemed by the caller), each on keys only this client uses.
fn request(i: usize, t: usize, n: usize) -> Sent {
    let own = format!("stores/fo/{i}/{t}/mac");
    let idem = format!("fo-{i}-{t}-{n}");
    let (who, path, body, op) = match n % 4 {
        0 => {
            let name = format!("stores/fo/{i}/{t}/new/{n}");
            (
                "officer",
                "/v1/keys".to_owned(),
                json!({"name": name, "type": "hmac-sha256"}),
                Op::Create(name),
            )
        }
        1 => (
            "officer",
            format!("/v1/keys/{own}:rotate"),
            json!({"reason": format!("load {n}")}),
            Op::Rotate(own),
        ),
        2 => {
            let message = b64(format!("m/{i}/{t}/{n}").as_bytes());
            (
                "service",
                format!("/v1/keys/{own}:sign"),
                json!({ "message": message }),
                Op::Sign(own, message),
            )
        }
        _ => {
            let subject = format!("c-{i}-{t}-{n}");
            (
                "service",
                "/v1/tokens/customer-otp:issue".to_owned(),
                json!({"key": OTP_KEY, "subject": subject}),
                Op::OtpIssue(subject),
            )
        }
    };
    Sent {
        instance: i,
        who,
        path,
        body,
        idem,
        op,
        answer: None,
    }
}

/// The redemption of the token an issue answered.
fn redeem_of(issue: &Sent) -> Option<Sent> {
    let (Op::OtpIssue(subject), Some(a)) = (&issue.op, &issue.answer) else {
        return None;
    };
    (a.status == 200).then(|| Sent {
        path: "/v1/tokens/customer-otp:redeem".to_owned(),
        body: json!({"key": OTP_KEY, "token": a.body["token"]}),
        idem: format!("{}-redeem", issue.idem),
        op: Op::OtpRedeem(subject.clone()),
        answer: None,
        ..issue.clone()
    })
}

/// One client of instance `i`: requests in turn until `stop`, or until its instance stops
/// answering (then it gives up, as a client whose instance died).
async fn client(
    i: usize,
    t: usize,
    officer: Client,
    service: Client,
    stop: Arc<AtomicBool>,
) -> Vec<Sent> {
    let mut conns = [
        officer.connect().await.expect("connect"),
        service.connect().await.expect("connect"),
    ];
    let mut sent = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut next = Some(request(i, t, n));
        n += 1;
        while let Some(mut s) = next.take() {
            let c = &mut conns[usize::from(s.who == "service")];
            s.answer = send(c, &s.path, &s.idem, &s.body).await;
            let died = s.answer.is_none();
            next = redeem_of(&s);
            sent.push(s);
            if died {
                return sent;
            }
        }
    }
    sent
}

/// What the database holds, read at once (a psql per answer is too slow for hundreds).
struct Snapshot {
    /// seq: "operation key outcome".
    audit: HashMap<i64, String>,
    /// "name version" of every key version.
    versions: HashSet<String>,
    /// subject: (tokens issued, tokens redeemed).
    otps: HashMap<String, (u64, u64)>,
}

impl Snapshot {
    fn of(pg: &Postgres) -> Self {
        let rows = |sql: &str| -> Vec<Vec<String>> {
            pg.query(sql)
                .lines()
                .map(|l| l.split('|').map(str::to_owned).collect())
                .collect()
        };
        Self {
            audit: rows("SELECT seq, operation || ' ' || key_name || ' ' || outcome FROM audit")
                .into_iter()
                .map(|r| (r[0].parse().expect("seq"), r[1].clone()))
                .collect(),
            versions: rows("SELECT name || ' ' || version FROM key_versions")
                .into_iter()
                .map(|r| r[0].clone())
                .collect(),
            otps: rows("SELECT subject, count(*), count(redeemed_at) FROM otps GROUP BY subject")
                .into_iter()
                .map(|r| (r[0].clone(), (r[1].parse().unwrap(), r[2].parse().unwrap())))
                .collect(),
        }
    }

    /// An answer with a receipt has its audit entry (that seq, that operation and key) and
    /// its effect in the database: the key and its version, the signature verifies (through
    /// `check`), the one token issued for the subject, redeemed.
    async fn assert_audited_and_done(&self, check: &mut Connection, op: &Op, a: &Answer) {
        let Some(receipt) = a.receipt() else {
            return;
        };
        let outcome = match a.status {
            503 => "unavailable",
            _ => "ok",
        };
        assert_eq!(
            self.audit.get(&receipt),
            Some(&format!("{} {} {outcome}", op.operation(), op.key())),
            "receipt {receipt} for {op:?}: {}",
            a.body
        );
        if !a.ok() {
            return;
        }
        let version = |name: &str, field: &str| {
            let v = a.body[field].as_u64().expect("a version");
            assert!(
                self.versions.contains(&format!("{name} {v}")),
                "no version {v} of {name}"
            );
        };
        match op {
            Op::Create(name) | Op::Rotate(name) => version(name, "active_version"),
            Op::Sign(name, message) => {
                version(name, "key_version");
                let (st, v) = post(
                    check,
                    &format!("/v1/keys/{name}:verify"),
                    json!({"message": message, "signature": a.body["signature"], "key_version": a.body["key_version"]}),
                )
                .await;
                assert_eq!((st, &v["valid"]), (200, &json!(true)), "{v}");
            }
            Op::OtpIssue(subject) => assert_eq!(
                self.otps.get(subject).map(|o| o.0),
                Some(1),
                "one token for {subject}"
            ),
            Op::OtpRedeem(subject) => {
                assert_eq!(a.body["redeemed"], true, "{}", a.body);
                assert_eq!(self.otps.get(subject), Some(&(1, 1)), "{subject}");
            }
        }
    }
}

/// What a request's dead attempt left in the database.
#[derive(Clone, Copy)]
struct LeftBehind {
    committed: bool,
    audited: bool,
    /// A create's name reserved (the `keys` row) without a version made.
    reserved: bool,
    /// Its intent entry is in the trail, with this request's operation and key, and its
    /// Idempotency-Key claim names it: it may have begun its change.
    started: bool,
}

/// Whether the attempt at `s` (sent to the killed instance, unanswered) committed its effect,
/// and whether its audit entry was written. A sign changes nothing that lasts: never committed.
fn left_behind(pg: &Postgres, sent: &[Sent], s: &Sent) -> LeftBehind {
    let n = |sql: String| -> u64 { pg.query(&sql).parse().expect("a count") };
    let ok = "outcome = 'ok' AND detail NOT LIKE 'Idempotency-Key replay%'";
    let reserved = match &s.op {
        Op::Create(name) => n(format!("SELECT count(*) FROM keys WHERE name = '{name}'")) > 0,
        _ => false,
    };
    let (committed, audited) = match &s.op {
        Op::Create(name) => (
            n(format!(
                "SELECT count(*) FROM key_versions WHERE name = '{name}'"
            )),
            n(format!(
                "SELECT count(*) FROM audit WHERE operation = 'create' AND key_name = '{name}' AND {ok}"
            )),
        ),
        Op::Rotate(name) => {
            // Only this client rotates this key; it stopped at this request.
            let answered = sent
                .iter()
                .filter(|o| matches!(&o.op, Op::Rotate(k) if k == name) && o.answer.is_some())
                .count() as u64;
            let versions = n(format!(
                "SELECT count(*) FROM key_versions WHERE name = '{name}'"
            ));
            let audited = n(format!(
                "SELECT count(*) FROM audit WHERE operation = 'rotate' AND key_name = '{name}' AND {ok}"
            ));
            (versions - 1 - answered, audited - answered)
        }
        Op::Sign(..) => (0, 0),
        Op::OtpIssue(subject) => (
            n(format!("SELECT count(*) FROM otps WHERE subject = '{subject}'")),
            n(format!(
                "SELECT count(*) FROM audit WHERE operation = 'customer_otp_issue' \
                 AND detail = 'for {subject}' AND {ok}"
            )),
        ),
        Op::OtpRedeem(subject) => (
            n(format!(
                "SELECT count(*) FROM otps WHERE subject = '{subject}' AND redeemed_at IS NOT NULL"
            )),
            n(format!(
                "SELECT count(*) FROM audit WHERE operation = 'customer_otp_redeem' \
                 AND detail = 'redeemed for {subject}' AND {ok}"
            )),
        ),
    };
    let intent = pg.query(&format!(
        "SELECT a.operation || ' ' || a.key_name || ' ' || a.outcome FROM idempotency i \
         JOIN audit a ON a.seq = i.started WHERE i.idem_key = '{}'",
        s.idem
    ));
    let started = !intent.is_empty();
    if started {
        assert_eq!(
            intent,
            format!("{} {} started", s.op.operation(), s.op.key()),
            "{:?}",
            s.op
        );
    }
    LeftBehind {
        committed: committed > 0,
        audited: audited > 0,
        reserved: reserved && committed == 0,
        started,
    }
}

/// Three instances under mixed load, one killed with SIGKILL in the middle. Every answer given
/// (by any instance) with a receipt is audited and done; `audit verify` passes; each request
/// sent to the dead instance, retried with its Idempotency-Key on a survivor, gets the answer
/// it was given, or, when none was given, the stored answer or 409 until the claim is 60 s
/// old; then it runs if it had not begun its change, and is 409 `outcome_unknown` (never run
/// twice) if it had. No change in the database is without its entry (outcome or intent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_under_load_loses_no_answer_and_its_retries_run_once() {
    const CLIENTS: usize = 3;
    let started = Instant::now();
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, OTP_KEY, "hmac-sha256").await;
    for i in 0..3 {
        for t in 0..CLIENTS {
            create(&a, &format!("stores/fo/{i}/{t}/mac"), "hmac-sha256").await;
        }
    }
    let (b, c) = (env.start(), env.start());
    let daemons = [&a, &b, &c];
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        for t in 0..CLIENTS {
            tasks.push(tokio::spawn(client(
                i,
                t,
                d.client("officer"),
                d.client("service"),
                stop.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.signal("KILL");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.expect("client"));
    }
    let on_c = |s: &&Sent| s.instance == 2;
    let (c_sent, c_lost) = (
        sent.iter().filter(on_c).count(),
        sent.iter()
            .filter(on_c)
            .filter(|s| s.answer.is_none())
            .count(),
    );
    eprintln!(
        "{} requests, {c_sent} to the killed instance, {c_lost} of them unanswered",
        sent.len()
    );
    assert!(c_sent >= 20, "too little load on C before the kill");
    assert!(c_lost >= 1, "the kill interrupted no request on C");
    let unavailable = sent
        .iter()
        .filter(|s| s.answer.as_ref().is_some_and(|a| a.status == 503))
        .count();
    eprintln!("{unavailable} answered 503 (an instance over 1 s behind on the loaded host)");
    assert!(unavailable * 10 < sent.len(), "too many 503s");

    // The survivors answered everything, and well.
    let mut check = a.conn("service").await;
    let db = Snapshot::of(&pg);
    for s in &sent {
        let answer = match &s.answer {
            Some(answer) => answer,
            None => {
                assert_eq!(s.instance, 2, "a survivor did not answer {}", s.path);
                continue;
            }
        };
        // Success, or 503 while an instance on the loaded host fell over 1 s behind the
        // other instances' changes (it fails closed then).
        assert!(
            answer.ok() || answer.status == 503,
            "{} {}: {}",
            s.path,
            answer.status,
            answer.body
        );
        db.assert_audited_and_done(&mut check, &s.op, answer).await;
    }

    // Retries of what was sent to C, on A or B with the same key. Of a request left
    // unanswered, first what the dead attempt did: its effect committed or not, and audited.
    let mut survivors = [
        (a.conn("officer").await, a.conn("service").await),
        (b.conn("officer").await, b.conn("service").await),
    ];
    let mut waiting = Vec::new();
    let mut rerun = Vec::new();
    for (n, s) in sent.iter().filter(on_c).enumerate() {
        let before = s.answer.is_none().then(|| left_behind(&pg, &sent, s));
        let pair = &mut survivors[n % 2];
        let conn = if s.who == "service" {
            &mut pair.1
        } else {
            &mut pair.0
        };
        let retry = send(conn, &s.path, &s.idem, &s.body)
            .await
            .expect("a survivor answers");
        match (&s.answer, before) {
            (Some(first), _) if first.status == 503 => {
                // A server error is not kept: the retry runs afresh.
                assert!(!retry.replayed(), "{}", retry.body);
                let mut done = s.clone();
                done.answer = Some(retry);
                rerun.push(done);
            }
            (Some(first), _) => {
                assert_eq!(
                    (retry.status, &retry.body, retry.receipt()),
                    (first.status, &first.body, first.receipt()),
                    "retry of {} {}",
                    s.path,
                    s.body
                );
                assert!(retry.replayed(), "{}", retry.body);
            }
            (None, Some(before)) => {
                // No change without its entry: what committed has its outcome's entry or, when
                // the instance died first, its intent's.
                assert!(
                    !before.committed || before.audited || before.started,
                    "{:?} committed without an audit entry",
                    s.op
                );
                eprintln!(
                    "unanswered {:?}: effect committed {}, audited {}, intent {}, name reserved \
                     {}; retry {} {}{}",
                    s.op,
                    before.committed,
                    before.audited,
                    before.started,
                    before.reserved,
                    retry.status,
                    retry.body,
                    if retry.replayed() { " (replayed)" } else { "" }
                );
                if retry.busy() {
                    waiting.push((s.clone(), before));
                    continue;
                }
                // Stored after all (then done), or never claimed (then not done either).
                assert!(retry.ok(), "{} {}: {}", s.path, retry.status, retry.body);
                if !matches!(s.op, Op::Sign(..)) {
                    assert_eq!(before.committed, retry.replayed(), "{:?}", s.op);
                }
                let mut done = s.clone();
                done.answer = Some(retry);
                rerun.push(done);
            }
            (None, None) => unreachable!(),
        }
    }
    // Once the dead attempts' claims are 60 s old: one that had begun its change (its intent is
    // in the trail) is never run again, whether or not the change committed: 409
    // `outcome_unknown`. One that had not begun runs.
    let mut unknown = Vec::new();
    if !waiting.is_empty() {
        let due = killed + Duration::from_secs(61);
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
        for (s, before) in &waiting {
            let mut conn = a.conn(s.who).await;
            let retry = send(&mut conn, &s.path, &s.idem, &s.body)
                .await
                .expect("a survivor answers");
            eprintln!(
                "after 60 s {:?}: {} {}{}",
                s.op,
                retry.status,
                retry.body,
                if retry.replayed() { " (replayed)" } else { "" }
            );
            assert!(!retry.replayed(), "{}", retry.body);
            if before.started || before.committed || before.reserved {
                assert!(before.started, "{:?} changed state before its intent", s.op);
                assert_eq!(
                    (retry.status, &retry.body["error"]["code"]),
                    (409, &json!("outcome_unknown")),
                    "{:?}: {}",
                    s.op,
                    retry.body
                );
                unknown.push(s.clone());
                continue;
            }
            assert!(
                retry.ok(),
                "taken over {} {}: {} {}",
                s.path,
                s.body,
                retry.status,
                retry.body
            );
            let mut done = s.clone();
            done.answer = Some(retry);
            rerun.push(done);
        }
    }
    // A fresh connection: the one above sat idle through the wait, longer than the server
    // keeps an idle connection.
    check = a.conn("service").await;
    let db = Snapshot::of(&pg);
    for s in &rerun {
        db.assert_audited_and_done(&mut check, &s.op, s.answer.as_ref().unwrap())
            .await;
    }
    eprintln!(
        "unanswered on C: {} answered on the first retry, {} waited 60 s, of which {} had begun \
         their change (outcome_unknown, not run again)",
        c_lost - waiting.len(),
        waiting.len(),
        unknown.len(),
    );

    // Each request's last answer: the first, or the retry's when the first was none or 503.
    let mut finally: HashMap<&str, &Sent> = HashMap::new();
    for s in sent.iter().chain(&rerun) {
        finally.insert(&s.idem, s);
    }
    // Every answered rotation is audited once. A key may hold more versions than that: a rotate
    // whose attempt got no answer (its instance died) or a 503 (its outcome entry failed after
    // the change committed). Each such version has its rotation's intent in the trail, an
    // intent no outcome followed.
    let mut unanswered_versions = 0;
    for i in 0..3 {
        for t in 0..CLIENTS {
            let name = format!("stores/fo/{i}/{t}/mac");
            let is_rotate = |s: &Sent| matches!(&s.op, Op::Rotate(k) if *k == name);
            let rotated = |s: &&&Sent| is_rotate(s) && s.answer.as_ref().is_some_and(Answer::ok);
            let rotates = finally.values().filter(rotated).count();
            let interrupted = sent
                .iter()
                .filter(|s| is_rotate(s))
                .filter(|s| s.answer.as_ref().is_none_or(|a| a.status == 503))
                .count();
            let versions: usize = pg
                .query(&format!(
                    "SELECT count(*) FROM key_versions WHERE name = '{name}'"
                ))
                .parse()
                .expect("count");
            let audited = pg.query(&format!(
                "SELECT count(*) FROM audit WHERE operation = 'rotate' AND key_name = '{name}' \
                 AND outcome = 'ok' AND detail NOT LIKE 'Idempotency-Key replay%'"
            ));
            assert_eq!(audited, rotates.to_string(), "{name}: audited rotations");
            let extra = versions.checked_sub(rotates + 1).unwrap_or_else(|| {
                panic!("{name}: {versions} versions for {rotates} answered rotations")
            });
            assert!(
                extra <= interrupted,
                "{name}: {extra} versions beyond the answered rotations, {interrupted} interrupted"
            );
            let intents: usize = pg
                .query(&format!(
                    "SELECT count(*) FROM audit i WHERE operation = 'rotate' \
                     AND key_name = '{name}' AND outcome = 'started' AND NOT EXISTS \
                     (SELECT 1 FROM audit o WHERE o.request_id = i.request_id \
                      AND o.seq > i.seq AND o.outcome <> 'started')"
                ))
                .parse()
                .expect("count");
            assert!(
                extra <= intents,
                "{name}: {extra} versions beyond the answered rotations, {intents} intents \
                 without an outcome"
            );
            unanswered_versions += extra;
        }
    }
    eprintln!("versions made by rotations that got no answer (each with its intent): {unanswered_versions}");

    drop((check, survivors));
    assert!(a.stop().success());
    assert!(b.stop().success());
    let rows = pg.query("SELECT count(*) FROM audit");
    assert_eq!(pg.query("SELECT max(seq) FROM audit"), rows);
    assert_eq!(pg.query("SELECT seq FROM audit_head"), rows);
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit trail intact"), "{out}");
    eprintln!("took {:?}", started.elapsed());
}

/// What one load client saw: every answer with its request, and the 503s and broken
/// connections it met.
#[derive(Default)]
struct Seen {
    answers: Vec<(Op, Answer, Instant)>,
    unavailable: usize,
    broken: usize,
}

/// Signs and creates on one instance until `stop`, each with its receipt; reconnects when the
/// connection breaks.
async fn load(i: usize, officer: Client, service: Client, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut conns: [Option<Connection>; 2] = [None, None];
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (slot, path, body, op) = if n % 3 == 0 {
            let name = format!("stores/db/{i}/new/{n}");
            (
                0,
                "/v1/keys".to_owned(),
                json!({"name": name, "type": "hmac-sha256"}),
                Op::Create(name),
            )
        } else {
            let key = format!("stores/db/{i}/mac");
            let message = b64(format!("m/{i}/{n}").as_bytes());
            (
                1,
                format!("/v1/keys/{key}:sign"),
                json!({ "message": message }),
                Op::Sign(key, message),
            )
        };
        if conns[slot].is_none() {
            let client = if slot == 0 { &officer } else { &service };
            match client.connect().await {
                Ok(c) => conns[slot] = Some(c),
                Err(_) => {
                    seen.broken += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let conn = conns[slot].as_mut().expect("connected");
        match send(conn, &path, &format!("db-{i}-{n}"), &body).await {
            None => {
                seen.broken += 1;
                conns[slot] = None;
            }
            Some(a) if a.status == 503 => {
                seen.unavailable += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(a) => {
                assert!(a.ok(), "{path}: {} {}", a.status, a.body);
                seen.answers.push((op, a, Instant::now()));
            }
        }
    }
    seen
}

/// The database fails over to a synchronous streaming replica under load: the primary stops
/// hard, the replica is promoted, and the database's address moves to it. The instances
/// answer 503 for a while and then serve again without a restart, and everything they
/// acknowledged (every create answered 201, every audit receipt) is on the promoted server,
/// whose audit trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failover_to_a_synchronous_replica_loses_nothing_acknowledged() {
    let started = Instant::now();
    let primary = Postgres::start();
    let replica = primary.replica();
    let vip = Vip::to(&primary);
    let env = Env::on(Backend::Pkcs11);
    use_registry(&env, &vip.url());
    let a = env.start();
    for i in 0..2 {
        create(&a, &format!("stores/db/{i}/mac"), "hmac-sha256").await;
    }
    let b = env.start();
    eprintln!("set up in {:?}", started.elapsed());
    let pids = (a.pid(), b.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, d) in [&a, &b].into_iter().enumerate() {
        tasks.push(tokio::spawn(load(
            i,
            d.client("officer"),
            d.client("service"),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopping = Instant::now();
    let moved = tokio::task::spawn_blocking(move || {
        primary.stop();
        replica.promote();
        vip.move_to(&replica);
        (Instant::now(), primary, replica, vip)
    });
    let (moved, _old, promoted, _vip) = moved.await.expect("failover");
    // Load goes on for a while after the move; both instances must serve again within it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("load"));
    }
    for (i, s) in seen.iter().enumerate() {
        let before = s.answers.iter().filter(|(_, _, at)| *at < moved).count();
        let after = s.answers.len() - before;
        let gap = {
            let last = s.answers.iter().rev().find(|(_, _, at)| *at < stopping);
            let next = s.answers.iter().find(|(_, _, at)| *at > stopping);
            next.zip(last).map(|(n, l)| n.2 - l.2)
        };
        eprintln!(
            "instance {i}: {before} answers before the move, {after} after; none for {gap:?} \
             around the failover ({:?} from stopping the primary to the move); {} 503s, {} \
             broken connections",
            moved - stopping,
            s.unavailable,
            s.broken
        );
        assert!(before >= 20, "too little load before the failover");
        assert!(
            after >= 20,
            "instance {i} did not serve again after the failover"
        );
    }
    assert_eq!((a.pid(), b.pid()), pids);
    // The change feed runs on after the promotion: a key made on A is used on B within 1 s.
    create(&a, "stores/db/after", "hmac-sha256").await;
    let made = Instant::now();
    let mut b_svc = b.conn("service").await;
    loop {
        let (st, v) = post(
            &mut b_svc,
            "/v1/keys/stores/db/after:sign",
            json!({"message": b64(b"after")}),
        )
        .await;
        if st == 200 {
            break;
        }
        assert!(made.elapsed() < Duration::from_secs(1), "B: {st} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "key_changes on the promoted server: count, max(seq): {}",
        promoted.query("SELECT count(*) || ', ' || max(seq) FROM key_changes")
    );

    // Everything acknowledged is on the promoted server.
    let mut check = a.conn("service").await;
    let db = Snapshot::of(&promoted);
    for s in &seen {
        for (op, answer, _) in &s.answers {
            assert!(answer.receipt().is_some(), "no receipt: {}", answer.body);
            db.assert_audited_and_done(&mut check, op, answer).await;
        }
    }
    drop(check);
    eprintln!("answers checked at {:?}", started.elapsed());
    assert!(a.stop().success());
    assert!(b.stop().success());
    let rows = promoted.query("SELECT count(*) FROM audit");
    assert_eq!(promoted.query("SELECT max(seq) FROM audit"), rows);
    assert_eq!(promoted.query("SELECT seq FROM audit_head"), rows);
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit trail intact"), "{out}");
    eprintln!("took {:?}", started.elapsed());
}
