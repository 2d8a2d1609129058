//! The `[backend] type = "tpm"` section checked into [`TpmSettings`]: a TCTI string the TSS can
//! load, a context count the TPM has room for, and an owner authorization readable by this user
//! only. Done before the daemon binds a port and before anything talks to the TPM.

use std::path::Path;

use zeroize::Zeroizing;

use crate::backend::open::existing_file;
use crate::config::TpmConfig;

pub struct TpmSettings {
    /// TCTI configuration, e.g. `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`.
    pub tcti: String,
    pub contexts: usize,
    /// Owner hierarchy authorization; `None` when it is empty (swtpm, a fresh TPM).
    pub owner_auth: Option<Zeroizing<Vec<u8>>>,
}

impl TpmSettings {
    pub fn from_config(c: &TpmConfig) -> Result<Self, String> {
        let contexts = validate_tpm(&c.tcti, c.contexts)?;
        let owner_auth = match &c.owner_auth_file {
            Some(f) => read_owner_auth(&existing_file("backend.owner_auth_file", f)?)?,
            None => None,
        };
        Ok(Self {
            tcti: c.tcti.clone(),
            contexts,
            owner_auth,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_settings_are_checked() {
        assert_eq!(validate_tpm("swtpm:host=127.0.0.1,port=2321", None), Ok(2));
        assert!(validate_tpm("swtpm:host=127.0.0.1,port=2321", Some(3)).is_err());
        assert!(validate_tpm("swtpm:host=127.0.0.1,port=2321", Some(0)).is_err());
        assert_eq!(validate_tpm("device:/dev/tpmrm0", Some(8)), Ok(8));
        assert!(validate_tpm("carrier-pigeon:loft=3", None).is_err());
        // The example's commented TPM section parses (`config::tests`); its values pass here.
        let example = TpmConfig {
            tcti: "device:/dev/tpmrm0".into(),
            contexts: Some(2),
            owner_auth_file: None,
        };
        assert_eq!(
            TpmSettings::from_config(&example).map(|s| s.contexts),
            Ok(2)
        );
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
}
