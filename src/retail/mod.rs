//! The retail flows, each a vertical slice over the key core: its logic and its own tables
//! (`store`) in one folder. POS payment QR codes (`pos`), customer QR codes (`customer`),
//! challenge-response and counter-sealed messages (`challenge`), gift-card codes (`giftcode`);
//! `cwt` and `qr` are the encodings they share. A new token flow is a new folder here plus its
//! entry in [`Retail`].

pub mod challenge;
pub mod customer;
pub mod cwt;
pub mod giftcode;
pub mod pos;
pub mod qr;
pub mod routes;

use std::sync::Arc;

use crate::config::TokenSettings;
use crate::service::KeyCore;

/// Every retail flow, each holding the key core and its own store.
pub struct Retail {
    pub pos: pos::PosTokens,
    pub customers: customer::CustomerTokens,
    pub challenges: challenge::Challenges,
    pub giftcodes: giftcode::GiftCodes,
}

impl Retail {
    /// The flows on the key core's database.
    pub fn new(core: Arc<KeyCore>, settings: TokenSettings) -> Self {
        let pool = core.pool().clone();
        Self {
            pos: pos::PosTokens::new(core.clone(), pos::PurchaseStore::new(pool.clone())),
            customers: customer::CustomerTokens::new(
                core.clone(),
                customer::CustomerStore::new(pool.clone()),
                settings,
            ),
            challenges: challenge::Challenges::new(
                core.clone(),
                challenge::ChallengeStore::new(pool.clone()),
            ),
            giftcodes: giftcode::GiftCodes::new(core, giftcode::GiftCodeStore::new(pool), settings),
        }
    }
}

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
