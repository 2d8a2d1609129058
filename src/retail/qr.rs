//! QR codes for issued tokens. Error correction M (15% of codewords recoverable) is what cheap
//! POS scanners read reliably from a screen; Base45 keeps the code in alphanumeric mode.

use qrcode::{EcLevel, QrCode, Version};

use crate::error::ServiceError;

fn code(text: &str) -> Result<QrCode, ServiceError> {
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).map_err(|e| {
        ServiceError::Internal {
            detail: format!("QR encoding: {e}"),
        }
    })
}

/// The QR version (size) the token needs at error correction M.
pub fn version(text: &str) -> Result<i16, ServiceError> {
    Ok(match code(text)?.version() {
        Version::Normal(v) | Version::Micro(v) => v,
    })
}

pub fn svg(text: &str) -> Result<String, ServiceError> {
    Ok(code(text)?
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(256, 256)
        .build())
}
