//! POS payment QR codes (seed 000), done the sound way.
//!
//! - A *request* token (POS -> app -> server) is a CWT in COSE_Mac0 under the POS's own HMAC key
//!   `stores/{store}/pos/{pos}/qr-request`: one key per POS, never per store.
//! - A *paid* token (server -> app -> POS) is a CWT bound to the request it answers (first 16
//!   bytes of SHA-256 over the request token). It is signed with ES256 under the store key
//!   `stores/{store}/paid-sign` when that key exists, so a stolen POS holds nothing that can
//!   forge "paid"; otherwise it is MACed under the POS's separate `.../qr-paid` key.
//! - The two types differ in text prefix, `type` claim and key: never interchangeable.
//! - The protected `kid` is `role#version` (`req`, `paid` or `store`): the key's name follows
//!   from the role and the token's own store and POS, so a token can only ever name a key of
//!   the store and POS it claims, and the QR stays small.
//! - Paying a purchase again returns the same paid token, never one for another amount; the
//!   online check of a paid token consumes it.

mod store;

pub use store::PurchaseStore;

use super::cwt::{self, Claims};
use crate::backend::KeyRef;
use std::sync::Arc;

use crate::error::ServiceError;
use crate::keys::{KeyName, KeyType};
use crate::policy::Operation;
use crate::registry::RegistryError;
use crate::service::{unix_now, Caller, KeyCore};

pub const REQUEST_PREFIX: &str = "TKR1:";
pub const PAID_PREFIX: &str = "TKP1:";
const REQUEST: &str = "pos-request";
const PAID: &str = "pos-paid";
/// Default lives: a request is shown while the customer pays; "paid" is checked right away.
const REQUEST_TTL: u64 = 300;
const PAID_TTL: u64 = 600;
const MAX_TTL: u64 = 86_400;
/// Tolerated clock difference for `iat` in the future.
const CLOCK_SKEW: i64 = 30;

pub struct PosRequest {
    pub store: String,
    pub pos: String,
    pub purchase: String,
    pub amount: i64,
    pub currency: String,
    pub description: Option<String>,
    pub ttl: Option<u64>,
}

pub struct Issued {
    pub text: String,
    pub claims: Claims,
    pub kid: String,
    /// The registry name of the key that sealed it.
    pub key: String,
    /// True when an earlier identical payment's token was returned.
    pub repeated: bool,
}

/// The outcome of checking a token: `valid` with its claims, or the reason it was refused.
pub struct Checked {
    pub valid: bool,
    pub reason: Option<String>,
    pub claims: Claims,
    pub kid: String,
    /// The key the kid resolves to (empty when it resolves to none).
    pub key: String,
    pub cose: Vec<u8>,
}

fn request_key(store: &str, pos: &str) -> String {
    format!("stores/{store}/pos/{pos}/qr-request")
}

fn paid_mac_key(store: &str, pos: &str) -> String {
    format!("stores/{store}/pos/{pos}/qr-paid")
}

fn paid_sign_key(store: &str) -> String {
    format!("stores/{store}/paid-sign")
}

/// The key a `kid` role names for a token of `kind` about `claims`; `None` for a role that does
/// not seal that kind.
fn key_for_role(kind: &str, role: &str, claims: &Claims) -> Option<String> {
    match (kind, role) {
        (REQUEST, "req") => Some(request_key(&claims.store, &claims.pos)),
        (PAID, "paid") => Some(paid_mac_key(&claims.store, &claims.pos)),
        (PAID, "store") => Some(paid_sign_key(&claims.store)),
        _ => None,
    }
}

fn ttl(given: Option<u64>, default: u64) -> Result<i64, ServiceError> {
    let t = given.unwrap_or(default);
    if !(1..=MAX_TTL).contains(&t) {
        return Err(ServiceError::invalid(format!(
            "ttl must be 1..={MAX_TTL} seconds"
        )));
    }
    Ok(t as i64)
}

fn check_fields(r: &PosRequest) -> Result<(), ServiceError> {
    let id = |what: &str, v: &str| {
        let ok = (1..=32).contains(&v.len()) && v.bytes().all(crate::keys::is_name_byte);
        if ok {
            Ok(())
        } else {
            Err(ServiceError::invalid(format!(
                "{what} must be 1-32 characters of a-z, 0-9, '.', '_', '-'"
            )))
        }
    };
    id("store_id", &r.store)?;
    id("pos_id", &r.pos)?;
    if !(1..=64).contains(&r.purchase.len())
        || !r
            .purchase
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(ServiceError::invalid(
            "purchase_id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-'",
        ));
    }
    if !(1..=1_000_000_000_000).contains(&r.amount) {
        return Err(ServiceError::invalid(
            "amount is a positive integer in minor units (cents), at most 10^12",
        ));
    }
    if r.currency.len() != 3 || !r.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ServiceError::invalid(
            "currency is an ISO 4217 code such as EUR",
        ));
    }
    if let Some(d) = &r.description {
        if d.chars().count() > 64 || d.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "description is at most 64 printable characters",
            ));
        }
    }
    Ok(())
}

