//! Several tillkeyd instances on one PostgreSQL database and one token: what holds today.
//! Requests spread over two real daemons write one audit chain that verifies as a whole; a key
//! made or revoked on one instance is obeyed by the other within 1 s; a change racing another
//! instance's never revives a revoked version; `max_operations` holds across instances; timed
//! rotations run on one instance at a time. At scale, with three instances (issue 21): every
//! single-use item (one-time token, challenge, paid purchase, device nonce) presented four
//! times at once over the instances is accepted once; seals for one sender get distinct
//! counters; rotations and revocations are obeyed by the others within 1 s in 100 of 100
//! trials; 100 keys on a 2 s period get exactly their versions, one token object (or pair) each
//! and nothing else, and the scheduler lease moves when its holder stops; `max_operations`
//! holds for ECDSA keys and batch signs. `TILLKEY_FULL_CLUSTER=1` runs the issue's full sizes.

mod common;

use common::postgres::{env_on, Postgres};

/// One cluster test at a time: each runs two or three daemons and PostgreSQL, and several
/// measure time bounds (a change obeyed within 1 s, a lease moved within its term) that a
/// 2-core machine running a dozen clusters at once cannot honour.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
use common::*;
use serde_json::json;

#[tokio::test]
async fn two_instances_write_one_audit_chain_that_verifies() {
    let _one = ONE_CLUSTER.lock().await;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/9/mac", "hmac-sha256").await;
    create(&a, "stores/9/ec", "ecdsa-p256").await;
    let b = env.start();
    // Both instances answer at the same time, each request with its receipt.
    let mut tasks = Vec::new();
    for (d, key) in [
        (&a, "stores/9/ec"),
        (&b, "stores/9/ec"),
        (&a, "stores/9/mac"),
        (&b, "stores/9/mac"),
    ] {
        let client = d.client("service");
        let path = format!("/v1/keys/{key}:sign");
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.expect("connect");
            let mut ok = 0;
            for i in 0..100 {
                let (s, v) = post(
                    &mut c,
                    &path,
                    json!({"message": b64(format!("m{i}").as_bytes())}),
                )
                .await;
                assert_eq!(s, 200, "{v}");
                ok += 1;
            }
            ok
        }));
    }
    let mut signed = 0;
    for t in tasks {
        signed += t.await.expect("client");
    }
    assert_eq!(signed, 400);
    assert!(a.stop().success());
    assert!(b.stop().success());
    // Every request of both instances is one entry of one chain: no sequence taken twice, none
    // skipped, and `audit verify` walks it end to end.
    let rows: u64 = pg
        .query("SELECT count(*) FROM audit")
        .parse()
        .expect("count");
    assert!(rows >= 402, "{rows} audit rows for 402 requests");
    assert_eq!(pg.query("SELECT max(seq) FROM audit"), rows.to_string());
    assert_eq!(pg.query("SELECT seq FROM audit_head"), rows.to_string());
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit trail intact"), "{out}");
}

/// B rotates a key right after A revoked it, before or after B has heard of the revocation:
/// either B's copy was stale and the database refuses the change (409, and B reads the key
/// again), or B already knew; in both cases the revoked version stays revoked and B never signs
/// with it. (The refusal itself is tested deterministically on two registries in
/// `tests/postgres.rs`.)
#[tokio::test]
async fn a_rotation_racing_a_revocation_never_revives_the_revoked_version() {
    let _one = ONE_CLUSTER.lock().await;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/9/mac", "hmac-sha256").await;
    let b = env.start();
    let (mut a_officer, mut b_officer) = (a.conn("officer").await, b.conn("officer").await);
    let (s, k) = post(
        &mut a_officer,
        "/v1/keys/stores/9/mac:revoke",
        json!({"reason": "leaked"}),
    )
    .await;
    assert_eq!(s, 200, "{k}");
    let rotate = json!({"reason": "replace the leaked key"});
    let mut first = post(
        &mut b_officer,
        "/v1/keys/stores/9/mac:rotate",
        rotate.clone(),
    )
    .await;
    if first.0 == 409 {
        assert_error(&first, 409, "failed_precondition");
        first = post(&mut b_officer, "/v1/keys/stores/9/mac:rotate", rotate).await;
    }
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(
        pg.query("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM key_versions WHERE name = 'stores/9/mac'"),
        "1:revoked,2:active"
    );
    let mut b_svc = b.conn("service").await;
    let (s, v) = post(
        &mut b_svc,
        "/v1/keys/stores/9/mac:sign",
        json!({"message": b64(b"pay")}),
    )
    .await;
    assert_eq!((s, v["key_version"].clone()), (200, json!(2)), "{v}");
}

