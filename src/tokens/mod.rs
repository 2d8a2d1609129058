//! Retail token profiles over the key service: CWT claims sealed with keys from the registry.
//! POS payment QR codes (request and paid) are the first profile.

pub mod cwt;
pub mod pos;
pub mod qr;
