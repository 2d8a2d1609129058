//! An object the token says it does not hold, which another process sharing the token (an
//! instance of a cluster) may have just made: how long to keep looking, and the error it
//! becomes when it stays missing.

use std::sync::Arc;

use super::connection::Connection;
use crate::backend::{BackendError, ObjectRef};
use crate::encoding;

/// Pauses before looking again for an object the token says it does not hold. Measured with
/// three instances on one SoftHSM token rotating a key every few hundred milliseconds: an
/// object another process had made and committed was sometimes missing from this process's
/// searches for a while (SoftHSM notices other processes' writes lazily): up to about 200 ms
/// on a quiet machine, longer on a loaded one. An object that is really gone costs its request
/// the sum, about 3 s, on a device thread.
pub(super) const MISSING_PAUSES: [std::time::Duration; 10] = {
    use std::time::Duration;
    [
        Duration::from_millis(5),
        Duration::from_millis(20),
        Duration::from_millis(50),
        Duration::from_millis(100),
        Duration::from_millis(200),
        Duration::from_millis(300),
        Duration::from_millis(400),
        Duration::from_millis(500),
        Duration::from_millis(600),
        Duration::from_millis(800),
    ]
};

/// How one attempt at a call failed: the object was not found on the connection, or otherwise.
pub(super) enum Failure {
    Missing(Arc<Connection>),
    Other(BackendError),
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Self::Other(e)
    }
}

impl Failure {
    pub(super) fn into_backend(self, what: &str, object: &ObjectRef) -> BackendError {
        match self {
            Self::Other(e) => e,
            Self::Missing(conn) => BackendError::Failed(format!(
                "pkcs11 {what}: token '{}' holds no object with id {}",
                conn.token_label,
                encoding::hex_encode(&object.0)
            )),
        }
    }
}
