//! The `tillkey` operator CLI: development PKI, key management and client calls.
//!
//! Over 600 lines because it holds the whole clap command tree beside its one dispatch
//! (`call`), which reads best next to the commands it serves.

/// `println!` for the CLI's results: a reader that stops early (`tillkey audit export | head`)
/// ends the output quietly (exit 0) instead of std's panic on a closed pipe.
macro_rules! out {
    () => {
        $crate::cli::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}

pub mod audit;
pub mod bench;
mod db;
mod init;
mod package;
pub mod provision;

use std::path::PathBuf;
use std::process::ExitCode;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::Client;

#[derive(Parser)]
#[command(
    name = "tillkey",
    version,
    about = "Operator and client CLI for tillkeyd"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Create, list and inspect keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign (or MAC) a message with a key's active version.
    Sign {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[command(flatten)]
        message: Message,
        /// ECDSA signature encoding: der (default) or raw (r||s).
        #[arg(long)]
        format: Option<String>,
    },
    /// Verify a signature or MAC.
    Verify {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[command(flatten)]
        message: Message,
        /// Signature, base64.
        #[arg(long)]
        signature: String,
        #[arg(long)]
        key_version: Option<u32>,
        #[arg(long)]
        format: Option<String>,
    },
    /// Encrypt with an aes256-gcm key; prints the ciphertext (base64).
    Encrypt {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[command(flatten)]
        message: Message,
        /// Associated data, as text.
        #[arg(long)]
        aad: Option<String>,
    },
    /// Decrypt a ciphertext made by `encrypt`.
    Decrypt {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// Ciphertext, base64.
        #[arg(long)]
        ciphertext: String,
        #[arg(long)]
        aad: Option<String>,
    },
    /// Provision stores and terminals.
    #[command(subcommand)]
    Provision(ProvisionCommand),
    /// Dual-control approvals: list, approve, cancel.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Measure raw token speed against tillkeyd's on the same token, in one run.
    Bench(bench::BenchArgs),
    /// The benchmark's transport floor server (started by `bench`, not by hand).
    #[command(hide = true)]
    BenchFloor(bench::FloorArgs),
    /// Check or export the tamper-evident audit trail (reads the store and the token directly).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The registry database's schema (reads the configuration's [registry]).
    #[command(subcommand)]
    Db(DbCommand),
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the schema migrations this build has that the database lacks (PostgreSQL: once
    /// per upgrade, before the new daemons start; safe to run from several hosts at once).
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the database's schema version; exits 1 unless it is this build's.
    Version {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make a development CA, server certificate and client certificates in DIR.
    Dev { dir: PathBuf },
    /// Create a CA in DIR (ca.crt, ca.key 0600, an empty crl.pem).
    Ca {
        dir: PathBuf,
        #[arg(long, default_value = "tillkey CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Keep the CA key in the device this daemon configuration reaches (no ca.key; DIR gets
        /// ca-key.toml, and issue/revoke sign through the device).
        #[arg(long, value_name = "CONFIG")]
        hsm: Option<PathBuf>,
    },
    /// Issue a certificate from the CA in DIR: a client (identity in a URI SAN) or the server.
    Issue {
        dir: PathBuf,
        /// Writes OUT.crt and OUT.key (0600).
        #[arg(long)]
        out: PathBuf,
        /// Client identity, e.g. spiffe://example.com/svc/payments.
        #[arg(long, conflicts_with_all = ["dns", "ip"])]
        uri: Option<String>,
        #[arg(long, default_value = "tillkey client")]
        cn: String,
        /// Server DNS names (makes a server certificate).
        #[arg(long)]
        dns: Vec<String>,
        /// Server IP addresses.
        #[arg(long)]
        ip: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Revoke a certificate issued by the CA in DIR; tillkeyd applies DIR/crl.pem on SIGHUP.
    Revoke {
        dir: PathBuf,
        #[arg(long)]
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify order, links and every MAC; exits 1 naming the first bad entry.
    Verify {
        /// tillkeyd's configuration (for the registry and the token). Set SOFTHSM2_CONF as for
        /// the daemon.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write every entry as JSON lines to standard output.
    Export {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProvisionCommand {
    /// Prepare the device before the daemon's first start: initialise the configured token if
    /// it does not exist (needs --so-pin-file) and make the daemon's service keys.
    Init {
        /// The daemon's configuration (backend, PIN source, registry).
        #[arg(long)]
        config: PathBuf,
        /// Security officer PIN, to initialise a blank slot as the configured token.
        #[arg(long)]
        so_pin_file: Option<PathBuf>,
    },
    /// Key-injection packages for a terminal vendor: keys wrapped under each terminal's
    /// transport key with check values (two officers: request, then approve).
    #[command(subcommand)]
    Package(PackageCommand),
    /// Create the keys a manifest of stores and terminals calls for, from key templates.
    /// Idempotent; reports (never retires) keys of stores or terminals no longer listed.
    Enrol {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, default_value = "policies/templates.toml")]
        templates: PathBuf,
        /// Report what would be created, create nothing.
        #[arg(long)]
        dry_run: bool,
        /// Concurrent connections.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Keys per `batchCreate` request (1 to 1000). Each key is ~150 bytes of JSON: keep
        /// batches within the daemon's `max_body_bytes` (64 KiB by default).
        #[arg(long, default_value_t = 250)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Officer A: request the export of KEYS (templates) for every store/terminal in the
    /// manifest, wrapped under UNDER (a template, per terminal, or a key name); writes
    /// DIR/pending.json.
    Request {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, default_value = "policies/templates.toml")]
        templates: PathBuf,
        #[arg(long, value_delimiter = ',', required = true)]
        keys: Vec<String>,
        #[arg(long)]
        under: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Officer B: approve the pending exports in DIR and write one package per transport key.
    Approve {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    List {
        #[command(flatten)]
        conn: Conn,
    },
    Approve {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    Cancel {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    Create {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// hmac-sha256, ecdsa-p256, ed25519 or aes256-gcm.
        #[arg(long = "type")]
        key_type: String,
    },
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        prefix: String,
    },
    Get {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// New active version; the previous one verifies only until its grace ends.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke one version (or every version) at once.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        reason: String,
    },
    /// Request destruction of a revoked or retired version (needs a second officer).
    Destroy {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// Request export of an exportable version wrapped under a transport key (needs a second
    /// officer; the approver receives the wrapped key).
    Export {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        version: u32,
        #[arg(long)]
        transport_key: String,
    },
    /// Import existing key material (BYOK). The material is wrapped here, under the daemon's
    /// wrapping key, and never sent in the clear; a second officer approves the import.
    Import {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// hmac-sha256, aes256-gcm or aes256-kw.
        #[arg(long = "type")]
        key_type: String,
        /// File holding the raw key bytes.
        #[arg(long)]
        material_file: PathBuf,
    },
}

/// Where tillkeyd is and who we are.
#[derive(Args, Clone)]
pub struct Conn {
    #[arg(long, env = "TILLKEY_URL", default_value = "https://localhost:8443")]
    pub url: String,
    /// CA certificate that signed the server's certificate.
    #[arg(long, env = "TILLKEY_CA")]
    pub ca: PathBuf,
    /// Client certificate (PEM).
    #[arg(long, env = "TILLKEY_CERT")]
    pub cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long, env = "TILLKEY_KEY")]
    pub key: PathBuf,
}

impl Conn {
    pub fn client(&self) -> Result<Client, String> {
        Client::new(&self.url, &self.ca, Some((&self.cert, &self.key))).map_err(|e| e.to_string())
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Message {
    /// The message as text.
    #[arg(long)]
    message: Option<String>,
    /// The message as base64.
    #[arg(long)]
    message_b64: Option<String>,
    /// Read the message from a file.
    #[arg(long)]
    message_file: Option<PathBuf>,
}

impl Message {
    fn base64(&self) -> Result<String, String> {
        if let Some(m) = &self.message {
            return Ok(STANDARD.encode(m));
        }
        if let Some(m) = &self.message_b64 {
            return Ok(m.clone());
        }
        let path = self.message_file.as_ref().ok_or("no message given")?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(STANDARD.encode(bytes))
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pki(PkiCommand::Dev { dir }) => crate::pki::dev(&dir).map(|()| {
            out!("development PKI written to {}", dir.display());
            true
        }),
        Command::Pki(PkiCommand::Ca { dir, name, days, hsm }) => crate::pki::create_ca(&dir, &name, days, hsm.as_deref())
            .and_then(|ca| {
                ca.save(&dir)?;
                ca.write_crl(&dir)
            })
            .map(|()| {
                out!("CA written to {}", dir.display());
                true
            }),
        Command::Pki(PkiCommand::Issue { dir, out, uri, cn, dns, ip, days }) => {
            issue(&dir, &out, uri.as_deref(), &cn, &dns, &ip, days).map(|()| true)
        }
        Command::Pki(PkiCommand::Revoke { dir, cert }) => crate::pki::revoke(&dir, &cert).map(|serial| {
            out!("revoked serial {serial}; send tillkeyd SIGHUP (systemctl reload tillkeyd) to apply");
            true
        }),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::BenchFloor(args) => bench::serve_floor(args).map(|()| true),
        Command::Provision(ProvisionCommand::Init { config, so_pin_file }) => {
            runtime().and_then(|rt| rt.block_on(init::run(&config, so_pin_file.as_deref())))
        }
        Command::Provision(ProvisionCommand::Package(PackageCommand::Request { conn, manifest, templates, keys, under, dir })) => {
            runtime().and_then(|rt| rt.block_on(package::request(&conn, &manifest, &templates, &keys, &under, &dir)))
        }
        Command::Provision(ProvisionCommand::Package(PackageCommand::Approve { conn, dir })) => {
            runtime().and_then(|rt| rt.block_on(package::approve(&conn, &dir)))
        }
        Command::Provision(ProvisionCommand::Enrol { conn, manifest, templates, dry_run, parallel, batch }) => {
            runtime().and_then(|rt| rt.block_on(provision::enrol(&conn, &manifest, &templates, dry_run, parallel, batch)))
        }
        Command::Audit(AuditCommand::Verify { config }) => {
            runtime().and_then(|rt| rt.block_on(audit::verify(&config)))
        }
        Command::Audit(AuditCommand::Export { config }) => {
            runtime().and_then(|rt| rt.block_on(audit::export(&config)).map(|()| true))
        }
        Command::Db(DbCommand::Migrate { config }) => {
            runtime().and_then(|rt| rt.block_on(db::migrate(&config)))
        }
        Command::Db(DbCommand::Version { config }) => {
            runtime().and_then(|rt| rt.block_on(db::version(&config)))
        }
        other => runtime().and_then(|rt| rt.block_on(call(other))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tillkey: {e}");
            ExitCode::from(2)
        }
    }
}

fn issue(
    dir: &std::path::Path,
    out: &std::path::Path,
    uri: Option<&str>,
    cn: &str,
    dns: &[String],
    ip: &[String],
    days: i64,
) -> Result<(), String> {
    use crate::pki::{Authority, Leaf};
    let ca = Authority::load(dir)?;
    let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
    let ip: Vec<&str> = ip.iter().map(String::as_str).collect();
    let leaf = if dns.is_empty() && ip.is_empty() {
        Leaf::Client { uri, cn }
    } else {
        Leaf::Server {
            dns: &dns,
            ips: &ip,
        }
    };
    let issued = ca.issue(
        leaf,
        time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
        days,
    )?;
    let parent = out.parent().unwrap_or(std::path::Path::new("."));
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("--out needs a file name")?;
    crate::pki::write_pair(parent, name, &issued)?;
    out!("wrote {0}.crt and {0}.key", out.display());
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Write one line of results to standard output (see `out!`).
pub(crate) fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("tillkey: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// Run one API call, print the JSON answer; `Ok(false)` when the server said no.
async fn call(cmd: Command) -> Result<bool, String> {
    let aad = |a: Option<String>| a.map(|a| STANDARD.encode(a));
    let (conn, method, path, body): ApiRequest = match cmd {
        Command::Sign {
            conn,
            name,
            message,
            format,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:sign"),
            Some(json!({"message": message.base64()?, "signature_format": format})),
        ),
        Command::Verify {
            conn,
            name,
            message,
            signature,
            key_version,
            format,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:verify"),
            Some(json!({"message": message.base64()?, "signature": signature,
                        "key_version": key_version, "signature_format": format})),
        ),
        Command::Encrypt {
            conn,
            name,
            message,
            aad: a,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:encrypt"),
            Some(json!({"plaintext": message.base64()?, "associated_data": aad(a)})),
        ),
        Command::Decrypt {
            conn,
            name,
            ciphertext,
            aad: a,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:decrypt"),
            Some(json!({"ciphertext": ciphertext, "associated_data": aad(a)})),
        ),
        Command::Keys(k) => keys_request(k).await?,
        Command::Approvals(a) => approvals_request(a),
        Command::Pki(_)
        | Command::Bench(_)
        | Command::BenchFloor(_)
        | Command::Audit(_)
        | Command::Db(_)
        | Command::Provision(_) => return Err("not an API call".into()),
    };
    let body = body.map(strip_nulls);
    let mut connection = conn.client()?.connect().await.map_err(|e| e.to_string())?;
    let (status, answer) = connection
        .call(method, &path, body.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    out!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(status.is_success())
}

/// The API request a `keys` command makes.
async fn keys_request(cmd: KeysCommand) -> Result<ApiRequest, String> {
    Ok(match cmd {
        KeysCommand::Create {
            conn,
            name,
            key_type,
        } => (
            conn,
            Method::POST,
            "/v1/keys".into(),
            Some(json!({"name": name, "type": key_type})),
        ),
        KeysCommand::List { conn, prefix } => {
            (conn, Method::GET, format!("/v1/keys?prefix={prefix}"), None)
        }
        KeysCommand::Get { conn, name } => (conn, Method::GET, format!("/v1/keys/{name}"), None),
        KeysCommand::Rotate { conn, name, reason } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:rotate"),
            Some(json!({"reason": reason})),
        ),
        KeysCommand::Revoke {
            conn,
            name,
            version,
            reason,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:revoke"),
            Some(json!({"version": version, "reason": reason})),
        ),
        KeysCommand::Destroy {
            conn,
            name,
            version,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:destroy"),
            Some(json!({"version": version})),
        ),
        KeysCommand::Export {
            conn,
            name,
            version,
            transport_key,
        } => (
            conn,
            Method::POST,
            format!("/v1/keys/{name}:export"),
            Some(json!({"version": version, "transport_key": transport_key})),
        ),
        KeysCommand::Import {
            conn,
            name,
            key_type,
            material_file,
        } => {
            let body = import_body(&conn, &name, &key_type, &material_file).await?;
            (conn, Method::POST, "/v1/keys:import".into(), Some(body))
        }
    })
}

/// The API request an `approvals` command makes.
fn approvals_request(cmd: ApprovalsCommand) -> ApiRequest {
    match cmd {
        ApprovalsCommand::List { conn } => (conn, Method::GET, "/v1/approvals".into(), None),
        ApprovalsCommand::Approve { conn, id } => (
            conn,
            Method::POST,
            format!("/v1/approvals/{id}:approve"),
            Some(json!({})),
        ),
        ApprovalsCommand::Cancel { conn, id } => (
            conn,
            Method::POST,
            format!("/v1/approvals/{id}:cancel"),
            Some(json!({})),
        ),
    }
}

/// Where a command's request goes: connection, method, path and JSON body.
type ApiRequest = (Conn, Method, String, Option<Value>);

/// Fetch the wrapping key and wrap the material for it; only ciphertext leaves this process.
async fn import_body(
    conn: &Conn,
    name: &str,
    key_type: &str,
    material_file: &std::path::Path,
) -> Result<Value, String> {
    let material = zeroize::Zeroizing::new(
        std::fs::read(material_file).map_err(|e| format!("{}: {e}", material_file.display()))?,
    );
    let mut c = conn.client()?.connect().await.map_err(|e| e.to_string())?;
    let (status, wk) = c
        .call(Method::GET, "/v1/wrapping-key", None)
        .await
        .map_err(|e| e.to_string())?;
    let pem = wk["public_key_pem"]
        .as_str()
        .filter(|_| status.is_success())
        .ok_or_else(|| format!("fetching the wrapping key: {wk}"))?;
    let (kek, wrapped) = crate::exchange::wrap_for_import(pem, &material)?;
    let kcv = (key_type == "hmac-sha256").then(|| crate::exchange::hmac_kcv(&material));
    Ok(json!({
        "name": name, "type": key_type,
        "encrypted_kek": STANDARD.encode(kek), "wrapped_key": STANDARD.encode(wrapped), "kcv": kcv,
    }))
}

/// Optional flags left unset are omitted rather than sent as `null`.
pub(crate) fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}
