//! The key service: a small key core (`core`: authorize, look up, claim the active version,
//! count use, reach the device through its gate, audit) and the features built on it, each its
//! own type holding the core: key operations, lifecycle, dual-control approvals, the signed
//! status feed and the audit trail reader. The retail token flows (`crate::retail`) hold the
//! core the same way.

mod approvals;
mod audit_read;
pub mod batch;
mod batch_create;
mod derived;
mod envelope;
mod key_core;
pub mod lifecycle;
mod operations;
mod scheduler;
pub mod status;
mod versions;

pub use approvals::{Approvals, Executed, ExportResult, ImportRequest};
pub use audit_read::AuditTrail;
pub use batch_create::{BatchItem, NewKey, MAX_CREATE_BATCH};
pub use derived::context as derivation_context;
pub use key_core::KeyCore;
pub use lifecycle::{ensure_service_key, KeyLifecycle, LifecycleInput, PrefixOutcome};
pub use operations::Operations;
pub use status::StatusFeed;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::audit::AuditLog;
use crate::device::Device;
use crate::policy::PolicyHandle;
use crate::registry::Registry;

/// Most keys one listing page returns.
pub const LIST_PAGE: usize = 1000;

/// The authenticated client, from its certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// ASN.1 DER `SEQUENCE { r, s }` for ECDSA, as OpenSSL writes it.
    Der,
    /// `r || s`, as JOSE and COSE use it.
    Raw,
}

pub struct Signed {
    pub signature: Vec<u8>,
    pub version: u32,
}

pub struct Verified {
    pub valid: bool,
    pub version: u32,
}

/// Every key feature, each holding the same key core: what the daemon builds once and the API
/// serves.
pub struct Service {
    pub core: Arc<KeyCore>,
    pub keys: Operations,
    pub lifecycle: Arc<KeyLifecycle>,
    pub approvals: Approvals,
    pub status: StatusFeed,
    pub audit_trail: AuditTrail,
}

impl Service {
    /// `approval_ttl`: seconds a dual-control approval stays open.
    pub fn new(
        device: Arc<Device>,
        registry: Registry,
        policy: PolicyHandle,
        audit: AuditLog,
        approval_ttl: u64,
    ) -> Self {
        let core = Arc::new(KeyCore::new(device, registry, policy, audit));
        let lifecycle = Arc::new(KeyLifecycle::new(core.clone()));
        Self {
            keys: Operations::new(core.clone()),
            approvals: Approvals::new(core.clone(), lifecycle.clone(), approval_ttl),
            status: StatusFeed::new(core.clone()),
            audit_trail: AuditTrail::new(core.clone()),
            lifecycle,
            core,
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
