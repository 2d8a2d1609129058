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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::json::tests::{as_before, s};

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
}
