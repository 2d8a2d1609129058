//! The key endpoints: management, lifecycle, dual control, audit and the cryptographic
//! operations. Each handler decodes the body, calls the service and encodes the answer.

use hyper::StatusCode;

use super::endpoint::{handler, ok, Endpoint, Note, Outcome, Req};
use super::json::{self, ApprovalView, KeyView};
use super::query::{audit_query, list_query};
use super::views;
use super::{batch, batch_create};
use crate::error::ServiceError;
use crate::keys::KeyPrefix;
use crate::service::{Executed, ImportRequest, LifecycleInput, LIST_PAGE};

#[rustfmt::skip]
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint::get("/v1/keys", "list", handler!(list_keys)),
    Endpoint::post_change("/v1/keys", "create", handler!(create_key)),
    Endpoint::post_change("/v1/keys:batchCreate", "batch_create", handler!(batch_create::create)),
    Endpoint::post_change("/v1/keys:revokePrefix", "revoke_prefix", handler!(revoke_prefix)),
    Endpoint::post_change("/v1/keys:rotatePrefix", "rotate_prefix", handler!(rotate_prefix)),
    Endpoint::post_change("/v1/keys:import", "import", handler!(import)),
    Endpoint::get("/v1/keys/{name}", "get", handler!(get_key)),
    Endpoint::patch("/v1/keys/{name}", "update", handler!(update_key)),
    Endpoint::post_change("/v1/keys/{name}:rotate", "rotate", handler!(rotate)),
    Endpoint::post_change("/v1/keys/{name}:revoke", "revoke", handler!(revoke)),
    Endpoint::post_change("/v1/keys/{name}:destroy", "destroy", handler!(destroy)),
    Endpoint::post("/v1/keys/{name}:export", "export", handler!(export)),
    Endpoint::post("/v1/keys/{name}:sign", "sign", handler!(sign)),
    Endpoint::post("/v1/keys/{name}:verify", "verify", handler!(verify)),
    Endpoint::post("/v1/keys/{name}:encrypt", "encrypt", handler!(encrypt)),
    Endpoint::post("/v1/keys/{name}:decrypt", "decrypt", handler!(decrypt)),
    Endpoint::get("/v1/wrapping-key", "wrapping_key", handler!(wrapping_key)),
    Endpoint::get("/v1/approvals", "list_approvals", handler!(list_approvals)),
    Endpoint::post_change("/v1/approvals/{id}:approve", "approve", handler!(approve)),
    Endpoint::post_change("/v1/approvals/{id}:cancel", "cancel_approval", handler!(cancel_approval)),
    Endpoint::get("/v1/audit", "audit_read", handler!(audit)),
    Endpoint::get("/v1/status-list", "status_list", handler!(status_list)),
];

const STATUS_LIST_FORMAT: &str = "COSE_Sign1 (RFC 9052), ES256; payload CBOR {iss, prefix, seq, iat, exp, entries[{kid, v, state, since, reason?}]}";
const WRAPPING_ALGORITHM: &str = "RSA-OAEP (SHA-1, MGF1-SHA1) for a one-time AES-256 KEK; the key material wrapped under the KEK with AES-KWP (RFC 5649)";

async fn create_key(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::CreateKey = json::parse(r.body)?;
    note.key = Some(req.name.clone());
    let settings = LifecycleInput {
        rotation_period: req.rotation_period,
        verify_grace: req.verify_grace,
        max_operations: req.max_operations,
        exportable: req.exportable,
    };
    let key = r
        .svc
        .lifecycle
        .create_key_from(
            r.caller,
            &req.name,
            &req.key_type,
            &settings,
            req.derive_from.as_deref(),
        )
        .await?;
    ok(
        StatusCode::CREATED,
        &KeyView::of(&key),
        key.active().map(|v| v.version),
    )
}

async fn get_key(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let key = r.svc.keys.get_key(r.caller, r.name)?;
    ok(StatusCode::OK, &KeyView::of(&key), None)
}

async fn list_keys(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let q = list_query(r.query)?;
    let names = |s: &str| {
        KeyPrefix::parse(s).map_err(|_| {
            ServiceError::invalid(
                "prefix and page_token may contain only a-z, 0-9, '.', '_', '-' and '/'",
            )
        })
    };
    let prefix = names(&q.prefix)?;
    let page_token = q.page_token.as_deref().map(names).transpose()?;
    let (keys, next) = r.svc.keys.list_keys(
        r.caller,
        &prefix,
        page_token.as_ref(),
        q.page_size.unwrap_or(LIST_PAGE),
    )?;
    let body = views::KeyList {
        keys: keys.iter().map(|k| KeyView::of(k)).collect(),
        next_page_token: next,
    };
    ok(StatusCode::OK, &body, None)
}

