//! A throwaway PostgreSQL cluster for the tests that run the registry on PostgreSQL (initdb and
//! pg_ctl from Debian's server package, which `softhsm-ci/test` installs).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{write, Env};

/// A PostgreSQL cluster in a temporary directory; stopped when dropped.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = server_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        // PostgreSQL refuses to run as root; under root (CI) it runs as the `postgres` user.
        if is_root() {
            run(Command::new("chown").args(["postgres"]).arg(dir.path()));
        }
        let data = dir.path().join("data");
        run(as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "tillkey", "--no-sync"]));
        // A free port can be taken by someone else before the server binds it (the other
        // tests here start clusters at the same time): try a few, and say why if none works.
        let log = dir.path().join("server.log");
        let mut port = 0;
        for attempt in 1..=5 {
            port = free_port();
            let out = as_server_user(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
                    dir.path().display()
                ))
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"])
                .output()
                .expect("pg_ctl");
            if out.status.success() {
                break;
            }
            assert!(
                attempt < 5,
                "pg_ctl start failed 5 times; last server log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        run(as_server_user(&bin.join("createdb")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "tillkey",
            "tillkey",
        ]));
        Self {
            _dir: dir,
            data,
            bin,
            port,
        }
    }

    /// Stop the server now, as a crash or a cut network would look to its clients.
    pub fn stop(&self) {
        run(as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]));
    }

    /// Start the stopped server again on its port.
    pub fn start_again(&self) {
        let dir = self.data.parent().expect("cluster directory");
        run(as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
                self.port,
                dir.display()
            ))
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]));
    }

    /// One value from a query, through psql.
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|err| panic!("psql {sql}: {err}"))
    }

    /// A query's value, or what psql said when the server refused it.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let out = as_server_user(&self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "tillkey", "-d", "tillkey", "-v", "ON_ERROR_STOP=1"])
            .args(["-At", "-c", sql])
            .output()
            .expect("psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://tillkey@127.0.0.1:{}/tillkey", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// The newest installed server's programs (Debian: /usr/lib/postgresql/N/bin).
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server installed (softhsm-ci/test installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("id -u");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("start a PostgreSQL program");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Point the environment's config at `url` instead of its SQLite file, and bring that
/// database's schema to this build's with `tillkey db migrate`, as an operator does (daemons on
/// PostgreSQL do not migrate at start).
pub fn use_registry(env: &Env, url: &str) {
    point_at(env, url);
    let (ok, out) = db(env, "migrate");
    assert!(ok, "tillkey db migrate: {out}");
}

/// Only point the environment's config at `url`.
pub fn point_at(env: &Env, url: &str) {
    let path = env.path("tillkeyd.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let sqlite = "sqlite = \"registry.db\"";
    assert!(config.contains(sqlite), "dev-env config changed: {config}");
    write(&path, config.replace(sqlite, &format!("url = \"{url}\"")));
}

/// `tillkey db CMD --config` on the environment's config: success, and what it printed.
pub fn db(env: &Env, cmd: &str) -> (bool, String) {
    let out = std::process::Command::new(super::TILLKEY)
        .args(["db", cmd, "--config"])
        .arg(env.path("tillkeyd.toml"))
        .output()
        .expect("run tillkey db");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A fresh environment (SoftHSM token, PKI, config) whose registry is `pg`.
pub fn env_on(pg: &Postgres) -> Env {
    let env = Env::on(super::Backend::Pkcs11);
    use_registry(&env, &pg.url());
    env
}
