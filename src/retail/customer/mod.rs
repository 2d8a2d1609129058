//! Customer QR codes (seed 001): server-issued one-time tokens, and tokens a registered device
//! signs itself.
//!
//! One-time tokens are 128 random bits; only an HMAC of each (under a key in the token) is
//! stored, so the table alone cannot redeem anything. Every refusal of a redemption looks the
//! same, whether the token was unknown, expired, used or malformed.
//!
//! Device tokens are COSE_Sign1 (EdDSA or ES256) over CWT claims `sub` (2), `exp` (4), `iat`
//! (6) and `cti` (7, a nonce of at least 16 bytes), `kid` = the device id: accepted only from the
//! subject's registered, unrevoked device key, within the clock window, each nonce once.

mod store;

pub use store::CustomerStore;

use coset::cbor::value::Value;
use coset::{iana, CoseSign1, TaggedCborSerializable};

use std::sync::Arc;

use crate::config::TokenSettings;
use crate::encoding::hex_encode;
use crate::error::ServiceError;
use crate::keys::KeyType;
use crate::policy::Operation;
use crate::service::{unix_now, Caller, KeyCore};
pub use store::Device;

pub const OTP_PREFIX: &str = "TKC1:";
pub const DEVICE_PREFIX: &str = "TKD1:";
const OTP_LABEL: &[u8] = b"tillkey/customer-otp/v1\0";
const OTP_TTL: u64 = 120;
const OTP_MAX_TTL: u64 = 900;
/// A device token may not claim to live longer than this.
const DEVICE_MAX_LIFE: i64 = 300;

const ED25519_SPKI: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn subject_ok(s: &str) -> Result<(), ServiceError> {
    if (1..=128).contains(&s.len()) && !s.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "subject is 1-128 bytes of printable characters",
        ))
    }
}

/// The result of checking a device-signed token.
pub struct DeviceCheck {
    pub valid: bool,
    pub reason: Option<String>,
    pub subject: String,
    pub device: String,
}

/// Customer QR codes over the key core: one-time tokens and registered device keys.
pub struct CustomerTokens {
    core: Arc<KeyCore>,
    store: CustomerStore,
    settings: TokenSettings,
}

impl CustomerTokens {
    pub fn new(core: Arc<KeyCore>, store: CustomerStore, settings: TokenSettings) -> Self {
        Self {
            core,
            store,
            settings,
        }
    }
}

impl CustomerTokens {
    pub async fn issue_customer_otp(
        &self,
        caller: &Caller,
        key: &str,
        subject: &str,
        ttl: Option<u64>,
    ) -> Result<(String, i64), ServiceError> {
        subject_ok(subject)?;
        let ttl = ttl.unwrap_or(OTP_TTL);
        if !(1..=OTP_MAX_TTL).contains(&ttl) {
            return Err(ServiceError::invalid(format!(
                "ttl must be 1..={OTP_MAX_TTL} seconds"
            )));
        }
        let name = self.core.authorize(caller, Operation::Sign, key)?;
        let (_, v) = self
            .core
            .claim_active(&name, "index one-time tokens with", |t| {
                t == KeyType::HmacSha256
            })
            .await?;
        let secret = self.core.random::<16>()?;
        let mac = self
            .core
            .device()
            .sign(
                KeyType::HmacSha256,
                &v.object,
                [OTP_LABEL, &secret].concat(),
            )
            .await?;
        let expires_at = unix_now() + ttl as i64;
        self.store
            .insert_otp(&hex_encode(&mac), key, subject, expires_at)
            .await?;
        Ok((
            format!("{OTP_PREFIX}{}", base45::encode(secret)),
            expires_at,
        ))
    }

    /// The subject, if this call redeemed the token; `None` for every kind of refusal alike.
    pub async fn redeem_customer_otp(
        &self,
        caller: &Caller,
        key: &str,
        token: &str,
    ) -> Result<Option<String>, ServiceError> {
        let name = self.core.authorize(caller, Operation::Verify, key)?;
        let record = self.core.lookup(&name)?;
        if record.key_type != KeyType::HmacSha256 {
            return Err(ServiceError::UnsupportedOperation(
                "one-time tokens are indexed with an hmac-sha256 key".into(),
            ));
        }
        let secret = token
            .trim()
            .strip_prefix(OTP_PREFIX)
            .and_then(|b| base45::decode(b).ok())
            .filter(|s| s.len() == 16)
            .unwrap_or_else(|| vec![0u8; 16]); // still computed: a malformed token costs the same
        let now = unix_now();
        for idx in self.core.keyed_indexes(&record, OTP_LABEL, &secret).await? {
            if let Some(subject) = self.store.redeem_otp(&idx, key, now).await? {
                return Ok(Some(subject));
            }
        }
        Ok(None)
    }

    /// Register a device's public key (PEM SubjectPublicKeyInfo, Ed25519 or P-256) for a subject
    /// in `realm`; the subject's earlier device keys are revoked in the same transaction.
    pub async fn register_device(
        &self,
        caller: &Caller,
        realm: &str,
        subject: &str,
        pem: &str,
    ) -> Result<Device, ServiceError> {
        subject_ok(subject)?;
        self.core.authorize(caller, Operation::Update, realm)?;
        let der = pem_der(pem)?;
        let alg = if der.len() == 44 && der.starts_with(&ED25519_SPKI) {
            "ed25519"
        } else if crate::encoding::spki_from_ec_point(
            KeyType::EcdsaP256,
            der.get(26..).unwrap_or_default(),
        )
        .as_deref()
            == Some(&der[..])
        {
            "es256"
        } else {
            return Err(ServiceError::invalid(
                "public_key_pem must be an Ed25519 or P-256 public key (SPKI PEM)",
            ));
        };
        let d = Device {
            id: hex_encode(&self.core.random::<16>()?),
            realm: realm.to_owned(),
            subject: subject.to_owned(),
            alg: alg.to_owned(),
            public_key: hex_encode(&der),
            state: "active".into(),
        };
        self.store.register_device(&d, unix_now()).await?;
        Ok(d)
    }