async fn update_key(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::UpdateKey = json::parse(r.body)?;
    let settings = LifecycleInput {
        rotation_period: req.rotation_period,
        verify_grace: req.verify_grace,
        max_operations: req.max_operations,
        exportable: None,
    };
    let key = r
        .svc
        .lifecycle
        .update_lifecycle(r.caller, r.name, &settings)
        .await?;
    ok(StatusCode::OK, &KeyView::of(&key), None)
}

async fn rotate(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Rotate = if r.body.is_empty() {
        json::Rotate::default()
    } else {
        json::parse(r.body)?
    };
    note.detail = req.reason.clone().unwrap_or_default();
    let key = r
        .svc
        .lifecycle
        .rotate(r.caller, r.name, req.reason.as_deref())
        .await?;
    ok(
        StatusCode::OK,
        &KeyView::of(&key),
        key.active().map(|v| v.version),
    )
}

async fn revoke(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Revoke = json::parse(r.body)?;
    note.detail = req.reason.clone();
    let key = r
        .svc
        .lifecycle
        .revoke(r.caller, r.name, req.version, &req.reason)
        .await?;
    ok(StatusCode::OK, &KeyView::of(&key), req.version)
}

async fn revoke_prefix(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    prefix_action(r, note, true).await
}

async fn rotate_prefix(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    prefix_action(r, note, false).await
}

async fn prefix_action(r: Req<'_>, note: &mut Note, revoke: bool) -> Result<Outcome, ServiceError> {
    let req: json::PrefixAction = json::parse(r.body)?;
    note.key = Some(req.prefix.clone());
    note.detail = req.reason.clone().unwrap_or_default();
    let prefix = KeyPrefix::parse_whole_segments(&req.prefix)?;
    let out = if revoke {
        r.svc
            .lifecycle
            .revoke_prefix(r.caller, &prefix, req.reason.as_deref().unwrap_or(""))
            .await?
    } else {
        r.svc
            .lifecycle
            .rotate_prefix(r.caller, &prefix, req.reason.as_deref())
            .await?
    };
    note.detail = format!(
        "{} keys, {} versions; {}",
        out.keys.len(),
        out.versions,
        note.detail
    );
    let body = views::PrefixDone {
        keys: &out.keys,
        prefix: &req.prefix,
        versions: out.versions,
    };
    ok(StatusCode::OK, &body, None)
}

fn pending(a: &crate::registry::approvals::ApprovalRecord) -> views::Pending {
    views::Pending {
        approval: ApprovalView::of(a),
    }
}

async fn destroy(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Destroy = json::parse(r.body)?;
    let a = r
        .svc
        .approvals
        .request_destroy(r.caller, r.name, req.version)
        .await?;
    note.detail = format!("approval {} requested", a.id);
    ok(StatusCode::ACCEPTED, &pending(&a), Some(req.version))
}

async fn export(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Export = json::parse(r.body)?;
    note.detail = format!("under {}", req.transport_key);
    let a = r
        .svc
        .approvals
        .request_export(r.caller, r.name, req.version, &req.transport_key)
        .await?;
    note.detail = format!("approval {} requested: under {}", a.id, req.transport_key);
    ok(StatusCode::ACCEPTED, &pending(&a), Some(req.version))
}

async fn import(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Import = json::parse(r.body)?;
    note.key = Some(req.name.clone());
    let import = ImportRequest {
        name: req.name,
        key_type: req.key_type,
        encrypted_kek: json::b64("encrypted_kek", &req.encrypted_kek)?,
        wrapped_key: json::b64("wrapped_key", &req.wrapped_key)?,
        kcv: req.kcv,
        settings: LifecycleInput {
            rotation_period: req.rotation_period,
            verify_grace: req.verify_grace,
            max_operations: req.max_operations,
            exportable: req.exportable,
        },
    };
    let a = r.svc.approvals.request_import(r.caller, import).await?;
    note.detail = format!("approval {} requested", a.id);
    ok(StatusCode::ACCEPTED, &pending(&a), None)
}

async fn status_list(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let q = list_query(r.query)?;
    note.key = Some(q.prefix.clone());
    let prefix = KeyPrefix::parse(&q.prefix)?;
    let s = r.svc.status.status_list(r.caller, &prefix).await?;
    note.detail = format!("seq {}, {} entries", s.sequence, s.entries);
    let body = views::StatusListView {
        cose_sign1: json::encode(&s.cose),
        expires_at: json::rfc3339(s.expires_at),
        format: STATUS_LIST_FORMAT,
        issued_at: json::rfc3339(s.issued_at),
        kid: &s.kid,
        public_key_pem: crate::encoding::pem("PUBLIC KEY", &s.public_key_der),
        seq: s.sequence,
    };
    ok(StatusCode::OK, &body, None)
}

