//! One function per endpoint: decode the body, call the service, encode the answer.

use hyper::StatusCode;

use super::endpoint::{ok, Note, Outcome};
use super::json::{self, ApprovalView, KeyView};
use super::query::{audit_query, list_query};
use super::routes::Route;
use super::AppState;
use crate::error::ServiceError;
use crate::service::{Caller, Executed, ImportRequest, LifecycleInput, LIST_PAGE};

pub async fn dispatch(
    state: &AppState,
    caller: &Caller,
    route: Route,
    name: &str,
    query: &str,
    body: &[u8],
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    let svc = &state.service;
    match route {
        Route::CreateKey => {
            let req: json::CreateKey = json::parse(body)?;
            note.key = Some(req.name.clone());
            let settings = LifecycleInput {
                rotation_period: req.rotation_period,
                verify_grace: req.verify_grace,
                max_operations: req.max_operations,
                exportable: req.exportable,
            };
            let key = svc
                .create_key_from(
                    caller,
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
        Route::BatchCreate => super::batch_create::create(svc, caller, body, note).await,
        Route::GetKey => {
            let key = svc.get_key(caller, name)?;
            ok(StatusCode::OK, &KeyView::of(&key), None)
        }
        Route::ListKeys => {
            let q = list_query(query)?;
            let (keys, next) = svc.list_keys(
                caller,
                &q.prefix,
                q.page_token.as_deref(),
                q.page_size.unwrap_or(LIST_PAGE),
            )?;
            let keys: Vec<KeyView> = keys.iter().map(|k| KeyView::of(k)).collect();
            let mut body = serde_json::json!({ "keys": keys });
            if let Some(next) = next {
                body["next_page_token"] = serde_json::Value::String(next);
            }
            ok(StatusCode::OK, &body, None)
        }
        Route::UpdateKey => {
            let req: json::UpdateKey = json::parse(body)?;
            let settings = LifecycleInput {
                rotation_period: req.rotation_period,
                verify_grace: req.verify_grace,
                max_operations: req.max_operations,
                exportable: None,
            };
            let key = svc.update_lifecycle(caller, name, &settings).await?;
            ok(StatusCode::OK, &KeyView::of(&key), None)
        }
        Route::Rotate => {
            let req: json::Rotate = if body.is_empty() {
                json::Rotate::default()
            } else {
                json::parse(body)?
            };
            note.detail = req.reason.clone().unwrap_or_default();
            let key = svc.rotate(caller, name, req.reason.as_deref()).await?;
            ok(
                StatusCode::OK,
                &KeyView::of(&key),
                key.active().map(|v| v.version),
            )
        }
        Route::Revoke => {
            let req: json::Revoke = json::parse(body)?;
            note.detail = req.reason.clone();
            let key = svc.revoke(caller, name, req.version, &req.reason).await?;
            ok(StatusCode::OK, &KeyView::of(&key), req.version)
        }
        Route::RevokePrefix | Route::RotatePrefix => {
            let req: json::PrefixAction = json::parse(body)?;
            note.key = Some(req.prefix.clone());
            note.detail = req.reason.clone().unwrap_or_default();
            let out = if route == Route::RevokePrefix {
                svc.revoke_prefix(caller, &req.prefix, req.reason.as_deref().unwrap_or(""))
                    .await?
            } else {
                svc.rotate_prefix(caller, &req.prefix, req.reason.as_deref())
                    .await?
            };
            note.detail = format!(
                "{} keys, {} versions; {}",
                out.keys.len(),
                out.versions,
                note.detail
            );
            ok(
                StatusCode::OK,
                &serde_json::json!({ "prefix": req.prefix, "keys": out.keys, "versions": out.versions }),
                None,
            )
        }
        Route::Destroy => {
            let req: json::Destroy = json::parse(body)?;
            let a = svc.request_destroy(caller, name, req.version).await?;
            note.detail = format!("approval {} requested", a.id);
            ok(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "approval": ApprovalView::of(&a) }),
                Some(req.version),
            )
        }
        Route::Export => {
            let req: json::Export = json::parse(body)?;
            note.detail = format!("under {}", req.transport_key);
            let a = svc
                .request_export(caller, name, req.version, &req.transport_key)
                .await?;
            note.detail = format!("approval {} requested: under {}", a.id, req.transport_key);
            ok(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "approval": ApprovalView::of(&a) }),
                Some(req.version),
            )
        }
        Route::Import => {
            let req: json::Import = json::parse(body)?;
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
            let a = svc.request_import(caller, import).await?;
            note.detail = format!("approval {} requested", a.id);
            ok(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "approval": ApprovalView::of(&a) }),
                None,
            )
        }
        Route::PosRequestIssue
        | Route::PosPaidIssue
        | Route::PosRequestVerify
        | Route::PosPaidVerify
        | Route::OtpIssue
        | Route::OtpRedeem
        | Route::DeviceRegister
        | Route::DeviceRevoke
        | Route::DeviceTokenVerify
        | Route::ChallengeIssue
        | Route::ChallengeVerify
        | Route::Seal
        | Route::Open
        | Route::GiftIssue
        | Route::GiftCheck
        | Route::GiftReissue
        | Route::GiftRevoke
        | Route::GiftUnlock => {
            super::retail::dispatch(svc, caller, route, name, query, body, note).await
        }
        Route::StatusList => {
            let q = list_query(query)?;
            note.key = Some(q.prefix.clone());
            let s = svc.status_list(caller, &q.prefix)?;
            note.detail = format!("seq {}, {} entries", s.sequence, s.entries);
            ok(
                StatusCode::OK,
                &serde_json::json!({
                    "cose_sign1": json::encode(&s.cose),
                    "format": "COSE_Sign1 (RFC 9052), ES256; payload CBOR {iss, prefix, seq, iat, exp, entries[{kid, v, state, since, reason?}]}",
                    "kid": s.kid,
                    "public_key_pem": crate::encoding::pem("PUBLIC KEY", &s.public_key_der),
                    "seq": s.sequence,
                    "issued_at": json::rfc3339(s.issued_at),
                    "expires_at": json::rfc3339(s.expires_at),
                }),
                None,
            )
        }
        Route::WrappingKey => {
            let pem = svc.import_wrapping_key()?;
            ok(
                StatusCode::OK,
                &serde_json::json!({
                    "public_key_pem": pem,
                    "algorithm": "RSA-OAEP (SHA-1, MGF1-SHA1) for a one-time AES-256 KEK; the key material wrapped under the KEK with AES-KWP (RFC 5649)",
                }),
                None,
            )
        }
        Route::ListApprovals => {
            let list: Vec<ApprovalView> = svc
                .pending_approvals(caller)
                .await?
                .iter()
                .map(ApprovalView::of)
                .collect();
            ok(
                StatusCode::OK,
                &serde_json::json!({ "approvals": list }),
                None,
            )
        }
        Route::Approve => {
            // Audited under the key it concerns, refused or not.
            note.key = svc.approval_key(name).await;
            note.detail = format!("approval {name}");
            let (a, done) = svc.approve(caller, name).await?;
            note.key = Some(a.key.clone());
            note.detail = format!(
                "approval {}: {} by {} executed",
                a.id, a.action, a.requested_by
            );
            let body = match done {
                Executed::Key(key) => {
                    serde_json::json!({ "approval": ApprovalView::of(&a), "key": KeyView::of(&key) })
                }
                Executed::Export(x) => serde_json::json!({
                    "approval": ApprovalView::of(&a),
                    "export": {
                        "key": x.key,
                        "version": x.version,
                        "algorithm": "AES-KWP (RFC 5649)",
                        "wrapped_key": json::encode(&x.wrapped_key),
                        "kcv": x.kcv,
                        "transport_key": x.transport_key,
                        "transport_version": x.transport_version,
                        "transport_kcv": x.transport_kcv,
                    }
                }),
            };
            ok(StatusCode::OK, &body, a.version)
        }
        Route::CancelApproval => {
            note.key = svc.approval_key(name).await;
            note.detail = format!("approval {name}");
            let a = svc.cancel_approval(caller, name).await?;
            note.key = Some(a.key.clone());
            note.detail = format!("approval {} cancelled", a.id);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "approval": ApprovalView::of(&a) }),
                None,
            )
        }
        Route::Audit => {
            let q = audit_query(query)?;
            let (entries, next) = svc.audit_entries(caller, &q).await?;
            let entries: Vec<serde_json::Value> = entries.iter().map(|e| e.to_json()).collect();
            let mut body = serde_json::json!({ "entries": entries });
            if let Some(n) = next {
                body["next_since"] = n.into();
            }
            ok(StatusCode::OK, &body, None)
        }
        Route::Sign => {
            let req: json::Sign = json::parse(body)?;
            if let Some(items) = req.batch {
                return super::batch::sign(
                    svc,
                    caller,
                    name,
                    req.message.is_some(),
                    items,
                    req.signature_format.as_deref(),
                    note,
                )
                .await;
            }
            let message = json::b64("message", &json::required("message", req.message)?)?;
            let format = json::signature_format(req.signature_format.as_deref())?;
            let s = svc.sign(caller, name, message, format).await?;
            ok(
                StatusCode::OK,
                &serde_json::json!({ "signature": json::encode(&s.signature), "key_version": s.version }),
                Some(s.version),
            )
        }
        Route::Verify => {
            let req: json::Verify = json::parse(body)?;
            if let Some(items) = req.batch {
                let single =
                    req.message.is_some() || req.signature.is_some() || req.key_version.is_some();
                return super::batch::verify(
                    svc,
                    caller,
                    name,
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
            let v = svc
                .verify(caller, name, message, signature, req.key_version, format)
                .await?;
            ok(
                StatusCode::OK,
                &serde_json::json!({ "valid": v.valid, "key_version": v.version }),
                Some(v.version),
            )
        }
        Route::Encrypt => {
            let req: json::Encrypt = json::parse(body)?;
            let plaintext = zeroize::Zeroizing::new(json::b64("plaintext", &req.plaintext)?);
            let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
            let (ct, version) = svc.encrypt(caller, name, &plaintext, &aad).await?;
            ok(
                StatusCode::OK,
                &serde_json::json!({ "ciphertext": json::encode(&ct), "key_version": version }),
                Some(version),
            )
        }
        Route::Decrypt => {
            let req: json::Decrypt = json::parse(body)?;
            let ciphertext = json::b64("ciphertext", &req.ciphertext)?;
            let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
            let (pt, version) = svc.decrypt(caller, name, &ciphertext, &aad)?;
            let pt = zeroize::Zeroizing::new(pt);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "plaintext": json::encode(&pt), "key_version": version }),
                Some(version),
            )
        }
    }
}
