//! The signed key-status feed that offline POS verifiers poll: which key versions they must stop
//! trusting, and since when.
//!
//! A verifier that has lost its link still has to decide whether a signature from a revoked key
//! is acceptable, so the feed is a self-contained COSE_Sign1 (RFC 9052) it can keep and check
//! without calling us. Two fields carry the fail-closed rules, and they are the caller's to
//! enforce because this module has no clock and no memory of earlier lists:
//! - `exp`: a verifier holding only an expired list treats every listed prefix as unknown
//!   rather than trusting a stale picture, so an attacker who cuts the feed gains nothing.
//! - `seq`: a verifier refuses a list whose `seq` is below the last one it accepted, so an
//!   older, validly signed list cannot be replayed to un-revoke a key.
//!
//! This module knows nothing of the backend or PKCS#11: the signature is a callback, so the same
//! code serves the HSM-backed signer, tests with an in-memory key, and verifier tooling.

use coset::{
    cbor::value::Value, iana, CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder,
    TaggedCborSerializable,
};

/// The three states a verifier must act on. Active versions are not listed: the feed is a deny
/// list, so a verifier that misses an entry errs towards the key it already trusted only until
/// `exp`, never beyond.
pub const STATES: [&str; 3] = ["revoked", "retired", "destroyed"];

/// Text content type in the protected header, so a verifier cannot be handed some other signed
/// COSE object from the same key and be made to read it as a status list.
pub const CONTENT_TYPE: &str = "application/tillkey-status+cbor";

/// COSE_Sign1 tag (RFC 9052 section 2, 18); the feed is always tagged so the message type is
/// explicit on the wire.
const COSE_SIGN1_TAG: u64 = <CoseSign1 as TaggedCborSerializable>::TAG;

/// ES256 signatures (raw r || s on P-256) are exactly this long; anything else is rejected before the verifier
/// callback sees it.
const P256_SIGNATURE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    pub kid: String,
    pub version: u32,
    /// One of [`STATES`]. `&'static str` so a decoded list can only hold the known values.
    pub state: &'static str,
    /// Unix seconds. Verifiers compare signature times against this, so a key revoked after
    /// compromise does not invalidate what it signed before.
    pub since: i64,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusList {
    pub issuer: String,
    /// The key-name prefix this list is authoritative for; a verifier ignores lists for other
    /// prefixes instead of reading absence as "not revoked".
    pub prefix: String,
    /// Strictly increasing per (issuer, prefix); verifiers reject any list with a lower value
    /// than the one they hold, so an old list cannot be replayed.
    pub sequence: u64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds. Past this, verifiers fail closed rather than trust a stale list.
    pub expires_at: i64,
    pub entries: Vec<StatusEntry>,
}

/// Why a status list could not be built or was refused. Every malformed or unauthenticated
/// input lands here; nothing in [`open1`] panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("not a tagged COSE_Sign1 message: {0}")]
    Envelope(String),
    #[error("protected header has no algorithm; ES256 (-7) is required")]
    MissingAlgorithm,
    #[error("unsupported algorithm {0}; only ES256 (-7) is accepted")]
    WrongAlgorithm(String),
    #[error("protected header marks parameters critical ({0}); none are understood")]
    CriticalHeaders(String),
    #[error("content type is {0}, expected \"{CONTENT_TYPE}\"")]
    WrongContentType(String),
    #[error("payload is detached; a status list must carry its payload")]
    DetachedPayload,
    #[error("signature is {0} bytes, an ES256 signature is {P256_SIGNATURE_LEN}")]
    SignatureLength(usize),
    #[error("signature does not verify")]
    BadSignature,
    #[error("malformed status list payload: {0}")]
    Payload(String),
    #[error("signing failed: {0}")]
    Signer(String),
    #[error("CBOR encoding failed: {0}")]
    Encoding(String),
}

