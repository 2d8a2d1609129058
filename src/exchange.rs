//! The client's half of moving symmetric keys in and out of the token, for the CLI, terminal
//! simulators and tests. The daemon's half is in the backend.
//!
//! Import: a one-time AES-256 KEK is encrypted to the daemon's RSA wrapping key with RSA-OAEP
//! (SHA-1, MGF1-SHA1: the only OAEP SoftHSM 2.6.1 offers; OAEP does not rely on collision
//! resistance), and the material is wrapped under the KEK with AES-KWP (RFC 5649). Export comes
//! back as AES-KWP under the terminal's transport key.

use aes_kw::KeyInit;
use rsa::pkcs8::DecodePublicKey;
use zeroize::Zeroizing;

/// (encrypted KEK, wrapped material) for `POST /v1/keys:import`.
pub fn wrap_for_import(
    wrapping_key_pem: &str,
    material: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let public = rsa::RsaPublicKey::from_public_key_pem(wrapping_key_pem)
        .map_err(|e| format!("wrapping key: {e}"))?;
    let mut kek = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), kek.as_mut())
        .map_err(|_| "system random generator failed".to_string())?;
    let encrypted_kek = public
        .encrypt(
            &mut rand_core::OsRng,
            rsa::Oaep::new::<sha1::Sha1>(),
            kek.as_ref(),
        )
        .map_err(|e| format!("RSA-OAEP: {e}"))?;
    let kw = aes_kw::KwpAes256::new_from_slice(kek.as_ref()).map_err(|e| format!("KEK: {e}"))?;
    let mut buf = vec![0u8; material.len() + 16];
    let wrapped = kw
        .wrap_key(material, &mut buf)
        .map_err(|e| format!("AES-KWP: {e}"))?
        .to_vec();
    Ok((encrypted_kek, wrapped))
}

/// Recover exported material with the transport key a terminal holds.
pub fn unwrap_export(transport_key: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    let kw = aes_kw::KwpAes256::new_from_slice(transport_key)
        .map_err(|e| format!("transport key: {e}"))?;
    let mut buf = Zeroizing::new(vec![0u8; wrapped.len()]);
    let n = kw
        .unwrap_key(wrapped, &mut buf)
        .map_err(|e| format!("AES-KWP unwrap: {e}"))?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// tillkey's key check value of an HMAC key: the first 3 bytes of HMAC-SHA256 over 32 zero
/// bytes, as lower-case hex.
pub fn hmac_kcv(material: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, material);
    crate::encoding::hex_encode(&ring::hmac::sign(&key, &[0u8; 32]).as_ref()[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kwp_round_trip_matches_rfc5649_lengths() {
        let transport = [7u8; 32];
        let kw = aes_kw::KwpAes256::new_from_slice(&transport).unwrap();
        let mut buf = [0u8; 48];
        let wrapped = kw.wrap_key(&[1u8; 32], &mut buf).unwrap().to_vec();
        assert_eq!(wrapped.len(), 40);
        assert_eq!(
            unwrap_export(&transport, &wrapped).unwrap().as_slice(),
            &[1u8; 32]
        );
        assert!(unwrap_export(&[8u8; 32], &wrapped).is_err());
        assert_eq!(hmac_kcv(&[0u8; 32]).len(), 6);
    }
}
