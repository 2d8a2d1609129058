//! One function per endpoint: decode the body, call the service, encode the answer.

use hyper::StatusCode;
use serde::Serialize;

use super::json::{self, ApprovalView, KeyView};
use super::routes::Route;
use super::AppState;
use crate::error::ServiceError;
use crate::service::{Caller, Executed, ImportRequest, LifecycleInput, LIST_PAGE};

/// A successful answer, plus the key version it used for the operations log.
pub struct Outcome {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub version: Option<u32>,
    pub content_type: &'static str,
}

/// What the audit entry and the log record about a request beyond its path, filled in by the
/// handler as soon as it is known, so refused requests carry it too.
#[derive(Default)]
pub struct Note {
    /// The key (or prefix) when it comes from the body rather than the path.
    pub key: Option<String>,
    /// Reasons and summaries; never message contents.
    pub detail: String,
}

fn ok<T: Serialize>(
    status: StatusCode,
    value: &T,
    version: Option<u32>,
) -> Result<Outcome, ServiceError> {
    let body = serde_json::to_vec(value).map_err(|e| ServiceError::Internal {
        detail: format!("serializing response: {e}"),
    })?;
    Ok(Outcome {
        status,
        body,
        version,
        content_type: "application/json",
    })
}

/// An issued token as JSON (with its size and QR version), or with `?format=svg` the QR image.
/// `format=json` (default) or `format=svg`; checked before anything is issued or recorded.
fn wants_svg(query: &str) -> Result<bool, ServiceError> {
    match query {
        "" | "format=json" => Ok(false),
        "format=svg" => Ok(true),
        other => Err(ServiceError::invalid(format!(
            "unknown query '{other}'; use format=json or format=svg"
        ))),
    }
}

fn issued(
    query: &str,
    t: crate::tokens::pos::Issued,
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    note.detail = format!("{} {} purchase {}", t.claims.kind, t.kid, t.claims.purchase);
    if wants_svg(query)? {
        return Ok(Outcome {
            status: StatusCode::OK,
            body: crate::tokens::qr::svg(&t.text)?.into_bytes(),
            version: None,
            content_type: "image/svg+xml",
        });
    }
    ok(
        StatusCode::OK,
        &serde_json::json!({
            "token": t.text,
            "type": t.claims.kind,
            "kid": t.kid,
            "key": t.key,
            "chars": t.text.len(),
            "qr_version": crate::tokens::qr::version(&t.text)?,
            "qr_error_correction": "M",
            "issued_at": json::rfc3339(t.claims.issued_at),
            "expires_at": json::rfc3339(t.claims.expires_at),
            "repeated": t.repeated,
        }),
        None,
    )
}

