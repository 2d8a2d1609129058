//! Several tillkeyd instances on one PostgreSQL database and one token: what holds today.
//! Requests spread over two real daemons write one audit chain that verifies as a whole; a key
//! made or revoked on one instance is obeyed by the other within 1 s; a change racing another
//! instance's never revives a revoked version; `max_operations` holds across instances; timed
//! rotations run on one instance at a time.

mod common;

use common::postgres::{env_on, Postgres};
use common::*;
use serde_json::json;

#[tokio::test]
async fn two_instances_write_one_audit_chain_that_verifies() {
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

/// `max_operations` is one cap for the whole cluster: three instances signing with one capped
/// key as fast as they can never use a version more than the cap allows (counted from the
/// answers themselves), every request is served (the cap rotates the key, it never refuses),
/// and the database's counts agree.
#[tokio::test]
async fn max_operations_holds_across_instances_and_never_refuses() {
    const CAP: u64 = 150;
    const PER_CLIENT: usize = 120;
    let pg = Postgres::start();
    let env = env_on(&pg);
    let first = env.start();
    let (s, k) = post(
        &mut first.conn("officer").await,
        "/v1/keys",
        json!({"name": "stores/9/capped", "type": "hmac-sha256", "max_operations": CAP}),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let daemons = [first, env.start(), env.start()];
    let mut tasks = Vec::new();
    for d in &daemons {
        for _ in 0..2 {
            let client = d.client("service");
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.expect("connect");
                let mut versions = Vec::new();
                for i in 0..PER_CLIENT {
                    let (s, v) = post(
                        &mut c,
                        "/v1/keys/stores/9/capped:sign",
                        json!({"message": b64(format!("m{i}").as_bytes())}),
                    )
                    .await;
                    assert_eq!(s, 200, "{v}");
                    versions.push(v["key_version"].as_u64().expect("key_version"));
                }
                versions
            }));
        }
    }
    let mut per_version = std::collections::BTreeMap::<u64, u64>::new();
    for t in tasks {
        let Ok(versions) = t.await else {
            for d in &daemons {
                for line in d.logs().iter().filter(|l| l.contains("ERROR")) {
                    eprintln!("tillkeyd on {}: {line}", d.api);
                }
            }
            panic!("a client failed (the daemons' errors are above)");
        };
        for v in versions {
            *per_version.entry(v).or_default() += 1;
        }
    }
    let total: u64 = per_version.values().sum();
    assert_eq!(total, 6 * PER_CLIENT as u64);
    for (v, n) in &per_version {
        assert!(
            *n <= CAP,
            "version {v} did {n} operations, cap {CAP}: {per_version:?}"
        );
    }
    eprintln!("operations per version: {per_version:?}");
    for d in daemons {
        assert!(d.stop().success());
    }
    // Stopped cleanly: every count is flushed, and every unspent lease given back.
    let rows = pg.query(
        "SELECT string_agg(version || ':' || operations || ':' || leased, ',' ORDER BY version) \
         FROM key_versions WHERE name = 'stores/9/capped'",
    );
    for row in rows.split(',') {
        let f: Vec<u64> = row.split(':').map(|x| x.parse().expect("number")).collect();
        assert_eq!(
            per_version.get(&f[0]).copied().unwrap_or(0),
            f[1],
            "answers and database disagree for version {}: {rows}",
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
