//! The retail token endpoints: POS payment QR codes, customer one-time and device tokens,
//! challenge-response, counter-sealed messages and gift codes. Same contract as
//! [`super::handlers`]: decode the body, call the service, encode the answer.

use hyper::StatusCode;

use super::endpoint::{ok, Note, Outcome};
use super::json;
use super::routes::Route;
use crate::error::ServiceError;
use crate::service::{Caller, Service};

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

/// An issued token as JSON (with its size and QR version), or with `?format=svg` the QR image.
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
    svc: &Service,
    caller: &Caller,
    route: Route,
    name: &str,
    query: &str,
    body: &[u8],
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    match route {
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
            let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
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
            let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
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
        other => Err(ServiceError::Internal {
            detail: format!("{other:?} is not a retail route"),
        }),
    }
}