/// The CBOR payload: a map with text keys in this order,
/// `{"iss", "prefix", "seq", "iat", "exp", "entries": [{"kid", "v", "state", "since",
/// "reason"?}]}`, with `reason` left out when `None`.
///
/// Built as a ciborium [`Value`] and serialized by ciborium (definite lengths, shortest-form
/// integers), so the bytes are a pure function of the list. Writing into a `Vec` does not fail
/// in practice; the error is surfaced rather than unwrapped all the same.
pub fn payload(list: &StatusList) -> Result<Vec<u8>, StatusError> {
    let entries = list
        .entries
        .iter()
        .map(|e| {
            let mut m = vec![
                (Value::from("kid"), Value::from(e.kid.as_str())),
                (Value::from("v"), Value::from(e.version)),
                (Value::from("state"), Value::from(e.state)),
                (Value::from("since"), Value::from(e.since)),
            ];
            if let Some(reason) = &e.reason {
                m.push((Value::from("reason"), Value::from(reason.as_str())));
            }
            Value::Map(m)
        })
        .collect();
    let value = Value::Map(vec![
        (Value::from("iss"), Value::from(list.issuer.as_str())),
        (Value::from("prefix"), Value::from(list.prefix.as_str())),
        (Value::from("seq"), Value::from(list.sequence)),
        (Value::from("iat"), Value::from(list.issued_at)),
        (Value::from("exp"), Value::from(list.expires_at)),
        (Value::from("entries"), Value::Array(entries)),
    ]);
    let mut out = Vec::new();
    coset::cbor::ser::into_writer(&value, &mut out)
        .map_err(|e| StatusError::Encoding(e.to_string()))?;
    Ok(out)
}

/// Sign a status list as a tagged COSE_Sign1.
///
/// `sign` receives the exact RFC 9052 `Sig_structure` (`["Signature1", protected, h'',
/// payload]`, from coset's `tbs_data`) and returns the 64-byte ES256 signature (ECDSA P-256 over SHA-256 of those bytes, raw r || s); its error
/// comes back as [`StatusError::Signer`]. `key_id` goes into the protected header (alg ES256,
/// content type [`CONTENT_TYPE`], kid) so a verifier holding several feed keys knows which one
/// to try, and cannot be tricked by an unprotected one. The unprotected header stays empty:
/// nothing a verifier may rely on lives outside the signature.
///
/// `state` strings are not checked here; [`open1`] refuses anything outside [`STATES`], so a
/// bad entry cannot reach a verifier as a silently ignored value.
pub fn sign1(
    list: &StatusList,
    key_id: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, StatusError> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(CONTENT_TYPE.to_owned())
        .key_id(key_id.to_vec())
        .build();
    let mut msg = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload(list)?)
        .build();
    msg.signature = sign(&msg.tbs_data(&[])).map_err(StatusError::Signer)?;
    msg.to_tagged_vec()
        .map_err(|e| StatusError::Encoding(e.to_string()))
}

/// Decode a tagged COSE_Sign1 status list and check its signature with `verify(sig_structure,
/// signature)`. Returns the list and the protected `kid`.
///
/// Checks are in order of cost and trust: envelope, then the protected header (ES256 only, no
/// critical parameters, our content type), then the signature, and only then the payload, so
/// unauthenticated bytes never reach the payload parser. Freshness (`exp`) and ordering (`seq`)
/// are left to the caller, who has the clock and the previous list.
pub fn open1(
    bytes: &[u8],
    verify: impl FnOnce(&[u8], &[u8]) -> bool,
) -> Result<(StatusList, Vec<u8>), StatusError> {
    let msg = CoseSign1::from_tagged_slice(bytes)
        .map_err(|e| StatusError::Envelope(describe_envelope_error(bytes, &e)))?;
    let header = &msg.protected.header;

    match &header.alg {
        None => return Err(StatusError::MissingAlgorithm),
        Some(coset::Algorithm::Assigned(iana::Algorithm::ES256)) => {}
        Some(other) => return Err(StatusError::WrongAlgorithm(format!("{other:?}"))),
    }
    if !header.crit.is_empty() {
        return Err(StatusError::CriticalHeaders(format!("{:?}", header.crit)));
    }
    match &header.content_type {
        Some(coset::ContentType::Text(t)) if t == CONTENT_TYPE => {}
        Some(other) => return Err(StatusError::WrongContentType(format!("{other:?}"))),
        None => return Err(StatusError::WrongContentType("absent".into())),
    }
    // coset signs a detached payload as if it were empty; a list must carry its own.
    let Some(payload) = msg.payload.as_deref() else {
        return Err(StatusError::DetachedPayload);
    };
    if msg.signature.len() != P256_SIGNATURE_LEN {
        return Err(StatusError::SignatureLength(msg.signature.len()));
    }
    // coset keeps the protected bytes exactly as received and builds the Sig_structure from
    // them, so a non-canonical but signed header still verifies and nothing is re-encoded.
    if !verify(&msg.tbs_data(&[]), &msg.signature) {
        return Err(StatusError::BadSignature);
    }

    let list = decode_payload(payload)?;
    Ok((list, header.key_id.clone()))
}

