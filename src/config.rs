//! Daemon configuration: TOML with `deny_unknown_fields`, validated into [`Config`] before any
//! port is bound or the token is touched. A bad config is reported with the file and field and
//! the daemon exits with status 64.
//!
//! The `[backend]` section stays plain data here ([`BackendConfig`]): the backend it names checks
//! it (`crate::backend::Settings::from_config`), so this module knows no device library.
//!
//! Relative paths are relative to the directory of the config file, so a config and its
//! certificates can move together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest request body the API accepts unless configured otherwise (64 KiB): enough for any
/// message a retail flow signs, small enough that a flood of large bodies cannot exhaust memory.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// How long SIGTERM waits for in-flight requests (10 s).
pub const DEFAULT_DRAIN_TIMEOUT: u64 = 10;

/// How long a dual-control request waits for its second officer (24 h).
pub const DEFAULT_APPROVAL_TTL: u64 = 24 * 3600;

/// Hard ceiling on `max_body_bytes`.
pub const MAX_MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    tls: RawTls,
    backend: BackendConfig,
    registry: RawRegistry,
    policy: RawPolicy,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    approvals: RawApprovals,
    #[serde(default)]
    tokens: RawTokens,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    clock_window: Option<String>,
    giftcode_pin_attempts: Option<u32>,
}

/// Settings of the retail token flows.
#[derive(Debug, Clone, Copy)]
pub struct TokenSettings {
    /// Accepted difference between a device's clock and ours (seconds).
    pub clock_window: i64,
    /// Wrong PINs before a gift code locks.
    pub giftcode_pin_attempts: i64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            clock_window: 30,
            giftcode_pin_attempts: 5,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    admin_listen: String,
    max_body_bytes: Option<usize>,
    workers: Option<usize>,
    allow_root: Option<bool>,
    drain_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<PathBuf>,
}

/// `[backend]` as written, its paths made absolute. The backend it names validates it.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum BackendConfig {
    #[serde(rename = "pkcs11")]
    Pkcs11(Pkcs11Config),
    #[serde(rename = "tpm")]
    Tpm(TpmConfig),
}

/// `[backend] type = "pkcs11"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    pub module: PathBuf,
    /// A PKCS#11 URI (`pkcs11:token=...`).
    pub token: String,
    pub pin_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PIN.
    pub pin_credential: Option<String>,
    pub sessions: Option<usize>,
    pub derived_cache: Option<usize>,
    pub calls_on_workers: Option<bool>,
}

/// `[backend] type = "tpm"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    pub tcti: String,
    pub contexts: Option<usize>,
    pub owner_auth_file: Option<PathBuf>,
}

