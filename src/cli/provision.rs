//! `tillkey provision enrol`: make the keys a manifest of stores and terminals calls for, from
//! key templates, through the API (so policy, audit and dual control apply as to any officer).
//!
//! Idempotent: keys that exist are left alone. Keys of stores or terminals no longer in the
//! manifest are reported as "would retire", never touched: retiring is an officer's decision.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Conn;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    #[serde(default)]
    pub(super) template: Vec<Template>,
    #[serde(default)]
    #[allow(dead_code)]
    grant: Vec<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub(super) name: String,
    pub(super) key: String,
    #[serde(rename = "type")]
    pub(super) key_type: String,
    rotation_period: Option<String>,
    verify_grace: Option<String>,
    max_operations: Option<u64>,
    exportable: Option<bool>,
    /// Master to derive the key from (may use {group} and {store}); the key then holds no
    /// object in the HSM.
    derive_from: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    #[serde(default)]
    pub(super) store: Vec<Store>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Store {
    pub(super) id: String,
    /// Store group, for templates whose keys are per group (`{group}`), such as derivation
    /// masters.
    group: Option<String>,
    #[serde(default)]
    pub(super) pos: Vec<String>,
    pub(super) templates: Vec<String>,
}

/// The key templates in `path`, by name.
pub(super) fn load_templates(path: &Path) -> Result<BTreeMap<String, Template>, String> {
    let file: TemplateFile = read_toml(path)?;
    Ok(file
        .template
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}

pub(super) fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Every key the manifest calls for, with the template that makes it.
fn desired(
    manifest: &Manifest,
    templates: &BTreeMap<String, Template>,
) -> Result<BTreeMap<String, Template>, String> {
    let mut want = BTreeMap::new();
    for store in &manifest.store {
        for t in &store.templates {
            let tpl = templates
                .get(t)
                .ok_or_else(|| format!("store {}: no template named '{t}'", store.id))?;
            let fill = |pattern: &str| -> Result<String, String> {
                let s = pattern.replace("{store}", &store.id);
                match (&store.group, s.contains("{group}")) {
                    (Some(g), _) => Ok(s.replace("{group}", g)),
                    (None, false) => Ok(s),
                    (None, true) => Err(format!(
                        "store {}: template '{t}' needs the store's group",
                        store.id
                    )),
                }
            };
            let base = fill(&tpl.key)?;
            let mut tpl = tpl.clone();
            if let Some(m) = &tpl.derive_from {
                tpl.derive_from = Some(fill(m)?);
            }
            if base.contains("{pos}") {
                for pos in &store.pos {
                    want.insert(base.replace("{pos}", pos), tpl.clone());
                }
            } else {
                want.insert(base, tpl);
            }
        }
    }
    Ok(want)
}

/// Whether `name` has the shape of some template (so it is ours to report on).
fn from_template(name: &str, templates: &BTreeMap<String, Template>) -> bool {
    templates.values().any(|t| {
        let pattern: Vec<&str> = t.key.split('/').collect();
        let parts: Vec<&str> = name.split('/').collect();
        pattern.len() == parts.len()
            && pattern
                .iter()
                .zip(&parts)
                .all(|(p, n)| matches!(*p, "{store}" | "{pos}" | "{group}") || p == n)
    })
}

pub async fn enrol(
    conn: &Conn,
    manifest: &Path,
    templates: &Path,
    dry_run: bool,
    parallel: usize,
    batch: usize,
) -> Result<bool, String> {
    let started = Instant::now();
    let templates = load_templates(templates)?;
    let manifest: Manifest = read_toml(manifest)?;
    let want = desired(&manifest, &templates)?;

    let client = conn.client()?;
    let mut c = client.connect().await.map_err(|e| e.to_string())?;
    let mut existing = BTreeSet::new();
    // Every top-level segment the manifest's keys (and their masters) live under.
    let prefixes: BTreeSet<String> = want
        .keys()
        .filter_map(|n| n.split_once('/').map(|(top, _)| format!("{top}/")))
        .collect();
    for prefix in prefixes {
        list_into(&mut c, &prefix, &mut existing).await?;
    }

    let missing: Vec<(String, Template)> = want
        .iter()
        .filter(|(n, _)| !existing.contains(*n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let would_retire: Vec<String> = existing
        .iter()
        .filter(|n| !want.contains_key(*n) && from_template(n, &templates))
        .cloned()
        .collect();

    let mut created = 0usize;
    let mut raced = 0usize;
    let mut failures = Vec::new();
    if !dry_run {
        // Masters (and every other stored key) first: derived keys need theirs to exist.
        let (derived, stored): (Vec<_>, Vec<_>) = missing
            .iter()
            .cloned()
            .partition(|(_, t)| t.derive_from.is_some());
        for phase in [stored, derived] {
            let (done, dup, failed) = create_all(&client, phase, batch, parallel).await?;
            created += done;
            raced += dup;
            failures.extend(failed);
        }
    }
    let report: Value = json!({
        "stores": manifest.store.len(),
        "terminals": manifest.store.iter().map(|s| s.pos.len()).sum::<usize>(),
        "keys_wanted": want.len(),
        "existing": want.len() - missing.len() + raced,
        "created": created,
        "keys_per_second": if started.elapsed().as_secs_f64() > 0.0 { (created as f64 / started.elapsed().as_secs_f64()).round() } else { 0.0 },
        "to_create": if dry_run { missing.len() } else { 0 },
        "would_retire": would_retire,
        "failures": failures,
        "seconds": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    });
    out!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(report["failures"].as_array().is_none_or(|f| f.is_empty()))
}

/// Add the names of every key under `prefix` to `into`, page by page.
async fn list_into(
    c: &mut crate::client::Connection,
    prefix: &str,
    into: &mut BTreeSet<String>,
) -> Result<(), String> {
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/keys?prefix={prefix}&page_token={t}"),
            None => format!("/v1/keys?prefix={prefix}"),
        };
        let (status, page) = c
            .call(Method::GET, &path, None)
            .await
            .map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("listing keys: {page}"));
        }
        for k in page["keys"].as_array().into_iter().flatten() {
            if let Some(n) = k["name"].as_str() {
                into.insert(n.to_owned());
            }
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(()),
        }
    }
}

