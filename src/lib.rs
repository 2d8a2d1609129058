//! tillkey: a hardware-backed key service for retail payments.
//!
//! Layers, from the wire inwards:
//! - [`api`]: mutual-TLS HTTP front and the admin listener; one table of endpoints routes each
//!   request to a feature.
//! - [`retail`]: the retail token flows, each a vertical slice (routes, logic, tables) over the
//!   key core.
//! - [`service`]: the key core (authorize, look up, claim the active version, count use, audit)
//!   and the key features on it: operations, lifecycle, approvals, status feed, audit reader.
//! - [`policy`]: default-deny grants of operations on key names to client identities.
//! - [`device`]: the gate every device call passes: where a blocking token call runs.
//! - [`registry`]: key metadata (names, versions, states, backend object references) in SQL.
//! - [`backend`]: the `KeyBackend` trait and its hardware implementations. Nothing above this
//!   module sees a PKCS#11 or TPM type.
//!
//! `unsafe` is forbidden here; the FFI lives inside `cryptoki` and `tss-esapi`.
#![forbid(unsafe_code)]
#![warn(clippy::too_many_lines)]

pub mod api;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod device;
pub mod encoding;
pub mod error;
pub mod exchange;
pub mod key_locks;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod registry;
pub mod retail;
pub mod service;
pub mod statuslist;
pub mod systemd;
pub mod tls;
