//! CWT claim sets (RFC 8392) sealed in COSE_Mac0 or COSE_Sign1 (RFC 9052), as Base45 text
//! (RFC 9285) for QR alphanumeric mode.
//!
//! Claims are a CBOR map with integer keys: the registered `exp` (4), `iat` (6) and `cti` (7, the
//! purchase id), and one private claim -65537 (the IANA CWT registry leaves keys below -65536 for
//! private use) holding a map of tillkey's fields under keys 0-7: type, store, pos, amount,
//! currency, description, payment_ref, request binding. The token
//! type is a claim *and* the text prefix, and each type has its own key, so a request token can
//! never be read as a "paid" token (domain separation twice over).

use coset::cbor::value::Value;
use coset::{
    iana, mac_structure_data, CoseMac0, CoseMac0Builder, CoseSign1, CoseSign1Builder,
    HeaderBuilder, MacContext, TaggedCborSerializable,
};

use crate::error::ServiceError;

const EXP: i64 = 4;
const IAT: i64 = 6;
/// `cti`: the purchase id, which is what makes a token unique.
const CTI: i64 = 7;
/// The one private claim: a map of tillkey's fields under small integer keys. One private key
/// (5 bytes of CBOR) instead of one per field keeps a "paid" QR small.
const TILLKEY: i64 = -65537;
const F_TYPE: i64 = 0;
const F_STORE: i64 = 1;
const F_POS: i64 = 2;
const F_AMOUNT: i64 = 3;
const F_CURRENCY: i64 = 4;
const F_DESCRIPTION: i64 = 5;
const F_PAYMENT_REF: i64 = 6;
const F_REQUEST: i64 = 7;

/// The claims of a retail token. Amounts are integers in the currency's minor unit (cents), so
/// no decimal point ever has to be parsed on a POS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: String,
    pub store: String,
    pub pos: String,
    pub purchase: String,
    pub amount: i64,
    pub currency: String,
    pub description: Option<String>,
    pub payment_ref: Option<String>,
    /// For "paid": the first 16 bytes of SHA-256 over the request token it answers.
    pub request: Option<Vec<u8>>,
    pub issued_at: i64,
    pub expires_at: i64,
}

fn bad(msg: impl Into<String>) -> ServiceError {
    ServiceError::invalid(format!("malformed token: {}", msg.into()))
}

impl Claims {
    pub fn to_cbor(&self) -> Result<Vec<u8>, ServiceError> {
        let mut fields = vec![
            (Value::from(F_TYPE), Value::from(self.kind.as_str())),
            (Value::from(F_STORE), Value::from(self.store.as_str())),
            (Value::from(F_POS), Value::from(self.pos.as_str())),
            (Value::from(F_AMOUNT), Value::from(self.amount)),
            (Value::from(F_CURRENCY), Value::from(self.currency.as_str())),
        ];
        if let Some(d) = &self.description {
            fields.push((Value::from(F_DESCRIPTION), Value::from(d.as_str())));
        }
        if let Some(p) = &self.payment_ref {
            fields.push((Value::from(F_PAYMENT_REF), Value::from(p.as_str())));
        }
        if let Some(r) = &self.request {
            fields.push((Value::from(F_REQUEST), Value::Bytes(r.clone())));
        }
        let claims = Value::Map(vec![
            (Value::from(EXP), Value::from(self.expires_at)),
            (Value::from(IAT), Value::from(self.issued_at)),
            (
                Value::from(CTI),
                Value::Bytes(self.purchase.as_bytes().to_vec()),
            ),
            (Value::from(TILLKEY), Value::Map(fields)),
        ]);
        let mut out = Vec::new();
        coset::cbor::ser::into_writer(&claims, &mut out).map_err(|e| ServiceError::Internal {
            detail: format!("encoding claims: {e}"),
        })?;
        Ok(out)
    }

