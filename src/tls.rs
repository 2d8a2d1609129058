//! Mutual TLS: the server configuration and the caller's identity.
//!
//! TLS 1.3 only: every client tillkey serves is a backend service we control, so there is no
//! legacy peer to justify 1.2's larger surface. A client certificate chaining to the configured
//! CA is required before any HTTP is read; without one the handshake fails and no handler runs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::TlsFiles;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificates found", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Build the whole server configuration from the files. Called at start and on SIGHUP: a reload
/// replaces the configuration only if every file loads, and only new handshakes see it.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let roots = load_roots(&files.client_ca)?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(crl) = &files.crl {
        let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(crl)
            .map_err(|e| format!("{}: {e}", crl.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", crl.display()))?;
        if crls.is_empty() {
            return Err(format!("{}: no CRL found", crl.display()));
        }
        builder = builder.with_crls(crls);
    }
    let verifier = builder
        .build()
        .map_err(|e| format!("client CA {}: {e}", files.client_ca.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| format!("server certificate {}: {e}", files.cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Prefix of identities taken from a subject CN (see [`identity`]).
pub const CN_PREFIX: &str = "cn:";

/// The caller's identity: the first URI SAN (SPIFFE-style) or, without one, `cn:` and the
/// subject CN, so a CN can never be mistaken for a URI identity in policies, approvals or the
/// audit trail.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_owned());
            }
        }
    }
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(|cn| format!("{CN_PREFIX}{cn}"));
    cn
}
