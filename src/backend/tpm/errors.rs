//! The one place TSS errors become [`BackendError`]s.
//!
//! The TSS stack reports where an error arose in the top bits of its 32-bit response code (the
//! "layer": 0 for the TPM itself, 10 for the TCTI transport, 7 for ESAPI...). A transport error
//! means the TPM is gone (swtpm restarted, the device vanished): the contexts are rebuilt. A few
//! TPM codes mean the same (not initialised, failure mode, handles the TPM no longer knows), and
//! so do the ESAPI and SAPI codes for a context that can no longer be used: after any command
//! fails on its way to the TPM, ESAPI answers every later call on that context with
//! `BAD_SEQUENCE`, even once the TPM is back. That failure is not always seen where it happens
//! (a best-effort flush ignores it), so the refusal itself has to count as fatal, or a context
//! would stay in the pool refusing every call for good (tests/tpm.rs forces this).

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind as K};
use tss_esapi::Error;

use crate::backend::BackendError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The connection or the TPM's state is gone: rebuild the contexts.
    Fatal,
    /// Out of object memory or asked to retry: answer `Unavailable`, keep the context.
    Busy,
    /// Anything else: this request failed.
    Failed,
}

const LAYER_TPM: u32 = 0;
const LAYER_ESAPI: u32 = 7;
const LAYER_SAPI: u32 = 8;
const LAYER_TCTI: u32 = 10;

/// Base codes (TSS2_BASE_RC_*) that, from ESAPI or SAPI, mean this context is finished: it was
/// used out of sequence (a command failed half-way: ESAPI's state is `INTERNALERROR` for good),
/// has no connection, or got an answer it could not read (the stream is out of step).
const CONTEXT_FINISHED: [u32; 5] = [
    7,  // BAD_SEQUENCE
    8,  // NO_CONNECTION
    10, // IO_ERROR
    17, // MALFORMED_RESPONSE
    19, // INSUFFICIENT_RESPONSE
];

/// The raw TSS2 response code. `Tss2ResponseCode` hides it, but its format structs print it.
fn raw(rc: &Tss2ResponseCode) -> Option<u32> {
    let text = match rc {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(z) => z.to_string(),
        Tss2ResponseCode::FormatOne(o) => o.to_string(),
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

pub fn severity(e: &Error) -> Severity {
    let Error::Tss2Error(rc) = e else {
        return Severity::Failed;
    };
    let code = raw(rc);
    let layer = code.map_or(LAYER_TCTI, |r| r >> 16);
    if layer == LAYER_TCTI {
        return Severity::Fatal;
    }
    if layer == LAYER_ESAPI || layer == LAYER_SAPI {
        let base = code.map_or(0, |r| r & 0xffff);
        return if CONTEXT_FINISHED.contains(&base) {
            Severity::Fatal
        } else {
            // Anything else from these layers is a bad parameter on a healthy context.
            Severity::Failed
        };
    }
    if layer != LAYER_TPM {
        return Severity::Failed;
    }
    match rc.kind() {
        Some(
            K::Initialize
            | K::Failure
            | K::Reboot
            | K::Handle
            | K::ReferenceH0
            | K::ReferenceH1
            | K::ReferenceH2
            | K::BadContext,
        ) => Severity::Fatal,
        Some(
            K::ObjectMemory
            | K::ObjectHandles
            | K::SessionMemory
            | K::Memory
            | K::Retry
            | K::Yielded
            | K::Testing
            | K::ContextGap,
        ) => Severity::Busy,
        _ => Severity::Failed,
    }
}

/// Describe `e` for the log: what was attempted, on which TPM, and the TSS's own words.
pub fn translate(e: &Error, what: &str, tcti: &str) -> BackendError {
    let code = match e {
        Error::Tss2Error(rc) => raw(rc).map_or_else(String::new, |r| format!(" (rc {r:#010x})")),
        Error::WrapperError(_) => String::new(),
    };
    let msg = match e {
        Error::Tss2Error(rc) if raw(rc).is_some_and(|r| r >> 16 == LAYER_TCTI) => {
            format!("tpm {what} on {tcti}: the TPM does not answer (transport error{code})")
        }
        _ => format!("tpm {what} on {tcti}: {e}{code}"),
    };
    match severity(e) {
        Severity::Fatal | Severity::Busy => BackendError::Unavailable(msg),
        Severity::Failed => BackendError::Failed(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(code: u32) -> Error {
        Error::Tss2Error(Tss2ResponseCode::from(code))
    }

    #[test]
    fn transport_and_lost_state_are_fatal_full_tpm_is_busy() {
        // TSS2_TCTI_RC_IO_ERROR: swtpm gone.
        assert_eq!(severity(&rc(0x000a_000a)), Severity::Fatal);
        assert!(matches!(
            translate(&rc(0x000a_000a), "sign", "swtpm:port=1"),
            BackendError::Unavailable(m) if m.contains("does not answer")
        ));
        // TPM_RC_INITIALIZE, TPM_RC_FAILURE.
        assert_eq!(severity(&rc(0x100)), Severity::Fatal);
        assert_eq!(severity(&rc(0x101)), Severity::Fatal);
        // TPM_RC_OBJECT_MEMORY, TPM_RC_RETRY.
        assert_eq!(severity(&rc(0x902)), Severity::Busy);
        assert_eq!(severity(&rc(0x922)), Severity::Busy);
        // TSS2_ESYS_RC_BAD_SEQUENCE: the context refuses every call after a failed one.
        assert_eq!(severity(&rc(0x0007_0007)), Severity::Fatal);
        assert!(matches!(
            translate(&rc(0x0007_0007), "sign", "x"),
            BackendError::Unavailable(_)
        ));
        // TSS2_ESYS_RC_IO_ERROR and TSS2_SYS_RC_MALFORMED_RESPONSE: the link, not the request.
        assert_eq!(severity(&rc(0x0007_000a)), Severity::Fatal);
        assert_eq!(severity(&rc(0x0008_0011)), Severity::Fatal);
        // TSS2_ESYS_RC_BAD_VALUE and TSS2_ESYS_RC_BAD_REFERENCE: a bad parameter, context fine.
        assert_eq!(severity(&rc(0x0007_000b)), Severity::Failed);
        assert_eq!(severity(&rc(0x0007_0005)), Severity::Failed);
        // TPM_RC_VALUE on parameter 1: this request's fault, the TPM is fine.
        assert_eq!(severity(&rc(0x1c4)), Severity::Failed);
        assert!(matches!(
            translate(&rc(0x1c4), "sign", "x"),
            BackendError::Failed(_)
        ));
    }
}