impl BackendConfig {
    /// The section's files are named relative to the config file, like every other path in it.
    fn resolve_paths(&mut self, base: &Path) {
        match self {
            BackendConfig::Pkcs11(c) => {
                c.module = base.join(&c.module);
                if let Some(f) = &mut c.pin_file {
                    *f = base.join(&*f);
                }
            }
            BackendConfig::Tpm(c) => {
                if let Some(f) = &mut c.owner_auth_file {
                    *f = base.join(&*f);
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    sqlite: Option<PathBuf>,
    url: Option<String>,
    migrate_at_start: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    dir: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Validated configuration.
pub struct Config {
    /// The file it was read from, as given: messages about it (the backend's too) name it.
    pub path: PathBuf,
    /// Run even as root (refused by default: the daemon needs no privilege).
    pub allow_root: bool,
    /// How long SIGTERM waits for in-flight requests before exiting (seconds).
    pub drain_timeout: u64,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub workers: usize,
    pub tls: TlsFiles,
    pub backend: BackendConfig,
    /// sqlx connection URL of the registry database.
    pub registry_url: String,
    /// Whether the daemon migrates the database's schema at start or requires it migrated.
    pub registry_schema: crate::registry::Schema,
    pub policy_dir: PathBuf,
    pub log_format: LogFormat,
    /// Seconds a dual-control approval stays open.
    pub approval_ttl: u64,
    pub tokens: TokenSettings,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Revoked client certificates (PEM CRLs), re-read on SIGHUP.
    pub crl: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, message: String) -> Self {
        Self {
            file: file.display().to_string(),
            message,
        }
    }
}

/// Command-line overrides (for tests and ad-hoc runs).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Validate everything except that the TLS files exist: provisioning reaches the device
    /// (token set-up, a device-held CA) before any certificate has been issued.
    pub before_certificates: bool,
}

impl Overrides {
    /// How provisioning commands read the daemon's configuration: certificates may not exist
    /// yet.
    pub fn provisioning() -> Self {
        Self {
            before_certificates: true,
            ..Default::default()
        }
    }
}

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError::new(path, message);
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        // Absolute, so the daemon's paths do not depend on its working directory.
        let absolute =
            std::fs::canonicalize(path).map_err(|e| err(format!("cannot resolve: {e}")))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        Self::validate(raw, path, base, overrides).map_err(err)
    }

    fn validate(raw: RawConfig, path: &Path, base: &Path, ov: &Overrides) -> Result<Self, String> {
        let addr = |field: &str, v: &str| {
            v.parse::<SocketAddr>().map_err(|e| {
                format!("{field} = '{v}': {e} (expected host:port with an IP address)")
            })
        };
        let listen = match ov.listen {
            Some(a) => a,
            None => addr("server.listen", &raw.server.listen)?,
        };
        let admin_listen = match ov.admin_listen {
            Some(a) => a,
            None => addr("server.admin_listen", &raw.server.admin_listen)?,
        };
        let max_body_bytes = raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
        if !(1024..=MAX_MAX_BODY).contains(&max_body_bytes) {
            return Err(format!(
                "server.max_body_bytes = {max_body_bytes}: must be between 1024 and {MAX_MAX_BODY}"
            ));
        }
        let workers = raw
            .server
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        if !(1..=256).contains(&workers) {
            return Err(format!(
                "server.workers = {workers}: must be between 1 and 256"
            ));
        }

        let file = |field: &str, p: &Path| -> Result<PathBuf, String> {
            let full = base.join(p);
            std::fs::metadata(&full).map_err(|e| format!("{field} = '{}': {e}", full.display()))?;
            Ok(full)
        };
        let tls_file = |field: &str, p: &Path| -> Result<PathBuf, String> {
            if ov.before_certificates {
                Ok(base.join(p))
            } else {
                file(field, p)
            }
        };
        let tls = TlsFiles {
            cert: tls_file("tls.cert", &raw.tls.cert)?,
            key: tls_file("tls.key", &raw.tls.key)?,
            client_ca: tls_file("tls.client_ca", &raw.tls.client_ca)?,
            crl: match &raw.tls.crl {
                Some(p) => Some(tls_file("tls.crl", p)?),
                None => None,
            },
        };

        let mut backend = raw.backend;
        backend.resolve_paths(base);

        // One process owns a SQLite file, so it may as well migrate it; instances sharing
        // PostgreSQL leave that to `tillkey db migrate`, run once per upgrade.
        let registry_schema = match raw
            .registry
            .migrate_at_start
            .unwrap_or(raw.registry.sqlite.is_some())
        {
            true => crate::registry::Schema::Migrate,
            false => crate::registry::Schema::RequireLatest,
        };
        let registry_url = registry_url(raw.registry, base)?;

        let policy_dir = base.join(raw.policy.dir);
        if !policy_dir.is_dir() {
            return Err(format!(
                "policy.dir: {} is not a directory",
                policy_dir.display()
            ));
        }

        let approval_ttl = match &raw.approvals.ttl {
            Some(t) => crate::keys::parse_duration(t).map_err(|e| format!("approvals.ttl: {e}"))?,
            None => DEFAULT_APPROVAL_TTL,
        };

        let drain_timeout = match &raw.server.drain_timeout {
            Some(t) => {
                crate::keys::parse_duration(t).map_err(|e| format!("server.drain_timeout: {e}"))?
            }
            None => DEFAULT_DRAIN_TIMEOUT,
        };

        let tokens = token_settings(&raw.tokens)?;

        Ok(Config {
            path: path.to_path_buf(),
            tokens,
            allow_root: raw.server.allow_root.unwrap_or(false),
            drain_timeout,
            approval_ttl,
            listen,
            admin_listen,
            max_body_bytes,
            workers,
            tls,
            backend,
            registry_url,
            registry_schema,
            policy_dir,
            log_format: raw.log.format.unwrap_or_default(),
        })
    }
}

/// sqlx connection URL of `[registry]`: exactly one of a SQLite file (its directory must exist)
/// or a PostgreSQL URL.
fn registry_url(raw: RawRegistry, base: &Path) -> Result<String, String> {
    let url = match (raw.sqlite, raw.url) {
        (Some(p), None) => {
            let full = base.join(p);
            let dir = full.parent().unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(format!(
                    "registry.sqlite: directory {} does not exist",
                    dir.display()
                ));
            }
            // Others who can write the directory can replace the registry under the daemon.
            if let Ok(meta) = std::fs::metadata(dir) {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o002 != 0 {
                    return Err(format!(
                        "registry.sqlite: directory {} is writable by every user; give the \
                         registry a directory of its own (e.g. 0700, owned by tillkeyd)",
                        dir.display()
                    ));
                }
            }
            format!("sqlite://{}?mode=rwc", full.display())
        }
        (None, Some(url)) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            url
        }
        (None, Some(url)) => {
            return Err(format!(
                "registry.url: '{}' is not a postgres:// URL (use registry.sqlite for SQLite)",
                url.split('@').next_back().unwrap_or("")
            ))
        }
        _ => return Err("registry: give exactly one of sqlite or url".into()),
    };
    Ok(url)
}