/// POS payment QR codes over the key core, with the paid purchases.
pub struct PosTokens {
    core: Arc<KeyCore>,
    store: PurchaseStore,
}

impl PosTokens {
    pub fn new(core: Arc<KeyCore>, store: PurchaseStore) -> Self {
        Self { core, store }
    }
}

impl PosTokens {
    /// Seal `claims` with the active version of `name` (MAC for HMAC keys, ES256 for P-256).
    async fn seal_claims(
        &self,
        caller: &Caller,
        name: &str,
        role: &str,
        claims: &Claims,
    ) -> Result<(String, Vec<u8>), ServiceError> {
        let key_name = self.core.authorize(caller, Operation::Sign, name)?;
        let (key, v) = self
            .core
            .claim_active(&key_name, "seal tokens with", |t| {
                matches!(t, KeyType::HmacSha256 | KeyType::EcdsaP256)
            })
            .await?;
        let kid = format!("{role}#{}", v.version);
        let payload = claims.to_cbor()?;
        let (key_type, sealing_kid) = (key.key_type, kid.clone());
        let cose = self
            .core
            .device()
            .call(move |b| {
                let r = KeyRef {
                    key_type,
                    object: &v.object,
                };
                if key_type == KeyType::HmacSha256 {
                    cwt::seal_mac0(payload, &sealing_kid, |tbm| Ok(b.sign(r, tbm)?))
                } else {
                    cwt::seal_sign1(payload, &sealing_kid, |tbs| Ok(b.sign(r, tbs)?))
                }
            })
            .await?;
        Ok((kid, cose))
    }

    pub async fn issue_pos_request(
        &self,
        caller: &Caller,
        r: PosRequest,
    ) -> Result<Issued, ServiceError> {
        check_fields(&r)?;
        let now = unix_now();
        let claims = Claims {
            kind: REQUEST.into(),
            store: r.store.clone(),
            pos: r.pos.clone(),
            purchase: r.purchase,
            amount: r.amount,
            currency: r.currency,
            description: r.description,
            payment_ref: None,
            request: None,
            issued_at: now,
            expires_at: now + ttl(r.ttl, REQUEST_TTL)?,
        };
        let key = request_key(&r.store, &r.pos);
        let (kid, cose) = self.seal_claims(caller, &key, "req", &claims).await?;
        Ok(Issued {
            text: cwt::to_text(REQUEST_PREFIX, &cose),
            claims,
            kid,
            key,
            repeated: false,
        })
    }

    /// Authenticate a token of `kind`. Malformed input is an error (400); a well-formed token that
    /// must not be trusted is `valid: false` with the reason.
    pub async fn check_token(
        &self,
        caller: &Caller,
        text: &str,
        kind: &str,
    ) -> Result<Checked, ServiceError> {
        let (prefix, cose) = cwt::from_text(text.trim(), &[REQUEST_PREFIX, PAID_PREFIX])?;
        let sealed = cwt::open(&cose)?;
        let claims = Claims::from_cbor(&sealed.payload)?;
        let refuse_with = |reason: String, claims: Claims, key: &str| Checked {
            valid: false,
            reason: Some(reason),
            claims,
            kid: sealed.kid.clone(),
            key: key.to_owned(),
            cose: cose.clone(),
        };
        let refuse = |reason: String, claims: Claims| refuse_with(reason, claims, "");
        let expected_prefix = if kind == REQUEST {
            REQUEST_PREFIX
        } else {
            PAID_PREFIX
        };
        if prefix != expected_prefix || claims.kind != kind {
            return Ok(refuse(format!("not a {kind} token"), claims));
        }
        let (role, version) = sealed
            .kid
            .split_once('#')
            .and_then(|(r, v)| Some((r.to_owned(), v.parse::<u32>().ok()?)))
            .ok_or_else(|| ServiceError::invalid("malformed token: kid is not role#version"))?;
        // The key is derived from the token's own store and POS: another POS's (or another
        // type's) key can never vouch for it.
        let Some(name) = key_for_role(kind, &role, &claims) else {
            return Ok(refuse(
                format!("kid role '{role}' does not seal {kind} tokens"),
                claims,
            ));
        };
        let key_name = self.core.authorize(caller, Operation::Verify, &name)?;
        let Some(key) = self.core.get(&key_name) else {
            return Ok(refuse_with(
                format!("key '{name}' does not exist"),
                claims,
                &name,
            ));
        };
        let Some(v) = key.version(version) else {
            return Ok(refuse_with(
                format!("key '{name}' has no version {version}"),
                claims,
                &name,
            ));
        };
        if !v.state.may_check() {
            return Ok(refuse_with(
                format!("key '{name}' version {version} is {}", v.state.as_str()),
                claims,
                &name,
            ));
        }
        let type_fits = if sealed.signed {
            key.key_type == KeyType::EcdsaP256
        } else {
            key.key_type == KeyType::HmacSha256
        };
        if !type_fits
            || self
                .core
                .device()
                .verify_any(key.key_type, vec![v.object.clone()], sealed.tbs, sealed.tag)
                .await?
                .is_none()
        {
            return Ok(refuse_with(
                "the MAC or signature does not verify".into(),
                claims,
                &name,
            ));
        }
        let now = unix_now();
        if claims.expires_at <= now {
            return Ok(refuse_with("expired".into(), claims, &name));
        }
        if claims.issued_at > now + CLOCK_SKEW {
            return Ok(refuse_with(
                "issued in the future (clock skew)".into(),
                claims,
                &name,
            ));
        }
        Ok(Checked {
            valid: true,
            reason: None,
            claims,
            kid: sealed.kid,
            key: name,
            cose,
        })
    }

