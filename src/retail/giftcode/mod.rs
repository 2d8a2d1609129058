//! Gift-card codes (seeds 003, 004).
//!
//! A code is 16 Crockford Base32 characters (80 bits from the OS CSPRNG), printed 4-4-4-4.
//! Neither the code nor its PIN is stored: only HMAC-SHA256 of each under a key in the token,
//! deterministic so the code's HMAC can be the lookup index. Checking forgives what people
//! type (lower case, hyphens, spaces, I/L for 1, O for 0) and answers every failure with the
//! same "invalid", after the same work. Each client identity is throttled; a code locks after
//! a number of wrong PINs until an officer unlocks it. Balances stay with the caller.

mod store;

pub use store::GiftCodeStore;

use std::sync::Arc;

use crate::config::TokenSettings;
use crate::encoding::hex_encode;
use crate::error::ServiceError;
use crate::keys::KeyType;
use crate::policy::Operation;
use crate::service::{unix_now, Caller, KeyCore};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const CODE_LABEL: &[u8] = b"tillkey/giftcode/v1\0";
const PIN_LABEL: &[u8] = b"tillkey/giftpin/v1\0";
/// Checks per client identity, across all instances: a burst, then this many per second.
const BURST: i64 = 20;
const PER_SECOND: i64 = 5;

