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

/// What `script` asks to install on a machine where `dpkg-query` finds no package at all. A fake
/// `apt-get` records the request and fails, so the script stops there and nothing is installed.
fn packages_requested_on_an_empty_machine(script: &str, env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let record = dir.path().join("apt-get.args");
    let fake = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    fake("dpkg-query", "exit 1");
    fake(
        "apt-get",
        &format!(
            "[ \"$1\" = update ] && exit 0\necho \"$@\" >> {}\nexit 1",
            record.display()
        ),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut cmd = Command::new(repo().join(script));
    cmd.arg(dir.path().join("env")).env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{script} went on without packages");
    // As root the script calls apt-get; otherwise it names what to install.
    let asked = std::fs::read_to_string(&record).unwrap_or_default()
        + stderr
            .lines()
            .find_map(|l| l.split_once("please install: ").map(|(_, p)| p))
            .unwrap_or_default();
    asked
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "install")
        .map(str::to_owned)
        .collect()
}

/// Each README command works first on a fresh machine: before building, the quick start installs
/// what the build needs (tss-esapi-sys: libtss2, pkg-config, libclang), not only SoftHSM; the
/// test command installs all of it too. Both read one list (`softhsm-ci/packages`).
#[test]
fn each_readme_command_installs_what_it_builds_and_runs_with() {
    let build = ["pkg-config", "libtss2-dev", "clang", "libclang-dev"];
    let run = ["softhsm2", "opensc", "swtpm", "python3", "curl"];
    let quickstart = packages_requested_on_an_empty_machine("softhsm-ci/quickstart", &[]);
    for p in build.iter().chain(&run) {
        assert!(
            quickstart.iter().any(|q| q == p),
            "quickstart: {p} missing from {quickstart:?}"
        );
    }
    let test = packages_requested_on_an_empty_machine("softhsm-ci/test", &[]);
    for p in build.iter().chain(&run).chain(&["postgresql", "p11-kit"]) {
        assert!(
            test.iter().any(|q| q == p),
            "test: {p} missing from {test:?}"
        );
    }
    // With binaries given, the quick start does not need the build's packages.
    let prebuilt = packages_requested_on_an_empty_machine(
        "softhsm-ci/quickstart",
        &[("TILLKEY_BIN_DIR", "/nonexistent")],
    );
    assert!(
        prebuilt.iter().all(|p| !build.contains(&p.as_str())),
        "{prebuilt:?}"
    );
    assert!(prebuilt.iter().any(|p| p == "softhsm2"), "{prebuilt:?}");
}
