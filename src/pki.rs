//! Certificates for tillkey's mutual TLS, made with `rcgen`.
//!
//! The development PKI (`tillkey pki dev DIR`) issues everything the quick start and the tests
//! need in one go: a CA, a server certificate for `localhost`/`127.0.0.1`, client certificates
//! whose identity is a SPIFFE-style URI SAN, one from an unrelated CA and one already expired.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Trust domain of the development identities.
pub const DEV_TRUST_DOMAIN: &str = "tillkey.test";

pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

/// What a leaf certificate is for.
pub enum Leaf<'a> {
    Server {
        dns: &'a [&'a str],
        ips: &'a [&'a str],
    },
    Client {
        uri: Option<&'a str>,
        cn: &'a str,
    },
}

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn err(e: rcgen::Error) -> String {
    format!("certificate generation: {e}")
}

impl Authority {
    pub fn new(common_name: &str, valid_days: i64) -> Result<Self, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(valid_days);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issue a leaf valid from `not_before` for `valid_days`.
    pub fn issue(
        &self,
        leaf: Leaf<'_>,
        not_before: OffsetDateTime,
        valid_days: i64,
    ) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_before + Duration::days(valid_days);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match leaf {
            Leaf::Server { dns, ips } => {
                params.distinguished_name.push(
                    DnType::CommonName,
                    dns.first().copied().unwrap_or("tillkeyd"),
                );
                for d in dns {
                    params
                        .subject_alt_names
                        .push(SanType::DnsName((*d).try_into().map_err(err)?));
                }
                for ip in ips {
                    let ip = ip.parse().map_err(|e| format!("server IP '{ip}': {e}"))?;
                    params.subject_alt_names.push(SanType::IpAddress(ip));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            Leaf::Client { uri, cn } => {
                params.distinguished_name.push(DnType::CommonName, cn);
                if let Some(uri) = uri {
                    params
                        .subject_alt_names
                        .push(SanType::URI(uri.try_into().map_err(err)?));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Write a certificate and its key as `DIR/NAME.crt` and `DIR/NAME.key` (key mode 0600).
pub fn write_pair(dir: &Path, name: &str, issued: &Issued) -> Result<(), String> {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    fs::write(&crt, &issued.cert_pem).map_err(|e| format!("{}: {e}", crt.display()))?;
    write_private(&key, issued.key_pem.as_bytes())
}

pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The development PKI. Client identities:
/// officer `spiffe://tillkey.test/officer/alice` (officer2: `.../officer/bob`), auditor
/// `spiffe://tillkey.test/auditor/carol`, service `spiffe://tillkey.test/svc/payments`,
/// stranger `spiffe://tillkey.test/svc/stranger` (no grants), `cn-only` (identity from the CN
/// `legacy-pos-gateway`), `expired` (the payments identity, expired yesterday) and `foreign`
/// (the payments identity from another CA).
pub fn dev(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = Authority::new("tillkey dev CA", 3650)?;
    fs::write(dir.join("ca.crt"), ca.cert_pem()).map_err(|e| format!("ca.crt: {e}"))?;
    let now = OffsetDateTime::now_utc() - Duration::hours(1);
    let server = ca.issue(
        Leaf::Server {
            dns: &["localhost"],
            ips: &["127.0.0.1", "::1"],
        },
        now,
        825,
    )?;
    write_pair(dir, "server", &server)?;
    let td = DEV_TRUST_DOMAIN;
    let clients = [
        ("officer", format!("spiffe://{td}/officer/alice"), "alice"),
        ("officer2", format!("spiffe://{td}/officer/bob"), "bob"),
        ("service", format!("spiffe://{td}/svc/payments"), "payments"),
        (
            "stranger",
            format!("spiffe://{td}/svc/stranger"),
            "stranger",
        ),
        ("auditor", format!("spiffe://{td}/auditor/carol"), "carol"),
    ];
    for (file, uri, cn) in &clients {
        write_pair(
            dir,
            file,
            &ca.issue(Leaf::Client { uri: Some(uri), cn }, now, 365)?,
        )?;
    }
    write_pair(
        dir,
        "cn-only",
        &ca.issue(
            Leaf::Client {
                uri: None,
                cn: "legacy-pos-gateway",
            },
            now,
            365,
        )?,
    )?;
    let payments = format!("spiffe://{td}/svc/payments");
    write_pair(
        dir,
        "expired",
        &ca.issue(
            Leaf::Client {
                uri: Some(&payments),
                cn: "payments",
            },
            OffsetDateTime::now_utc() - Duration::days(30),
            29,
        )?,
    )?;
    let other = Authority::new("someone else's CA", 3650)?;
    write_pair(
        dir,
        "foreign",
        &other.issue(
            Leaf::Client {
                uri: Some(&payments),
                cn: "payments",
            },
            now,
            365,
        )?,
    )?;
    Ok(())
}
