//! Challenge-response for cards and terminals, and counter-sealed messages (seed 002).
//!
//! A challenge is 32 random bytes bound to a subject and a key, valid for a few seconds and
//! consumed by its first successful use. The response is HMAC-SHA256, under the subject's key,
//! over `"tillkey/challenge/v1" 0x00 || challenge || subject`: the label keeps these MACs apart
//! from any other use of the key, the subject binds the answer to the card that was asked. It is
//! checked inside the token.
//!
//! Sealed messages are AES-256-GCM with a per-(key, sender) counter that the sealing side
//! increases and the opening side requires to increase: a replayed or older message is refused.
//! The counter travels in the clear but is authenticated as associated data.

mod store;

pub use store::ChallengeStore;

use std::sync::Arc;

use crate::encoding::{hex_decode, hex_encode};
use crate::error::ServiceError;
use crate::keys::KeyType;
use crate::policy::Operation;
use crate::service::{unix_now, Caller, KeyCore, Operations};

const CHALLENGE_LABEL: &[u8] = b"tillkey/challenge/v1\0";
const SEAL_LABEL: &[u8] = b"tillkey/seal/v1\0";
const CHALLENGE_TTL: u64 = 5;
const CHALLENGE_MAX_TTL: u64 = 60;

/// What the response MACs: label, challenge, subject.
pub fn challenge_message(challenge: &[u8], subject: &str) -> Vec<u8> {
    [CHALLENGE_LABEL, challenge, subject.as_bytes()].concat()
}

fn seal_aad(sender: &str, counter: i64, caller_aad: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SEAL_LABEL.len() + sender.len() + 9 + caller_aad.len());
    aad.extend_from_slice(SEAL_LABEL);
    aad.extend_from_slice(sender.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&counter.to_be_bytes());
    aad.extend_from_slice(caller_aad);
    aad
}

fn sender_ok(s: &str) -> Result<(), ServiceError> {
    if (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "sender is 1-64 printable ASCII characters without spaces",
        ))
    }
}

pub struct Challenge {
    pub id: String,
    pub challenge: [u8; 32],
    pub expires_at: i64,
}

/// Challenge-response and counter-sealed messages over the key core; sealing encrypts and
/// opens as the key operations do.
pub struct Challenges {
    core: Arc<KeyCore>,
    keys: Operations,
    store: ChallengeStore,
}

impl Challenges {
    pub fn new(core: Arc<KeyCore>, store: ChallengeStore) -> Self {
        Self {
            keys: Operations::new(core.clone()),
            core,
            store,
        }
    }
}

impl Challenges {
    pub async fn issue_challenge(
        &self,
        caller: &Caller,
        key: &str,
        subject: &str,
        ttl: Option<u64>,
    ) -> Result<Challenge, ServiceError> {
        if !(1..=128).contains(&subject.len()) || subject.chars().any(char::is_control) {
            return Err(ServiceError::invalid(
                "subject is 1-128 printable characters",
            ));
        }
        let ttl = ttl.unwrap_or(CHALLENGE_TTL);
        if !(1..=CHALLENGE_MAX_TTL).contains(&ttl) {
            return Err(ServiceError::invalid(format!(
                "ttl must be 1..={CHALLENGE_MAX_TTL} seconds"
            )));
        }
        let name = self.core.authorize(caller, Operation::Verify, key)?;
        let record = self.core.lookup(&name)?;
        if record.key_type != KeyType::HmacSha256 {
            return Err(ServiceError::UnsupportedOperation(
                "challenge responses are HMAC-SHA256: use an hmac-sha256 key".into(),
            ));
        }
        let c = Challenge {
            id: hex_encode(&self.core.random::<16>()?),
            challenge: self.core.random::<32>()?,
            expires_at: unix_now() + ttl as i64,
        };
        self.store
            .insert_challenge(&c.id, key, subject, &hex_encode(&c.challenge), c.expires_at)
            .await?;
        Ok(c)
    }

    /// `Ok((valid, reason))`; a valid response consumes the challenge.
    pub async fn verify_challenge(
        &self,
        caller: &Caller,
        id: &str,
        response: &[u8],
    ) -> Result<(bool, Option<&'static str>, String), ServiceError> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::invalid(
                "challenge ids are 32 hexadecimal characters",
            ));
        }
        let (key, subject, challenge, expires_at, used) = self
            .store
            .challenge(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no challenge {id}")))?;
        let name = self.core.authorize(caller, Operation::Verify, &key)?;
        let record = self.core.lookup(&name)?;
        let now = unix_now();
        if used {
            return Ok((false, Some("already used"), subject));
        }
        if expires_at <= now {
            return Ok((false, Some("expired"), subject));
        }
        let message = challenge_message(&hex_decode(&challenge).unwrap_or_default(), &subject);
        let objects = record
            .versions
            .iter()
            .filter(|v| v.state.may_check())
            .map(|v| v.object.clone())
            .collect();
        let ok = self
            .core
            .device()
            .verify_any(KeyType::HmacSha256, objects, message, response.to_vec())
            .await?
            .is_some();
        if !ok {
            return Ok((false, Some("the response does not match"), subject));
        }
        if !self.store.use_challenge(id, now).await? {
            return Ok((false, Some("already used or expired"), subject));
        }
        Ok((true, None, subject))
    }

    /// Encrypt for `sender` with the next counter of (key, sender).
    pub async fn seal(
        &self,
        caller: &Caller,
        name: &str,
        sender: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, i64, u32), ServiceError> {
        sender_ok(sender)?;
        let key = self.core.authorize(caller, Operation::Encrypt, name)?;
        // Check the key before taking a counter, so a refused request leaves no gap.
        if !self.core.lookup(&key)?.key_type.encrypts() {
            return Err(ServiceError::UnsupportedOperation(
                "seal needs an aes256-gcm key".into(),
            ));
        }
        let counter = self.store.next_counter(name, sender).await?;
        let (ct, v) = self
            .keys
            .encrypt(caller, name, plaintext, &seal_aad(sender, counter, aad))
            .await?;
        Ok((ct, counter, v))
    }

    /// Decrypt a sealed message and accept it only if its counter is above every one opened
    /// before for (key, sender).
    pub async fn open(
        &self,
        caller: &Caller,
        name: &str,
        sender: &str,
        counter: i64,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), ServiceError> {
        sender_ok(sender)?;
        if counter < 1 {
            return Err(ServiceError::invalid("counter starts at 1"));
        }
        let (pt, v) = self
            .keys
            .decrypt(caller, name, ciphertext, &seal_aad(sender, counter, aad))
            .await?;
        if !self.store.advance_counter(name, sender, counter).await? {
            return Err(ServiceError::FailedPrecondition(format!(
                "counter {counter} from '{sender}' is not above the last one opened: replayed or out of order"
            )));
        }
        Ok((pt, v))
    }
}
