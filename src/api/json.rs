//! Request and response bodies. Bytes travel as standard base64 with padding.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::encoding;
use crate::error::ServiceError;
use crate::keys::format_duration;
use crate::registry::KeyRecord;
use crate::service::SignatureFormat;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: String,
    pub rotation_period: Option<String>,
    pub verify_grace: Option<String>,
    pub max_operations: Option<u64>,
    pub exportable: Option<bool>,
    /// Name of an `aes256-derive` master: the key is derived from it, not stored.
    pub derive_from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCreate {
    pub keys: Vec<CreateKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    pub rotation_period: Option<String>,
    pub verify_grace: Option<String>,
    pub max_operations: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    pub version: Option<u32>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub version: u32,
    pub transport_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: String,
    /// One-time AES-256 KEK, RSA-OAEP (SHA-1, MGF1-SHA1) under the wrapping key.
    pub encrypted_kek: String,
    /// The material, AES key wrap with padding (RFC 5649) under that KEK.
    pub wrapped_key: String,
    pub kcv: Option<String>,
    pub rotation_period: Option<String>,
    pub verify_grace: Option<String>,
    pub max_operations: Option<u64>,
    pub exportable: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destroy {
    pub version: u32,
}

#[derive(Serialize)]
pub struct ApprovalView {
    pub id: String,
    pub action: String,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    pub requested_by: String,
    pub requested_at: String,
    pub expires_at: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

impl ApprovalView {
    pub fn of(a: &crate::registry::approvals::ApprovalRecord) -> Self {
        Self {
            id: a.id.clone(),
            action: a.action.clone(),
            key: a.key.clone(),
            version: a.version,
            requested_by: a.requested_by.clone(),
            requested_at: rfc3339(a.requested_at),
            expires_at: rfc3339(a.expires_at),
            state: a.state.clone(),
            decided_by: a.decided_by.clone(),
            decided_at: a.decided_at.map(rfc3339),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixAction {
    pub prefix: String,
    pub reason: Option<String>,
}

/// `message` for one signature, or `batch` for many (see `api::batch`); exactly one of them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sign {
    pub message: Option<String>,
    pub batch: Option<Vec<SignItem>>,
    pub signature_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignItem {
    pub message: String,
}

/// `message` and `signature` for one check, or `batch` for many; exactly one of the two forms.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    pub message: Option<String>,
    pub signature: Option<String>,
    pub key_version: Option<u32>,
    pub batch: Option<Vec<VerifyItem>>,
    pub signature_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyItem {
    pub message: String,
    pub signature: String,
    pub key_version: Option<u32>,
}

/// A field a single (non-batch) call needs.
pub fn required<T>(field: &str, v: Option<T>) -> Result<T, ServiceError> {
    v.ok_or_else(|| ServiceError::invalid(format!("missing field '{field}' (or give 'batch')")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encrypt {
    pub plaintext: String,
    pub associated_data: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decrypt {
    pub ciphertext: String,
    pub associated_data: Option<String>,
}

#[derive(Serialize)]
pub struct KeyView {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: &'static str,
    pub created_at: String,
    pub created_by: String,
    pub rotation_period: Option<String>,
    pub verify_grace: String,
    pub max_operations: Option<u64>,
    pub exportable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derive_from: Option<String>,
    pub active_version: Option<u32>,
    pub versions: Vec<VersionView>,
}

#[derive(Serialize)]
pub struct VersionView {
    pub version: u32,
    pub state: &'static str,
    pub created_at: String,
    pub state_changed_at: String,
    pub changed_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<String>,
    pub operations: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kcv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// For derived versions: the master version and KDF that make it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derivation: Option<DerivationView>,
}

#[derive(Serialize)]
pub struct DerivationView {
    pub master_version: u32,
    pub kdf: &'static str,
}

impl KeyView {
    pub fn of(k: &KeyRecord) -> Self {
        Self {
            name: k.name.to_string(),
            key_type: k.key_type.as_str(),
            created_at: rfc3339(k.created_at),
            created_by: k.created_by.to_string(),
            rotation_period: k.lifecycle.rotation_period.map(format_duration),
            verify_grace: format_duration(k.lifecycle.verify_grace),
            max_operations: k.lifecycle.max_operations,
            exportable: k.lifecycle.exportable,
            derive_from: k.derive_from.as_ref().map(|m| m.to_string()),
            active_version: k.active().map(|v| v.version),
            versions: k
                .versions
                .iter()
                .map(|v| VersionView {
                    version: v.version,
                    state: v.state.as_str(),
                    created_at: rfc3339(v.created_at),
                    state_changed_at: rfc3339(v.state_changed_at),
                    changed_by: v.changed_by.to_string(),
                    reason: v.reason.clone(),
                    grace_until: v.grace_until.map(rfc3339),
                    operations: v.operations.count(),
                    kcv: v.kcv.clone(),
                    public_key_pem: v
                        .public_key_der
                        .as_deref()
                        .map(|der| encoding::pem("PUBLIC KEY", der)),
                    derivation: v.derivation.map(|d| DerivationView {
                        master_version: d.master_version,
                        kdf: d.kdf.as_str(),
                    }),
                })
                .collect(),
        }
    }
}

pub fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            // Data errors name the field; they echo only the caller's own input.
            Category::Data => ServiceError::invalid(format!("invalid request body: {e}")),
            _ => ServiceError::invalid(format!(
                "request body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )),
        }
    })
}

pub fn b64(field: &str, value: &str) -> Result<Vec<u8>, ServiceError> {
    STANDARD
        .decode(value)
        .map_err(|_| ServiceError::invalid(format!("field '{field}' is not valid standard base64")))
}

/// An optional bytes field; absent reads as empty, as AEAD associated data does.
pub fn optional_b64(field: &str, v: Option<&str>) -> Result<Vec<u8>, ServiceError> {
    v.map_or(Ok(Vec::new()), |v| b64(field, v))
}

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn signature_format(v: Option<&str>) -> Result<SignatureFormat, ServiceError> {
    match v {
        None | Some("der") => Ok(SignatureFormat::Der),
        Some("raw") => Ok(SignatureFormat::Raw),
        Some(other) => Err(ServiceError::invalid(format!(
            "signature_format '{other}' is not 'der' or 'raw'"
        ))),
    }
}

/// RFC 3339 UTC timestamp from Unix seconds (proleptic Gregorian, days-from-civil inverse).
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Same bytes as a `json!` map of the same fields, which sorts its keys at every level:
    /// what the answers' typed views are held to.
    pub(crate) fn as_before<T: Serialize>(v: &T) {
        let direct = serde_json::to_string(v).unwrap();
        let sorted = serde_json::to_value(v).unwrap().to_string();
        assert_eq!(direct, sorted);
    }

    pub(crate) fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_437_296), "2026-11-23T12:34:56Z");
    }
}
