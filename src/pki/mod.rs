//! Certificates for tillkey's mutual TLS, made with `rcgen`.
//!
//! The development PKI (`tillkey pki dev DIR`) issues everything the quick start and the tests
//! need in one go: a CA, a server certificate for `localhost`/`127.0.0.1`, client certificates
//! whose identity is a SPIFFE-style URI SAN, one from an unrelated CA and one already expired.
//!
//! A production CA (`tillkey pki ca`) keeps its key either in `ca.key` (mode 0600) or, with
//! `--hsm`, inside the device the daemon's configuration names ([`hsm`]); every later `issue` and
//! `revoke` finds it the same way, so the rest of this module does not care where it lives.

pub mod hsm;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
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
        Self::with_key(common_name, valid_days, key)
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A CA whose key lives in the device (`--hsm`): generated there, never readable.
    pub fn new_in_device(
        common_name: &str,
        valid_days: i64,
        config: &Path,
        dir: &Path,
    ) -> Result<Self, String> {
        let key = hsm::generate(config, dir, common_name)?;
        Self::with_key(common_name, valid_days, key)
    }

    fn with_key(common_name: &str, valid_days: i64, key: KeyPair) -> Result<Self, String> {
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

    /// A CA kept in `dir` as `ca.crt` plus either `ca.key` (mode 0600) or `ca-key.toml` (the key
    /// is in a device).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |f: &str| {
            fs::read_to_string(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()))
        };
        let key = if dir.join(hsm::REFERENCE).exists() {
            hsm::load(dir, &read("ca.crt")?)?
        } else {
            KeyPair::from_pem(&read("ca.key")?).map_err(err)?
        };
        // Rebuilt from the stored certificate: same subject and key, so what it signs chains
        // to the ca.crt that clients and the daemon trust.
        let params = CertificateParams::from_ca_cert_pem(&read("ca.crt")?).map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Self { cert, key })
    }

    /// Write `ca.crt`, and `ca.key` unless the key is in a device (its reference was written
    /// when it was generated).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        fs::write(dir.join("ca.crt"), self.cert.pem()).map_err(|e| format!("ca.crt: {e}"))?;
        if self.key.as_remote().is_some() {
            return Ok(());
        }
        write_private(&dir.join("ca.key"), self.key.serialize_pem().as_bytes())
    }

    /// Sign a CRL listing every serial in `dir/revoked.txt` into `dir/crl.pem`.
    pub fn write_crl(&self, dir: &Path) -> Result<(), String> {
        let list = fs::read_to_string(dir.join("revoked.txt")).unwrap_or_default();
        let mut revoked = Vec::new();
        for line in list.lines().filter(|l| !l.trim().is_empty()) {
            let (serial, at) = line
                .split_once(' ')
                .ok_or_else(|| format!("revoked.txt: bad line '{line}'"))?;
            let serial = crate::encoding::hex_decode(serial)
                .ok_or_else(|| format!("revoked.txt: bad serial '{serial}'"))?;
            let at: i64 = at
                .trim()
                .parse()
                .map_err(|_| format!("revoked.txt: bad time in '{line}'"))?;
            revoked.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&serial),
                revocation_time: OffsetDateTime::from_unix_timestamp(at)
                    .map_err(|e| e.to_string())?,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let now = OffsetDateTime::now_utc();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            // Every CRL this CA writes carries a higher number than the last (the clock).
            crl_number: rcgen::SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .map_err(err)?;
        fs::write(dir.join("crl.pem"), crl.pem().map_err(err)?).map_err(|e| format!("crl.pem: {e}"))
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

/// A new CA for DIR, its key in a file or (with `device_config`) in the device. Refuses a
/// directory that already holds a CA: replacing it would orphan every certificate it issued.
pub fn create_ca(
    dir: &Path,
    name: &str,
    days: i64,
    device_config: Option<&Path>,
) -> Result<Authority, String> {
    if dir.join("ca.crt").exists() {
        return Err(format!("{} already holds a CA (ca.crt)", dir.display()));
    }
    match device_config {
        Some(config) => Authority::new_in_device(name, days, config, dir),
        None => Authority::new(name, days),
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
    // Kept (ca.key, 0600) so the dev CA can issue and revoke like a production one.
    ca.save(dir)?;
    ca.write_crl(dir)?;
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
    // Kept as a CA directory of its own, so tests can add it (with its CRL) to the trust bundle.
    other.save(&dir.join("foreign-ca"))?;
    other.write_crl(&dir.join("foreign-ca"))?;
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

/// Add the certificate in `cert_file` to the CA's revocation list and re-sign the CRL. The
/// daemon applies it on its next SIGHUP.
pub fn revoke(dir: &Path, cert_file: &Path) -> Result<String, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let ca = Authority::load(dir)?;
    let pem = fs::read(cert_file).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let (_, ca_cert) =
        X509Certificate::from_der(ca.cert.der()).map_err(|e| format!("ca.crt: {e}"))?;
    if cert.issuer() != ca_cert.subject() {
        return Err(format!("{} was not issued by this CA", cert_file.display()));
    }
    let serial = crate::encoding::hex_encode(cert.raw_serial());
    let path = dir.join("revoked.txt");
    let mut list = fs::read_to_string(&path).unwrap_or_default();
    if !list
        .lines()
        .any(|l| l.split(' ').next() == Some(serial.as_str()))
    {
        list.push_str(&format!(
            "{serial} {}\n",
            OffsetDateTime::now_utc().unix_timestamp()
        ));
        fs::write(&path, list).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    ca.write_crl(dir)?;
    Ok(serial)
}