    /// Answer a verified request with a "paid" token bound to it.
    pub async fn issue_pos_paid(
        &self,
        caller: &Caller,
        request_text: &str,
        payment_ref: &str,
    ) -> Result<Issued, ServiceError> {
        if !(1..=64).contains(&payment_ref.len()) || payment_ref.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "payment_ref is 1-64 bytes of printable characters",
            ));
        }
        let req = self.check_token(caller, request_text, REQUEST).await?;
        if !req.valid {
            return Err(ServiceError::invalid(format!(
                "request token refused: {}",
                req.reason.unwrap_or_default()
            )));
        }
        let r = req.claims;
        let sign_key = paid_sign_key(&r.store);
        let (key, role) = if self.core.get(&KeyName::parse(&sign_key)?).is_some() {
            (sign_key, "store")
        } else {
            (paid_mac_key(&r.store, &r.pos), "paid")
        };
        // A repeat needs the same grant as the first payment. The refusal names neither key,
        // so it does not tell whether the store has a paid-sign key.
        self.core
            .authorize(caller, Operation::Sign, &key)
            .map_err(|e| match e {
                ServiceError::PermissionDenied(_) => ServiceError::PermissionDenied(format!(
                    "'{}' may not issue paid tokens for store '{}', POS '{}'",
                    caller.identity, r.store, r.pos
                )),
                other => other,
            })?;
        if let Some(existing) = self.store.purchase(&r.store, &r.pos, &r.purchase).await? {
            return repeat_payment(existing, &r);
        }
        let now = unix_now();
        let binding =
            ring::digest::digest(&ring::digest::SHA256, &req.cose).as_ref()[..16].to_vec();
        let claims = Claims {
            kind: PAID.into(),
            description: None,
            payment_ref: Some(payment_ref.to_owned()),
            request: Some(binding),
            issued_at: now,
            expires_at: now + PAID_TTL as i64,
            ..r.clone()
        };
        let (kid, cose) = self.seal_claims(caller, &key, role, &claims).await?;
        let text = cwt::to_text(PAID_PREFIX, &cose);
        match self
            .store
            .insert_purchase(
                &r.store,
                &r.pos,
                &r.purchase,
                r.amount,
                &r.currency,
                payment_ref,
                &text,
                now,
            )
            .await
        {
            Ok(()) => Ok(Issued {
                text,
                claims,
                kid,
                key,
                repeated: false,
            }),
            // A concurrent payment of the same purchase won; answer as for a repeat.
            Err(RegistryError::Exists) => {
                match self.store.purchase(&r.store, &r.pos, &r.purchase).await? {
                    Some(existing) => repeat_payment(existing, &r),
                    None => Err(ServiceError::Internal {
                        detail: "purchase vanished".into(),
                    }),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The online check of a "paid" token: authentic, unexpired, and used once.
    pub async fn verify_pos_paid(
        &self,
        caller: &Caller,
        text: &str,
    ) -> Result<Checked, ServiceError> {
        let mut c = self.check_token(caller, text, PAID).await?;
        if !c.valid {
            return Ok(c);
        }
        let cl = &c.claims;
        let known = self
            .store
            .purchase(&cl.store, &cl.pos, &cl.purchase)
            .await?;
        if known.as_ref().is_none_or(|p| p.paid_token != text.trim()) {
            c.valid = false;
            c.reason = Some("no such payment was recorded here".into());
        } else if !self
            .store
            .consume_purchase(&cl.store, &cl.pos, &cl.purchase, unix_now())
            .await?
        {
            c.valid = false;
            c.reason = Some("replayed: this paid token was already used".into());
        }
        Ok(c)
    }
}

fn repeat_payment(existing: store::PurchaseRecord, r: &Claims) -> Result<Issued, ServiceError> {
    if existing.amount != r.amount || existing.currency != r.currency {
        return Err(ServiceError::FailedPrecondition(format!(
            "purchase '{}' was already paid for a different amount; no second paid token is issued",
            r.purchase
        )));
    }
    let (_, cose) = cwt::from_text(&existing.paid_token, &[PAID_PREFIX])?;
    let sealed = cwt::open(&cose)?;
    let claims = Claims::from_cbor(&sealed.payload)?;
    let key = sealed
        .kid
        .split_once('#')
        .and_then(|(role, _)| key_for_role(PAID, role, &claims))
        .unwrap_or_default();
    Ok(Issued {
        claims,
        text: existing.paid_token,
        kid: sealed.kid,
        key,
        repeated: true,
    })
}
