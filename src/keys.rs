//! Key vocabulary shared by every layer: names, types, versions and their states.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ServiceError;

/// Longest accepted key name; keeps names usable as PKCS#11 labels and index keys.
pub const MAX_NAME_LEN: usize = 200;
/// Longest accepted segment of a key name.
pub const MAX_SEGMENT_LEN: usize = 64;

/// A validated resource name such as `stores/1212/pos/0001/qr-mac`.
///
/// Lower-case segments of `[a-z0-9._-]` joined by `/`; no empty, `.` or `..` segments, so a
/// name can never be read as a path or glob and compares byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        let bad = |why: &str| ServiceError::invalid(format!("invalid key name: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad(&format!("longer than {MAX_NAME_LEN} characters")));
        }
        for seg in s.split('/') {
            if seg.is_empty() {
                return Err(bad("empty segment"));
            }
            if seg == "." || seg == ".." {
                return Err(bad("'.' and '..' segments are not allowed"));
            }
            if seg.len() > MAX_SEGMENT_LEN {
                return Err(bad(&format!(
                    "segment longer than {MAX_SEGMENT_LEN} characters"
                )));
            }
            if !seg.bytes().all(is_name_byte) {
                return Err(bad("segments may contain only a-z, 0-9, '.', '_' and '-'"));
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_name_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a key is for; fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "aes256-gcm")]
    Aes256Gcm,
}

impl KeyType {
    pub const ALL: [KeyType; 4] = [
        KeyType::HmacSha256,
        KeyType::EcdsaP256,
        KeyType::Ed25519,
        KeyType::Aes256Gcm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::HmacSha256 => "hmac-sha256",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
            KeyType::Aes256Gcm => "aes256-gcm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_asymmetric(self) -> bool {
        matches!(self, KeyType::EcdsaP256 | KeyType::Ed25519)
    }

    /// Types that produce and check signatures or MACs.
    pub fn signs(self) -> bool {
        !matches!(self, KeyType::Aes256Gcm)
    }

    pub fn encrypts(self) -> bool {
        matches!(self, KeyType::Aes256Gcm)
    }
}

/// Life-cycle state of one key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionState {
    /// The one version that signs, MACs and encrypts.
    Active,
    /// Older version during its grace window: verify and decrypt only.
    VerifyOnly,
    /// Grace over: refuses everything, kept for the record.
    Retired,
    /// Refuses everything from the moment of revocation.
    Revoked,
    /// Backend object deleted; metadata kept.
    Destroyed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::VerifyOnly => "verify-only",
            Self::Retired => "retired",
            Self::Revoked => "revoked",
            Self::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Active,
            Self::VerifyOnly,
            Self::Retired,
            Self::Revoked,
            Self::Destroyed,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    pub fn may_produce(self) -> bool {
        self == Self::Active
    }

    pub fn may_check(self) -> bool {
        matches!(self, Self::Active | Self::VerifyOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_store_and_pos_names() {
        for ok in ["a", "stores/1212/pos/0001/qr-mac", "x.y_z-1", "a/b.c"] {
            assert!(KeyName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_paths_case_and_empties() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let long_seg = "b".repeat(MAX_SEGMENT_LEN + 1);
        for bad in [
            "", "/a", "a/", "a//b", "..", "a/../b", "./a", "Stores/1", "a b", "a:b", "ä", "a*",
            &long, &long_seg,
        ] {
            assert!(KeyName::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn type_names_round_trip() {
        for t in KeyType::ALL {
            assert_eq!(KeyType::parse(t.as_str()), Some(t));
        }
        assert_eq!(KeyType::parse("rsa-2048"), None);
    }
}
