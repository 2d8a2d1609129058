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
        let dir = server_dir();
        let data = dir.path().join("data");
        run(as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "tillkey", "--no-sync"]));
        let port = start_on_free_port(&bin, &data);
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

    /// A streaming replica of this server (`pg_basebackup -R`), started on its own port, and
    /// made synchronous: from now on a commit here returns only once the replica has it (the
    /// replica itself keeps no `synchronous_standby_names`, so once promoted it commits alone).
    pub fn replica(&self) -> Self {
        let dir = server_dir();
        let data = dir.path().join("data");
        run(as_server_user(&self.bin.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "tillkey",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]));
        let port = start_on_free_port(&self.bin, &data);
        self.query("ALTER SYSTEM SET synchronous_standby_names = '*'");
        self.query("SELECT pg_reload_conf()");
        let replica = Self {
            _dir: dir,
            data,
            bin: self.bin.clone(),
            port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.query("SELECT string_agg(sync_state, ',') FROM pg_stat_replication") != "sync" {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica did not become a synchronous standby"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        replica
    }

    /// Promote this replica to a primary (`pg_ctl promote`, waiting until it takes writes).
    pub fn promote(&self) {
        run(as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "promote"]));
    }

    pub fn port(&self) -> u16 {
        self.port
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
        run(&mut pg_ctl_start(&self.bin, &self.data, self.port));
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

/// A temporary directory for one server, owned by the user the server runs as. PostgreSQL
/// refuses to run as root; under root (CI) it runs as the `postgres` user.
fn server_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    if is_root() {
        run(Command::new("chown").args(["postgres"]).arg(dir.path()));
    }
    dir
}

/// `pg_ctl start` for the server in `data` on `port`, its socket and log next to `data`.
fn pg_ctl_start(bin: &Path, data: &Path, port: u16) -> Command {
    let dir = data.parent().expect("cluster directory");
    let mut cmd = as_server_user(&bin.join("pg_ctl"));
    cmd.arg("-D")
        .arg(data)
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            dir.display()
        ))
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "60", "start"]);
    cmd
}

/// Start the server in `data` on a free port; the port.
fn start_on_free_port(bin: &Path, data: &Path) -> u16 {
    // A free port can be taken by someone else before the server binds it (the other tests
    // here start clusters at the same time): try a few, and say why if none works.
    for attempt in 1..=5 {
        let port = free_port();
        let out = pg_ctl_start(bin, data, port).output().expect("pg_ctl");
        if out.status.success() {
            return port;
        }
        assert!(
            attempt < 5,
            "pg_ctl start failed 5 times; last server log:\n{}",
            std::fs::read_to_string(data.parent().unwrap().join("server.log")).unwrap_or_default()
        );
    }
    unreachable!()
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

/// The one address the instances reach "the database" at, standing in for the virtual IP or
/// HAProxy that docs/cluster.md prescribes (sqlx connects to the one host of its URL; it has no
/// libpq-style host list). A TCP forwarder on a loopback port to a server's port; [`Vip::move_to`]
/// points it at another server and cuts the connections made to the old one, as a VIP moving
/// to another host does.
pub struct Vip {
    port: u16,
    target: std::sync::Arc<std::sync::Mutex<Target>>,
}

#[derive(Default)]
struct Target {
    port: u16,
    /// Both halves of each forwarded connection, to cut them when the address moves.
    open: Vec<std::net::TcpStream>,
}

impl Vip {
    pub fn to(server: &Postgres) -> Self {
        use std::net::{TcpListener, TcpStream};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(Mutex::new(Target {
            port: server.port,
            open: Vec::new(),
        }));
        let shared = target.clone();
        // The thread (and the listener) lives as long as the test process; tests are short.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mut t = shared.lock().unwrap();
                t.open.retain(|s| s.peer_addr().is_ok());
                let Ok(server) = TcpStream::connect(("127.0.0.1", t.port)) else {
                    continue; // dropped: the client sees the server as down
                };
                for s in [&client, &server] {
                    t.open.push(s.try_clone().expect("clone"));
                }
                drop(t);
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                pipe(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                pipe(server, client);
            }
        });
        Self { port, target }
    }

    /// Send new connections to `server`, and cut every connection made so far.
    pub fn move_to(&self, server: &Postgres) {
        let mut t = self.target.lock().unwrap();
        t.port = server.port;
        for s in t.open.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The database's URL through this address.
    pub fn url(&self) -> String {
        format!("postgres://tillkey@127.0.0.1:{}/tillkey", self.port)
    }
}

/// 8 clients spread over `daemons` seal 500 messages each for one sender with the AES-GCM key
/// `stores/1212/atm/dispense` (made beforehand): every seal gets its own counter, 1 to 4,000,
/// and the database's counter ends at 4,000.
pub async fn assert_seals_get_distinct_counters(pg: &Postgres, daemons: &[&super::Daemon]) {
    const CLIENTS: usize = 8;
    const EACH: usize = 500;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for k in 0..CLIENTS {
        let client = daemons[k % daemons.len()].client("service");
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.expect("connect");
            let mut counters = Vec::with_capacity(EACH);
            for _ in 0..EACH {
                let (s, m) = super::post(
                    &mut c,
                    "/v1/keys/stores/1212/atm/dispense:seal",
                    serde_json::json!({"sender": "atm-7", "plaintext": super::b64(b"dispense 20")}),
                )
                .await;
                assert_eq!(s, 200, "{m}");
                counters.push(m["counter"].as_i64().expect("a counter"));
            }
            counters
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a client failed"));
    }
    eprintln!(
        "{} seals from {CLIENTS} clients over {} instances: {} ms",
        all.len(),
        daemons.len(),
        started.elapsed().as_millis()
    );
    let distinct: std::collections::BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        CLIENTS * EACH,
        "{} counters handed out more than once",
        CLIENTS * EACH - distinct.len()
    );
    assert_eq!(
        (distinct.first().copied(), distinct.last().copied()),
        (Some(1), Some((CLIENTS * EACH) as i64))
    );
    assert_eq!(
        pg.query("SELECT value FROM counters WHERE sender = 'atm-7' AND side = 'seal'"),
        (CLIENTS * EACH).to_string()
    );
}
