//! The one place where `cryptoki` errors become [`BackendError`]s.

use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};

use crate::backend::BackendError;

/// How the backend should react to a failed PKCS#11 call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Severity {
    /// The library, token or login is gone: drop every session and reconnect.
    Fatal,
    /// A cached object handle went stale: look the object up again.
    StaleHandle,
    /// Anything that leaves the connection usable.
    Local,
}

pub(super) fn severity(e: &Error) -> Severity {
    let Error::Pkcs11(rv, _) = e else {
        return Severity::Local;
    };
    match rv {
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized
        | RvError::UserNotLoggedIn
        | RvError::SlotIdInvalid => Severity::Fatal,
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Severity::StaleHandle,
        _ => Severity::Local,
    }
}

/// Translate with context: `what` names the operation, `token` the token label and `object` the
/// object label (these reach the operator's log, never the client).
pub(super) fn translate(e: &Error, what: &str, token: &str, object: &str) -> BackendError {
    let detail = format!("pkcs11 {what} on token '{token}', object '{object}': {e}");
    match e {
        Error::Pkcs11(rv, _) => match rv {
            RvError::DataLenRange | RvError::DataInvalid => {
                BackendError::InvalidInput(format!("the device refused the input for {what}"))
            }
            RvError::MechanismInvalid | RvError::KeyFunctionNotPermitted => {
                BackendError::Unsupported(format!("the pkcs11 token cannot perform {what}"))
            }
            _ if severity(e) == Severity::Fatal => BackendError::Unavailable(detail),
            _ => BackendError::Failed(detail),
        },
        _ => BackendError::Failed(detail),
    }
}

/// A signature or ciphertext that simply does not authenticate.
///
/// SoftHSM 2.6 answers a failed AES-GCM tag check in `C_Decrypt` with `CKR_GENERAL_ERROR`, so
/// that code counts as an authentication failure for decryption only. (It is not treated as
/// fatal anywhere: a device that is really gone fails the supervisor's probe.)
pub(super) fn is_auth_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::SignatureInvalid
                | RvError::SignatureLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange,
            _
        ) | Error::Pkcs11(RvError::GeneralError, Function::Decrypt)
    )
}

/// Error inside one operation: a PKCS#11 failure, or an object the registry names that the token
/// does not hold.
#[derive(Debug)]
pub(super) enum OpError {
    Ck(Error),
    ObjectMissing,
    /// The token refused the caller's data (e.g. a wrapped blob that does not unwrap).
    Refused(String),
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::Ck(e)
    }
}