/// 80 random bits as 16 Crockford Base32 characters.
fn encode(bits: &[u8; 10]) -> String {
    let mut acc: u128 = 0;
    for b in bits {
        acc = (acc << 8) | u128::from(*b);
    }
    (0..16)
        .rev()
        .map(|i| ALPHABET[((acc >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// What people type, as the canonical 16 characters; `None` if it cannot be a code.
pub fn normalize(input: &str) -> Option<String> {
    let mut out = String::with_capacity(16);
    for c in input.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() {
            return None;
        }
        out.push(c);
    }
    (out.len() == 16).then_some(out)
}

pub fn printed(code: &str) -> String {
    code.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

pub struct IssuedCode {
    pub id: String,
    pub code: String,
    pub pin: Option<String>,
}

/// Gift-card codes over the key core, with their store (which also keeps the per-client
/// throttle, so it holds across instances).
pub struct GiftCodes {
    core: Arc<KeyCore>,
    store: GiftCodeStore,
    settings: TokenSettings,
}

impl GiftCodes {
    pub fn new(core: Arc<KeyCore>, store: GiftCodeStore, settings: TokenSettings) -> Self {
        Self {
            core,
            store,
            settings,
        }
    }
}

impl GiftCodes {
    fn new_code(&self, with_pin: bool) -> Result<(String, Option<String>), ServiceError> {
        let code = encode(&self.core.random::<10>()?);
        let pin = if with_pin {
            // Uniform 6 digits: reject the top of the u32 range that 10^6 does not divide.
            loop {
                let n = u32::from_be_bytes(self.core.random::<4>()?);
                if n < u32::MAX - (u32::MAX % 1_000_000) {
                    break Some(format!("{:06}", n % 1_000_000));
                }
            }
        } else {
            None
        };
        Ok((code, pin))
    }

    async fn code_indexes(
        &self,
        key: &crate::registry::KeyRecord,
        code: &str,
        id: &str,
        pin: Option<&str>,
    ) -> Result<(String, Option<String>), ServiceError> {
        let code_idx = self
            .core
            .keyed_indexes(key, CODE_LABEL, code.as_bytes())
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        let pin_idx = match pin {
            Some(p) => self
                .core
                .keyed_indexes(key, PIN_LABEL, format!("{id}\0{p}").as_bytes())
                .await?
                .into_iter()
                .next(),
            None => None,
        };
        Ok((code_idx, pin_idx))
    }

    pub async fn issue_giftcode(
        &self,
        caller: &Caller,
        key: &str,
        with_pin: bool,
    ) -> Result<IssuedCode, ServiceError> {
        let name = self.core.authorize(caller, Operation::Sign, key)?;
        let (record, _) = self
            .core
            .claim_active(&name, "index gift codes with", |t| t == KeyType::HmacSha256)
            .await?;
        let id = hex_encode(&self.core.random::<8>()?);
        let (code, pin) = self.new_code(with_pin)?;
        let (code_idx, pin_idx) = self
            .code_indexes(&record, &code, &id, pin.as_deref())
            .await?;
        self.store
            .insert_giftcode(&id, key, &code_idx, pin_idx.as_deref(), unix_now())
            .await?;
        Ok(IssuedCode {
            id,
            code: printed(&code),
            pin,
        })
    }

    /// The code's id when it is valid (and its PIN right); `None` otherwise, whatever the reason.
    pub async fn check_giftcode(
        &self,
        caller: &Caller,
        key: &str,
        code: &str,
        pin: Option<&str>,
    ) -> Result<Option<String>, ServiceError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if !self
            .store
            .take_check(&caller.identity, now_ms, BURST, PER_SECOND)
            .await?
        {
            return Err(ServiceError::RateLimited);
        }
        let name = self.core.authorize(caller, Operation::Verify, key)?;
        let record = self.core.lookup(&name)?;
        if record.key_type != KeyType::HmacSha256 {
            return Err(ServiceError::UnsupportedOperation(
                "gift codes are indexed with an hmac-sha256 key".into(),
            ));
        }
        let canonical = normalize(code);
        // A code that cannot exist still costs the same HMAC and lookup as one that might.
        let probe = canonical.clone().unwrap_or_else(|| "0".repeat(16));
        let mut found = None;
        for idx in self
            .core
            .keyed_indexes(&record, CODE_LABEL, probe.as_bytes())
            .await?
        {
            if let Some(g) = self.store.giftcode_by_index(&idx).await? {
                found = Some(g);
                break;
            }
        }
        let pin_given = pin.unwrap_or("");
        let id_for_pin = found.as_ref().map_or("-", |g| g.id.as_str()).to_owned();
        let pin_idx = self
            .core
            .keyed_indexes(
                &record,
                PIN_LABEL,
                format!("{id_for_pin}\0{pin_given}").as_bytes(),
            )
            .await?;
        let Some(g) = found.filter(|g| canonical.is_some() && g.key == key && g.state == "active")
        else {
            return Ok(None);
        };
        if let Some(expected) = &g.pin_idx {
            let limit = self.settings.giftcode_pin_attempts;
            // The attempt is claimed before the PIN is compared: at most `limit` comparisons
            // per lock cycle, however many checks arrive at once.
            if !self.store.claim_pin_attempt(&g.id, limit).await? {
                return Ok(None);
            }
            let right = pin.is_some()
                && pin_idx.iter().any(|p| {
                    bool::from(subtle::ConstantTimeEq::ct_eq(
                        p.as_bytes(),
                        expected.as_bytes(),
                    ))
                });
            if !right {
                let failed = self.store.pin_was_wrong(&g.id, limit).await?;
                tracing::info!(giftcode = %g.id, failed, "wrong gift-code PIN");
                if failed >= limit {
                    tracing::warn!(giftcode = %g.id, failed, "gift code locked after too many wrong PINs");
                }
                return Ok(None);
            }
            if !self.store.pin_was_right(&g.id).await? {
                return Ok(None);
            }
        }
        Ok(Some(g.id))
    }

    /// After a partial redemption: a new code (and PIN, if the old one had one); the old code is
    /// superseded in the same transaction and stops working at once.
    pub async fn reissue_giftcode(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<IssuedCode, ServiceError> {
        let g = self
            .store
            .giftcode(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no gift code {id}")))?;
        let name = self.core.authorize(caller, Operation::Sign, &g.key)?;
        let (record, _) = self
            .core
            .claim_active(&name, "index gift codes with", |t| t == KeyType::HmacSha256)
            .await?;
        let new_id = hex_encode(&self.core.random::<8>()?);
        let (code, pin) = self.new_code(g.pin_idx.is_some())?;
        let (code_idx, pin_idx) = self
            .code_indexes(&record, &code, &new_id, pin.as_deref())
            .await?;
        if !self
            .store
            .reissue_giftcode(
                id,
                &new_id,
                &g.key,
                &code_idx,
                pin_idx.as_deref(),
                unix_now(),
            )
            .await?
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "gift code {id} is {}; only active codes are reissued",
                g.state
            )));
        }
        Ok(IssuedCode {
            id: new_id,
            code: printed(&code),
            pin,
        })
    }

    pub async fn set_giftcode_state(
        &self,
        caller: &Caller,
        id: &str,
        action: &str,
    ) -> Result<String, ServiceError> {
        let g = self
            .store
            .giftcode(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no gift code {id}")))?;
        let (op, from, to): (Operation, &[&str], &str) = match action {
            "revoke" => (Operation::Revoke, &["active", "locked"], "revoked"),
            _ => (Operation::Update, &["locked"], "active"),
        };
        self.core.authorize(caller, op, &g.key)?;
        if !self.store.giftcode_state(id, from, to).await? {
            return Err(ServiceError::FailedPrecondition(format!(
                "gift code {id} is {}; cannot {action} it",
                g.state
            )));
        }
        Ok(to.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_crockford_and_normalize_what_people_type() {
        let c = encode(&[0xff; 10]);
        assert_eq!(c, "ZZZZZZZZZZZZZZZZ");
        assert_eq!(encode(&[0; 10]), "0000000000000000");
        assert_eq!(
            normalize("abcd-efgh jkmn-pqrs").as_deref(),
            Some("ABCDEFGHJKMNPQRS")
        );
        assert_eq!(
            normalize("IL0O-0000-0000-0000").as_deref(),
            Some("1100000000000000")
        );
        assert_eq!(
            normalize("UUUU-0000-0000-0000"),
            None,
            "U is not in the alphabet"
        );
        assert_eq!(normalize("0000-0000-0000-000"), None);
        assert_eq!(normalize("0000-0000-0000-00000"), None);
        assert_eq!(normalize("ÄBCD-0000-0000-0000"), None);
        assert_eq!(printed("ABCDEFGHJKMNPQRS"), "ABCD-EFGH-JKMN-PQRS");
    }
}
