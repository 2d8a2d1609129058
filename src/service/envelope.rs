//! The ciphertext format of `:encrypt`: `0x01 || key version (u32, big-endian) || nonce (12) ||
//! AES-GCM ciphertext || tag (16)`.
//!
//! The format byte and version are also fed to GCM as associated data ahead of the caller's, so
//! a header cannot be edited to steer decryption to another version without failing
//! authentication.

use crate::backend::GCM_NONCE_LEN;
use crate::error::ServiceError;

const FORMAT: u8 = 0x01;
const HEADER_LEN: usize = 1 + 4 + GCM_NONCE_LEN;
const TAG_LEN: usize = 16;

pub struct Header {
    pub version: u32,
    pub nonce: [u8; GCM_NONCE_LEN],
}

impl Header {
    pub fn aad(&self, caller_aad: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(5 + caller_aad.len());
        aad.push(FORMAT);
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad.extend_from_slice(caller_aad);
        aad
    }

    pub fn seal(&self, ciphertext_and_tag: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext_and_tag.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(ciphertext_and_tag);
        out
    }

    pub fn open(input: &[u8]) -> Result<(Header, &[u8]), ServiceError> {
        if input.len() < HEADER_LEN + TAG_LEN || input[0] != FORMAT {
            return Err(ServiceError::invalid(
                "ciphertext is not in tillkey's format (too short or unknown format byte)",
            ));
        }
        let mut version = [0u8; 4];
        version.copy_from_slice(&input[1..5]);
        let mut nonce = [0u8; GCM_NONCE_LEN];
        nonce.copy_from_slice(&input[5..HEADER_LEN]);
        Ok((
            Header {
                version: u32::from_be_bytes(version),
                nonce,
            },
            &input[HEADER_LEN..],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let h = Header {
            version: 7,
            nonce: [3; 12],
        };
        let sealed = h.seal(&[9u8; 20]);
        let (back, body) = Header::open(&sealed).unwrap();
        assert_eq!(back.version, 7);
        assert_eq!(back.nonce, [3; 12]);
        assert_eq!(body, &[9u8; 20]);
        assert!(Header::open(&sealed[..HEADER_LEN + TAG_LEN - 1]).is_err());
        let mut wrong = sealed.clone();
        wrong[0] = 2;
        assert!(Header::open(&wrong).is_err());
        assert_eq!(h.aad(b"x"), vec![1, 0, 0, 0, 7, b'x']);
    }
}