    pub fn from_cbor(bytes: &[u8]) -> Result<Self, ServiceError> {
        let value: Value =
            coset::cbor::de::from_reader(bytes).map_err(|_| bad("claims are not CBOR"))?;
        let top = int_map(value, "claims")?;
        let mut c = Claims {
            kind: String::new(),
            store: String::new(),
            pos: String::new(),
            purchase: String::new(),
            amount: 0,
            currency: String::new(),
            description: None,
            payment_ref: None,
            request: None,
            issued_at: 0,
            expires_at: 0,
        };
        let mut fields = None;
        for (key, v) in top {
            match key {
                EXP => c.expires_at = int(v, "exp")?,
                IAT => c.issued_at = int(v, "iat")?,
                CTI => {
                    let b = v.into_bytes().map_err(|_| bad("cti is not bytes"))?;
                    c.purchase =
                        String::from_utf8(b).map_err(|_| bad("cti is not a purchase id"))?;
                }
                TILLKEY => fields = Some(int_map(v, "tillkey claim")?),
                other => return Err(bad(format!("unknown claim {other}"))),
            }
        }
        let mut seen = Vec::new();
        for (key, v) in fields.ok_or_else(|| bad("tillkey claim is missing"))? {
            seen.push(key);
            match key {
                F_TYPE => c.kind = text(v, "type")?,
                F_STORE => c.store = text(v, "store")?,
                F_POS => c.pos = text(v, "pos")?,
                F_AMOUNT => c.amount = int(v, "amount")?,
                F_CURRENCY => c.currency = text(v, "currency")?,
                F_DESCRIPTION => c.description = Some(text(v, "description")?),
                F_PAYMENT_REF => c.payment_ref = Some(text(v, "payment_ref")?),
                F_REQUEST => {
                    c.request = Some(
                        v.into_bytes()
                            .map_err(|_| bad("request binding is not bytes"))?,
                    )
                }
                other => return Err(bad(format!("unknown field {other}"))),
            }
        }
        for required in [F_TYPE, F_STORE, F_POS, F_AMOUNT, F_CURRENCY] {
            if !seen.contains(&required) {
                return Err(bad(format!("field {required} is missing")));
            }
        }
        if c.purchase.is_empty() || c.expires_at == 0 || c.issued_at == 0 {
            return Err(bad("cti, iat and exp are required"));
        }
        Ok(c)
    }
}

/// A CBOR map with integer keys, each at most once.
fn int_map(v: Value, what: &str) -> Result<Vec<(i64, Value)>, ServiceError> {
    let Value::Map(entries) = v else {
        return Err(bad(format!("{what} is not a map")));
    };
    let mut out: Vec<(i64, Value)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let k = k
            .as_integer()
            .and_then(|i| i64::try_from(i).ok())
            .ok_or_else(|| bad(format!("{what} has a key that is not an integer")))?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(bad(format!("{what} repeats key {k}")));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn text(v: Value, what: &str) -> Result<String, ServiceError> {
    v.into_text()
        .map_err(|_| bad(format!("{what} is not text")))
}

fn int(v: Value, what: &str) -> Result<i64, ServiceError> {
    v.as_integer()
        .and_then(|i| i64::try_from(i).ok())
        .ok_or_else(|| bad(format!("{what} is not an integer")))
}

/// A decoded, not yet authenticated token: what to check and with which key.
pub struct Sealed {
    /// The protected `kid`: `role#version` (see [`super::pos`]).
    pub kid: String,
    pub signed: bool,
    /// The exact bytes the MAC or signature covers.
    pub tbs: Vec<u8>,
    pub tag: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Tagged COSE_Mac0 with HMAC 256/256; `mac` computes the tag over the MAC_structure.
pub fn seal_mac0(
    payload: Vec<u8>,
    kid: &str,
    mac: impl FnOnce(&[u8]) -> Result<Vec<u8>, ServiceError>,
) -> Result<Vec<u8>, ServiceError> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::HMAC_256_256)
        .key_id(kid.as_bytes().to_vec())
        .build();
    let mut msg = CoseMac0Builder::new()
        .protected(protected)
        .payload(payload)
        .build();
    let tbm = mac_structure_data(
        MacContext::CoseMac0,
        msg.protected.clone(),
        &[],
        msg.payload.as_deref().unwrap_or_default(),
    );
    msg.tag = mac(&tbm)?;
    msg.to_tagged_vec().map_err(|e| ServiceError::Internal {
        detail: format!("encoding COSE_Mac0: {e}"),
    })
}

/// Tagged COSE_Sign1 with ES256; `sign` returns raw `r || s` over SHA-256 of the Sig_structure.
pub fn seal_sign1(
    payload: Vec<u8>,
    kid: &str,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, ServiceError>,
) -> Result<Vec<u8>, ServiceError> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .key_id(kid.as_bytes().to_vec())
        .build();
    let mut msg = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .build();
    msg.signature = sign(&msg.tbs_data(&[]))?;
    msg.to_tagged_vec().map_err(|e| ServiceError::Internal {
        detail: format!("encoding COSE_Sign1: {e}"),
    })
}