fn checked(c: &crate::tokens::pos::Checked, note: &mut Note) -> Result<Outcome, ServiceError> {
    let cl = &c.claims;
    note.key = Some(c.key.clone());
    note.detail = format!(
        "{} purchase {}: {}",
        cl.kind,
        cl.purchase,
        c.reason.as_deref().unwrap_or("valid")
    );
    let mut v = serde_json::json!({
        "valid": c.valid,
        "type": cl.kind,
        "store_id": cl.store,
        "pos_id": cl.pos,
        "purchase_id": cl.purchase,
        "amount": cl.amount,
        "currency": cl.currency,
        "issued_at": json::rfc3339(cl.issued_at),
        "expires_at": json::rfc3339(cl.expires_at),
        "kid": c.kid,
        "key": c.key,
    });
    if let Some(r) = &c.reason {
        v["reason"] = r.clone().into();
    }
    if let Some(d) = &cl.description {
        v["description"] = d.clone().into();
    }
    if let Some(p) = &cl.payment_ref {
        v["payment_ref"] = p.clone().into();
    }
    ok(StatusCode::OK, &v, None)
}

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
        Route::PosRequestIssue => {
            wants_svg(query)?;
            let req: json::PosRequestIssue = json::parse(body)?;
            note.key = Some(format!(
                "stores/{}/pos/{}/qr-request",
                req.store_id, req.pos_id
            ));
            let t = svc
                .issue_pos_request(
                    caller,
                    crate::tokens::pos::PosRequest {
                        store: req.store_id,
                        pos: req.pos_id,
                        purchase: req.purchase_id,
                        amount: req.amount,
                        currency: req.currency,
                        description: req.description,
                        ttl: req.ttl,
                    },
                )
                .await?;
            issued(query, t, note)
        }
        Route::PosPaidIssue => {
            wants_svg(query)?;
            let req: json::PosPaidIssue = json::parse(body)?;
            let t = svc
                .issue_pos_paid(caller, &req.request_token, &req.payment_ref)
                .await?;
            note.key = Some(t.key.clone());
            issued(query, t, note)
        }
        Route::PosRequestVerify => {
            let req: json::TokenVerify = json::parse(body)?;
            let c = svc.check_token(caller, &req.token, "pos-request")?;
            checked(&c, note)
        }
        Route::PosPaidVerify => {
            let req: json::TokenVerify = json::parse(body)?;
            let c = svc.verify_pos_paid(caller, &req.token).await?;
            checked(&c, note)
        }
        Route::OtpIssue => {
            let req: json::OtpIssue = json::parse(body)?;
            note.key = Some(req.key.clone());
            let (token, expires_at) = svc
                .issue_customer_otp(caller, &req.key, &req.subject, req.ttl)
                .await?;
            note.detail = format!("for {}", req.subject);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "token": token, "expires_at": json::rfc3339(expires_at) }),
                None,
            )
        }
        Route::OtpRedeem => {
            let req: json::KeyedToken = json::parse(body)?;
            note.key = Some(req.key.clone());
            let body = match svc
                .redeem_customer_otp(caller, &req.key, &req.token)
                .await?
            {
                Some(subject) => {
                    note.detail = format!("redeemed for {subject}");
                    serde_json::json!({ "redeemed": true, "subject": subject })
                }
                None => {
                    note.detail = "refused".into();
                    serde_json::json!({ "redeemed": false, "reason": "invalid" })
                }
            };
            ok(StatusCode::OK, &body, None)
        }
        Route::DeviceRegister => {
            let req: json::DeviceRegister = json::parse(body)?;
            note.key = Some(req.realm.clone());
            let d = svc
                .register_device(caller, &req.realm, &req.subject, &req.public_key_pem)
                .await?;
            note.detail = format!("device {} ({}) for {}", d.id, d.alg, d.subject);
            ok(
                StatusCode::CREATED,
                &serde_json::json!({ "device_id": d.id, "realm": d.realm, "subject": d.subject, "alg": d.alg, "state": d.state }),
                None,
            )
        }
        Route::DeviceRevoke => {
            let d = svc.revoke_device(caller, name).await?;
            note.key = Some(d.realm.clone());
            note.detail = format!("device {} revoked", d.id);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "device_id": d.id, "state": d.state }),
                None,
            )
        }
        Route::DeviceTokenVerify => {
            let req: json::DeviceTokenVerify = json::parse(body)?;
            note.key = Some(req.realm.clone());
            let c = svc
                .verify_customer_signed(caller, &req.realm, &req.token)
                .await?;
            note.detail = format!(
                "device {}: {}",
                c.device,
                c.reason.as_deref().unwrap_or("valid")
            );
            let mut v = serde_json::json!({ "valid": c.valid, "subject": c.subject, "device_id": c.device });
            if let Some(r) = c.reason {
                v["reason"] = r.into();
            }
            ok(StatusCode::OK, &v, None)
        }
        Route::ChallengeIssue => {
            let req: json::ChallengeIssue = json::parse(body)?;
            note.key = Some(req.key.clone());
            let c = svc
                .issue_challenge(caller, &req.key, &req.subject, req.ttl)
                .await?;
            note.detail = format!("challenge {} for {}", c.id, req.subject);
            ok(
                StatusCode::CREATED,
                &serde_json::json!({ "id": c.id, "challenge": json::encode(&c.challenge), "expires_at": json::rfc3339(c.expires_at) }),
                None,
            )
        }
        Route::ChallengeVerify => {
            let req: json::ChallengeVerify = json::parse(body)?;
            let response = json::b64("response", &req.response)?;
            let (valid, reason, subject) = svc.verify_challenge(caller, name, &response).await?;
            note.detail = format!(
                "challenge {name} for {subject}: {}",
                reason.unwrap_or("valid")
            );
            let mut v = serde_json::json!({ "valid": valid, "subject": subject });
            if let Some(r) = reason {
                v["reason"] = r.into();
            }
            ok(StatusCode::OK, &v, None)
        }
        Route::Seal => {
            let req: json::Seal = json::parse(body)?;
            let pt = zeroize::Zeroizing::new(json::b64("plaintext", &req.plaintext)?);
            let aad = optional_b64("associated_data", req.associated_data.as_deref())?;
            let (ct, counter, v) = svc.seal(caller, name, &req.sender, &pt, &aad).await?;
            note.detail = format!("{} #{counter}", req.sender);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "ciphertext": json::encode(&ct), "counter": counter, "key_version": v }),
                Some(v),
            )
        }
        Route::Open => {
            let req: json::Open = json::parse(body)?;
            let ct = json::b64("ciphertext", &req.ciphertext)?;
            let aad = optional_b64("associated_data", req.associated_data.as_deref())?;
            note.detail = format!("{} #{}", req.sender, req.counter);
            let (pt, v) = svc
                .open(caller, name, &req.sender, req.counter, &ct, &aad)
                .await?;
            let pt = zeroize::Zeroizing::new(pt);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "plaintext": json::encode(&pt), "counter": req.counter, "key_version": v }),
                Some(v),
            )
        }
        Route::GiftIssue => {
            let req: json::GiftIssue = json::parse(body)?;
            note.key = Some(req.key.clone());
            let c = svc.issue_giftcode(caller, &req.key, req.pin).await?;
            note.detail = format!("gift code {}", c.id);
            ok(
                StatusCode::CREATED,
                &serde_json::json!({ "id": c.id, "code": c.code, "pin": c.pin }),
                None,
            )
        }
        Route::GiftCheck => {
            let req: json::GiftCheck = json::parse(body)?;
            note.key = Some(req.key.clone());
            let body = match svc
                .check_giftcode(caller, &req.key, &req.code, req.pin.as_deref())
                .await?
            {
                Some(id) => {
                    note.detail = format!("gift code {id} valid");
                    serde_json::json!({ "valid": true, "id": id, "status": "active" })
                }
                None => {
                    note.detail = "refused".into();
                    serde_json::json!({ "valid": false, "reason": "invalid" })
                }
            };
            ok(StatusCode::OK, &body, None)
        }
        Route::GiftReissue => {
            let c = svc.reissue_giftcode(caller, name).await?;
            note.detail = format!("gift code {name} superseded by {}", c.id);
            ok(
                StatusCode::OK,
                &serde_json::json!({ "id": c.id, "code": c.code, "pin": c.pin, "supersedes": name }),
                None,
            )
        }
        Route::GiftRevoke | Route::GiftUnlock => {
            let action = if route == Route::GiftRevoke {
                "revoke"
            } else {
                "unlock"
            };
            let state = svc.set_giftcode_state(caller, name, action).await?;
            note.detail = format!("gift code {name}: {action}");
            ok(
                StatusCode::OK,
                &serde_json::json!({ "id": name, "status": state }),
                None,
            )
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
            let s = svc.sign(caller, name, &message, format).await?;
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
            let v = svc.verify(caller, name, &message, &signature, req.key_version, format)?;
            ok(
                StatusCode::OK,
                &serde_json::json!({ "valid": v.valid, "key_version": v.version }),
                Some(v.version),
            )
        }
        Route::Encrypt => {
            let req: json::Encrypt = json::parse(body)?;
            let plaintext = zeroize::Zeroizing::new(json::b64("plaintext", &req.plaintext)?);
            let aad = optional_b64("associated_data", req.associated_data.as_deref())?;
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
            let aad = optional_b64("associated_data", req.associated_data.as_deref())?;
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

fn optional_b64(field: &str, v: Option<&str>) -> Result<Vec<u8>, ServiceError> {
    v.map_or(Ok(Vec::new()), |v| json::b64(field, v))
}

#[derive(Default)]
struct ListQuery {
    prefix: String,
    page_token: Option<String>,
    page_size: Option<usize>,
}

/// `prefix`, `page_token` and `page_size` are the only query parameters. Their values are key-name
/// characters, so no percent-decoding is done: a `%` is refused by the service's check.
fn list_query(query: &str) -> Result<ListQuery, ServiceError> {
    let mut q = ListQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", v)) => q.prefix = v.to_owned(),
            Some(("page_token", v)) => q.page_token = Some(v.to_owned()),
            Some(("page_size", v)) => {
                q.page_size = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=LIST_PAGE).contains(n))
                        .ok_or_else(|| {
                            ServiceError::invalid(format!("page_size must be 1..={LIST_PAGE}"))
                        })?,
                )
            }
            _ => {
                return Err(ServiceError::invalid(format!(
                    "unknown query parameter '{}'; accepted: prefix, page_token, page_size",
                    pair.split('=').next().unwrap_or("")
                )))
            }
        }
    }
    Ok(q)
}

/// `since` (sequence number), `key`, `identity`, `limit` (1..=1000, default 100).
fn audit_query(query: &str) -> Result<crate::audit::Query, ServiceError> {
    let mut q = crate::audit::Query {
        limit: 100,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ServiceError::invalid(format!("query parameter '{pair}' has no value"))
        })?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| ServiceError::invalid(format!("{k} must be a number")))
        };
        match k {
            "since" => q.since = number(v)?,
            "limit" => {
                q.limit = usize::try_from(number(v)?).unwrap_or(0);
                if !(1..=1000).contains(&q.limit) {
                    return Err(ServiceError::invalid("limit must be 1..=1000"));
                }
            }
            "key" => q.key = Some(v.to_owned()),
            "identity" => q.identity = Some(v.to_owned()),
            _ => {
                return Err(ServiceError::invalid(format!(
                    "unknown query parameter '{k}'; accepted: since, key, identity, limit"
                )))
            }
        }
    }
    Ok(q)
}
