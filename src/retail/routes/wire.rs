//! The retail endpoints' wire types: request bodies as clients send them (unknown fields are
//! refused) and answers as they are written.

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PosRequestIssue {
    pub store_id: String,
    pub pos_id: String,
    pub purchase_id: String,
    /// Minor units (cents).
    pub amount: i64,
    pub currency: String,
    pub description: Option<String>,
    pub ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PosPaidIssue {
    pub request_token: String,
    pub payment_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtpIssue {
    pub key: String,
    pub subject: String,
    pub ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedToken {
    pub key: String,
    pub token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRegister {
    pub realm: String,
    pub subject: String,
    pub public_key_pem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTokenVerify {
    pub realm: String,
    pub token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeIssue {
    pub key: String,
    pub subject: String,
    pub ttl: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeVerify {
    pub response: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    pub sender: String,
    pub plaintext: String,
    pub associated_data: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open {
    pub sender: String,
    pub counter: i64,
    pub ciphertext: String,
    pub associated_data: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiftIssue {
    pub key: String,
    #[serde(default)]
    pub pin: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiftCheck {
    pub key: String,
    pub code: String,
    pub pin: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenVerify {
    pub token: String,
}

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
    use crate::api::json::tests::{as_before, s};

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
