//! Object templates and the registry form of a TPM key.
//!
//! A TPM key lives outside the TPM as the private blob the TPM encrypted under its parent (the
//! storage primary) plus the public area. Both go into the registry's [`ObjectRef`]; the TPM
//! loads them on demand. The primary is never stored: it is recreated from [`primary`], a fixed
//! template, and comes out the same for as long as the owner hierarchy's seed is unchanged.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, KeyedHashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::backend::ObjectRef;
use crate::keys::KeyType;

/// First byte of every TPM object reference; a later layout gets a new number.
const FORMAT_V1: u8 = 0x01;

/// The storage primary: an ECC P-256 restricted decryption key with an empty unique field, so
/// `CreatePrimary` derives the same key from the owner seed every time.
pub fn primary() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Template of a key the service generates, or `None` for a type a TPM cannot hold.
/// Keys are bound to this TPM and parent (`fixedTPM`, `fixedParent`): they cannot be
/// duplicated out, which is why export is refused.
pub fn template(key_type: KeyType) -> Option<tss_esapi::Result<Public>> {
    let attributes = || {
        ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_sign_encrypt(true)
            .build()
    };
    match key_type {
        KeyType::HmacSha256 => Some((|| {
            PublicBuilder::new()
                .with_public_algorithm(PublicAlgorithm::KeyedHash)
                .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
                .with_object_attributes(attributes()?)
                .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
                    KeyedHashScheme::HMAC_SHA_256,
                ))
                .with_keyed_hash_unique_identifier(Digest::default())
                .build()
        })()),
        KeyType::EcdsaP256 => Some((|| {
            PublicBuilder::new()
                .with_public_algorithm(PublicAlgorithm::Ecc)
                .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
                .with_object_attributes(attributes()?)
                .with_ecc_parameters(
                    PublicEccParametersBuilder::new_unrestricted_signing_key(
                        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                        EccCurve::NistP256,
                    )
                    .build()?,
                )
                .with_ecc_unique_identifier(EccPoint::default())
                .build()
        })()),
        KeyType::Ed25519 | KeyType::Aes256Gcm | KeyType::Aes256Kw | KeyType::Aes256Derive => None,
    }
}

/// `01 || len(public) u16 BE || public (TPMT_PUBLIC) || len(private) u16 BE || private`.
pub fn encode(public: &Public, private: &Private) -> Result<ObjectRef, String> {
    let public = public
        .marshall()
        .map_err(|e| format!("marshalling a public area: {e}"))?;
    let private = private.value();
    let mut out = Vec::with_capacity(5 + public.len() + private.len());
    out.push(FORMAT_V1);
    for part in [public.as_slice(), private] {
        let len = u16::try_from(part.len()).map_err(|_| "TPM blob too large".to_string())?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part);
    }
    Ok(ObjectRef(out))
}

/// The inverse of [`encode`]; `Err` names what is wrong with a reference that is not ours.
pub fn decode(object: &ObjectRef) -> Result<(Public, Private), String> {
    let bytes = object.0.as_slice();
    let (&format, mut rest) = bytes.split_first().ok_or("empty TPM object reference")?;
    if format != FORMAT_V1 {
        return Err(format!(
            "TPM object reference of unknown format {format:#04x}"
        ));
    }
    let mut part = || -> Result<&[u8], String> {
        if rest.len() < 2 {
            return Err("truncated TPM object reference".into());
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let (head, tail) = rest[2..]
            .split_at_checked(len)
            .ok_or("truncated TPM object reference")?;
        rest = tail;
        Ok(head)
    };
    let public = Public::unmarshall(part()?).map_err(|e| format!("TPM public area: {e}"))?;
    let private =
        Private::try_from(part()?.to_vec()).map_err(|e| format!("TPM private blob: {e}"))?;
    Ok((public, private))
}

/// Uncompressed SEC1 point (`04 || x || y`) of an ECC public area.
pub fn ec_point(public: &Public) -> Option<Vec<u8>> {
    match public {
        Public::Ecc { unique, .. } => {
            let mut point = vec![0x04];
            for coord in [unique.x().value(), unique.y().value()] {
                if coord.len() > 32 {
                    return None;
                }
                point.extend(std::iter::repeat_n(0, 32 - coord.len()));
                point.extend_from_slice(coord);
            }
            Some(point)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_junk_is_refused() {
        let public = template(KeyType::HmacSha256).unwrap().unwrap();
        let private = Private::try_from(vec![7u8; 40]).unwrap();
        let obj = encode(&public, &private).unwrap();
        let (p2, k2) = decode(&obj).unwrap();
        assert_eq!(p2, public);
        assert_eq!(k2.value(), private.value());
        for bad in [
            vec![],
            vec![2u8],
            obj.0[..obj.0.len() - 1].to_vec(),
            vec![1, 0xff],
        ] {
            assert!(decode(&ObjectRef(bad)).is_err());
        }
        assert!(template(KeyType::Ed25519).is_none());
        assert!(template(KeyType::Aes256Gcm).is_none());
    }
}
