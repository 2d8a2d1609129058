//! `docs/openapi.yaml` and the endpoint table describe the same API: every declared endpoint is
//! documented, every documented mTLS operation is served, and the `operation` label list in the
//! metrics description names exactly the table's labels.
//!
//! The spec is read with a small line scanner rather than a YAML library: it only needs the
//! keys of `paths:` (two-space indent), their methods (four spaces) and each path's server.

use std::collections::BTreeSet;

use super::endpoints;

const SPEC: &str = include_str!("../../docs/openapi.yaml");
/// Operations on this server are the mTLS API's; the others are the admin listener's.
const API_SERVER: &str = "https://localhost:8443";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

struct SpecPath {
    path: String,
    server: Option<String>,
    methods: Vec<String>,
}

fn spec_paths() -> Vec<SpecPath> {
    let mut out: Vec<SpecPath> = Vec::new();
    let mut in_paths = false;
    for line in SPEC.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(key) = line.strip_prefix("  /").and_then(|k| k.strip_suffix(':')) {
            out.push(SpecPath {
                path: format!("/{key}"),
                server: None,
                methods: Vec::new(),
            });
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        if let Some(url) = line.strip_prefix("      - url: ") {
            current.server.get_or_insert_with(|| url.trim().to_owned());
        } else if let Some(key) = line.strip_prefix("    ").and_then(|k| k.strip_suffix(':')) {
            if METHODS.contains(&key) {
                current.methods.push(key.to_uppercase());
            }
        }
    }
    out
}

#[test]
fn every_endpoint_is_documented_and_every_documented_operation_served() {
    let paths = spec_paths();
    assert!(
        paths.len() > 30,
        "the scanner found only {} paths",
        paths.len()
    );
    let mut spec = BTreeSet::new();
    for p in &paths {
        assert!(!p.methods.is_empty(), "{} has no operation", p.path);
        match p.server.as_deref() {
            Some(API_SERVER) => {
                spec.extend(p.methods.iter().map(|m| format!("{m} {}", p.path)));
            }
            Some(_) => assert!(!p.path.starts_with("/v1/"), "{} off the API server", p.path),
            None => panic!("{} names no server", p.path),
        }
    }
    let table: BTreeSet<String> = endpoints()
        .map(|e| format!("{} {}", e.method, e.path))
        .collect();
    let undocumented: Vec<_> = table.difference(&spec).collect();
    let unserved: Vec<_> = spec.difference(&table).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "in the table, not the spec: {undocumented:?}; in the spec, not the table: {unserved:?}"
    );
}

/// The labels listed (in backquotes) in the `/metrics` description's `operation is one of`.
fn documented_labels() -> BTreeSet<&'static str> {
    let start = SPEC
        .find("operation is one of")
        .expect("the /metrics description lists the operation labels");
    let list = &SPEC[start..];
    let end = list.find("for unrouted requests").expect("the list ends");
    list[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|label| *label != "unknown")
        .collect()
}

#[test]
fn the_documented_operation_labels_are_the_tables() {
    let table: BTreeSet<&str> = endpoints().map(|e| e.label).collect();
    let documented = documented_labels();
    let undocumented: Vec<_> = table.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&table).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "labels not in the spec: {undocumented:?}; in the spec but not the table: {unknown:?}"
    );
}
