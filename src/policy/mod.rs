//! Access policy: which client identity may do which operation on which keys.
//!
//! Default deny. A policy is the union of every `*.toml` file in the policy directory; each file
//! holds `[[grant]]` tables. A file that does not parse or names an unknown operation, role or
//! malformed pattern makes the whole load fail with the file and grant number, so a typo never
//! half-applies.

pub mod glob;

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use self::glob::Glob;

/// Everything a caller can be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Create,
    Read,
    Rotate,
    Revoke,
    Update,
    Destroy,
    Import,
    Export,
    Audit,
    Sign,
    Verify,
    Encrypt,
    Decrypt,
    /// Create keys derived from this master key.
    Derive,
}

impl Operation {
    pub const ALL: [Operation; 14] = [
        Operation::Create,
        Operation::Read,
        Operation::Rotate,
        Operation::Revoke,
        Operation::Update,
        Operation::Destroy,
        Operation::Import,
        Operation::Export,
        Operation::Audit,
        Operation::Sign,
        Operation::Verify,
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::Derive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Read => "read",
            Operation::Rotate => "rotate",
            Operation::Revoke => "revoke",
            Operation::Update => "update",
            Operation::Destroy => "destroy",
            Operation::Import => "import",
            Operation::Export => "export",
            Operation::Audit => "audit",
            Operation::Sign => "sign",
            Operation::Verify => "verify",
            Operation::Encrypt => "encrypt",
            Operation::Decrypt => "decrypt",
            Operation::Derive => "derive",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// Built-in roles: named bundles of operations, so policies say what a person is for.
fn role_operations(role: &str) -> Option<&'static [Operation]> {
    match role {
        "officer" => Some(&[
            Operation::Create,
            Operation::Read,
            Operation::Rotate,
            Operation::Revoke,
            Operation::Update,
            Operation::Destroy,
            Operation::Import,
            Operation::Export,
            Operation::Audit,
            Operation::Derive,
        ]),
        "auditor" => Some(&[Operation::Audit]),
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    grant: Vec<RawGrant>,
    /// Key templates live beside the grants (read by `tillkey provision enrol`, not here).
    #[serde(default)]
    #[allow(dead_code)]
    template: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[allow(dead_code)]
    description: Option<String>,
    identities: Vec<String>,
    keys: Vec<String>,
    #[serde(default)]
    operations: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug)]
struct Grant {
    identities: Vec<Glob>,
    keys: Vec<Glob>,
    operations: Vec<Operation>,
}

#[derive(Debug, Default)]
pub struct Policy {
    grants: Vec<Grant>,
    files: usize,
}

impl Policy {
    pub fn load_dir(dir: &Path) -> Result<Self, String> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| format!("policy dir {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut policy = Policy::default();
        for path in paths {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            policy
                .add_file(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(policy)
    }

    fn add_file(&mut self, text: &str) -> Result<(), String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for (i, g) in raw.grant.into_iter().enumerate() {
            let n = i + 1;
            let at = |msg: String| format!("grant #{n}: {msg}");
            if g.identities.is_empty() || g.keys.is_empty() {
                return Err(at(
                    "identities and keys must each list at least one pattern".into(),
                ));
            }
            let mut operations = Vec::new();
            for op in &g.operations {
                operations.push(Operation::parse(op).ok_or_else(|| {
                    at(format!(
                        "unknown operation '{op}' (known: {})",
                        Operation::ALL.map(Operation::as_str).join(", ")
                    ))
                })?);
            }
            for role in &g.roles {
                let ops = role_operations(role).ok_or_else(|| {
                    at(format!("unknown role '{role}' (known: officer, auditor)"))
                })?;
                operations.extend_from_slice(ops);
            }
            if operations.is_empty() {
                return Err(at("grants nothing: give operations or roles".into()));
            }
            let identities = g
                .identities
                .iter()
                .map(|p| {
                    check_identity_kind(p).map_err(at)?;
                    Glob::new(p).map_err(|e| at(format!("identity {e}")))
                })
                .collect::<Result<_, _>>()?;
            let keys = g
                .keys
                .iter()
                .map(|p| {
                    let glob = Glob::new(p).map_err(|e| at(format!("key {e}")))?;
                    glob.check_key_alphabet()
                        .map_err(|e| at(format!("key {e}")))?;
                    Ok(glob)
                })
                .collect::<Result<_, String>>()?;
            self.grants.push(Grant {
                identities,
                keys,
                operations,
            });
        }
        self.files += 1;
        Ok(())
    }

    pub fn allows(&self, identity: &str, op: Operation, key: &str) -> bool {
        self.grants.iter().any(|g| {
            g.operations.contains(&op)
                && g.identities.iter().any(|p| p.matches_identity(identity))
                && g.keys.iter().any(|p| p.matches(key))
        })
    }

    /// Whether `identity` holds `op` on every name under `prefix` by one grant, whatever keys
    /// exist (see [`Glob::covers_prefix`]).
    pub fn covers_prefix(&self, identity: &str, op: Operation, prefix: &str) -> bool {
        self.grants.iter().any(|g| {
            g.operations.contains(&op)
                && g.identities.iter().any(|p| p.matches_identity(identity))
                && g.keys.iter().any(|p| p.covers_prefix(prefix))
        })
    }

    /// Whether `identity` holds `op` on any key at all.
    pub fn grants_any(&self, identity: &str, op: Operation) -> bool {
        self.grants.iter().any(|g| {
            g.operations.contains(&op) && g.identities.iter().any(|p| p.matches_identity(identity))
        })
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    pub fn file_count(&self) -> usize {
        self.files
    }
}

/// The policy in force, swapped whole on reload.
#[derive(Default)]
pub struct PolicyHandle(RwLock<Arc<Policy>>);

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        Self(RwLock::new(Arc::new(policy)))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

/// An identity pattern says which part of a certificate it matches: a URI (`spiffe://...`,
/// compared with the certificate's URI SAN) or `cn:NAME` (a certificate without a URI SAN,
/// by its subject CN). One namespace for both let a certificate whose CN reads like an
/// officer's URI pass as that officer.
fn check_identity_kind(pattern: &str) -> Result<(), String> {
    if pattern.starts_with(crate::tls::CN_PREFIX) || pattern.contains("://") {
        Ok(())
    } else {
        Err(format!(
            "identity '{pattern}' is neither a URI (spiffe://...) nor a CN ('{}{pattern}')",
            crate::tls::CN_PREFIX
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [[grant]]
        identities = ["spiffe://t/svc/payments"]
        operations = ["sign", "verify"]
        keys = ["stores/*/pos/*/qr-mac"]

        [[grant]]
        identities = ["spiffe://t/officer/*"]
        roles = ["officer"]
        keys = ["**"]
    "#;

    fn sample() -> Policy {
        let mut p = Policy::default();
        p.add_file(SAMPLE).unwrap();
        p
    }

    #[test]
    fn default_deny_and_exact_grants() {
        let p = sample();
        assert!(p.allows(
            "spiffe://t/svc/payments",
            Operation::Sign,
            "stores/1/pos/2/qr-mac"
        ));
        assert!(!p.allows(
            "spiffe://t/svc/payments",
            Operation::Encrypt,
            "stores/1/pos/2/qr-mac"
        ));
        assert!(!p.allows(
            "spiffe://t/svc/payments",
            Operation::Sign,
            "stores/1/pos/2/other"
        ));
        assert!(!p.allows(
            "spiffe://t/svc/loyalty",
            Operation::Sign,
            "stores/1/pos/2/qr-mac"
        ));
        assert!(p.allows("spiffe://t/officer/alice", Operation::Create, "a/b"));
        assert!(!p.allows("spiffe://t/officer/alice", Operation::Sign, "a/b"));
        assert!(!Policy::default().allows("x", Operation::Read, "a"));
    }

    #[test]
    fn load_errors_name_the_grant() {
        let mut p = Policy::default();
        let e = p
            .add_file("[[grant]]\nidentities=[\"a\"]\nkeys=[\"k\"]\noperations=[\"sing\"]")
            .unwrap_err();
        assert!(e.contains("grant #1") && e.contains("sing"), "{e}");
        let e = p
            .add_file("[[grant]]\nidentities=[\"a\"]\nkeys=[\"k\"]\nroles=[\"root\"]")
            .unwrap_err();
        assert!(e.contains("unknown role"), "{e}");
        let e = p
            .add_file("[[grant]]\nidentities=[\"a\"]\nkeys=[\"k\"]")
            .unwrap_err();
        assert!(e.contains("grants nothing"), "{e}");
        assert!(p.add_file("[[grant]]\nidentity=[\"a\"]").is_err());
        assert_eq!(p.grant_count(), 0);
    }
}
