//! Small, exact encodings: lower-case hex, SubjectPublicKeyInfo for the two curves we generate,
//! PEM, and ECDSA signatures between the token's raw `r || s` and the ASN.1 DER form OpenSSL
//! expects.

use base64::Engine;

use crate::keys::KeyType;

const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Lower-case hex, the one form the registry, the audit trail and every printed reference use.
/// A table lookup rather than `format!` per byte: every audit entry's hash goes through here on
/// the request path.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The inverse of [`hex_encode`]; either case is accepted, anything else is `None`.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    // A table lookup per digit: every stored object reference passes through here at start-up.
    const BAD: u8 = 0xff;
    const TABLE: [u8; 256] = {
        let mut t = [BAD; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 2);
    for pair in b.chunks_exact(2) {
        let (hi, lo) = (TABLE[usize::from(pair[0])], TABLE[usize::from(pair[1])]);
        if hi == BAD || lo == BAD {
            return None;
        }
        out.push(hi << 4 | lo);
    }
    Some(out)
}

/// Build a DER SubjectPublicKeyInfo from `CKA_EC_POINT`, which tokens return either raw or
/// wrapped in a DER OCTET STRING (SoftHSM wraps). Told apart by length, since a raw P-256 point
/// also starts with 0x04.
pub fn spki_from_ec_point(key_type: KeyType, point: &[u8]) -> Option<Vec<u8>> {
    let (prefix, raw_len): (&[u8], usize) = match key_type {
        KeyType::EcdsaP256 => (&P256_SPKI_PREFIX, 65),
        KeyType::Ed25519 => (&ED25519_SPKI_PREFIX, 32),
        _ => return None,
    };
    let raw = if point.len() == raw_len {
        point
    } else if point.len() == raw_len + 2 && point[0] == 0x04 && usize::from(point[1]) == raw_len {
        &point[2..]
    } else {
        return None;
    };
    if key_type == KeyType::EcdsaP256 && raw[0] != 0x04 {
        return None; // only uncompressed points
    }
    Some([prefix, raw].concat())
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// `r || s` (64 bytes for P-256) to DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != 64 {
        return None;
    }
    let (r, s) = raw.split_at(32);
    let (r, s) = (der_uint(r), der_uint(s));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    Some(out)
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len() - 1);
    let trimmed = &bytes[start..];
    let pad = trimmed[0] & 0x80 != 0;
    let mut out = vec![0x02, (trimmed.len() + usize::from(pad)) as u8];
    if pad {
        out.push(0);
    }
    out.extend_from_slice(trimmed);
    out
}

/// Strict DER `SEQUENCE { INTEGER r, INTEGER s }` to 64-byte `r || s`; `None` for anything that
/// is not minimal DER of two positive integers below 2^256.
pub fn ecdsa_der_to_raw(der: &[u8]) -> Option<[u8; 64]> {
    let (&tag, rest) = der.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x30 || len & 0x80 != 0 || usize::from(len) != body.len() {
        return None;
    }
    let (r, body) = read_uint(body)?;
    let (s, body) = read_uint(body)?;
    if !body.is_empty() {
        return None;
    }
    let mut out = [0u8; 64];
    out[32 - r.len()..32].copy_from_slice(r);
    out[64 - s.len()..].copy_from_slice(s);
    Some(out)
}

fn read_uint(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if tag != 0x02 || len == 0 || len > 33 || rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    if value[0] & 0x80 != 0 {
        return None; // negative
    }
    if len > 1 && value[0] == 0 && value[1] & 0x80 == 0 {
        return None; // not minimal
    }
    let value = if value[0] == 0 { &value[1..] } else { value };
    if value.len() > 32 {
        return None;
    }
    Some((value, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let formatted: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex_encode(&bytes), formatted);
    }

    #[test]
    fn der_round_trip_including_high_bits_and_leading_zeros() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a pad byte
        raw[31] = 1;
        raw[33] = 0x7f; // s has a leading zero byte
        raw[63] = 2;
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(ecdsa_der_to_raw(&der), Some(raw));
    }

    #[test]
    fn der_refuses_non_minimal_negative_and_trailing() {
        let ok = ecdsa_raw_to_der(&[1u8; 64]).unwrap();
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(ecdsa_der_to_raw(&trailing).is_none());
        // INTEGER 0x00 0x01 is not minimal.
        assert!(
            ecdsa_der_to_raw(&[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01]).is_none()
        );
        // Negative r.
        assert!(ecdsa_der_to_raw(&[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01]).is_none());
        assert!(ecdsa_der_to_raw(&[]).is_none());
        assert!(ecdsa_der_to_raw(&[0x30, 0x81]).is_none());
    }

    #[test]
    fn spki_accepts_wrapped_and_raw_points() {
        let mut raw = vec![0x04];
        raw.extend([7u8; 64]);
        let wrapped = [&[0x04, 0x41][..], &raw].concat();
        let a = spki_from_ec_point(KeyType::EcdsaP256, &raw).unwrap();
        let b = spki_from_ec_point(KeyType::EcdsaP256, &wrapped).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 91);
        let ed = spki_from_ec_point(KeyType::Ed25519, &[&[0x04, 0x20][..], &[9u8; 32]].concat());
        assert_eq!(ed.unwrap().len(), 44);
        assert!(spki_from_ec_point(KeyType::EcdsaP256, &[0x04; 10]).is_none());
    }
}
