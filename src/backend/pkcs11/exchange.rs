//! Keys crossing the token boundary, always wrapped: key check values, export under a transport
//! key, and import (BYOK) through an RSA wrapping key.
//!
//! Facts of SoftHSM 2.6.1 this relies on (checked against the token): RSA-OAEP works only with
//! SHA-1 and MGF1-SHA1 (OAEP needs no collision resistance, so SHA-1 is sound here); unwrap
//! templates must not carry `CKA_VALUE_LEN`; usage flags left out default to true, so every flag
//! is set; a wrapped blob that does not authenticate fails with `CKR_GENERAL_ERROR`.

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rsa::pkcs8::EncodePublicKey;

use super::errors::OpError;
use super::templates::{secret_usage, usage};
use super::{object_class, Pkcs11Backend};
use crate::backend::{BackendError, BackendResult, GeneratedKey, KeyRef, ObjectRef};
use crate::keys::KeyType;

/// `CKA_ID` of the RSA key pair that clients wrap import material for.
const WRAPPING_ID: &[u8] = b"tillkey-import-wrapping";
const WRAPPING_LABEL: &str = "tillkey:import-wrapping-key";

fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

impl Pkcs11Backend {
    pub(super) fn check_value_impl(&self, key: KeyRef<'_>) -> BackendResult<[u8; 3]> {
        let (mech, data): (Mechanism<'_>, &[u8]) = match key.key_type {
            KeyType::HmacSha256 => (Mechanism::Sha256Hmac, &[0u8; 32]),
            KeyType::Aes256Gcm | KeyType::Aes256Kw => (Mechanism::AesCMac, &[0u8; 16]),
            other => {
                return Err(BackendError::Unsupported(format!(
                    "key check values are for symmetric keys, not {}",
                    other.as_str()
                )))
            }
        };
        let out = self.with_session("check value", key.object, |conn, s| {
            let h = conn.handle(s, ObjectClass::SECRET_KEY, &key.object.0)?;
            Ok(s.sign(&mech, h.get(), data)?)
        })?;
        let mut kcv = [0u8; 3];
        kcv.copy_from_slice(
            out.get(..3)
                .ok_or_else(|| BackendError::Failed("short check value".into()))?,
        );
        Ok(kcv)
    }

    pub(super) fn wrap_impl(
        &self,
        key: KeyRef<'_>,
        transport: KeyRef<'_>,
    ) -> BackendResult<Vec<u8>> {
        self.with_session("export wrap", key.object, |conn, s| {
            let h = conn.handle(s, object_class(key.key_type, false), &key.object.0)?;
            let t = conn.token_handle(s, ObjectClass::SECRET_KEY, &transport.object.0)?;
            match s.wrap_key(&Mechanism::AesKeyWrapPad, t, h.get()) {
                Err(Error::Pkcs11(RvError::KeyUnextractable, _)) => Err(OpError::Refused(
                    "the key was not created exportable; it cannot leave the token".into(),
                )),
                other => Ok(other?),
            }
        })
    }

    pub(super) fn import_wrapping_key_impl(&self) -> BackendResult<Vec<u8>> {
        let object = ObjectRef(WRAPPING_ID.to_vec());
        self.with_session("import wrapping key", &object, |conn, s| {
            let public = match conn.token_handle(s, ObjectClass::PUBLIC_KEY, WRAPPING_ID) {
                Ok(h) => h,
                Err(OpError::ObjectMissing) => generate_wrapping_pair(s)?,
                Err(e) => return Err(e),
            };
            rsa_spki(s, public)
        })
    }

    pub(super) fn import_impl(
        &self,
        key_type: KeyType,
        label: &str,
        encrypted_kek: &[u8],
        wrapped_key: &[u8],
    ) -> BackendResult<GeneratedKey> {
        if key_type.is_asymmetric() {
            return Err(BackendError::Unsupported(format!(
                "import of {} keys is not supported; import symmetric keys",
                key_type.as_str()
            )));
        }
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| BackendError::Failed("system random generator failed".into()))?;
        let object = ObjectRef(id.to_vec());
        self.with_session("import", &object, |conn, s| {
            let private = conn.token_handle(s, ObjectClass::PRIVATE_KEY, WRAPPING_ID)?;
            // The one-time KEK lives only in this session and is destroyed at once.
            let mut kek_template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
            ];
            kek_template.extend(usage(false, false, true));
            let kek = s
                .unwrap_key(&oaep(), private, encrypted_kek, &kek_template)
                .map_err(refuse_blob)?;
            let mut template = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(if key_type == KeyType::HmacSha256 {
                    CkKeyType::GENERIC_SECRET
                } else {
                    CkKeyType::AES
                }),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                // SoftHSM refuses CKA_MODIFIABLE in an unwrap template (CKR_ATTRIBUTE_READ_ONLY).
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            template.extend(secret_usage(key_type));
            let imported = s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, wrapped_key, &template);
            let _ = s.destroy_object(kek);
            imported.map_err(refuse_blob)?;
            Ok(())
        })?;
        Ok(GeneratedKey {
            object,
            public_key_der: None,
        })
    }
}

/// A blob that does not decrypt or unwrap is the caller's error, not the device's.
fn refuse_blob(e: Error) -> OpError {
    match e {
        Error::Pkcs11(
            RvError::GeneralError
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::KeySizeRange,
            _,
        ) => OpError::Refused(
            "the wrapped key material did not unwrap: wrong wrapping key, wrong format (RSA-OAEP-SHA1 KEK, RFC 5649 material) or corrupted".into(),
        ),
        other => OpError::Ck(other),
    }
}

fn generate_wrapping_pair(s: &Session) -> Result<ObjectHandle, OpError> {
    let common = |class| {
        vec![
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Id(WRAPPING_ID.to_vec()),
            Attribute::Label(WRAPPING_LABEL.as_bytes().to_vec()),
            Attribute::Modifiable(false),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.extend([
        Attribute::ModulusBits(3072.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Private(false),
        Attribute::Encrypt(true),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ]);
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Derive(false),
    ]);
    let (public, _) = s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
    Ok(public)
}

fn rsa_spki(s: &Session, public: ObjectHandle) -> Result<Vec<u8>, OpError> {
    let attrs = s.get_attributes(
        public,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )?;
    let (mut n, mut e) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(m) => n = Some(m),
            Attribute::PublicExponent(x) => e = Some(x),
            _ => {}
        }
    }
    let (Some(n), Some(e)) = (n, e) else {
        return Err(OpError::Refused(
            "the wrapping key has no modulus or exponent".into(),
        ));
    };
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from_bytes_be(&e),
    )
    .map_err(|e| OpError::Refused(format!("the wrapping key is not a valid RSA key: {e}")))?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| OpError::Refused(format!("encoding the wrapping key: {e}")))
}
