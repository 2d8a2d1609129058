//! Key vocabulary shared by every layer: names, types, versions and their states.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A name or duration a client wrote that does not parse; the message says why (it reaches
/// the client as `invalid_argument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Names under this prefix belong to the service itself (the audit key, later the status-list
/// key); no client may create, use or manage them.
pub const RESERVED_PREFIX: &str = "tillkey/";

/// Longest accepted key name; keeps names usable as PKCS#11 labels and index keys.
pub const MAX_NAME_LEN: usize = 200;
/// Longest accepted segment of a key name.
pub const MAX_SEGMENT_LEN: usize = 64;

/// A validated resource name such as `stores/1212/pos/0001/qr-mac`.
///
/// Lower-case segments of `[a-z0-9._-]` joined by `/`; no empty, `.` or `..` segments, so a
/// name can never be read as a path or glob and compares byte for byte. Shared, not copied:
/// the index, the scheduler's agenda and every record of a key hold the same string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(Arc<str>);

impl KeyName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = |why: &str| Invalid(format!("invalid key name: {why}"));
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
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_PREFIX)
    }
}

/// The characters of a key name's segments (and of the ids that become segments).
pub fn is_name_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')
}

/// Why a prefix action's prefix was refused.
pub const WHOLE_SEGMENTS: &str = "prefix is required, ends with '/' (whole segments), and contains only a-z, 0-9, '.', '_', '-' and '/'";

/// A prefix of key names, as listings, the status feed and prefix actions take it: name
/// characters and `/`, at most a name's length plus its separator. Empty selects every key.
/// Parsed where a request enters, so the layers below hold only well-formed prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.len() > MAX_NAME_LEN + 1 || !s.bytes().all(|b| is_name_byte(b) || b == b'/') {
            return Err(Invalid(
                "prefix may contain only a-z, 0-9, '.', '_', '-' and '/'".into(),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// A prefix an action on every key under it takes: whole segments (not empty, ending in
    /// `/`), so "stores/1/" never also takes "stores/12/...".
    pub fn parse_whole_segments(s: &str) -> Result<Self, Invalid> {
        match Self::parse(s) {
            Ok(p) if p.is_whole_segments() => Ok(p),
            _ => Err(Invalid(WHOLE_SEGMENTS.into())),
        }
    }

    pub fn is_whole_segments(&self) -> bool {
        self.0.len() > 1 && self.0.ends_with('/')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Orders and hashes exactly as the string does, so maps keyed by name can be searched by `&str`.
impl Borrow<str> for KeyName {
    fn borrow(&self) -> &str {
        &self.0
    }
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
    /// A transport (key-encryption) key: wraps keys for export to a terminal, nothing else.
    #[serde(rename = "aes256-kw")]
    Aes256Kw,
    /// A master key that only derives per-terminal keys inside the device (see
    /// `crate::backend::Derivation`); it signs, encrypts and wraps nothing itself.
    #[serde(rename = "aes256-derive")]
    Aes256Derive,
}

impl KeyType {
    pub const ALL: [KeyType; 6] = [
        KeyType::HmacSha256,
        KeyType::EcdsaP256,
        KeyType::Ed25519,
        KeyType::Aes256Gcm,
        KeyType::Aes256Kw,
        KeyType::Aes256Derive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::HmacSha256 => "hmac-sha256",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
            KeyType::Aes256Gcm => "aes256-gcm",
            KeyType::Aes256Kw => "aes256-kw",
            KeyType::Aes256Derive => "aes256-derive",
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
        matches!(
            self,
            KeyType::HmacSha256 | KeyType::EcdsaP256 | KeyType::Ed25519
        )
    }

    /// Transport keys, which only wrap other keys for export.
    pub fn wraps(self) -> bool {
        matches!(self, KeyType::Aes256Kw)
    }

    pub fn encrypts(self) -> bool {
        matches!(self, KeyType::Aes256Gcm)
    }

    /// Master keys, which only derive other keys.
    pub fn derives(self) -> bool {
        matches!(self, KeyType::Aes256Derive)
    }

    /// Types a key derived from a master may have: symmetric keys the device can derive
    /// directly as a secret of the right length.
    pub fn derivable(self) -> bool {
        matches!(self, KeyType::HmacSha256 | KeyType::Aes256Gcm)
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

/// Per-key life-cycle settings, given at creation and (except `exportable`) changeable by an
/// officer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// Rotate automatically once the active version is this old (seconds).
    pub rotation_period: Option<u64>,
    /// How long a replaced version keeps verifying and decrypting before it retires (seconds).
    pub verify_grace: u64,
    /// Rotate once the active version has performed this many operations.
    pub max_operations: Option<u64>,
    /// May be exported wrapped under a terminal transport key; fixed at creation.
    pub exportable: bool,
}

/// A week: long enough for every POS to pick up a rotated key, short enough to bound exposure.
pub const DEFAULT_VERIFY_GRACE: u64 = 7 * 86_400;

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            rotation_period: None,
            verify_grace: DEFAULT_VERIFY_GRACE,
            max_operations: None,
            exportable: false,
        }
    }
}

/// Parse a duration such as `90d`, `12h`, `30m` or `5s` into seconds. One number, one unit:
/// unambiguous in a config review, and enough for cryptoperiods.
pub fn parse_duration(s: &str) -> Result<u64, Invalid> {
    let bad = || Invalid(format!("'{s}' is not a duration like 90d, 12h, 30m or 5s"));
    // Split on a character boundary: the last character may be any UTF-8 from a client.
    let Some((cut, _)) = s.char_indices().last() else {
        return Err(bad());
    };
    let (digits, unit) = s.split_at(cut);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(scale).ok_or_else(bad)?;
    if secs == 0 || secs > 100 * 365 * 86_400 {
        return Err(Invalid(format!(
            "duration '{s}' must be between 1s and 100 years"
        )));
    }
    Ok(secs)
}

/// The inverse of [`parse_duration`], choosing the largest exact unit.
pub fn format_duration(secs: u64) -> String {
    for (unit, scale) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs.is_multiple_of(scale) {
            return format!("{}{unit}", secs / scale);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_refuse_nonsense() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("5s").unwrap(), 5);
        assert_eq!(format_duration(parse_duration("36h").unwrap()), "36h");
        assert_eq!(format_duration(90), "90s");
        for bad in [
            "",
            "d",
            "5",
            "5w",
            "-5s",
            "0s",
            "1.5h",
            "99999999999999999d",
            " 5s",
            "5é",
            "é",
            "5日",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
