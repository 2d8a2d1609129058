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
pub(super) struct TemplateFile {
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
    #[serde(default)]
    pub(super) pos: Vec<String>,
    pub(super) templates: Vec<String>,
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
            let base = tpl.key.replace("{store}", &store.id);
            if base.contains("{pos}") {
                for pos in &store.pos {
                    want.insert(base.replace("{pos}", pos), tpl.clone());
                }
            } else {
                want.insert(base, tpl.clone());
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
                .all(|(p, n)| *p == "{store}" || *p == "{pos}" || p == n)
    })
}

pub async fn enrol(
    conn: &Conn,
    manifest: &Path,
    templates: &Path,
    dry_run: bool,
    parallel: usize,
) -> Result<bool, String> {
    let started = Instant::now();
    let file: TemplateFile = read_toml(templates)?;
    let templates: BTreeMap<String, Template> = file
        .template
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let manifest: Manifest = read_toml(manifest)?;
    let want = desired(&manifest, &templates)?;

    let client = conn.client()?;
    let mut c = client.connect().await.map_err(|e| e.to_string())?;
    let mut existing = BTreeSet::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/keys?prefix=stores/&page_token={t}"),
            None => "/v1/keys?prefix=stores/".to_string(),
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
                existing.insert(n.to_owned());
            }
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
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
    let mut failures = Vec::new();
    if !dry_run {
        let chunks: Vec<Vec<(String, Template)>> = missing
            .chunks(missing.len().div_ceil(parallel.max(1)).max(1))
            .map(<[_]>::to_vec)
            .collect();
        let mut tasks = Vec::new();
        for chunk in chunks {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client.connect().await.map_err(|e| e.to_string())?;
                let mut done = 0usize;
                let mut failed = Vec::new();
                for (name, t) in chunk {
                    let body = json!({
                        "name": name, "type": t.key_type, "rotation_period": t.rotation_period,
                        "verify_grace": t.verify_grace, "max_operations": t.max_operations, "exportable": t.exportable,
                    });
                    let body = super::strip_nulls(body);
                    match c.call(Method::POST, "/v1/keys", Some(&body)).await {
                        Ok((s, _)) if s.as_u16() == 201 => done += 1,
                        // Someone else made it meanwhile: still idempotent.
                        Ok((s, _)) if s.as_u16() == 409 => {}
                        Ok((_, v)) => failed.push(format!("{name}: {}", v["error"]["message"])),
                        Err(e) => failed.push(format!("{name}: {e}")),
                    }
                }
                Ok::<_, String>((done, failed))
            }));
        }
        for t in tasks {
            let (done, failed) = t.await.map_err(|e| e.to_string())??;
            created += done;
            failures.extend(failed);
        }
    }
    let report: Value = json!({
        "stores": manifest.store.len(),
        "terminals": manifest.store.iter().map(|s| s.pos.len()).sum::<usize>(),
        "keys_wanted": want.len(),
        "existing": want.len() - missing.len(),
        "created": created,
        "to_create": if dry_run { missing.len() } else { 0 },
        "would_retire": would_retire,
        "failures": failures,
        "seconds": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(report["failures"].as_array().is_none_or(|f| f.is_empty()))
}
