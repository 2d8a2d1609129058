//! Retail token profiles over the key service: CWT claims sealed with keys from the registry.
//! POS payment QR codes (request and paid) are the first profile.

pub mod challenge;
pub mod customer;
pub mod cwt;
pub mod giftcode;
pub mod pos;
pub mod qr;

/// Run every decoder over `data`; used by the fuzz target and the robustness test. Results are
/// ignored: the only failure is a panic.
pub fn fuzz_decoders(data: &[u8]) {
    let _ = cwt::open(data);
    let _ = cwt::Claims::from_cbor(data);
    let _ = crate::statuslist::open1(data, |_, _| true);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cwt::from_text(text, &[pos::REQUEST_PREFIX, pos::PAID_PREFIX]);
        let _ = giftcode::normalize(text);
        let _ = crate::keys::parse_duration(text);
        let _ = crate::keys::KeyName::parse(text);
    }
    // Also as if it were the body of a token: decoded envelopes carry payloads onward.
    if let Ok(sealed) = cwt::open(data) {
        let _ = cwt::Claims::from_cbor(&sealed.payload);
    }
}
