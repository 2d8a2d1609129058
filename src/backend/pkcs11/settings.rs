//! The `[backend] type = "pkcs11"` section checked into [`Pkcs11Settings`]: the module exists,
//! the token URI selects a token, exactly one PIN source and it is readable by this user only,
//! and the counts are in range. Done before the daemon binds a port (so it exits with the
//! configuration's status) and before anything touches the token.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{TokenSelector, DEFAULT_DERIVED_CACHE};
use crate::backend::open::existing_file;
use crate::config::Pkcs11Config;

pub struct Pkcs11Settings {
    pub module: PathBuf,
    pub token_uri: String,
    pub token: TokenSelector,
    pub pin: Zeroizing<String>,
    pub sessions: usize,
    /// Most derived keys held in the token at once (see `derive`).
    pub derived_cache: usize,
    /// Whether single short calls run on the async worker that asked (see
    /// [`KeyBackend::waits_on_device`](crate::backend::KeyBackend::waits_on_device)); None: only
    /// if the slot is a software token.
    pub calls_on_workers: Option<bool>,
}

impl Pkcs11Settings {
    /// `workers` (the async worker count) sets the default session count: every worker can
    /// have a call in flight while the device threads hold theirs.
    pub fn from_config(c: &Pkcs11Config, workers: usize) -> Result<Self, String> {
        let module = existing_file("backend.module", &c.module)?;
        let token = TokenSelector::parse(&c.token).map_err(|e| format!("backend.token: {e}"))?;
        let pin = match (&c.pin_file, &c.pin_credential) {
            (Some(f), None) => read_pin(&existing_file("backend.pin_file", f)?)?,
            (None, Some(name)) => read_pin(&credential_path(name)?)?,
            _ => return Err("backend: give exactly one of pin_file or pin_credential".into()),
        };
        let sessions = c.sessions.unwrap_or(workers * 2 + 2);
        if !(1..=512).contains(&sessions) {
            return Err(format!(
                "backend.sessions = {sessions}: must be between 1 and 512"
            ));
        }
        let derived_cache = c.derived_cache.unwrap_or(DEFAULT_DERIVED_CACHE);
        if !(1..=1_000_000).contains(&derived_cache) {
            return Err(format!(
                "backend.derived_cache = {derived_cache}: must be between 1 and 1000000"
            ));
        }
        Ok(Self {
            module,
            token_uri: c.token.clone(),
            token,
            pin,
            sessions,
            derived_cache,
            calls_on_workers: c.calls_on_workers,
        })
    }
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
