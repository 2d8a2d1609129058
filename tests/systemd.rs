//! The systemd deployment (`systemd/`, `provisioning/install`), without a daemon: the unit's
//! sandbox must keep its exposure score, and the installer must put files where the unit expects
//! them without ever overwriting a site's configuration.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Highest acceptable `systemd-analyze security` exposure (0 = fully sandboxed, 10 = none).
const MAX_EXPOSURE: f64 = 1.5;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn unit_exposure_score_is_low() {
    let unit = repo().join("systemd/tillkeyd.service");
    // No skipping: softhsm-ci/test installs what the suite needs, and systemd is one of them.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (is systemd installed?): {e}"));
    assert!(
        out.status.success(),
        "systemd-analyze failed: {}",
        describe(&out)
    );

    // A misspelt directive is only a warning, and silently drops that protection.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for complaint in [
        "Unknown key",
        "Unknown section",
        "Failed to parse",
        "Invalid",
    ] {
        assert!(
            !stderr.contains(complaint),
            "systemd-analyze complains about the unit: {}",
            describe(&out)
        );
    }

    // "→ Overall exposure level for tillkeyd.service: 1.1 OK 🙂"
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure line: {}", describe(&out)));
    let score: f64 = line
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure from {line:?}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}; a sandboxing directive was weakened or lost:\n{stdout}"
    );
}

/// A fake `cargo build --release` output: two executables that are not the real programs.
fn fake_target(dir: &Path) -> PathBuf {
    let target = dir.join("target-release");
    fs::create_dir(&target).unwrap();
    for name in ["tillkeyd", "tillkey"] {
        let path = target.join(name);
        fs::write(&path, format!("#!/bin/sh\necho fake {name}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    target
}

fn install(target: &Path, destdir: &Path) -> Output {
    Command::new(repo().join("provisioning/install"))
        .arg(target)
        .env("DESTDIR", destdir)
        .output()
        .expect("run provisioning/install")
}

#[test]
fn install_into_destdir_never_overwrites_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fake_target(tmp.path());
    let root = tmp.path().join("root");

    let out = install(&target, &root);
    assert!(out.status.success(), "install failed: {}", describe(&out));

    // Programs.
    for name in ["tillkeyd", "tillkey"] {
        let installed = root.join("usr/bin").join(name);
        assert_eq!(read(&installed), read(&target.join(name)), "{name}");
        assert_eq!(mode(&installed), 0o755, "{name} mode");
    }

    // systemd integration, byte for byte what is in systemd/.
    for (src, dst) in [
        (
            "tillkeyd.service",
            "usr/lib/systemd/system/tillkeyd.service",
        ),
        ("tillkey.sysusers.conf", "usr/lib/sysusers.d/tillkey.conf"),
        ("tillkey.tmpfiles.conf", "usr/lib/tmpfiles.d/tillkey.conf"),
    ] {
        let installed = root.join(dst);
        assert_eq!(
            read(&installed),
            read(&repo().join("systemd").join(src)),
            "{dst}"
        );
        assert_eq!(mode(&installed), 0o644, "{dst} mode");
    }

    // Configuration: private to root and the service group, adapted to the unit's sandbox.
    let etc = root.join("etc/tillkey");
    let conf = etc.join("tillkeyd.toml");
    assert_eq!(mode(&etc) & !0o750, 0, "/etc/tillkey mode {:o}", mode(&etc));
    assert_eq!(mode(&conf) & !0o640, 0, "config mode {:o}", mode(&conf));
    let text = read(&conf);
    assert!(
        text.contains("\nsqlite = \"/var/lib/tillkey/registry.db\""),
        "the registry must live in the state directory (/etc is read-only):\n{text}"
    );
    assert!(
        text.contains("\npin_credential = \"hsm-pin\""),
        "the PIN must come from the unit's LoadCredential=hsm-pin:\n{text}"
    );
    assert!(
        !text.contains("\npin_file ="),
        "exactly one PIN source:\n{text}"
    );

    let policies = etc.join("policies");
    assert_eq!(mode(&policies) & !0o750, 0, "policies dir mode");
    let dev = policies.join("dev.toml");
    assert_eq!(read(&dev), read(&repo().join("policies/dev.toml")));
    assert_eq!(mode(&dev) & !0o640, 0, "policy file mode {:o}", mode(&dev));

    // The site edits its config and policies; a second install (an upgrade) keeps them.
    let marker = format!("\n# site edit {}\n", std::process::id());
    fs::write(&conf, format!("{text}{marker}")).unwrap();
    fs::remove_file(&dev).unwrap();
    fs::write(policies.join("site.toml"), "# site policy\n").unwrap();
    fs::write(
        target.join("tillkeyd"),
        "#!/bin/sh\necho fake tillkeyd v2\n",
    )
    .unwrap();

    let out = install(&target, &root);
    assert!(
        out.status.success(),
        "second install failed: {}",
        describe(&out)
    );
    assert_eq!(
        read(&conf),
        format!("{text}{marker}"),
        "config was overwritten"
    );
    assert_eq!(mode(&conf) & !0o640, 0, "config mode after reinstall");
    assert!(
        !dev.exists(),
        "a deleted policy came back: policies were overwritten"
    );
    assert_eq!(read(&policies.join("site.toml")), "# site policy\n");
    assert_eq!(
        read(&root.join("usr/bin/tillkeyd")),
        "#!/bin/sh\necho fake tillkeyd v2\n",
        "the program itself must be upgraded"
    );
    // Nothing left behind from writing the config.
    let leftovers: Vec<_> = fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files in /etc/tillkey: {leftovers:?}"
    );
}

#[test]
fn install_refuses_a_target_without_the_programs() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("empty");
    fs::create_dir(&target).unwrap();
    let root = tmp.path().join("root");

    let out = install(&target, &root);
    assert!(
        !out.status.success(),
        "install succeeded: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tillkeyd"),
        "the error should name the missing program: {}",
        describe(&out)
    );
    assert!(
        !root.join("etc").exists(),
        "a failed install wrote a config"
    );
}
