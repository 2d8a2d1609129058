//! Keys derived from a master: K(name, v) = KDF(master version, context(name, v)).
//!
//! A store-group master (`aes256-derive`) is an ordinary registry key with versions. A terminal
//! key created with `derive_from` stores no key material anywhere: each of its versions records
//! the master version and KDF that make it, and the backend re-derives it inside the device when
//! it is used. So the device's object count does not grow with the number of terminals, and a
//! version keeps working after the master rotates (it names its own master version).
//!
//! Life cycle of a derived key is that of any key (rotate derives the next version from the
//! master's active version; revoke refuses at once). Destroying a derived version only marks it:
//! there is no object to delete, and the master's version could derive it again; the registry
//! refuses to do so for a destroyed version. Derived keys are never exportable: export would let
//! a key leave that the device can re-create from the master at will, so a leaked export would
//! outlive every revocation short of replacing the master.

use std::sync::Arc;

use ring::digest;

use super::key_core::KeyCore;
use super::Caller;
use crate::error::ServiceError;
use crate::keys::KeyName;
use crate::policy::Operation;
use crate::registry::KeyRecord;

/// Domain label of the context; a new derivation scheme gets a new label.
const LABEL: &[u8] = b"tillkey derived key v1";

/// The 32-byte derivation context of version `version` of key `name`: SHA-256 over the label,
/// a zero byte, the name's length (2 bytes, big-endian), the name and the version (4 bytes,
/// big-endian). Length-prefixed fields make the encoding unambiguous; the hash makes it fixed
/// length (the KDF takes whole AES blocks) whatever the name.
pub fn context(name: &KeyName, version: u32) -> [u8; 32] {
    let name = name.as_str().as_bytes();
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(LABEL);
    ctx.update(&[0]);
    // Names are at most MAX_NAME_LEN (200) bytes.
    ctx.update(&(name.len() as u16).to_be_bytes());
    ctx.update(name);
    ctx.update(&version.to_be_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl KeyCore {
    /// The master a caller may derive from: granted `derive` on it, of type `aes256-derive`,
    /// with an active version.
    pub(super) fn master_for(
        &self,
        caller: &Caller,
        master: &str,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let name = self.authorize(caller, Operation::Derive, master)?;
        let key = self.lookup(&name)?;
        if !key.key_type.derives() {
            return Err(ServiceError::invalid(format!(
                "derive_from '{name}' is a {} key; masters are aes256-derive keys",
                key.key_type.as_str()
            )));
        }
        if key.active().is_none() {
            return Err(ServiceError::FailedPrecondition(format!(
                "master '{name}' has no active version to derive from"
            )));
        }
        Ok(key)
    }

    /// Keys with a usable version derived from version `version` of master `master`:
    /// destroying that master version would silently break them.
    pub(super) fn derived_dependents(&self, master: &KeyName, version: u32) -> usize {
        let (keys, _) = self.registry.list("", None, usize::MAX, |k| {
            k.derive_from.as_ref() == Some(master)
                && k.versions.iter().any(|v| {
                    v.derivation.is_some_and(|d| d.master_version == version) && v.state.may_check()
                })
        });
        keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_differ_by_name_and_version() {
        let a = KeyName::parse("stores/1/pos/12/mac").unwrap();
        let b = KeyName::parse("stores/11/pos/2/mac").unwrap();
        assert_ne!(context(&a, 1), context(&a, 2));
        assert_ne!(context(&a, 1), context(&b, 1));
        assert_eq!(context(&a, 7), context(&a, 7));
    }
}
