//! `tillkey provision package`: the key-injection packages a terminal vendor needs.
//!
//! For every terminal in a manifest, the chosen keys are exported wrapped (AES-KWP, RFC 5649)
//! under that terminal's transport key, with the check values of both, so the vendor's injection
//! facility can load them and prove it loaded the right ones. Export is a dual-control action, so
//! this runs in two steps by two officers:
//!
//! 1. `package request`: officer A asks for every export; the approval ids go to `DIR/pending.json`.
//! 2. `package approve`: officer B approves them; each approval returns its wrapped key and the
//!    packages are written to `DIR/<transport key>.json`, one per transport key.
//!
//! The same command covers both layers of a usual injection hierarchy: working keys under each
//! terminal's transport key (`--under pos-transport`, a template), and the transport keys under a
//! vendor key-encryption key imported once (`--under vendors/acme/kek`, a key name).

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::provision::{load_templates, read_toml, Manifest, Template};
use super::Conn;

/// One export waiting for the second officer.
#[derive(Serialize, Deserialize)]
struct Pending {
    approval: String,
    key: String,
    key_type: String,
    version: u32,
    transport_key: String,
    store: String,
    pos: Option<String>,
}

const PENDING: &str = "pending.json";

fn expand(pattern: &str, store: &str, pos: Option<&str>) -> Option<String> {
    let name = pattern.replace("{store}", store);
    match pos {
        Some(p) => Some(name.replace("{pos}", p)),
        None if name.contains("{pos}") => None,
        None => Some(name),
    }
}

/// Every (key, transport key) pair the manifest asks to package.
fn plan(
    manifest: &Manifest,
    templates: &BTreeMap<String, Template>,
    keys: &[String],
    under: &str,
) -> Result<Vec<Pending>, String> {
    let template = |n: &str| {
        templates
            .get(n)
            .ok_or_else(|| format!("no template named '{n}'"))
    };
    let mut out = Vec::new();
    for store in &manifest.store {
        // A store-level key is packaged once per store, a terminal-level one once per terminal.
        let mut places: Vec<Option<&str>> = vec![None];
        places.extend(store.pos.iter().map(|p| Some(p.as_str())));
        for pos in places {
            for k in keys {
                let t = template(k)?;
                if !store.templates.contains(k) {
                    continue;
                }
                if pos.is_some() != t.key.contains("{pos}") {
                    continue;
                }
                let Some(key) = expand(&t.key, &store.id, pos) else {
                    continue;
                };
                let transport = if under.contains('/') {
                    under.to_owned()
                } else {
                    let tt = template(under)?;
                    match expand(&tt.key, &store.id, pos) {
                        Some(name) => name,
                        None => {
                            return Err(format!(
                            "transport template '{under}' is per terminal but '{k}' is per store"
                        ))
                        }
                    }
                };
                out.push(Pending {
                    approval: String::new(),
                    key,
                    key_type: t.key_type.clone(),
                    version: 0,
                    transport_key: transport,
                    store: store.id.clone(),
                    pos: pos.map(str::to_owned),
                });
            }
        }
    }
    Ok(out)
}

async fn call(
    c: &mut crate::client::Connection,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let (s, v) = c
        .call(method, path, body)
        .await
        .map_err(|e| e.to_string())?;
    Ok((s.as_u16(), v))
}

/// Step one: request every export; writes `out/pending.json`.
pub async fn request(
    conn: &Conn,
    manifest: &Path,
    templates: &Path,
    keys: &[String],
    under: &str,
    out: &Path,
) -> Result<bool, String> {
    if out.join(PENDING).exists() {
        return Err(format!(
            "{} exists: approve or remove the earlier request first",
            out.join(PENDING).display()
        ));
    }
    let templates = load_templates(templates)?;
    let manifest: Manifest = read_toml(manifest)?;
    let mut wanted = plan(&manifest, &templates, keys, under)?;
    if wanted.is_empty() {
        return Err("the manifest asks for none of these keys".into());
    }
    let client = conn.client()?;
    let mut c = client.connect().await.map_err(|e| e.to_string())?;
    for p in &mut wanted {
        let (s, key) = call(&mut c, Method::GET, &format!("/v1/keys/{}", p.key), None).await?;
        if s != 200 {
            return Err(format!("{}: {}", p.key, key["error"]["message"]));
        }
        p.version = key["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["state"] == "active")
            .and_then(|v| v["version"].as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("{} has no active version", p.key))?;
        let body = json!({"version": p.version, "transport_key": p.transport_key});
        let (s, v) = call(
            &mut c,
            Method::POST,
            &format!("/v1/keys/{}:export", p.key),
            Some(&body),
        )
        .await?;
        if s != 202 {
            return Err(format!(
                "{} under {}: {}",
                p.key, p.transport_key, v["error"]["message"]
            ));
        }
        p.approval = v["approval"]["id"]
            .as_str()
            .ok_or("the export answer names no approval")?
            .to_owned();
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let text = serde_json::to_string_pretty(&wanted).map_err(|e| e.to_string())?;
    std::fs::write(out.join(PENDING), text).map_err(|e| format!("{PENDING}: {e}"))?;
    out!(
        "{} exports requested; a second officer runs: tillkey provision package approve --dir {}",
        wanted.len(),
        out.display()
    );
    Ok(true)
}

/// Step two: approve every pending export and write one package per transport key.
pub async fn approve(conn: &Conn, dir: &Path) -> Result<bool, String> {
    let path = dir.join(PENDING);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pending: Vec<Pending> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let client = conn.client()?;
    let mut c = client.connect().await.map_err(|e| e.to_string())?;
    let mut packages: BTreeMap<String, Value> = BTreeMap::new();
    let mut failures = Vec::new();
    for p in &pending {
        let (s, v) = call(
            &mut c,
            Method::POST,
            &format!("/v1/approvals/{}:approve", p.approval),
            Some(&json!({})),
        )
        .await?;
        if s != 200 {
            failures.push(format!("{}: {}", p.key, v["error"]["message"]));
            continue;
        }
        let x = &v["export"];
        let package = packages.entry(p.transport_key.clone()).or_insert_with(|| {
            json!({
                "format": "tillkey-injection-1",
                "wrapping": x["algorithm"],
                "store": p.store,
                "pos": p.pos,
                "transport_key": {
                    "name": x["transport_key"],
                    "version": x["transport_version"],
                    "kcv": x["transport_kcv"],
                },
                "keys": [],
            })
        });
        let wrapped = STANDARD
            .decode(x["wrapped_key"].as_str().unwrap_or(""))
            .map_err(|_| "the export answer carries no wrapped key")?;
        if let Some(list) = package["keys"].as_array_mut() {
            list.push(json!({
                "name": x["key"],
                "type": p.key_type,
                "version": x["version"],
                "wrapped_key": crate::encoding::hex_encode(&wrapped),
                "kcv": x["kcv"],
            }));
        }
    }
    for (transport, package) in &packages {
        let file = dir.join(format!("{}.json", transport.replace('/', "_")));
        let text = serde_json::to_string_pretty(package).map_err(|e| e.to_string())?;
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    // Approvals execute once; keeping the list would only invite a confusing second run.
    std::fs::rename(&path, dir.join("approved.json")).map_err(|e| format!("{PENDING}: {e}"))?;
    out!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "packages": packages.len(),
            "keys": pending.len() - failures.len(),
            "failures": failures,
        }))
        .unwrap_or_default()
    );
    Ok(failures.is_empty())
}
