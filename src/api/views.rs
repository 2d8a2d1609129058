//! Response bodies, other than the key and approval views in [`super::json`].
//!
//! Fields are declared in alphabetical order on purpose: these bodies used to be built with
//! `serde_json::json!`, whose maps sort their keys, and declaring them in that order keeps each
//! answer's top level byte-for-byte what clients received before (the test below holds it).
//! An optional field that used to be added only when present is skipped when `None`; one that
//! was always there (`pin`, `kcv`) still serializes as `null`.

use serde::Serialize;

use super::json::{ApprovalView, KeyView};

// Keys, lifecycle, approvals, audit.

#[derive(Serialize)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

#[derive(Serialize)]
pub struct PrefixDone<'a> {
    pub keys: &'a [String],
    pub prefix: &'a str,
    pub versions: usize,
}

/// A dual-controlled action waiting for its second officer.
#[derive(Serialize)]
pub struct Pending {
    pub approval: ApprovalView,
}

#[derive(Serialize)]
pub struct ApprovalList {
    pub approvals: Vec<ApprovalView>,
}

/// An approved action and what it produced: the key, or the export.
#[derive(Serialize)]
pub struct Approved {
    pub approval: ApprovalView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyView>,
}

#[derive(Serialize)]
pub struct ExportView {
    pub algorithm: &'static str,
    pub kcv: Option<String>,
    pub key: String,
    pub transport_kcv: Option<String>,
    pub transport_key: String,
    pub transport_version: u32,
    pub version: u32,
    pub wrapped_key: String,
}

#[derive(Serialize)]
pub struct AuditPage {
    pub entries: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_since: Option<u64>,
}

#[derive(Serialize)]
pub struct StatusListView<'a> {
    pub cose_sign1: String,
    pub expires_at: String,
    pub format: &'static str,
    pub issued_at: String,
    pub kid: &'a str,
    pub public_key_pem: String,
    pub seq: u64,
}

#[derive(Serialize)]
pub struct WrappingKey {
    pub algorithm: &'static str,
    pub public_key_pem: String,
}

// Cryptographic operations.

#[derive(Serialize)]
pub struct Signed {
    pub key_version: u32,
    pub signature: String,
}

#[derive(Serialize)]
pub struct Verified {
    pub key_version: u32,
    pub valid: bool,
}

#[derive(Serialize)]
pub struct Encrypted {
    pub ciphertext: String,
    pub key_version: u32,
}

#[derive(Serialize)]
pub struct Decrypted {
    pub key_version: u32,
    pub plaintext: String,
}

/// One item's failure inside a batch answer, with the code and message a single call gives.
#[derive(Serialize)]
pub struct ItemError {
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
pub struct BatchCreated {
    pub created: usize,
    pub failed: usize,
    pub results: Vec<CreateResult>,
}

#[derive(Serialize)]
pub struct CreateResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ItemError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyView>,
    pub name: String,
    pub outcome: &'static str,
    pub status: u16,
}

// Retail tokens.

#[derive(Serialize)]
pub struct TokenIssued<'a> {
    pub chars: usize,
    pub expires_at: String,
    pub issued_at: String,
    pub key: &'a str,
    pub kid: &'a str,
    pub qr_error_correction: &'static str,
    pub qr_version: i16,
    pub repeated: bool,
    pub token: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
}

#[derive(Serialize)]
pub struct TokenChecked<'a> {
    pub amount: i64,
    pub currency: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
    pub expires_at: String,
    pub issued_at: String,
    pub key: &'a str,
    pub kid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_ref: Option<&'a str>,
    pub pos_id: &'a str,
    pub purchase_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    pub store_id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub valid: bool,
}

#[derive(Serialize)]
pub struct OtpIssued {
    pub expires_at: String,
    pub token: String,
}

#[derive(Serialize)]
pub struct OtpRedeemed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub redeemed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Serialize)]
pub struct DeviceRegistered {
    pub alg: String,
    pub device_id: String,
    pub realm: String,
    pub state: String,
    pub subject: String,
}

#[derive(Serialize)]
pub struct DeviceRevoked {
    pub device_id: String,
    pub state: String,
}

#[derive(Serialize)]
pub struct DeviceTokenChecked {
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub subject: String,
    pub valid: bool,
}

#[derive(Serialize)]
pub struct ChallengeIssued {
    pub challenge: String,
    pub expires_at: String,
    pub id: String,
}

#[derive(Serialize)]
pub struct ChallengeChecked {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub subject: String,
    pub valid: bool,
}

#[derive(Serialize)]
pub struct Sealed {
    pub ciphertext: String,
    pub counter: i64,
    pub key_version: u32,
}

#[derive(Serialize)]
pub struct Opened {
    pub counter: i64,
    pub key_version: u32,
    pub plaintext: String,
}

/// A new gift code; on reissue, also the id it replaces.
#[derive(Serialize)]
pub struct GiftIssued<'a> {
    pub code: String,
    pub id: String,
    pub pin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<&'a str>,
}

