//! `tillkey provision init`: prepare a device for tillkey before the daemon's first start.
//!
//! It initialises the token when the configuration names one that does not exist yet (a blank
//! slot, SO PIN from a file), then makes the keys the daemon itself needs: the audit MAC key, the
//! status-list signing key and the RSA key that import material is wrapped for. The daemon would
//! make the first two on its first start anyway; doing it here lets a security officer see them
//! made, with their check values, during the key ceremony rather than at some later boot.
//!
//! Run it while the daemon is stopped: the daemon keeps the registry in memory and would not see
//! keys added behind its back until it restarts.

use std::path::Path;

use serde_json::{json, Value};

use crate::backend::{self, BackendError, KeyRef, Purpose, Settings};
use crate::config::{Config, Overrides};
use crate::daemon::AUDIT_KEY;
use crate::keys::KeyType;
use crate::registry::Registry;
use crate::service::ensure_service_key;
use crate::service::status::STATUS_KEY;

pub async fn run(config_path: &Path, so_pin_file: Option<&Path>) -> Result<bool, String> {
    let config =
        Config::load(config_path, &Overrides::provisioning()).map_err(|e| e.to_string())?;
    let settings = Settings::from_config(&config).map_err(|e| e.to_string())?;
    let device = prepare_device(&settings, so_pin_file)?;
    let backend = backend::open(settings, Purpose::Tool)
        .map_err(|e| match so_pin_file {
            None => format!("{e} (give --so-pin-file to initialise a new token)"),
            Some(_) => e,
        })?
        .backend;
    let made = service_keys(&config.registry_url, &backend).await;
    backend.close();
    let (keys, import) = made?;
    let report: Value = json!({
        "device": device,
        "service_keys": keys,
        "import_wrapping_key": import,
    });
    out!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(true)
}

/// The daemon's own keys, made if missing; what to print about them.
async fn service_keys(
    registry_url: &str,
    backend: &backend::SharedBackend,
) -> Result<(Vec<Value>, Value), String> {
    let registry = Registry::open(registry_url)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    // One gate in front of the device, as in the daemon; this thread may wait on it.
    let device = crate::device::Device::start(backend.clone(), 1);
    let mut keys = Vec::new();
    for (name, key_type) in [
        (AUDIT_KEY, KeyType::HmacSha256),
        (STATUS_KEY, KeyType::EcdsaP256),
    ] {
        let key = ensure_service_key(&registry, &device, name, key_type)
            .await
            .map_err(|e| format!("{name}: {e} {}", e.internal_detail().unwrap_or("")))?;
        let v = key
            .active()
            .ok_or_else(|| format!("{name} has no active version"))?;
        // Shown so the ceremony record can name the key without revealing it.
        let kcv = match key_type {
            KeyType::HmacSha256 => Some(crate::encoding::hex_encode(
                &backend
                    .check_value(KeyRef {
                        key_type,
                        object: &v.object,
                    })
                    .map_err(|e| format!("{name}: check value: {e}"))?,
            )),
            _ => None,
        };
        keys.push(json!({
            "name": name,
            "type": key_type.as_str(),
            "version": v.version,
            "kcv": kcv,
            "public_key_sha256": v.public_key_der.as_deref().map(fingerprint),
        }));
    }
    let import = match backend.import_wrapping_key() {
        Ok(spki) => json!({"type": "rsa-3072", "public_key_sha256": fingerprint(&spki)}),
        Err(BackendError::Unsupported(why)) => json!({"unavailable": why}),
        Err(e) => return Err(format!("import wrapping key: {e}")),
    };
    registry.close().await;
    Ok((keys, import))
}

/// Initialise the token if it does not exist yet; says what it found.
fn prepare_device(settings: &Settings, so_pin_file: Option<&Path>) -> Result<Value, String> {
    match settings {
        Settings::Pkcs11(settings) => {
            use crate::backend::pkcs11::init::{initialise, TokenInit};
            let Some(so_pin_file) = so_pin_file else {
                // Without an SO PIN only an existing token can be used; opening it says so.
                return Ok(json!({"token": settings.token_uri, "initialised_now": false}));
            };
            let so_pin = crate::backend::pkcs11::read_pin(so_pin_file)?;
            Ok(match initialise(settings, &so_pin)? {
                TokenInit::AlreadyThere { label } => {
                    json!({"token": label, "initialised_now": false})
                }
                TokenInit::Initialised { label } => {
                    json!({"token": label, "initialised_now": true})
                }
            })
        }
        // A TPM needs no initialising: keys live under a primary the backend derives from a
        // fixed template, so there is nothing to label and no PIN to set.
        Settings::Tpm(settings) => {
            if so_pin_file.is_some() {
                return Err("--so-pin-file applies to PKCS#11 tokens; a TPM has no SO PIN".into());
            }
            Ok(json!({"tpm": settings.tcti, "initialised_now": false}))
        }
    }
}

fn fingerprint(der: &[u8]) -> String {
    crate::encoding::hex_encode(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}