/// Parse a tagged COSE_Mac0 (HMAC 256/256) or COSE_Sign1 (ES256); nothing is trusted yet.
pub fn open(bytes: &[u8]) -> Result<Sealed, ServiceError> {
    let kid = |k: &[u8]| String::from_utf8(k.to_vec()).map_err(|_| bad("kid is not text"));
    if let Ok(m) = CoseMac0::from_tagged_slice(bytes) {
        let alg_ok = m.protected.header.alg
            == Some(coset::Algorithm::Assigned(iana::Algorithm::HMAC_256_256));
        if !alg_ok || !m.protected.header.crit.is_empty() {
            return Err(bad(
                "COSE_Mac0 must use HMAC 256/256 and no critical headers",
            ));
        }
        let payload = m.payload.clone().ok_or_else(|| bad("detached payload"))?;
        return Ok(Sealed {
            kid: kid(&m.protected.header.key_id)?,
            signed: false,
            tbs: mac_structure_data(MacContext::CoseMac0, m.protected.clone(), &[], &payload),
            tag: m.tag.clone(),
            payload,
        });
    }
    if let Ok(m) = CoseSign1::from_tagged_slice(bytes) {
        let alg_ok =
            m.protected.header.alg == Some(coset::Algorithm::Assigned(iana::Algorithm::ES256));
        if !alg_ok || !m.protected.header.crit.is_empty() {
            return Err(bad("COSE_Sign1 must use ES256 and no critical headers"));
        }
        let payload = m.payload.clone().ok_or_else(|| bad("detached payload"))?;
        return Ok(Sealed {
            kid: kid(&m.protected.header.key_id)?,
            signed: true,
            tbs: m.tbs_data(&[]),
            tag: m.signature.clone(),
            payload,
        });
    }
    Err(bad("not a tagged COSE_Mac0 or COSE_Sign1"))
}

/// `prefix` + Base45. Base45 uses only QR alphanumeric characters, so the QR stays in the
/// dense alphanumeric mode.
pub fn to_text(prefix: &str, cose: &[u8]) -> String {
    format!("{prefix}{}", base45::encode(cose))
}

pub fn from_text<'a>(
    text: &'a str,
    prefixes: &[&'a str],
) -> Result<(&'a str, Vec<u8>), ServiceError> {
    let prefix = prefixes
        .iter()
        .find(|p| text.starts_with(**p))
        .ok_or_else(|| {
            bad(format!(
                "expected a token starting with {}",
                prefixes.join(" or ")
            ))
        })?;
    let bytes = base45::decode(&text[prefix.len()..]).map_err(|_| bad("not valid Base45"))?;
    Ok((prefix, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Claims {
        Claims {
            kind: "pos-paid".into(),
            store: "1212".into(),
            pos: "0001".into(),
            purchase: "P-000042".into(),
            amount: 1250,
            currency: "EUR".into(),
            description: None,
            payment_ref: Some("PSP-77".into()),
            request: Some(vec![7; 16]),
            issued_at: 1_795_000_000,
            expires_at: 1_795_000_600,
        }
    }

    #[test]
    fn claims_round_trip_and_refuse_junk() {
        let c = sample();
        assert_eq!(Claims::from_cbor(&c.to_cbor().unwrap()).unwrap(), c);
        assert!(Claims::from_cbor(&[]).is_err());
        assert!(Claims::from_cbor(&[0xa0]).is_err()); // empty map: claims missing
        assert!(Claims::from_cbor(&[0xff, 0x00]).is_err());
    }

    #[test]
    fn mac0_seals_opens_and_base45_round_trips() {
        let payload = sample().to_cbor().unwrap();
        let cose = seal_mac0(payload.clone(), "stores/1212/pos/0001/qr-paid#1", |tbs| {
            Ok(ring::digest::digest(&ring::digest::SHA256, tbs)
                .as_ref()
                .to_vec())
        })
        .unwrap();
        let text = to_text("TKP1:", &cose);
        assert!(text
            .bytes()
            .all(|b| b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:".contains(&b)));
        let (prefix, bytes) = from_text(&text, &["TKR1:", "TKP1:"]).unwrap();
        assert_eq!(prefix, "TKP1:");
        let s = open(&bytes).unwrap();
        assert_eq!(
            (s.kid.as_str(), s.signed, s.payload),
            ("stores/1212/pos/0001/qr-paid#1", false, payload)
        );
        assert!(from_text("XX:ABC", &["TKP1:"]).is_err());
        assert!(from_text("TKP1:!!!", &["TKP1:"]).is_err());
        assert!(open(b"garbage").is_err());
    }
}