/// coset reports a wrong or missing tag as a bare "unexpected item"; say what was found.
fn describe_envelope_error(bytes: &[u8], e: &coset::CoseError) -> String {
    if bytes.is_empty() {
        return "empty input".into();
    }
    match Value::from_slice(bytes) {
        Ok(Value::Tag(t, _)) if t != COSE_SIGN1_TAG => {
            format!("CBOR tag {t}, expected {COSE_SIGN1_TAG} (COSE_Sign1)")
        }
        Ok(Value::Tag(..)) => format!("COSE_Sign1 structure: {e}"),
        Ok(_) => format!("untagged CBOR, expected tag {COSE_SIGN1_TAG} (COSE_Sign1)"),
        Err(_) => format!("not well-formed CBOR: {e}"),
    }
}

fn decode_payload(bytes: &[u8]) -> Result<StatusList, StatusError> {
    let value =
        Value::from_slice(bytes).map_err(|e| payload_err(format!("not well-formed CBOR: {e}")))?;
    let mut top = Fields::new(value, "payload")?;
    let list = StatusList {
        issuer: text(top.take("iss")?, "iss")?,
        prefix: text(top.take("prefix")?, "prefix")?,
        sequence: integer(top.take("seq")?, "seq")?,
        issued_at: integer(top.take("iat")?, "iat")?,
        expires_at: integer(top.take("exp")?, "exp")?,
        entries: match top.take("entries")? {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| decode_entry(v, i))
                .collect::<Result<_, _>>()?,
            _ => return Err(payload_err("\"entries\" is not an array")),
        },
    };
    top.finish()?;
    Ok(list)
}

fn decode_entry(value: Value, index: usize) -> Result<StatusEntry, StatusError> {
    let what = format!("entries[{index}]");
    let mut m = Fields::new(value, &what)?;
    let state_text = text(m.take("state")?, &format!("{what}.state"))?;
    let Some(state) = STATES.iter().copied().find(|s| *s == state_text) else {
        return Err(payload_err(format!(
            "{what}.state is {state_text:?}, expected one of {STATES:?}"
        )));
    };
    let entry = StatusEntry {
        kid: text(m.take("kid")?, &format!("{what}.kid"))?,
        version: integer(m.take("v")?, &format!("{what}.v"))?,
        state,
        since: integer(m.take("since")?, &format!("{what}.since"))?,
        reason: m
            .take_optional("reason")
            .map(|v| text(v, &format!("{what}.reason")))
            .transpose()?,
    };
    m.finish()?;
    Ok(entry)
}

fn payload_err(msg: impl Into<String>) -> StatusError {
    StatusError::Payload(msg.into())
}

/// A CBOR map with text keys, consumed key by key. Duplicate and unknown keys are refused: a
/// signed list carrying a field this verifier does not understand must not be half-applied.
struct Fields {
    what: String,
    entries: Vec<(String, Value)>,
}

impl Fields {
    fn new(value: Value, what: &str) -> Result<Self, StatusError> {
        let Value::Map(pairs) = value else {
            return Err(payload_err(format!("{what} is not a map")));
        };
        let mut entries: Vec<(String, Value)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let Value::Text(k) = k else {
                return Err(payload_err(format!("{what} has a non-text key")));
            };
            if entries.iter().any(|(seen, _)| *seen == k) {
                return Err(payload_err(format!("{what} has duplicate key {k:?}")));
            }
            entries.push((k, v));
        }
        Ok(Self {
            what: what.to_owned(),
            entries,
        })
    }

    fn take_optional(&mut self, key: &str) -> Option<Value> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.swap_remove(i).1)
    }

    fn take(&mut self, key: &str) -> Result<Value, StatusError> {
        self.take_optional(key)
            .ok_or_else(|| payload_err(format!("{} is missing {key:?}", self.what)))
    }

    fn finish(self) -> Result<(), StatusError> {
        match self.entries.first() {
            None => Ok(()),
            Some((k, _)) => Err(payload_err(format!("{} has unknown key {k:?}", self.what))),
        }
    }
}

fn text(value: Value, what: &str) -> Result<String, StatusError> {
    match value {
        Value::Text(t) => Ok(t),
        _ => Err(payload_err(format!("{what} is not a text string"))),
    }
}

fn integer<T: TryFrom<i128>>(value: Value, what: &str) -> Result<T, StatusError> {
    match value {
        Value::Integer(i) => {
            T::try_from(i128::from(i)).map_err(|_| payload_err(format!("{what} is out of range")))
        }
        _ => Err(payload_err(format!("{what} is not an integer"))),
    }
}

#[cfg(test)]
mod tests;