    pub async fn revoke_device(&self, caller: &Caller, id: &str) -> Result<Device, ServiceError> {
        let d = self
            .store
            .device(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no device {id}")))?;
        self.core.authorize(caller, Operation::Update, &d.realm)?;
        self.store.revoke_device(id).await?;
        Ok(Device {
            state: "revoked".into(),
            ..d
        })
    }

    pub async fn verify_customer_signed(
        &self,
        caller: &Caller,
        realm: &str,
        token: &str,
    ) -> Result<DeviceCheck, ServiceError> {
        self.core.authorize(caller, Operation::Verify, realm)?;
        let bad = |m: &str| ServiceError::invalid(format!("malformed device token: {m}"));
        let body = token
            .trim()
            .strip_prefix(DEVICE_PREFIX)
            .ok_or_else(|| bad("missing TKD1: prefix"))?;
        let cose = base45::decode(body).map_err(|_| bad("not Base45"))?;
        let msg =
            CoseSign1::from_tagged_slice(&cose).map_err(|_| bad("not a tagged COSE_Sign1"))?;
        let claims = DeviceClaims::parse(msg.payload.as_deref().ok_or_else(|| bad("no payload"))?)?;
        let device_id = String::from_utf8(msg.protected.header.key_id.clone())
            .map_err(|_| bad("kid is not text"))?;
        let mut check = DeviceCheck {
            valid: false,
            reason: None,
            subject: claims.sub.clone(),
            device: device_id.clone(),
        };
        let refuse = |mut c: DeviceCheck, why: &str| {
            c.reason = Some(why.to_owned());
            Ok(c)
        };
        let Some(device) = self.store.device(&device_id).await? else {
            return refuse(check, "unknown device");
        };
        if device.realm != realm || device.subject != claims.sub {
            return refuse(check, "the device is not registered for this subject");
        }
        if device.state != "active" {
            return refuse(check, "the device key was revoked or replaced");
        }
        let (alg, ring_alg): (_, &'static dyn ring::signature::VerificationAlgorithm) =
            match device.alg.as_str() {
                "ed25519" => (iana::Algorithm::EdDSA, &ring::signature::ED25519),
                _ => (
                    iana::Algorithm::ES256,
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                ),
            };
        if msg.protected.header.alg != Some(coset::Algorithm::Assigned(alg))
            || !msg.protected.header.crit.is_empty()
        {
            return refuse(check, "the algorithm does not match the device key");
        }
        let der = crate::encoding::hex_decode(&device.public_key).unwrap_or_default();
        let raw = if device.alg == "ed25519" {
            der.get(12..)
        } else {
            der.get(26..)
        }
        .unwrap_or_default();
        let ok = ring::signature::UnparsedPublicKey::new(ring_alg, raw)
            .verify(&msg.tbs_data(&[]), &msg.signature)
            .is_ok();
        if !ok {
            return refuse(check, "the signature does not verify");
        }
        let now = unix_now();
        if (claims.iat - now).abs() > self.settings.clock_window {
            return refuse(check, "iat is outside the clock window");
        }
        if claims.exp <= now || claims.exp - claims.iat > DEVICE_MAX_LIFE {
            return refuse(check, "expired (or claims too long a life)");
        }
        if !self
            .store
            .use_nonce(
                &device_id,
                &hex_encode(&claims.nonce),
                claims.exp + self.settings.clock_window,
            )
            .await?
        {
            return refuse(check, "replayed: this nonce was already used");
        }
        check.valid = true;
        Ok(check)
    }
}

struct DeviceClaims {
    sub: String,
    iat: i64,
    exp: i64,
    nonce: Vec<u8>,
}

impl DeviceClaims {
    fn parse(payload: &[u8]) -> Result<Self, ServiceError> {
        let bad = |m: &str| ServiceError::invalid(format!("malformed device token: {m}"));
        let v: Value =
            coset::cbor::de::from_reader(payload).map_err(|_| bad("claims are not CBOR"))?;
        let Value::Map(entries) = v else {
            return Err(bad("claims are not a map"));
        };
        let (mut sub, mut iat, mut exp, mut nonce) = (None, None, None, None);
        for (k, v) in entries {
            match k.as_integer().and_then(|i| i64::try_from(i).ok()) {
                Some(2) => sub = v.into_text().ok(),
                Some(6) => iat = v.as_integer().and_then(|i| i64::try_from(i).ok()),
                Some(4) => exp = v.as_integer().and_then(|i| i64::try_from(i).ok()),
                Some(7) => nonce = v.into_bytes().ok(),
                _ => return Err(bad("unexpected claim")),
            }
        }
        let nonce = nonce
            .filter(|n| (16..=64).contains(&n.len()))
            .ok_or_else(|| bad("cti nonce of 16-64 bytes is required"))?;
        Ok(Self {
            sub: sub.ok_or_else(|| bad("sub is required"))?,
            iat: iat.ok_or_else(|| bad("iat is required"))?,
            exp: exp.ok_or_else(|| bad("exp is required"))?,
            nonce,
        })
    }
}

fn pem_der(pem: &str) -> Result<Vec<u8>, ServiceError> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|_| ServiceError::invalid("public_key_pem is not PEM"))
}
