//! Attribute templates for the keys tillkey generates.
//!
//! Every private or secret key is a token object, private, sensitive and never extractable, so
//! it cannot leave the device even through a later `C_WrapKey`. Usage flags are set explicitly,
//! true only for what tillkey does with the key, rather than left to token defaults. `CKA_ID` and `CKA_LABEL` are set
//! on every object so standard tools (`pkcs11-tool --list-objects`) show which key is which.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass};

use crate::keys::KeyType;

/// DER OID of prime256v1 (secp256r1), the `CKA_EC_PARAMS` of P-256 keys.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID 1.3.101.112 (id-Ed25519).
pub const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

pub enum Template {
    Secret {
        mechanism: Mechanism<'static>,
        attrs: Vec<Attribute>,
    },
    Pair {
        mechanism: Mechanism<'static>,
        public: Vec<Attribute>,
        private: Vec<Attribute>,
    },
}

/// `exportable` secret keys stay sensitive (never readable) but may be wrapped.
pub fn for_type(key_type: KeyType, id: &[u8], label: &str, exportable: bool) -> Template {
    let common = |class: ObjectClass| {
        vec![
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ]
    };
    let locked = [
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(exportable && !key_type.is_asymmetric()),
        Attribute::Modifiable(false),
    ];
    match key_type {
        KeyType::HmacSha256 | KeyType::Aes256Gcm | KeyType::Aes256Kw | KeyType::Aes256Derive => {
            let mut attrs = common(ObjectClass::SECRET_KEY);
            attrs.extend(locked);
            attrs.extend(secret_usage(key_type));
            attrs.push(Attribute::ValueLen(32.into()));
            let mechanism = if key_type == KeyType::HmacSha256 {
                attrs.push(Attribute::KeyType(CkKeyType::GENERIC_SECRET));
                Mechanism::GenericSecretKeyGen
            } else {
                attrs.push(Attribute::KeyType(CkKeyType::AES));
                Mechanism::AesKeyGen
            };
            Template::Secret { mechanism, attrs }
        }
        KeyType::EcdsaP256 | KeyType::Ed25519 => {
            let (mechanism, params) = if key_type == KeyType::EcdsaP256 {
                (Mechanism::EccKeyPairGen, P256_PARAMS.to_vec())
            } else {
                (Mechanism::EccEdwardsKeyPairGen, ED25519_PARAMS.to_vec())
            };
            let mut public = common(ObjectClass::PUBLIC_KEY);
            // Tokens default public keys to encrypt/wrap; these keys only ever verify.
            public.extend([
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Derive(false),
                Attribute::Modifiable(false),
                Attribute::EcParams(params),
            ]);
            let mut private = common(ObjectClass::PRIVATE_KEY);
            private.extend(locked);
            private.extend([
                Attribute::Sign(true),
                Attribute::Decrypt(false),
                Attribute::Derive(false),
                Attribute::Unwrap(false),
            ]);
            Template::Pair {
                mechanism,
                public,
                private,
            }
        }
    }
}

/// Every usage flag, explicitly: token defaults would make imported keys wrap and encrypt.
pub(super) fn usage(sign: bool, encrypt: bool, wrap: bool) -> [Attribute; 7] {
    [
        Attribute::Sign(sign),
        Attribute::Verify(sign && !wrap),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(encrypt),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(wrap),
        Attribute::Derive(false),
    ]
}

/// Usage of a secret key of `key_type`: HMAC keys sign; AES data keys encrypt; transport keys
/// wrap. AES keys also sign, for their AES-CMAC key check value only.
pub(super) fn secret_usage(key_type: KeyType) -> [Attribute; 7] {
    match key_type {
        KeyType::HmacSha256 => usage(true, false, false),
        KeyType::Aes256Derive => {
            let mut u = usage(false, false, false);
            u[6] = Attribute::Derive(true);
            u
        }
        KeyType::Aes256Gcm => {
            let mut u = usage(true, true, false);
            u[1] = Attribute::Verify(false);
            u
        }
        _ => usage(true, false, true),
    }
}
