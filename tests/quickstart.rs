//! The README's first command must keep working: run `softhsm-ci/quickstart` as a user would.

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn quickstart_brings_up_the_daemon_and_its_example_works() {
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("qs");
    let (api, admin) = (free_port(), free_port());
    let bin_dir = std::path::Path::new(TILLKEYD).parent().unwrap();
    let out = Command::new(repo().join("softhsm-ci/quickstart"))
        .arg(&qs)
        .env("LISTEN", format!("127.0.0.1:{api}"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("TILLKEY_BIN_DIR", bin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = std::fs::read_to_string(qs.join("tillkeyd.pid")).unwrap_or_default();
    let stop = || {
        let _ = Command::new("kill").arg(pid.trim()).status();
    };
    if !out.status.success() {
        stop();
        panic!(
            "quickstart failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The printed command, run again by us, gives the same MAC the quick start showed.
    let example: String = stdout
        .lines()
        .skip_while(|l| !l.starts_with("curl "))
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let rerun = Command::new("bash")
        .arg("-c")
        .arg(&example)
        .output()
        .unwrap();
    stop();
    let again: serde_json::Value =
        serde_json::from_slice(&rerun.stdout).expect("example answers JSON");
    assert_eq!(again["key_version"], 1, "{again}");
    let mac = again["signature"].as_str().unwrap();
    assert_eq!(unb64(mac).len(), 32);
    assert!(
        stdout.contains(mac),
        "quickstart printed a different answer:\n{stdout}"
    );
}
