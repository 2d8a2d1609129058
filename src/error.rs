//! The service's one error type and its one mapping to HTTP.
//!
//! Messages are written for the client: they say what was wrong with the request, never which
//! slot, object handle or internal path was involved. Internal detail goes to the log, tied to
//! the request id, through [`ServiceError::internal_detail`].

use hyper::StatusCode;

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but the state it needs is not there: an approval expired or
    /// was decided, a version is in the wrong state for a dual-controlled action, a purchase was
    /// paid for another amount, a sealed message's counter went backwards.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A retry under an `Idempotency-Key` whose first attempt began a change and died before
    /// its outcome was recorded: running it again could do it twice.
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedOperation(String),
    /// A body that is not `application/json` (what a browser's cross-site form or
    /// `text/plain` request would send).
    #[error("request bodies are JSON: send content-type application/json")]
    UnsupportedMediaType,
    #[error("too many requests from this client; slow down")]
    RateLimited,
    /// `allow` lists the methods the path does accept (sent as the `Allow` header).
    #[error("method not allowed; this path accepts {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// The key backend is down, or the audit trail refuses writes (nothing is done unaudited).
    /// The message names both without saying which: the cause is for the operator's log.
    #[error("the key backend or the audit trail is unavailable; retry later")]
    Unavailable { detail: String },
    #[error("internal error")]
    Internal { detail: String },
}

impl ServiceError {
    /// Stable, documented error code (see `docs/openapi.yaml`). Clients branch on this, so a
    /// value never changes meaning once released.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "invalid_argument",
            Self::PermissionDenied(_) => "permission_denied",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::OutcomeUnknown(_) => "outcome_unknown",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedOperation(_) => "unsupported_operation",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::RateLimited => "rate_limited",
            Self::Unavailable { .. } => "unavailable",
            Self::Internal { .. } => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::AlreadyExists(_) | Self::FailedPrecondition(_) | Self::OutcomeUnknown(_) => {
                StatusCode::CONFLICT
            }
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedOperation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Detail that belongs in the operations log but not in the response.
    pub fn internal_detail(&self) -> Option<&str> {
        match self {
            Self::Unavailable { detail } | Self::Internal { detail } => Some(detail),
            _ => None,
        }
    }

    /// The JSON body `{"error":{"code","message"}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        body.to_string().into_bytes()
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// The outcome (`ok` or a [`code`](Self::code)) spelled `name`, as the `&'static str`
    /// audit entries and metrics take: a stored answer's outcome read back from the database.
    pub fn known_outcome(name: &str) -> Option<&'static str> {
        OUTCOMES.iter().copied().find(|o| *o == name)
    }
}

/// `ok` and every value of [`ServiceError::code`].
const OUTCOMES: &[&str] = &[
    "ok",
    "invalid_argument",
    "permission_denied",
    "not_found",
    "already_exists",
    "failed_precondition",
    "outcome_unknown",
    "payload_too_large",
    "unsupported_operation",
    "unsupported_media_type",
    "method_not_allowed",
    "rate_limited",
    "unavailable",
    "internal",
];

impl From<crate::keys::Invalid> for ServiceError {
    fn from(e: crate::keys::Invalid) -> Self {
        ServiceError::InvalidArgument(e.0)
    }
}

impl From<BackendError> for ServiceError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(detail) => Self::Unavailable { detail },
            BackendError::Unsupported(msg) => Self::UnsupportedOperation(msg),
            BackendError::InvalidInput(msg) => Self::InvalidArgument(msg),
            BackendError::Failed(detail) => Self::Internal { detail },
        }
    }
}

impl From<crate::registry::RegistryError> for ServiceError {
    fn from(e: crate::registry::RegistryError) -> Self {
        match e {
            // The caller acted on a key another instance had just changed: its state is the
            // database's again, and the same request may be sent again.
            crate::registry::RegistryError::Conflict(_) => Self::FailedPrecondition(e.to_string()),
            e => Self::Internal {
                detail: format!("registry: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_a_known_outcome() {
        let all = [
            ServiceError::invalid(""),
            ServiceError::PermissionDenied(String::new()),
            ServiceError::NotFound(String::new()),
            ServiceError::AlreadyExists(String::new()),
            ServiceError::FailedPrecondition(String::new()),
            ServiceError::OutcomeUnknown(String::new()),
            ServiceError::PayloadTooLarge { limit: 0 },
            ServiceError::UnsupportedOperation(String::new()),
            ServiceError::UnsupportedMediaType,
            ServiceError::MethodNotAllowed { allow: "" },
            ServiceError::RateLimited,
            ServiceError::Unavailable {
                detail: String::new(),
            },
            ServiceError::Internal {
                detail: String::new(),
            },
        ];
        for e in &all {
            assert_eq!(ServiceError::known_outcome(e.code()), Some(e.code()));
        }
        assert_eq!(OUTCOMES.len(), all.len() + 1);
        assert_eq!(ServiceError::known_outcome("ok"), Some("ok"));
        assert_eq!(ServiceError::known_outcome("nonsense"), None);
    }
}