#[derive(Serialize)]
pub struct GiftChecked {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    pub valid: bool,
}

#[derive(Serialize)]
pub struct GiftState<'a> {
    pub id: &'a str,
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same bytes as a `json!` map of the same fields, which sorts its keys at every level.
    fn as_before<T: Serialize>(v: &T) {
        let direct = serde_json::to_string(v).unwrap();
        let sorted = serde_json::to_value(v).unwrap().to_string();
        assert_eq!(direct, sorted);
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn fields_keep_the_order_clients_saw() {
        as_before(&KeyList {
            keys: vec![],
            next_page_token: Some(s("t")),
        });
        as_before(&PrefixDone {
            keys: &[s("a")],
            prefix: "a",
            versions: 1,
        });
        as_before(&ApprovalList { approvals: vec![] });
        as_before(&ExportView {
            algorithm: "a",
            kcv: None,
            key: s("k"),
            transport_kcv: Some(s("c")),
            transport_key: s("t"),
            transport_version: 1,
            version: 2,
            wrapped_key: s("w"),
        });
        as_before(&AuditPage {
            entries: vec![],
            next_since: Some(3),
        });
        as_before(&StatusListView {
            cose_sign1: s("c"),
            expires_at: s("e"),
            format: "f",
            issued_at: s("i"),
            kid: "k",
            public_key_pem: s("p"),
            seq: 1,
        });
        as_before(&WrappingKey {
            algorithm: "a",
            public_key_pem: s("p"),
        });
        as_before(&Signed {
            key_version: 1,
            signature: s("s"),
        });
        as_before(&Verified {
            key_version: 1,
            valid: true,
        });
        as_before(&Encrypted {
            ciphertext: s("c"),
            key_version: 1,
        });
        as_before(&Decrypted {
            key_version: 1,
            plaintext: s("p"),
        });
        as_before(&BatchCreated {
            created: 0,
            failed: 1,
            results: vec![CreateResult {
                error: Some(ItemError {
                    code: "c",
                    message: s("m"),
                }),
                key: None,
                name: s("n"),
                outcome: "error",
                status: 400,
            }],
        });
    }

    #[test]
    fn retail_fields_keep_the_order_clients_saw() {
        as_before(&TokenIssued {
            chars: 1,
            expires_at: s("e"),
            issued_at: s("i"),
            key: "k",
            kid: "d",
            qr_error_correction: "M",
            qr_version: 3,
            repeated: false,
            token: "t",
            kind: "pos-request",
        });
        as_before(&TokenChecked {
            amount: 1,
            currency: "EUR",
            description: Some("d"),
            expires_at: s("e"),
            issued_at: s("i"),
            key: "k",
            kid: "d",
            payment_ref: Some("p"),
            pos_id: "p",
            purchase_id: "u",
            reason: Some("r"),
            store_id: "s",
            kind: "pos-paid",
            valid: false,
        });
        as_before(&OtpIssued {
            expires_at: s("e"),
            token: s("t"),
        });
        for subject in [None, Some(s("s"))] {
            as_before(&OtpRedeemed {
                reason: Some("invalid"),
                redeemed: false,
                subject,
            });
        }
        as_before(&DeviceRegistered {
            alg: s("a"),
            device_id: s("d"),
            realm: s("r"),
            state: s("s"),
            subject: s("u"),
        });
        as_before(&DeviceRevoked {
            device_id: s("d"),
            state: s("s"),
        });
        as_before(&DeviceTokenChecked {
            device_id: s("d"),
            reason: Some(s("r")),
            subject: s("s"),
            valid: false,
        });
        as_before(&ChallengeIssued {
            challenge: s("c"),
            expires_at: s("e"),
            id: s("i"),
        });
        as_before(&ChallengeChecked {
            reason: Some("r"),
            subject: s("s"),
            valid: false,
        });
        as_before(&Sealed {
            ciphertext: s("c"),
            counter: 1,
            key_version: 1,
        });
        as_before(&Opened {
            counter: 1,
            key_version: 1,
            plaintext: s("p"),
        });
        as_before(&GiftIssued {
            code: s("c"),
            id: s("i"),
            pin: None,
            supersedes: Some("o"),
        });
        as_before(&GiftChecked {
            id: Some(s("i")),
            reason: Some("r"),
            status: Some("active"),
            valid: true,
        });
        as_before(&GiftState {
            id: "i",
            status: s("s"),
        });
    }

    #[test]
    fn absent_optionals_are_omitted_and_null_ones_kept() {
        let v = serde_json::to_value(GiftChecked {
            id: None,
            reason: Some("invalid"),
            status: None,
            valid: false,
        })
        .unwrap();
        assert_eq!(v.to_string(), r#"{"reason":"invalid","valid":false}"#);
        let v = serde_json::to_value(GiftIssued {
            code: s("c"),
            id: s("i"),
            pin: None,
            supersedes: None,
        })
        .unwrap();
        assert_eq!(v.to_string(), r#"{"code":"c","id":"i","pin":null}"#);
    }
}
