//! `tillkey audit verify|export`: read the trail straight from the store, and check every MAC
//! in the token, beside a running daemon or without one.

use std::collections::HashMap;
use std::path::Path;

use crate::audit::{self, Entry};
use crate::backend::{self, KeyRef, ObjectRef, Purpose, Settings};
use crate::config::{Config, Overrides};
use crate::daemon::AUDIT_KEY;
use crate::encoding::hex_decode;
use crate::keys::{KeyName, KeyType};
use crate::registry::Registry;

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
    let settings = Settings::from_config(&config).map_err(|e| e.to_string())?;
    let backend = backend::open(settings, Purpose::Tool)?.backend;
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
                &e.seal_input(),
                &mac,
            )
            .map_err(|e| e.to_string())
    });
    backend.close();
    match outcome? {
        Ok(report) => {
            out!(
                "audit trail intact: {} entries, head {}",
                report.entries,
                report.head
            );
            Ok(true)
        }
        Err(fault) => {
            out!("audit trail BROKEN: {fault}");
            Ok(false)
        }
    }
}

/// Every entry as one JSON object per line.
pub async fn export(config_path: &Path) -> Result<(), String> {
    let config = load(config_path)?;
    let (_, entries) = entries(&config).await?;
    for e in entries {
        out!("{}", e.to_json());
    }
    Ok(())
}