fn token_settings(raw: &RawTokens) -> Result<TokenSettings, String> {
    let mut tokens = TokenSettings::default();
    if let Some(w) = &raw.clock_window {
        let w = crate::keys::parse_duration(w).map_err(|e| format!("tokens.clock_window: {e}"))?;
        if w > 600 {
            return Err("tokens.clock_window: at most 10m".into());
        }
        tokens.clock_window = w as i64;
    }
    if let Some(n) = raw.giftcode_pin_attempts {
        if !(1..=20).contains(&n) {
            return Err("tokens.giftcode_pin_attempts: 1 to 20".into());
        }
        tokens.giftcode_pin_attempts = i64::from(n);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example must stay in step with the schema (unknown keys are errors).
    #[test]
    fn example_config_parses() {
        let text = include_str!("../provisioning/tillkeyd.example.toml");
        let raw: RawConfig = toml::from_str(text).expect("example config parses");
        assert_eq!(raw.server.listen, "127.0.0.1:8443");
        assert!(matches!(raw.backend, BackendConfig::Pkcs11(_)));
        // Its commented PKCS#11 option, uncommented, is one the schema knows.
        let with = text.replacen("# calls_on_workers = false", "calls_on_workers = false", 1);
        let raw: RawConfig = toml::from_str(&with).expect("uncommented option parses");
        assert!(matches!(
            raw.backend,
            BackendConfig::Pkcs11(Pkcs11Config {
                calls_on_workers: Some(false),
                ..
            })
        ));
    }

    /// The commented TPM settings of the example, uncommented, form a valid backend section
    /// (`backend::tpm` checks their values).
    #[test]
    fn example_tpm_settings_parse() {
        let text = include_str!("../provisioning/tillkeyd.example.toml");
        let (head, rest) = text.split_once("[backend]\n").unwrap();
        let (backend, tail) = rest.split_once("[registry]").unwrap();
        let tpm: String = backend
            .lines()
            .skip_while(|l| !l.starts_with("# type = \"tpm\""))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let raw: RawConfig = toml::from_str(&format!("{head}[backend]\n{tpm}[registry]{tail}"))
            .expect("tpm example parses");
        assert!(matches!(
            raw.backend,
            BackendConfig::Tpm(TpmConfig {
                contexts: Some(2),
                owner_auth_file: Some(_),
                ..
            })
        ));
    }

    /// An unknown key inside the backend section is refused, as anywhere else.
    #[test]
    fn backend_sections_deny_unknown_fields() {
        let text = include_str!("../provisioning/tillkeyd.example.toml");
        let with = text.replacen("[backend]\n", "[backend]\nslots = 3\n", 1);
        let err = toml::from_str::<RawConfig>(&with).unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("slots"),
            "{err}"
        );
    }
}
