//! A CA key held by the device: generated there as a non-extractable ECDSA P-256 key and used
//! through [`rcgen::RemoteKeyPair`], so certificates and CRLs are signed without the key ever
//! existing in a file or in this process's memory.
//!
//! The CA directory keeps `ca-key.toml`: which daemon configuration reaches the device, the
//! backend's reference to the key object and its public key. The reference names an object; it
//! is not a secret and is useless without the device and its PIN.

use std::path::{Path, PathBuf};

use rcgen::{KeyPair, RemoteKeyPair, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};

use crate::backend::{self, KeyRef, ObjectRef, Purpose, Settings, SharedBackend};
use crate::config::{Config, Overrides};
use crate::encoding::hex_decode;
use crate::encoding::hex_encode;
use crate::keys::KeyType;

/// File in the CA directory that says where the key is.
pub const REFERENCE: &str = "ca-key.toml";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reference {
    /// The daemon configuration whose `[backend]` reaches the device.
    config: PathBuf,
    /// Backend object reference (hex).
    object: String,
    /// DER SubjectPublicKeyInfo (hex), checked against `ca.crt` on every load.
    public_key: String,
}

struct DeviceKey {
    backend: SharedBackend,
    object: ObjectRef,
    /// Uncompressed EC point, as rcgen wants it.
    point: Vec<u8>,
}

impl Drop for DeviceKey {
    fn drop(&mut self) {
        self.backend.close();
    }
}

impl RemoteKeyPair for DeviceKey {
    fn public_key(&self) -> &[u8] {
        &self.point
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let raw = self
            .backend
            .sign(
                KeyRef {
                    key_type: KeyType::EcdsaP256,
                    object: &self.object,
                },
                msg,
            )
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        crate::encoding::ecdsa_raw_to_der(&raw).ok_or(rcgen::Error::RemoteKeyError)
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

fn open_device(config: &Path) -> Result<SharedBackend, String> {
    let config = Config::load(config, &Overrides::provisioning()).map_err(|e| e.to_string())?;
    let settings = Settings::from_config(&config).map_err(|e| e.to_string())?;
    Ok(backend::open(settings, Purpose::Tool)?.backend)
}

fn point_of(spki: &[u8]) -> Result<Vec<u8>, String> {
    let (_, info) = SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| format!("CA public key is not a valid SubjectPublicKeyInfo: {e}"))?;
    Ok(info.subject_public_key.data.to_vec())
}

fn key_pair(backend: SharedBackend, object: ObjectRef, spki: &[u8]) -> Result<KeyPair, String> {
    let point = point_of(spki)?;
    KeyPair::from_remote(Box::new(DeviceKey {
        backend,
        object,
        point,
    }))
    .map_err(|e| format!("CA key: {e}"))
}

/// Generate the CA key in the device `config` reaches and write `dir/ca-key.toml`.
pub fn generate(config: &Path, dir: &Path, common_name: &str) -> Result<KeyPair, String> {
    let config = std::fs::canonicalize(config).map_err(|e| format!("{}: {e}", config.display()))?;
    if dir.join(REFERENCE).exists() || dir.join("ca.key").exists() {
        return Err(format!("{} already holds a CA", dir.display()));
    }
    let backend = open_device(&config)?;
    let made = backend
        .generate(
            KeyType::EcdsaP256,
            &format!("tillkey:pki-ca:{common_name}"),
            false,
        )
        .map_err(|e| {
            backend.close();
            format!("generating the CA key in the device: {e}")
        })?;
    let spki = made
        .public_key_der
        .ok_or("the device returned no public key for the CA key")?;
    let reference = Reference {
        config,
        object: hex_encode(&made.object.0),
        public_key: hex_encode(&spki),
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = toml::to_string(&reference).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join(REFERENCE),
        format!("# The CA key is in the device this daemon configuration reaches; it never leaves it.\n{text}"),
    )
    .map_err(|e| format!("{REFERENCE}: {e}"))?;
    key_pair(backend, made.object, &spki)
}

/// The device-held key of the CA in `dir`, after checking it is the key `ca.crt` names.
pub fn load(dir: &Path, ca_pem: &str) -> Result<KeyPair, String> {
    let path = dir.join(REFERENCE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reference: Reference =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: {what} is not hex", path.display());
    let object = ObjectRef(hex_decode(&reference.object).ok_or_else(|| bad("object"))?);
    let spki = hex_decode(&reference.public_key).ok_or_else(|| bad("public_key"))?;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
        .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())
        .map_err(|e| format!("ca.crt: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("ca.crt: {e}"))?;
    if cert.public_key().raw != spki.as_slice() {
        return Err(format!(
            "{} names a different key than ca.crt; refusing to sign with it",
            path.display()
        ));
    }
    let backend = open_device(&reference.config)?;
    key_pair(backend, object, &spki)
}