/// A key made on A is usable on B, and a revocation on A is obeyed by B, each within 1 s (the
/// bound an instance serves keys for before it must have caught up), in every trial.
#[tokio::test]
async fn changes_on_one_instance_reach_the_other_within_a_second() {
    let _one = ONE_CLUSTER.lock().await;
    use std::time::{Duration, Instant};

    let pg = Postgres::start();
    let env = env_on(&pg);
    let (a, b) = (env.start(), env.start());
    let (mut a_officer, mut b_svc) = (a.conn("officer").await, b.conn("service").await);
    let bound = Duration::from_secs(1);
    for trial in 0..20 {
        let name = format!("stores/9/pos/{trial}/mac");
        let sign = format!("/v1/keys/{name}:sign");
        let (s, k) = post(
            &mut a_officer,
            "/v1/keys",
            json!({"name": name, "type": "hmac-sha256"}),
        )
        .await;
        assert_eq!(s, 201, "{k}");
        let made = Instant::now();
        loop {
            let (s, v) = post(&mut b_svc, &sign, json!({"message": b64(b"pay")})).await;
            if s == 200 {
                break;
            }
            assert_error(&(s, v), 404, "not_found");
            assert!(
                made.elapsed() < bound,
                "trial {trial}: B did not know the new key after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (s, k) = post(
            &mut a_officer,
            &format!("/v1/keys/{name}:revoke"),
            json!({"reason": "leaked"}),
        )
        .await;
        assert_eq!(s, 200, "{k}");
        let revoked = Instant::now();
        loop {
            let (s, v) = post(&mut b_svc, &sign, json!({"message": b64(b"pay")})).await;
            if s != 200 {
                assert_error(&(s, v), 422, "unsupported_operation");
                break;
            }
            assert!(
                revoked.elapsed() < bound,
                "trial {trial}: B still signed with the revoked version after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(b.admin_get("/readyz").0, 200);
}

/// An instance cut off from the database stops serving keys and says why on /readyz once it
/// has not caught up for over a second, and serves again by itself when the database is back.
#[tokio::test]
async fn an_instance_cut_off_from_the_database_stops_serving_and_recovers_by_itself() {
    let _one = ONE_CLUSTER.lock().await;
    use std::time::{Duration, Instant};

    let pg = Postgres::start();
    let env = env_on(&pg);
    let d = env.start();
    create(&d, "stores/9/mac", "hmac-sha256").await;
    let sign = |c| async move {
        let mut c: tillkey::client::Connection = c;
        let r = post(
            &mut c,
            "/v1/keys/stores/9/mac:sign",
            json!({"message": b64(b"pay")}),
        )
        .await;
        (c, r)
    };
    let (svc, (s, _)) = sign(d.conn("service").await).await;
    assert_eq!(s, 200);

    pg.stop();
    let cut = Instant::now();
    d.wait_for(
        "readyz to name the registry",
        Duration::from_secs(10),
        || {
            let (s, body) = d.admin_get("/readyz");
            s == 503 && body.contains("registry")
        },
    );
    let named = cut.elapsed();
    // Refused at most 1 s after the last poll that succeeded, which was before the cut (the
    // margin is for a loaded machine's scheduling, not for the daemon).
    assert!(named <= Duration::from_secs(2), "{named:?}");
    let (mut svc, r) = sign(svc).await;
    assert_error(&r, 503, "unavailable");
    eprintln!(
        "readyz named the registry after {} ms; a request was refused after {} ms",
        named.as_millis(),
        cut.elapsed().as_millis()
    );

    pg.start_again();
    let back = Instant::now();
    d.wait_for("the daemon to serve again", Duration::from_secs(30), || {
        d.admin_get("/readyz").0 == 200
    });
    let mut served = false;
    for _ in 0..50 {
        let r = post(
            &mut svc,
            "/v1/keys/stores/9/mac:sign",
            json!({"message": b64(b"pay")}),
        )
        .await;
        if r.0 == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        svc = d.conn("service").await;
    }
    assert!(
        served,
        "the daemon did not sign again after the database came back"
    );
    eprintln!(
        "serving again {} ms after the database returned",
        back.elapsed().as_millis()
    );
}

/// Timed rotations are one instance's work: with two instances, only the lease holder rotates;
/// when it stops, the other takes over within the lease's term; and the keys end with one new
/// version per period, never two.
#[tokio::test]
async fn one_instance_runs_the_scheduler_and_another_takes_over() {
    let _one = ONE_CLUSTER.lock().await;
    use std::time::Duration;

    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    let mut officer = a.conn("officer").await;
    for i in 0..3 {
        let (s, k) = post(
            &mut officer,
            "/v1/keys",
            json!({"name": format!("stores/9/pos/{i}/mac"), "type": "hmac-sha256", "rotation_period": "2s"}),
        )
        .await;
        assert_eq!(s, 201, "{k}");
    }
    drop(officer);
    let b = env.start();
    let rotations = |d: &Daemon| {
        d.logs()
            .iter()
            .filter(|l| l.contains("rotated: rotation_period elapsed"))
            .count()
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (by_a, by_b) = (rotations(&a), rotations(&b));
    assert!(
        (by_a == 0) != (by_b == 0),
        "both or neither rotated: A {by_a}, B {by_b}"
    );
    // No version number twice, no gap: each rotation the one holder made is in the database.
    // (The holder keeps rotating: one may commit between reading the logs and the database,
    // and is logged just after its commit.)
    let versions: u64 = pg
        .query("SELECT count(*) FROM key_versions WHERE name LIKE 'stores/9/pos/%'")
        .parse()
        .expect("count");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged_after = rotations(&a) + rotations(&b);
    assert!(
        (3 + by_a + by_b..=3 + logged_after).contains(&(versions as usize)),
        "{versions} versions; rotations logged {} before, {logged_after} after",
        by_a + by_b
    );

    // The lease row names the instance that rotated (holders are host/pid/random).
    let (holder, other) = if by_a > 0 { (a, b) } else { (b, a) };
    let held_by = |pid: u32| {
        pg.query("SELECT holder FROM leases WHERE name = 'scheduler'")
            .split('/')
            .nth(1)
            .map(str::to_owned)
            == Some(pid.to_string())
    };
    assert!(
        held_by(holder.pid()),
        "{}",
        pg.query("SELECT holder FROM leases")
    );

    // The holder stops; the other takes the lease within its 5 s term and rotates.
    assert!(holder.stop().success());
    let before = rotations(&other);
    other.wait_for(
        "the other instance to rotate",
        Duration::from_secs(10),
        || rotations(&other) > before,
    );
    assert!(
        held_by(other.pid()),
        "{}",
        pg.query("SELECT holder FROM leases")
    );
}

/// Signs that fail because this instance's SoftHSM does not see yet a key version another
/// instance just made (500; the daemon logs "holds no object", see
/// `src/backend/pkcs11/missing.rs`: separate processes on one SoftHSM token directory see new
/// objects late, on a loaded host sometimes for seconds) are sent again after a pause, up to
/// ten times, and counted in `misses`, which the caller prints and accounts for: the failed
/// attempt had already counted its use. Any other answer is returned as it came.
async fn sign_past_late_objects(
    c: &mut tillkey::client::Connection,
    path: &str,
    body: serde_json::Value,
    misses: &std::sync::atomic::AtomicU64,
    uses: u64,
) -> (u16, serde_json::Value) {
    for _ in 0..10 {
        let r = post(c, path, body.clone()).await;
        if r.0 != 500 {
            return r;
        }
        misses.fetch_add(uses, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    post(c, path, body).await
}

/// `max_operations` is one cap for the whole cluster: three instances signing with one capped
/// HMAC key as fast as they can never use a version more than the cap allows (counted from the
/// answers themselves), every request is served (the cap rotates the key, it never refuses),
/// and the database's counts agree.
#[tokio::test]
async fn max_operations_holds_across_instances_and_never_refuses() {
    let _one = ONE_CLUSTER.lock().await;
    cap_holds_across_three_instances("stores/9/capped", "hmac-sha256", 120, &[1]).await;
}

/// Six clients over three instances send `requests` signs each with the key `name` (type
/// `key_type`, created with a cap of 150), a request of `sizes[(i + instance + client) % len]`
/// messages (a batch when more than one: several operations at once, all from one version,
/// rotating first when the active version cannot take them all). Every request is answered
/// 200; no version does more than the cap, by the answers and by the database's counts once
/// the instances have stopped; and every lease is spent or given back.
async fn cap_holds_across_three_instances(
    name: &'static str,
    key_type: &str,
    requests: usize,
    sizes: &'static [usize],
) {
    const CAP: u64 = 150;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let first = env.start();
    let (s, k) = post(
        &mut first.conn("officer").await,
        "/v1/keys",
        json!({"name": name, "type": key_type, "max_operations": CAP}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let daemons = [first, env.start(), env.start()];
    let misses = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let path = format!("/v1/keys/{name}:sign");
    let mut tasks = Vec::new();
    for (n, d) in daemons.iter().enumerate() {
        for m in 0..2 {
            let (client, misses, path) = (d.client("service"), misses.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.expect("connect");
                let mut used = Vec::new();
                for i in 0..requests {
                    let size = sizes[(i + n + m) % sizes.len()];
                    let message =
                        |j: usize| json!({"message": b64(format!("m{i}.{j}").as_bytes())});
                    let body = if size == 1 {
                        message(0)
                    } else {
                        json!({"batch": (0..size).map(message).collect::<Vec<_>>()})
                    };
                    let (s, v) =
                        sign_past_late_objects(&mut c, &path, body, &misses, size as u64).await;
                    assert_eq!(s, 200, "{v}");
                    let version = v["key_version"].as_u64().expect("key_version");
                    if size > 1 {
                        let items = v["batch"].as_array().expect("batch");
                        assert_eq!(items.len(), size, "{v}");
                        for item in items {
                            assert_eq!(item["key_version"], version, "one version per batch: {v}");
                            assert!(item["signature"].is_string(), "{v}");
                        }
                    }
                    used.push((version, size as u64));
                }
                used
            }));
        }
    }
    let mut per_version = std::collections::BTreeMap::<u64, u64>::new();
    let mut total = 0;
    for t in tasks {
        let Ok(used) = t.await else {
            for d in &daemons {
                for line in d.logs().iter().filter(|l| l.contains("ERROR")) {
                    eprintln!("tillkeyd on {}: {line}", d.api);
                }
            }
            panic!("a client failed (the daemons' errors are above)");
        };
        for (v, n) in used {
            *per_version.entry(v).or_default() += n;
            total += n;
        }
    }
    let per_client = |n: usize, m: usize| -> u64 {
        (0..requests)
            .map(|i| sizes[(i + n + m) % sizes.len()] as u64)
            .sum()
    };
    let expected: u64 = (0..3)
        .flat_map(|n| (0..2).map(move |m| (n, m)))
        .map(|(n, m)| per_client(n, m))
        .sum();
    assert_eq!(total, expected);
    for (v, n) in &per_version {
        assert!(
            *n <= CAP,
            "version {v} did {n} operations, cap {CAP}: {per_version:?}"
        );
    }
    let misses = misses.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{total} operations; per version: {per_version:?}");
    eprintln!("uses sent again after SoftHSM had not yet shown a new object: {misses}");
    for d in daemons {
        assert!(d.stop().success());
    }
    // Stopped cleanly: every count is flushed, and every unspent lease given back. A use sent
    // again was counted by its failed attempt too.
    let rows = pg.query(&format!(
        "SELECT string_agg(version || ':' || operations || ':' || leased, ',' ORDER BY version) \
         FROM key_versions WHERE name = '{name}'"
    ));
    for row in rows.split(',') {
        let f: Vec<u64> = row.split(':').map(|x| x.parse().expect("number")).collect();
        let answered = per_version.get(&f[0]).copied().unwrap_or(0);
        assert!(
            (answered..=answered + misses).contains(&f[1]) && f[1] <= CAP,
            "answers ({answered}, {misses} failed uses) and database disagree for version {}: {rows}",
            f[0]
        );
        assert_eq!(
            f[1], f[2],
            "version {}: leases not all spent or returned: {rows}",
            f[0]
        );
    }
}

/// The gift-code check throttle (a burst of 20 per client identity, then 5 a second) is one
/// bucket for the cluster, kept in the database: a client spreading checks over two instances
/// gets no more than from one. (Each instance with its own bucket would allow twice the burst.)
#[tokio::test]
async fn the_gift_code_throttle_is_shared_by_instances() {
    let _one = ONE_CLUSTER.lock().await;
    use std::time::Instant;

    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/9/giftcodes/pepper", "hmac-sha256").await;
    let b = env.start();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for d in [&a, &b] {
        let client = d.client("service");
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.expect("connect");
            let mut allowed = 0;
            for _ in 0..30 {
                let r = post(
                    &mut c,
                    "/v1/giftcodes:check",
                    json!({"key": "stores/9/giftcodes/pepper", "code": "AAAA-BBBB-CCCC-DDDD"}),
                )
                .await;
                match r.0 {
                    200 => allowed += 1,
                    _ => assert_error(&r, 429, "rate_limited"),
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("client");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bound = 20 + (5.0 * elapsed).ceil() as u32;
    assert!(
        allowed <= bound,
        "{allowed} of 60 checks allowed in {elapsed:.2} s; one shared bucket allows {bound}"
    );
    assert!(allowed >= 20, "{allowed}");
}

/// The issue's full sizes (10,000 single-use items; 100 keys rotating for 60 s) with
/// `TILLKEY_FULL_CLUSTER=1`; smaller ones by default, so the suite stays quick on a small CI
/// machine.
fn full_size() -> bool {
    std::env::var("TILLKEY_FULL_CLUSTER").is_ok_and(|v| v == "1")
}

/// The four kinds of single-use item the API hands out, and how each is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SingleUse {
    /// `customer-otp:issue`, consumed by `customer-otp:redeem`.
    Otp,
    /// `POST /v1/challenges`, answered once at `challenges/{id}:verify`.
    Challenge,
    /// A purchase paid with `pos-paid:issue`, its token consumed by `pos-paid:verify`.
    Paid,
    /// A device-signed customer token, its nonce (`cti`) spent by `customer-signed:verify`.
    DeviceNonce,
}

const OTP_KEY: &str = "stores/1212/loyalty/otp";
const CARD_KEY: &str = "stores/1212/cards/card-7";
const CARD_SECRET: [u8; 32] = [0x44; 32];
const DEVICE_REALM: &str = "stores/1212/devices";

/// A customer's phone with an ES256 key, made here with ring (the daemon only sees its public
/// key): signs `TKD1:` tokens with a fresh 16-byte nonce each.
struct Phone {
    key: ring::signature::EcdsaKeyPair,
    public_key_pem: String,
    rng: ring::rand::SystemRandom,
}

impl Phone {
    fn new() -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pair.serialize_der(),
            &rng,
        )
        .expect("pkcs8");
        Self {
            key,
            public_key_pem: pair.public_key_pem(),
            rng,
        }
    }

    fn token(&self, device_id: &str, subject: &str) -> String {
        use coset::cbor::Value;
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce).expect("random");
        let now = tillkey::service::unix_now();
        let claims = Value::Map(vec![
            (Value::from(2), Value::from(subject)),
            (Value::from(4), Value::from(now + 60)),
            (Value::from(6), Value::from(now)),
            (Value::from(7), Value::Bytes(nonce.to_vec())),
        ]);
        let mut payload = Vec::new();
        coset::cbor::ser::into_writer(&claims, &mut payload).expect("cbor");
        let cose = tillkey::retail::cwt::seal_sign1(payload, device_id, |tbs| {
            Ok(self
                .key
                .sign(&self.rng, tbs)
                .expect("sign")
                .as_ref()
                .to_vec())
        })
        .expect("COSE_Sign1");
        format!("TKD1:{}", base45::encode(cose))
    }
}

/// One issued item: where to present it, and what to send.
struct Issued {
    kind: SingleUse,
    path: String,
    body: serde_json::Value,
}

/// Issue item `i` of `kind`, spread over the instances (`conns` are A, B, C).
async fn issue_single_use(
    kind: SingleUse,
    i: usize,
    conns: &mut [&mut tillkey::client::Connection],
    phone: &Phone,
    device_id: &str,
) -> Issued {
    let n = conns.len();
    let on = i % n;
    match kind {
        SingleUse::Otp => {
            let (s, t) = post(
                &mut *conns[on],
                "/v1/tokens/customer-otp:issue",
                json!({"key": OTP_KEY, "subject": format!("customer-{i}"), "ttl": 300}),
            )
            .await;
            assert_eq!(s, 200, "{t}");
            Issued {
                kind,
                path: "/v1/tokens/customer-otp:redeem".into(),
                body: json!({"key": OTP_KEY, "token": t["token"]}),
            }
        }
        SingleUse::Challenge => {
            let (s, c) = post(
                &mut *conns[on],
                "/v1/challenges",
                json!({"key": CARD_KEY, "subject": "card-7", "ttl": 60}),
            )
            .await;
            assert_eq!(s, 201, "{c}");
            let challenge = unb64(c["challenge"].as_str().expect("challenge"));
            let msg = tillkey::retail::challenge::challenge_message(&challenge, "card-7");
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &CARD_SECRET);
            Issued {
                kind,
                path: format!("/v1/challenges/{}:verify", c["id"].as_str().expect("id")),
                body: json!({"response": b64(ring::hmac::sign(&key, &msg).as_ref())}),
            }
        }
        SingleUse::Paid => {
            // The request on one instance, the payment on the next.
            let (s, req) = post(
                &mut *conns[on],
                "/v1/tokens/pos-request:issue",
                json!({"store_id": "1212", "pos_id": "0001", "purchase_id": format!("P-{i}"),
                       "amount": 100 + i, "currency": "EUR"}),
            )
            .await;
            assert_eq!(s, 200, "{req}");
            let (s, paid) = post(
                &mut *conns[(on + 1) % n],
                "/v1/tokens/pos-paid:issue",
                json!({"request_token": req["token"], "payment_ref": format!("PSP-{i}")}),
            )
            .await;
            assert_eq!(s, 200, "{paid}");
            Issued {
                kind,
                path: "/v1/tokens/pos-paid:verify".into(),
                body: json!({"token": paid["token"]}),
            }
        }
        SingleUse::DeviceNonce => Issued {
            kind,
            path: "/v1/tokens/customer-signed:verify".into(),
            body: json!({"realm": DEVICE_REALM, "token": phone.token(device_id, "alice")}),
        },
    }
}

/// Present an item once: whether it was accepted. A refusal must be the kind's answer for a
/// used item (never an error, which would hide a lost acceptance).
async fn attempt_single_use(c: &mut tillkey::client::Connection, item: &Issued) -> bool {
    let (s, v) = post(c, &item.path, item.body.clone()).await;
    assert_eq!(s, 200, "{:?}: {v}", item.kind);
    let (accepted, refusal) = match item.kind {
        SingleUse::Otp => (
            v["redeemed"] == true,
            v == json!({"redeemed": false, "reason": "invalid"}),
        ),
        SingleUse::Challenge => (
            v["valid"] == true,
            v["valid"] == false
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("already used")),
        ),
        SingleUse::Paid | SingleUse::DeviceNonce => (
            v["valid"] == true,
            v["valid"] == false
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("replayed")),
        ),
    };
    assert!(
        accepted || refusal,
        "{:?}: neither accepted nor refused as used: {v}",
        item.kind
    );
    accepted
}

/// Single-use items across three instances: every item is presented four times at once, to
/// A, B, C and A again, and exactly one of the four is accepted, for each of the four kinds
/// (one-time customer tokens, challenges, paid purchases, device nonces), each issued on one
/// instance and used on all. 10,000 items (2,500 of each) with `TILLKEY_FULL_CLUSTER=1`.
#[tokio::test]
async fn single_use_items_are_accepted_exactly_once_across_three_instances() {
    let _one = ONE_CLUSTER.lock().await;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Instant;

    const KINDS: [SingleUse; 4] = [
        SingleUse::Otp,
        SingleUse::Challenge,
        SingleUse::Paid,
        SingleUse::DeviceNonce,
    ];
    let per_kind: usize = if full_size() { 2_500 } else { 250 };
    const WORKERS: usize = 12;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, OTP_KEY, "hmac-sha256").await;
    import_known(&a, CARD_KEY, "hmac-sha256", &CARD_SECRET).await;
    create(&a, "stores/1212/pos/0001/qr-request", "hmac-sha256").await;
    create(&a, "stores/1212/pos/0001/qr-paid", "hmac-sha256").await;
    let phone = Arc::new(Phone::new());
    let (s, reg) = post(
        &mut a.conn("officer").await,
        "/v1/devices",
        json!({"realm": DEVICE_REALM, "subject": "alice", "public_key_pem": phone.public_key_pem}),
    )
    .await;
    assert_eq!(s, 201, "{reg}");
    let device_id: Arc<str> = reg["device_id"].as_str().expect("device_id").into();
    let daemons = [a, env.start(), env.start()];

    let started = Instant::now();
    let total = per_kind * KINDS.len();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let clients: Vec<_> = [0, 1, 2, 0]
            .iter()
            .map(|&d| daemons[d].client("service"))
            .collect();
        let (phone, device_id) = (phone.clone(), device_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut conns = Vec::new();
            for c in clients {
                conns.push(c.connect().await.expect("connect"));
            }
            let [a, b, c, a2] = &mut conns[..] else {
                unreachable!()
            };
            let mut accepted = Vec::new();
            for i in (w..total).step_by(WORKERS) {
                let kind = KINDS[i % KINDS.len()];
                let item = issue_single_use(
                    kind,
                    i,
                    &mut [&mut *a, &mut *b, &mut *c],
                    &phone,
                    &device_id,
                )
                .await;
                let tries = tokio::join!(
                    attempt_single_use(a, &item),
                    attempt_single_use(b, &item),
                    attempt_single_use(c, &item),
                    attempt_single_use(a2, &item),
                );
                let n = [tries.0, tries.1, tries.2, tries.3]
                    .iter()
                    .filter(|t| **t)
                    .count();
                accepted.push((kind, i, n));
            }
            accepted
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(
            t.await
                .expect("a client failed (the daemons' errors are above)"),
        );
    }
    let elapsed = started.elapsed();
    assert_eq!(results.len(), total);
    let mut wrong: BTreeMap<SingleUse, Vec<(usize, usize)>> = BTreeMap::new();
    for (kind, i, n) in &results {
        if *n != 1 {
            wrong.entry(*kind).or_default().push((*i, *n));
        }
    }
    let summary: Vec<String> = wrong
        .iter()
        .map(|(k, v)| {
            format!(
                "{k:?}: {} of {per_kind} items accepted other than once (item, acceptances) e.g. {:?}",
                v.len(),
                &v[..v.len().min(5)]
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{}", summary.join("; "));
    eprintln!(
        "{total} items ({per_kind} of each kind), 4 attempts each over 3 instances: {} ms",
        elapsed.as_millis()
    );
    // The database agrees: every item is spent once.
    for (table, column) in [
        ("otps", "redeemed_at"),
        ("challenges", "used_at"),
        ("purchases", "consumed_at"),
    ] {
        assert_eq!(
            pg.query(&format!(
                "SELECT count(*) FROM {table} WHERE {column} IS NOT NULL"
            )),
            per_kind.to_string(),
            "{table}"
        );
    }
    assert_eq!(
        pg.query("SELECT count(*) FROM nonces"),
        per_kind.to_string()
    );
}

/// Sealed-message counters across three instances: 4,000 seals for one sender from 8 clients
/// spread over A, B and C get 4,000 distinct counters, 1 to 4,000.
#[tokio::test]
async fn seals_for_one_sender_across_three_instances_get_distinct_counters() {
    let _one = ONE_CLUSTER.lock().await;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/1212/atm/dispense", "aes256-gcm").await;
    let (b, c) = (env.start(), env.start());
    common::postgres::assert_seals_get_distinct_counters(&pg, &[&a, &b, &c]).await;
}

/// Sign on `c` until `done` holds for the answer; every answer before must satisfy `before`.
/// Fails if an answer without the change comes to a request sent `bound` or more after
/// `since` (the change was not obeyed within the bound); returns when the change was seen.
async fn sign_until(
    c: &mut tillkey::client::Connection,
    path: &str,
    since: std::time::Instant,
    what: String,
    done: impl Fn(&(u16, serde_json::Value)) -> bool,
    before: impl Fn(&(u16, serde_json::Value)) -> bool,
) -> std::time::Duration {
    use std::time::Duration;
    let bound = Duration::from_secs(1);
    loop {
        let sent = since.elapsed();
        let r = post(c, path, json!({"message": b64(b"pay")})).await;
        if done(&r) {
            return since.elapsed();
        }
        assert!(before(&r), "{what}: unexpected answer {} {}", r.0, r.1);
        assert!(
            sent < bound,
            "{what}: still answered {} {} to a request sent {} ms after the change",
            r.0,
            r.1,
            sent.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Changes made on A reach B and C within 1 s, in every one of 100 trials: a new key signs on
/// both, a rotation makes both sign with the new version (and never the old one again), a
/// revocation makes both refuse. HMAC and ECDSA keys alternate.
#[tokio::test]
async fn rotation_and_revocation_on_one_instance_are_obeyed_by_two_others_within_a_second() {
    let _one = ONE_CLUSTER.lock().await;
    use std::time::{Duration, Instant};

    const TRIALS: usize = 100;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let (a, b, c) = (env.start(), env.start(), env.start());
    let (mut a_officer, mut a_svc) = (a.conn("officer").await, a.conn("service").await);
    let (mut b_svc, mut c_svc) = (b.conn("service").await, c.conn("service").await);
    let version = |r: &(u16, serde_json::Value), v: u64| r.0 == 200 && r.1["key_version"] == v;
    let refused = |r: &(u16, serde_json::Value)| {
        r.0 == 422 && r.1["error"]["code"] == "unsupported_operation"
    };
    let not_found =
        |r: &(u16, serde_json::Value)| r.0 == 404 && r.1["error"]["code"] == "not_found";
    let mut slowest = [Duration::ZERO; 3];
    let started = Instant::now();
    for trial in 0..TRIALS {
        let name = format!("stores/9/pos/{trial}/key");
        let key_type = if trial % 2 == 0 {
            "hmac-sha256"
        } else {
            "ecdsa-p256"
        };
        let sign = format!("/v1/keys/{name}:sign");
        let (s, k) = post(
            &mut a_officer,
            "/v1/keys",
            json!({"name": name, "type": key_type}),
        )
        .await;
        assert_eq!(s, 201, "{k}");
        let made = Instant::now();
        let took = tokio::join!(
            sign_until(
                &mut b_svc,
                &sign,
                made,
                format!("trial {trial}: B, new key"),
                |r| version(r, 1),
                not_found
            ),
            sign_until(
                &mut c_svc,
                &sign,
                made,
                format!("trial {trial}: C, new key"),
                |r| version(r, 1),
                not_found
            ),
        );
        slowest[0] = slowest[0].max(took.0).max(took.1);

        let (s, k) = post(
            &mut a_officer,
            &format!("/v1/keys/{name}:rotate"),
            json!({"reason": "scheduled"}),
        )
        .await;
        assert_eq!(s, 200, "{k}");
        let rotated = Instant::now();
        // The instance that made the change obeys it at once.
        let r = post(&mut a_svc, &sign, json!({"message": b64(b"pay")})).await;
        assert!(
            version(&r, 2),
            "trial {trial}: A signed after its own rotation with {}",
            r.1
        );
        let took = tokio::join!(
            sign_until(
                &mut b_svc,
                &sign,
                rotated,
                format!("trial {trial}: B, rotation"),
                |r| version(r, 2),
                |r| version(r, 1)
            ),
            sign_until(
                &mut c_svc,
                &sign,
                rotated,
                format!("trial {trial}: C, rotation"),
                |r| version(r, 2),
                |r| version(r, 1)
            ),
        );
        slowest[1] = slowest[1].max(took.0).max(took.1);

        let (s, k) = post(
            &mut a_officer,
            &format!("/v1/keys/{name}:revoke"),
            json!({"reason": "leaked"}),
        )
        .await;
        assert_eq!(s, 200, "{k}");
        let revoked = Instant::now();
        let r = post(&mut a_svc, &sign, json!({"message": b64(b"pay")})).await;
        assert!(
            refused(&r),
            "trial {trial}: A signed after its own revocation with {}",
            r.1
        );
        // Until they refuse, B and C may only still sign with version 2, never 1 again.
        let took = tokio::join!(
            sign_until(
                &mut b_svc,
                &sign,
                revoked,
                format!("trial {trial}: B, revocation"),
                refused,
                |r| version(r, 2)
            ),
            sign_until(
                &mut c_svc,
                &sign,
                revoked,
                format!("trial {trial}: C, revocation"),
                refused,
                |r| version(r, 2)
            ),
        );
        slowest[2] = slowest[2].max(took.0).max(took.1);
    }
    eprintln!(
        "{TRIALS} trials in {} ms; slowest to be obeyed by B or C: new key {} ms, rotation {} ms, revocation {} ms",
        started.elapsed().as_millis(),
        slowest[0].as_millis(),
        slowest[1].as_millis(),
        slowest[2].as_millis()
    );
    for d in [&a, &b, &c] {
        assert_eq!(d.admin_get("/readyz").0, 200);
    }
}

/// The token's objects, by (class, label, CKA_ID in hex), as `pkcs11-tool --list-objects`
/// shows them.
fn token_objects(env: &Env) -> std::collections::BTreeSet<(String, String, String)> {
    let (ok, listing) = pkcs11_tool(env, &["--list-objects"]);
    assert!(ok, "{listing}");
    let mut objects = std::collections::BTreeSet::new();
    let mut current: Option<(String, String, String)> = None;
    for line in listing.lines() {
        if line.contains("Object;") {
            objects.extend(current.take());
            let class = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            current = Some((class, String::new(), String::new()));
        } else if let Some((_, label, id)) = &mut current {
            let line = line.trim();
            if let Some(l) = line.strip_prefix("label:") {
                *label = l.trim().to_owned();
            } else if let Some(i) = line.strip_prefix("ID:") {
                *id = i.trim().to_lowercase();
            }
        }
    }
    objects.extend(current);
    objects
}

/// Timed rotations at scale: 100 keys (HMAC and ECDSA alternating) on a 2 s period with three
/// instances for 60 s. Only the lease holder rotates; every key's versions are 1..n without a
/// gap, each lived at least one period and at most two (never rotated twice, never skipped;
/// plus 2 s for a loaded machine), no key has more rotations than whole periods elapsed and
/// none is more than a period (plus those 2 s) overdue at the end. (A key rotates once its active version is a period old, checked every
/// second on whole seconds, so a 2 s period gives versions of 2 to 3 s: n is not elapsed/2.)
/// The token holds exactly one object (a pair for ECDSA) per version the registry keeps,
/// under the registry's object id, and nothing else. When the holder stops, another instance holds the lease within 5 s and every key
/// rotates again. (30 keys for 20 s unless `TILLKEY_FULL_CLUSTER=1`.)
#[tokio::test]
async fn timed_rotations_of_many_keys_on_three_instances_make_exactly_the_expected_versions() {
    let _one = ONE_CLUSTER.lock().await;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};

    const PERIOD: i64 = 2;
    // How much later than one period past due a loaded machine may run a pass: with other
    // builds on a 2-core host, single database commits were seen taking over 1 s.
    const LATE: i64 = 2;
    let (keys, run) = if full_size() { (100, 60) } else { (30, 20) };
    let pg = Postgres::start();
    let env = env_on(&pg);
    let first = env.start();
    let mut officer = first.conn("officer").await;
    for i in 0..keys {
        let key_type = if i % 2 == 0 {
            "hmac-sha256"
        } else {
            "ecdsa-p256"
        };
        let (s, k) = post(
            &mut officer,
            "/v1/keys",
            json!({"name": format!("stores/9/rot/{i}"), "type": key_type, "rotation_period": "2s"}),
        )
        .await;
        assert_eq!(s, 201, "{k}");
    }
    drop(officer);
    let mut daemons = vec![first, env.start(), env.start()];
    tokio::time::sleep(Duration::from_secs(run)).await;

    let rotations = |d: &Daemon| {
        d.logs()
            .iter()
            .filter(|l| l.contains("rotated: rotation_period elapsed"))
            .count()
    };
    let by: Vec<usize> = daemons.iter().map(rotations).collect();
    assert_eq!(
        by.iter().filter(|n| **n > 0).count(),
        1,
        "rotations logged per instance: {by:?}"
    );
    // Every key's versions, with when each was made.
    let versions = |pg: &Postgres| {
        let mut per_key: BTreeMap<String, Vec<(u32, i64)>> = BTreeMap::new();
        let rows = pg.query(
            "SELECT name, version, created_at FROM key_versions \
             WHERE name LIKE 'stores/9/rot/%' ORDER BY name, version",
        );
        for row in rows.lines() {
            let f: Vec<&str> = row.split('|').collect();
            per_key.entry(f[0].to_owned()).or_default().push((
                f[1].parse().expect("version"),
                f[2].parse().expect("created_at"),
            ));
        }
        per_key
    };
    let now = tillkey::service::unix_now();
    let snapshot = versions(&pg);
    assert_eq!(snapshot.len(), keys);
    let mut counts = BTreeMap::<usize, usize>::new();
    let mut odd = Vec::new();
    for (name, vs) in &snapshot {
        let numbers: Vec<u32> = vs.iter().map(|v| v.0).collect();
        let want: Vec<u32> = (1..=vs.len() as u32).collect();
        assert_eq!(numbers, want, "{name}: versions with a gap or twice");
        for pair in vs.windows(2) {
            let lived = pair[1].1 - pair[0].1;
            if !(PERIOD..=2 * PERIOD + LATE).contains(&lived) {
                odd.push(format!(
                    "{name}#{} lived {lived} s (from {})",
                    pair[0].0, pair[0].1
                ));
            }
        }
        // Never more rotations than whole periods elapsed, and none missed at the end either:
        // the active version is at most one period overdue.
        let elapsed = now - vs[0].1;
        let rotated = vs.len() as i64 - 1;
        let last = vs[vs.len() - 1].1;
        assert!(
            rotated <= elapsed / PERIOD && now - last <= 2 * PERIOD + LATE,
            "{name}: {rotated} rotations in {elapsed} s on a {PERIOD} s period, the last {} s ago: {vs:?}",
            now - last
        );
        *counts.entry(vs.len()).or_default() += 1;
    }
    assert!(
        odd.is_empty(),
        "{} versions lived less than {PERIOD} s or more than {} s: {odd:?}",
        odd.len(),
        2 * PERIOD + LATE
    );
    eprintln!("after {run} s: keys by number of versions {counts:?}; rotations logged {by:?}");
    let lives: Vec<i64> = snapshot
        .values()
        .flat_map(|vs| vs.windows(2).map(|p| p[1].1 - p[0].1).collect::<Vec<_>>())
        .collect();
    eprintln!(
        "versions lived {:.2} s on average on a {PERIOD} s period; by seconds lived: {:?}",
        lives.iter().sum::<i64>() as f64 / lives.len() as f64,
        lives
            .iter()
            .fold(BTreeMap::<i64, usize>::new(), |mut m, l| {
                *m.entry(*l).or_default() += 1;
                m
            })
    );

    // The lease holder (holders are host/pid/random) stops; another takes over within the
    // lease's 5 s term, and every key rotates again.
    let holder_pid = || -> Option<u32> {
        pg.query("SELECT holder FROM leases WHERE name = 'scheduler'")
            .split('/')
            .nth(1)?
            .parse()
            .ok()
    };
    let pid = holder_pid().expect("a scheduler lease");
    let at = daemons
        .iter()
        .position(|d| d.pid() == pid)
        .expect("the lease holder is one of the instances");
    assert!(
        by[at] > 0,
        "the holder {pid} is not the instance that rotated: {by:?}"
    );
    assert!(daemons.remove(at).stop().success());
    let stopped = Instant::now();
    let others: Vec<u32> = daemons.iter().map(Daemon::pid).collect();
    while !holder_pid().is_some_and(|p| others.contains(&p)) {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "no other instance held the lease 5 s after the holder stopped: {}",
            pg.query("SELECT holder || ' ' || expires_at FROM leases")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handover = stopped.elapsed();
    let taken = tillkey::service::unix_now();
    let rotated_since = || -> usize {
        pg.query(&format!(
            "SELECT count(DISTINCT name) FROM key_versions \
             WHERE name LIKE 'stores/9/rot/%' AND created_at >= {taken}"
        ))
        .parse()
        .expect("count")
    };
    while rotated_since() < keys {
        assert!(
            stopped.elapsed() < handover + Duration::from_secs(3 * PERIOD as u64),
            "after the handover only {} of {keys} keys rotated again",
            rotated_since()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "lease moved {} ms after the holder stopped; every key rotated again {} ms after",
        handover.as_millis(),
        stopped.elapsed().as_millis()
    );
    for d in daemons {
        assert!(d.stop().success());
    }

    // Stopped: versions still without gaps, and the token holds exactly what the registry
    // keeps (the daemon's own audit and status-list keys aside).
    let after = versions(&pg);
    for (name, vs) in &after {
        let numbers: Vec<u32> = vs.iter().map(|v| v.0).collect();
        let want: Vec<u32> = (1..=vs.len() as u32).collect();
        assert_eq!(numbers, want, "{name}: versions with a gap or twice");
    }
    let mut expected = BTreeSet::new();
    let rows = pg.query(
        "SELECT v.name, v.version, v.object_ref, k.key_type FROM key_versions v \
         JOIN keys k ON k.name = v.name WHERE v.state <> 'destroyed'",
    );
    for row in rows.lines() {
        let f: Vec<&str> = row.split('|').collect();
        if f[0].starts_with("tillkey/") {
            continue;
        }
        let label = format!("tillkey:{}#{}", f[0], f[1]);
        let classes: &[&str] = if f[3] == "hmac-sha256" {
            &["Secret"]
        } else {
            &["Private", "Public"]
        };
        for class in classes {
            expected.insert((class.to_string(), label.clone(), f[2].to_lowercase()));
        }
    }
    let held: BTreeSet<_> = token_objects(&env)
        .into_iter()
        .filter(|(_, label, _)| !label.starts_with("tillkey:tillkey/"))
        .collect();
    let orphans: Vec<_> = held.difference(&expected).take(10).collect();
    let missing: Vec<_> = expected.difference(&held).take(10).collect();
    assert!(
        orphans.is_empty() && missing.is_empty(),
        "token and registry disagree ({} objects held, {} expected): not in the registry {orphans:?}; \
         not on the token {missing:?}",
        held.len(),
        expected.len()
    );
    eprintln!(
        "{} token objects, each a version the registry keeps",
        held.len()
    );
}

/// `max_operations` across instances for an ECDSA key signed one message at a time and in
/// batches: see [`cap_holds_across_three_instances`].
#[tokio::test]
async fn max_operations_holds_across_instances_for_ecdsa_and_batch_signs() {
    let _one = ONE_CLUSTER.lock().await;
    cap_holds_across_three_instances("stores/9/capped-ec", "ecdsa-p256", 60, &[1, 7, 1, 23, 40])
        .await;
}

/// Instances started at the same moment on an empty database: one makes the daemon's own keys
/// (the audit and status-list keys), the others wait for them instead of failing to start, and
/// all serve. The token holds one object for each such key: nobody made a second one.
#[tokio::test]
async fn instances_starting_together_on_an_empty_database_all_serve() {
    let _one = ONE_CLUSTER.lock().await;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let daemons: Vec<Daemon> = std::thread::scope(|s| {
        let starting: Vec<_> = (0..3).map(|_| s.spawn(|| env.start())).collect();
        starting
            .into_iter()
            .map(|t| t.join().expect("every instance starts"))
            .collect()
    });
    for d in &daemons {
        d.wait_for("readiness", std::time::Duration::from_secs(10), || {
            d.admin_get("/readyz").0 == 200
        });
    }
    for name in ["tillkey/audit", "tillkey/status-list"] {
        assert_eq!(
            pg.query(&format!(
                "SELECT count(*) FROM key_versions WHERE name = '{name}'"
            )),
            "1",
            "{name}"
        );
        let held = token_objects(&env)
            .into_iter()
            .filter(|(class, label, _)| label == &format!("tillkey:{name}#1") && class != "Public")
            .count();
        assert_eq!(held, 1, "token objects of {name}");
    }
    // Each serves, and their entries make one trail.
    for d in &daemons {
        create(d, &format!("stores/st/{}/mac", d.pid()), "hmac-sha256").await;
    }
    for d in daemons {
        assert!(d.stop().success());
    }
    let (code, out) = env.audit_verify();
    assert_eq!(code, Some(0), "{out}");
}

/// The status list's `seq` orders lists across instances: a list made on an instance that has
/// been idle while another worked is not lower than the busy instance's earlier list, and holds
/// its revocation. (Each instance's own audit head made it lower, so verifiers would refuse the
/// newer list, or keep an older one over it.)
#[tokio::test]
async fn status_lists_from_any_instance_never_go_back() {
    let _one = ONE_CLUSTER.lock().await;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, "stores/sl/pos/1/mac", "hmac-sha256").await;
    let b = env.start();
    let mut svc_b = b.conn("service").await;
    // (seq, entries); the signature is checked in tests/status_list.rs.
    let list = |feed: &serde_json::Value| {
        let cose = unb64(feed["cose_sign1"].as_str().expect("a list"));
        let (decoded, _) = tillkey::statuslist::open1(&cose, |_, _| true).expect("decodes");
        assert_eq!(decoded.sequence, feed["seq"].as_u64().expect("seq"));
        (decoded.sequence, decoded.entries.len())
    };
    let (s, first) = get(&mut svc_b, "/v1/status-list?prefix=stores/sl/").await;
    assert_eq!(s, 200, "{first}");
    // A works while B idles, then revokes.
    let mut svc_a = a.conn("service").await;
    for i in 0..30 {
        let (s, _) = post(
            &mut svc_a,
            "/v1/keys/stores/sl/pos/1/mac:sign",
            json!({"message": b64(format!("m{i}").as_bytes())}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let mut officer = a.conn("officer").await;
    let (s, r) = post(
        &mut officer,
        "/v1/keys/stores/sl/pos/1/mac:revoke",
        json!({"reason": "till stolen"}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (_, on_a) = get(&mut svc_a, "/v1/status-list?prefix=stores/sl/").await;
    let (_, on_b) = get(&mut svc_b, "/v1/status-list?prefix=stores/sl/").await;
    let (_, on_a_again) = get(&mut svc_a, "/v1/status-list?prefix=stores/sl/").await;
    let (first, on_a, on_b, on_a_again) =
        (list(&first), list(&on_a), list(&on_b), list(&on_a_again));
    eprintln!("(seq, entries): B {first:?}, A {on_a:?}, B {on_b:?}, A {on_a_again:?}");
    assert_eq!(on_a.1, 1, "A's list holds the revocation");
    assert!(
        on_b.0 >= on_a.0,
        "B's later list is lower: {on_b:?} after {on_a:?}"
    );
    assert_eq!(on_b.1, 1, "B's later list left out the revocation");
    assert!(on_a_again.0 >= on_b.0);
    assert!(first.0 < on_a.0);
}

/// A derived version destroyed on one instance leaves no derived key behind in another
/// instance's device cache (the destroying instance empties its own; the others learn of it
/// through the change feed).
#[tokio::test]
async fn a_derived_version_destroyed_on_one_instance_leaves_no_key_in_the_others_caches() {
    use std::time::{Duration, Instant};
    let _one = ONE_CLUSTER.lock().await;
    const MASTER: &str = "groups/dv/pos-master";
    let name = "stores/dv/pos/1/qr-mac";
    let pg = Postgres::start();
    let env = env_on(&pg);
    let a = env.start();
    create(&a, MASTER, "aes256-derive").await;
    let mut alice = a.conn("officer").await;
    let (s, k) = post(
        &mut alice,
        "/v1/keys",
        json!({"name": name, "type": "hmac-sha256", "derive_from": MASTER}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let b = env.start();
    // B uses version 1: its device derives the key and keeps it.
    let mut svc_b = b.conn("service").await;
    let (s, r) = post(
        &mut svc_b,
        &format!("/v1/keys/{name}:sign"),
        json!({"message": b64(b"m")}),
    )
    .await;
    assert_eq!((s, &r["key_version"]), (200, &json!(1)), "{r}");
    let held = |d: &Daemon| {
        d.metric("tillkey_derived_keys{what=\"held\"}")
            .expect("derived keys held")
    };
    assert_eq!(held(&b), 1.0);
    // On A: a new version, the first revoked and destroyed under dual control.
    let mut bob = a.conn("officer2").await;
    for (path, body) in [
        (format!("/v1/keys/{name}:rotate"), json!({})),
        (
            format!("/v1/keys/{name}:revoke"),
            json!({"version": 1, "reason": "terminal stolen"}),
        ),
    ] {
        let (s, r) = post(&mut alice, &path, body).await;
        assert_eq!(s, 200, "{r}");
    }
    let id = request_destroy(&mut alice, name, 1).await;
    let (s, done) = post(&mut bob, &format!("/v1/approvals/{id}:approve"), json!({})).await;
    assert_eq!(s, 200, "{done}");
    let destroyed = Instant::now();
    while held(&b) != 0.0 {
        assert!(
            destroyed.elapsed() < Duration::from_secs(2),
            "B still holds the destroyed derived key {} ms after",
            destroyed.elapsed().as_millis()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "B dropped the destroyed derived key {} ms after the destroy",
        destroyed.elapsed().as_millis()
    );
}
