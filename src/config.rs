//! Daemon configuration: TOML with `deny_unknown_fields`, validated into [`Config`] before any
//! port is bound or the token is touched. A bad config is reported with the file and field and
//! the daemon exits with status 64.
//!
//! Relative paths are relative to the directory of the config file, so a config and its
//! certificates can move together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::backend::pkcs11::{Pkcs11Settings, TokenSelector};
use crate::backend::tpm::TpmSettings;

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
    backend: RawBackend,
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

#[derive(Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum RawBackend {
    #[serde(rename = "pkcs11")]
    Pkcs11 {
        module: PathBuf,
        token: String,
        pin_file: Option<PathBuf>,
        pin_credential: Option<String>,
        sessions: Option<usize>,
        derived_cache: Option<usize>,
        calls_on_workers: Option<bool>,
    },
    #[serde(rename = "tpm")]
    Tpm {
        tcti: String,
        contexts: Option<usize>,
        owner_auth_file: Option<PathBuf>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    sqlite: Option<PathBuf>,
    url: Option<String>,
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

pub enum BackendConfig {
    Pkcs11(Pkcs11Settings),
    Tpm(TpmSettings),
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
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

impl Config {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        // Absolute, so the daemon's paths do not depend on its working directory.
        let absolute =
            std::fs::canonicalize(path).map_err(|e| err(format!("cannot resolve: {e}")))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        Self::validate(raw, base, overrides).map_err(err)
    }

    fn validate(raw: RawConfig, base: &Path, ov: &Overrides) -> Result<Self, String> {
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

        let backend = match raw.backend {
            RawBackend::Pkcs11 {
                module,
                token,
                pin_file,
                pin_credential,
                sessions,
                derived_cache,
                calls_on_workers,
            } => {
                let module = file("backend.module", &module)?;
                let selector =
                    TokenSelector::parse(&token).map_err(|e| format!("backend.token: {e}"))?;
                let pin = match (pin_file, pin_credential) {
                    (Some(f), None) => read_pin(&file("backend.pin_file", &f)?)?,
                    (None, Some(name)) => read_pin(&credential_path(&name)?)?,
                    _ => {
                        return Err("backend: give exactly one of pin_file or pin_credential".into())
                    }
                };
                let sessions = sessions.unwrap_or(workers * 2 + 2);
                if !(1..=512).contains(&sessions) {
                    return Err(format!(
                        "backend.sessions = {sessions}: must be between 1 and 512"
                    ));
                }
                let derived_cache =
                    derived_cache.unwrap_or(crate::backend::pkcs11::DEFAULT_DERIVED_CACHE);
                if !(1..=1_000_000).contains(&derived_cache) {
                    return Err(format!(
                        "backend.derived_cache = {derived_cache}: must be between 1 and 1000000"
                    ));
                }
                BackendConfig::Pkcs11(Pkcs11Settings {
                    module,
                    token_uri: token,
                    token: selector,
                    pin,
                    sessions,
                    derived_cache,
                    calls_on_workers,
                })
            }
            RawBackend::Tpm {
                tcti,
                contexts,
                owner_auth_file,
            } => {
                let contexts = validate_tpm(&tcti, contexts)?;
                let owner_auth = match owner_auth_file {
                    Some(f) => read_owner_auth(&file("backend.owner_auth_file", &f)?)?,
                    None => None,
                };
                BackendConfig::Tpm(TpmSettings {
                    tcti,
                    contexts,
                    owner_auth,
                })
            }
        };

        let registry_url = match (raw.registry.sqlite, raw.registry.url) {
            (Some(p), None) => {
                let full = base.join(p);
                let dir = full.parent().unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    return Err(format!(
                        "registry.sqlite: directory {} does not exist",
                        dir.display()
                    ));
                }
                format!("sqlite://{}?mode=rwc", full.display())
            }
            (None, Some(url))
                if url.starts_with("postgres://") || url.starts_with("postgresql://") =>
            {
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

        let mut tokens = TokenSettings::default();
        if let Some(w) = &raw.tokens.clock_window {
            let w =
                crate::keys::parse_duration(w).map_err(|e| format!("tokens.clock_window: {e}"))?;
            if w > 600 {
                return Err("tokens.clock_window: at most 10m".into());
            }
            tokens.clock_window = w as i64;
        }
        if let Some(n) = raw.tokens.giftcode_pin_attempts {
            if !(1..=20).contains(&n) {
                return Err("tokens.giftcode_pin_attempts: 1 to 20".into());
            }
            tokens.giftcode_pin_attempts = i64::from(n);
        }

        Ok(Config {
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
            policy_dir,
            log_format: raw.log.format.unwrap_or_default(),
        })
    }
}

/// Without a resource manager a TPM holds about three loaded objects for all its users; each
/// context keeps one key loaded and one more slot is needed for the primary while loading.
const TPM_CONTEXTS_WITHOUT_RM: usize = 2;

/// Check the TCTI string and the context count for it; returns the count.
fn validate_tpm(tcti: &str, contexts: Option<usize>) -> Result<usize, String> {
    use std::str::FromStr;
    tss_esapi::tcti_ldr::TctiNameConf::from_str(tcti).map_err(|_| {
        format!("backend.tcti = '{tcti}': expected e.g. 'swtpm:host=127.0.0.1,port=2321' or 'device:/dev/tpmrm0'")
    })?;
    let has_rm = tcti.starts_with("device:/dev/tpmrm") || tcti.starts_with("tabrmd");
    let contexts = contexts.unwrap_or(TPM_CONTEXTS_WITHOUT_RM);
    let most = if has_rm { 64 } else { TPM_CONTEXTS_WITHOUT_RM };
    if !(1..=most).contains(&contexts) {
        return Err(format!(
            "backend.contexts = {contexts}: must be between 1 and {most} for '{tcti}'{}",
            if has_rm {
                ""
            } else {
                " (a TPM without resource manager holds about three loaded objects in all)"
            }
        ));
    }
    Ok(contexts)
}

/// The owner hierarchy's authorization; an empty file means an empty authorization (as on
/// swtpm and a fresh TPM). Refused if other users can read it, like a PIN file.
fn read_owner_auth(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("owner auth file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(format!(
            "owner auth file {} is accessible to other users; chmod o-rwx it",
            path.display()
        ));
    }
    let mut raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("owner auth file {}: {e}", path.display()))?,
    );
    while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        raw.pop();
    }
    if raw.len() > 64 {
        return Err(format!(
            "owner auth file {}: longer than 64 bytes",
            path.display()
        ));
    }
    Ok((!raw.is_empty()).then_some(raw))
}

