//! Life under a service manager: sd_notify readiness, reload and stop, watchdog pings, the
//! refusal to run as root, and a SIGTERM drain that lets an in-flight request finish.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn messages(sock: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = m.contains(until);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
    panic!("no {until} within {timeout:?}; saw {seen:?}");
}

#[test]
fn tells_systemd_ready_reloading_stopping_and_pings_the_watchdog() {
    let mut env = Env::new();
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    env.daemon_env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    env.daemon_env
        .push(("WATCHDOG_USEC".into(), "400000".into()));
    let d = env.start();
    messages(&sock, "READY=1", Duration::from_secs(10));
    messages(&sock, "WATCHDOG=1", Duration::from_secs(5));
    d.signal("HUP");
    let reload = messages(&sock, "RELOADING=1", Duration::from_secs(10));
    assert!(
        reload.last().unwrap().contains("MONOTONIC_USEC="),
        "{reload:?}"
    );
    messages(&sock, "READY=1", Duration::from_secs(10));
    d.signal("TERM");
    messages(&sock, "STOPPING=1", Duration::from_secs(10));
}

#[test]
fn refuses_to_run_as_root_unless_configured() {
    let env = Env::new();
    let config = std::fs::read_to_string(env.path("tillkeyd.toml")).unwrap();
    let without: String = config
        .lines()
        .filter(|l| !l.starts_with("allow_root"))
        .map(|l| format!("{l}\n"))
        .collect();
    write(&env.path("tillkeyd.toml"), &without);
    let root = tillkey::systemd::effective_uid() == Some(0);
    if root {
        let (status, err) = env.run_to_exit();
        assert_eq!(status.code(), Some(64), "{err}");
        assert!(err.contains("refusing to run as root"), "{err}");
    } else {
        // Not root: the same configuration starts.
        let d = env.start();
        assert_eq!(d.admin_get("/readyz").0, 200);
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let env = Env::new();
    let d = env.start();
    create(&d, "stores/1/mac", "hmac-sha256").await;
    // An idle keep-alive connection, and a request whose body is still arriving.
    let mut idle = d.conn("service").await;
    let (s, _) = post(
        &mut idle,
        "/v1/keys/stores/1/mac:sign",
        json!({"message": "aGk="}),
    )
    .await;
    assert_eq!(s, 200);
    let body = json!({"message": b64(b"slow client")}).to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut tls = d.client("service").connect_tls().await.unwrap();
    let head = format!(
        "POST /v1/keys/stores/1/mac:sign HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    d.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New connections are no longer accepted.
    assert!(
        d.client("service").connect().await.is_err(),
        "accepted a connection while draining"
    );
    // The in-flight request completes.
    tls.write_all(rest.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&resp).contains("key_version") {
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before the answer: {}",
            String::from_utf8_lossy(&resp)
        );
        resp.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    drop(tls);
    drop(idle);
    let status = d.stop();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_client_that_never_finishes_does_not_hold_shutdown_past_the_drain_timeout() {
    let env = Env::new();
    env.configure("server", "drain_timeout = \"1s\"");
    let d = env.start();
    let mut tls = d.client("service").connect_tls().await.unwrap();
    tls.write_all(b"POST /v1/keys/stores/1/mac:sign HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{").await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let status = d.stop();
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 1 s drain timeout"
    );
    assert!(
        took >= Duration::from_millis(900),
        "did not wait for the in-flight request at all ({took:?})"
    );
}
