//! `tillkey audit verify|export`: read the trail straight from the store, and check every MAC
//! in the token, beside a running daemon or without one.

use std::collections::HashMap;
use std::path::Path;

use crate::audit::{self, Entry};
use crate::backend::pkcs11::Pkcs11Backend;
use crate::backend::tpm::TpmBackend;
use crate::backend::{KeyRef, ObjectRef, SharedBackend};
use crate::config::{BackendConfig, Config, Overrides};
use crate::daemon::AUDIT_KEY;
use crate::keys::{KeyName, KeyType};
use crate::registry::{hex_decode, Registry};

async fn entries(config: &Config) -> Result<(Registry, Vec<Entry>), String> {
    let registry = Registry::open_for_reading(&config.registry_url)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    let entries = audit::read_all(registry.pool()).await?;
    Ok((registry, entries))
}

fn load(config_path: &Path) -> Result<Config, String> {
    Config::load(config_path, &Overrides::default()).map_err(|e| e.to_string())
}

/// `Ok(true)` when the whole chain verifies.
pub async fn verify(config_path: &Path) -> Result<bool, String> {
    let config = load(config_path)?;
    let (registry, entries) = entries(&config).await?;
    let name = KeyName::parse(AUDIT_KEY).map_err(|e| e.to_string())?;
    let key = registry
        .get(&name)
        .ok_or("the registry has no audit key; nothing was ever audited here")?;
    let objects: HashMap<u32, ObjectRef> = key
        .versions
        .iter()
        .map(|v| (v.version, v.object.clone()))
        .collect();
    let mut tpm = None;
    let backend: SharedBackend = match config.backend {
        BackendConfig::Pkcs11(settings) => Pkcs11Backend::open(settings)?,
        // One context: a TPM without resource manager is shared with a running daemon.
        BackendConfig::Tpm(mut settings) => {
            settings.contexts = 1;
            let opened = TpmBackend::open(settings, false)?;
            tpm = Some(opened.clone());
            opened
        }
    };
    let outcome = audit::verify_chain(&entries, |e| {
        let Some(object) = objects.get(&e.audit_key_version) else {
            return Ok(false);
        };
        let Some(mac) = hex_decode(&e.mac) else {
            return Ok(false);
        };
        backend
            .verify(
                KeyRef {
                    key_type: KeyType::HmacSha256,
                    object,
                },
                &e.canonical(),
                &mac,
            )
            .map_err(|e| e.to_string())
    });
    // Unload before exit: a TPM without resource manager keeps what a process left loaded.
    if let Some(tpm) = tpm {
        tpm.close();
    }
    match outcome? {
        Ok(report) => {
            println!(
                "audit trail intact: {} entries, head {}",
                report.entries, report.head
            );
            Ok(true)
        }
        Err(fault) => {
            println!("audit trail BROKEN: {fault}");
            Ok(false)
        }
    }
}

/// Every entry as one JSON object per line.
pub async fn export(config_path: &Path) -> Result<(), String> {
    let config = load(config_path)?;
    let (_, entries) = entries(&config).await?;
    for e in entries {
        println!("{}", e.to_json());
    }
    Ok(())
}