/// A systemd credential (`LoadCredential=`) lives in `$CREDENTIALS_DIRECTORY`.
fn credential_path(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!(
            "backend.pin_credential = '{name}': not a credential name"
        ));
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
        "backend.pin_credential is set but CREDENTIALS_DIRECTORY is not (run under systemd with LoadCredential=)".to_string()
    })?;
    Ok(Path::new(&dir).join(name))
}

/// Read a PIN, refusing a file others can read: a PIN that anyone on the host can see is not a
/// secret, and failing closed here is cheaper than discovering it in an audit.
pub fn read_pin(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("PIN file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(format!(
            "PIN file {} is accessible to other users; chmod o-rwx it",
            path.display()
        ));
    }
    let raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("PIN file {}: {e}", path.display()))?,
    );
    let text = std::str::from_utf8(&raw)
        .map_err(|_| format!("PIN file {} is not UTF-8", path.display()))?;
    let pin = Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned());
    if pin.is_empty() {
        return Err(format!("PIN file {} is empty", path.display()));
    }
    Ok(pin)
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
        assert!(matches!(raw.backend, RawBackend::Pkcs11 { .. }));
        // Its commented PKCS#11 option, uncommented, is one the schema knows.
        let with = text.replacen("# calls_on_workers = false", "calls_on_workers = false", 1);
        let raw: RawConfig = toml::from_str(&with).expect("uncommented option parses");
        assert!(matches!(
            raw.backend,
            RawBackend::Pkcs11 {
                calls_on_workers: Some(false),
                ..
            }
        ));
    }

    #[test]
    fn tpm_settings_are_checked() {
        assert_eq!(validate_tpm("swtpm:host=127.0.0.1,port=2321", None), Ok(2));
        assert!(validate_tpm("swtpm:host=127.0.0.1,port=2321", Some(3)).is_err());
        assert!(validate_tpm("swtpm:host=127.0.0.1,port=2321", Some(0)).is_err());
        assert_eq!(validate_tpm("device:/dev/tpmrm0", Some(8)), Ok(8));
        assert!(validate_tpm("carrier-pigeon:loft=3", None).is_err());
        // The commented TPM settings of the example, uncommented, form a valid backend.
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
            RawBackend::Tpm {
                contexts: Some(2),
                owner_auth_file: Some(_),
                ..
            }
        ));
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("owner");
        std::fs::write(&auth, "").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(read_owner_auth(&auth).unwrap().is_none());
        std::fs::write(&auth, "s3cret\n").unwrap();
        assert_eq!(
            read_owner_auth(&auth).unwrap().unwrap().as_slice(),
            b"s3cret"
        );
    }

    #[test]
    fn pin_files_open_to_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "123456\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_pin(&pin).unwrap().as_str(), "123456");
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(read_pin(&pin).is_err());
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&pin, "\n").unwrap();
        assert!(read_pin(&pin).is_err());
    }
}