/// Create `keys` through `POST /v1/keys:batchCreate`, `batch` at a time over `parallel`
/// connections: (created, already there, failures).
async fn create_all(
    client: &crate::client::Client,
    keys: Vec<(String, Template)>,
    batch: usize,
    parallel: usize,
) -> Result<(usize, usize, Vec<String>), String> {
    let batches: Vec<Vec<(String, Template)>> = keys
        .chunks(batch.clamp(1, 1000))
        .map(<[_]>::to_vec)
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let client = client.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client.connect().await.map_err(|e| e.to_string())?;
            let (mut done, mut dup, mut failed) = (0usize, 0usize, Vec::new());
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some(items) = next else { break };
                let body = json!({ "keys": items.iter().map(|(name, t)| super::strip_nulls(json!({
                    "name": name, "type": t.key_type, "rotation_period": t.rotation_period,
                    "verify_grace": t.verify_grace, "max_operations": t.max_operations,
                    "exportable": t.exportable, "derive_from": t.derive_from,
                }))).collect::<Vec<_>>() });
                match c
                    .call(Method::POST, "/v1/keys:batchCreate", Some(&body))
                    .await
                {
                    Ok((s, v)) if s.is_success() => {
                        for r in v["results"].as_array().into_iter().flatten() {
                            match r["outcome"].as_str() {
                                Some("created") => done += 1,
                                // Someone else made it meanwhile: still idempotent.
                                _ if r["error"]["code"] == "already_exists" => dup += 1,
                                _ => {
                                    failed.push(format!("{}: {}", r["name"], r["error"]["message"]))
                                }
                            }
                        }
                    }
                    Ok((_, v)) => failed.push(format!(
                        "batch of {} from {}: {}",
                        items.len(),
                        items[0].0,
                        v["error"]["message"]
                    )),
                    Err(e) => failed.push(format!("batch from {}: {e}", items[0].0)),
                }
            }
            Ok::<_, String>((done, dup, failed))
        }));
    }
    let (mut done, mut dup, mut failed) = (0, 0, Vec::new());
    for t in tasks {
        let (d, u, f) = t.await.map_err(|e| e.to_string())??;
        done += d;
        dup += u;
        failed.extend(f);
    }
    Ok((done, dup, failed))
}