async fn wrapping_key(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let body = views::WrappingKey {
        algorithm: WRAPPING_ALGORITHM,
        public_key_pem: r.svc.approvals.import_wrapping_key().await?,
    };
    ok(StatusCode::OK, &body, None)
}

async fn list_approvals(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let approvals = r.svc.approvals.pending_approvals(r.caller).await?;
    let body = views::ApprovalList {
        approvals: approvals.iter().map(ApprovalView::of).collect(),
    };
    ok(StatusCode::OK, &body, None)
}

async fn approve(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    // Audited under the key it concerns, refused or not.
    note.key = r.svc.approvals.approval_key(r.name).await;
    note.detail = format!("approval {}", r.name);
    let (a, done) = r.svc.approvals.approve(r.caller, r.name).await?;
    note.key = Some(a.key.clone());
    note.detail = format!(
        "approval {}: {} by {} executed",
        a.id, a.action, a.requested_by
    );
    let mut body = views::Approved {
        approval: ApprovalView::of(&a),
        export: None,
        key: None,
    };
    match done {
        Executed::Key(key) => body.key = Some(KeyView::of(&key)),
        Executed::Export(x) => {
            body.export = Some(views::ExportView {
                algorithm: "AES-KWP (RFC 5649)",
                kcv: x.kcv,
                key: x.key,
                transport_kcv: x.transport_kcv,
                transport_key: x.transport_key,
                transport_version: x.transport_version,
                version: x.version,
                wrapped_key: json::encode(&x.wrapped_key),
            })
        }
    }
    ok(StatusCode::OK, &body, a.version)
}

async fn cancel_approval(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    note.key = r.svc.approvals.approval_key(r.name).await;
    note.detail = format!("approval {}", r.name);
    let a = r.svc.approvals.cancel_approval(r.caller, r.name).await?;
    note.key = Some(a.key.clone());
    note.detail = format!("approval {} cancelled", a.id);
    ok(StatusCode::OK, &pending(&a), None)
}

async fn audit(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let q = audit_query(r.query)?;
    let (entries, next) = r.svc.audit_trail.audit_entries(r.caller, &q).await?;
    let body = views::AuditPage {
        entries: entries.iter().map(|e| e.to_json()).collect(),
        next_since: next,
    };
    ok(StatusCode::OK, &body, None)
}

async fn sign(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Sign = json::parse(r.body)?;
    if let Some(items) = req.batch {
        return batch::sign(
            r.svc,
            r.caller,
            r.name,
            req.message.is_some(),
            items,
            req.signature_format.as_deref(),
            note,
        )
        .await;
    }
    let message = json::b64("message", &json::required("message", req.message)?)?;
    let format = json::signature_format(req.signature_format.as_deref())?;
    let s = r.svc.keys.sign(r.caller, r.name, message, format).await?;
    let body = views::Signed {
        key_version: s.version,
        signature: json::encode(&s.signature),
    };
    ok(StatusCode::OK, &body, Some(s.version))
}

async fn verify(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Verify = json::parse(r.body)?;
    if let Some(items) = req.batch {
        let single = req.message.is_some() || req.signature.is_some() || req.key_version.is_some();
        return batch::verify(
            r.svc,
            r.caller,
            r.name,
            single,
            items,
            req.signature_format.as_deref(),
            note,
        )
        .await;
    }
    let message = json::b64("message", &json::required("message", req.message)?)?;
    let signature = json::b64("signature", &json::required("signature", req.signature)?)?;
    let format = json::signature_format(req.signature_format.as_deref())?;
    let v = r
        .svc
        .keys
        .verify(
            r.caller,
            r.name,
            message,
            signature,
            req.key_version,
            format,
        )
        .await?;
    let body = views::Verified {
        key_version: v.version,
        valid: v.valid,
    };
    ok(StatusCode::OK, &body, Some(v.version))
}

async fn encrypt(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Encrypt = json::parse(r.body)?;
    let plaintext = zeroize::Zeroizing::new(json::b64("plaintext", &req.plaintext)?);
    let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
    let (ct, version) = r
        .svc
        .keys
        .encrypt(r.caller, r.name, &plaintext, &aad)
        .await?;
    let body = views::Encrypted {
        ciphertext: json::encode(&ct),
        key_version: version,
    };
    ok(StatusCode::OK, &body, Some(version))
}

async fn decrypt(r: Req<'_>, _: &mut Note) -> Result<Outcome, ServiceError> {
    let req: json::Decrypt = json::parse(r.body)?;
    let ciphertext = json::b64("ciphertext", &req.ciphertext)?;
    let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
    let (pt, version) = r
        .svc
        .keys
        .decrypt(r.caller, r.name, &ciphertext, &aad)
        .await?;
    let pt = zeroize::Zeroizing::new(pt);
    let body = views::Decrypted {
        key_version: version,
        plaintext: json::encode(&pt),
    };
    ok(StatusCode::OK, &body, Some(version))
}
