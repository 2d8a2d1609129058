//! The retail endpoints: POS payment QR codes, customer one-time and device tokens,
//! challenge-response, counter-sealed messages and gift codes. This slice's own table, joined
//! with the key endpoints in `api`; its handlers reach only the retail flows.

use hyper::StatusCode;

use crate::api::endpoint::{handler, ok, Endpoint, Note, Outcome, Req};
use crate::api::json;

mod wire;
use crate::error::ServiceError;

#[rustfmt::skip]
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint::post("/v1/tokens/pos-request:issue", "pos_request_issue", handler!(pos_request_issue)),
    Endpoint::post("/v1/tokens/pos-request:verify", "pos_request_verify", handler!(pos_request_verify)),
    Endpoint::post_change("/v1/tokens/pos-paid:issue", "pos_paid_issue", handler!(pos_paid_issue)),
    Endpoint::post_change("/v1/tokens/pos-paid:verify", "pos_paid_verify", handler!(pos_paid_verify)),
    Endpoint::post_change("/v1/tokens/customer-otp:issue", "customer_otp_issue", handler!(otp_issue)),
    Endpoint::post_change("/v1/tokens/customer-otp:redeem", "customer_otp_redeem", handler!(otp_redeem)),
    Endpoint::post_change("/v1/devices", "device_register", handler!(device_register)),
    Endpoint::post_change("/v1/devices/{id}:revoke", "device_revoke", handler!(device_revoke)),
    Endpoint::post_change("/v1/tokens/customer-signed:verify", "customer_signed_verify", handler!(device_token_verify)),
    Endpoint::post_change("/v1/challenges", "challenge_issue", handler!(challenge_issue)),
    Endpoint::post_change("/v1/challenges/{id}:verify", "challenge_verify", handler!(challenge_verify)),
    Endpoint::post_change("/v1/keys/{name}:seal", "seal", handler!(seal)),
    Endpoint::post_change("/v1/keys/{name}:open", "open", handler!(open)),
    Endpoint::post_change("/v1/giftcodes:issue", "giftcode_issue", handler!(gift_issue)),
    Endpoint::post_change("/v1/giftcodes:check", "giftcode_check", handler!(gift_check)),
    Endpoint::post_change("/v1/giftcodes/{id}:reissue", "giftcode_reissue", handler!(gift_reissue)),
    Endpoint::post_change("/v1/giftcodes/{id}:revoke", "giftcode_revoke", handler!(gift_revoke)),
    Endpoint::post_change("/v1/giftcodes/{id}:unlock", "giftcode_unlock", handler!(gift_unlock)),
];

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
    t: crate::retail::pos::Issued,
    note: &mut Note,
) -> Result<Outcome, ServiceError> {
    note.detail = format!("{} {} purchase {}", t.claims.kind, t.kid, t.claims.purchase);
    if wants_svg(query)? {
        return Ok(Outcome {
            status: StatusCode::OK,
            body: crate::retail::qr::svg(&t.text)?.into_bytes(),
            version: None,
            content_type: "image/svg+xml".into(),
        });
    }
    let body = wire::TokenIssued {
        chars: t.text.len(),
        expires_at: json::rfc3339(t.claims.expires_at),
        issued_at: json::rfc3339(t.claims.issued_at),
        key: &t.key,
        kid: &t.kid,
        qr_error_correction: "M",
        qr_version: crate::retail::qr::version(&t.text)?,
        repeated: t.repeated,
        token: &t.text,
        kind: &t.claims.kind,
    };
    ok(StatusCode::OK, &body, None)
}

fn checked(c: &crate::retail::pos::Checked, note: &mut Note) -> Result<Outcome, ServiceError> {
    let cl = &c.claims;
    note.key = Some(c.key.clone());
    note.detail = format!(
        "{} purchase {}: {}",
        cl.kind,
        cl.purchase,
        c.reason.as_deref().unwrap_or("valid")
    );
    let body = wire::TokenChecked {
        amount: cl.amount,
        currency: &cl.currency,
        description: cl.description.as_deref(),
        expires_at: json::rfc3339(cl.expires_at),
        issued_at: json::rfc3339(cl.issued_at),
        key: &c.key,
        kid: &c.kid,
        payment_ref: cl.payment_ref.as_deref(),
        pos_id: &cl.pos,
        purchase_id: &cl.purchase,
        reason: c.reason.as_deref(),
        store_id: &cl.store,
        kind: &cl.kind,
        valid: c.valid,
    };
    ok(StatusCode::OK, &body, None)
}

async fn pos_request_issue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    wants_svg(r.query)?;
    let req: wire::PosRequestIssue = json::parse(r.body)?;
    note.key = Some(format!(
        "stores/{}/pos/{}/qr-request",
        req.store_id, req.pos_id
    ));
    let t = r
        .retail
        .pos
        .issue_pos_request(
            r.caller,
            crate::retail::pos::PosRequest {
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
    issued(r.query, t, note)
}

async fn pos_paid_issue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    wants_svg(r.query)?;
    let req: wire::PosPaidIssue = json::parse(r.body)?;
    let t = r
        .retail
        .pos
        .issue_pos_paid(r.caller, &req.request_token, &req.payment_ref)
        .await?;
    note.key = Some(t.key.clone());
    issued(r.query, t, note)
}

async fn pos_request_verify(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::TokenVerify = json::parse(r.body)?;
    let c = r
        .retail
        .pos
        .check_token(r.caller, &req.token, "pos-request")
        .await?;
    checked(&c, note)
}

async fn pos_paid_verify(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::TokenVerify = json::parse(r.body)?;
    let c = r.retail.pos.verify_pos_paid(r.caller, &req.token).await?;
    checked(&c, note)
}

async fn otp_issue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::OtpIssue = json::parse(r.body)?;
    note.key = Some(req.key.clone());
    let (token, expires_at) = r
        .retail
        .customers
        .issue_customer_otp(r.caller, &req.key, &req.subject, req.ttl)
        .await?;
    note.detail = format!("for {}", req.subject);
    let body = wire::OtpIssued {
        expires_at: json::rfc3339(expires_at),
        token,
    };
    ok(StatusCode::OK, &body, None)
}

async fn otp_redeem(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::KeyedToken = json::parse(r.body)?;
    note.key = Some(req.key.clone());
    let subject = r
        .retail
        .customers
        .redeem_customer_otp(r.caller, &req.key, &req.token)
        .await?;
    note.detail = match &subject {
        Some(subject) => format!("redeemed for {subject}"),
        None => "refused".into(),
    };
    let body = wire::OtpRedeemed {
        reason: subject.is_none().then_some("invalid"),
        redeemed: subject.is_some(),
        subject,
    };
    ok(StatusCode::OK, &body, None)
}

async fn device_register(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::DeviceRegister = json::parse(r.body)?;
    note.key = Some(req.realm.clone());
    let d = r
        .retail
        .customers
        .register_device(r.caller, &req.realm, &req.subject, &req.public_key_pem)
        .await?;
    note.detail = format!("device {} ({}) for {}", d.id, d.alg, d.subject);
    let body = wire::DeviceRegistered {
        alg: d.alg,
        device_id: d.id,
        realm: d.realm,
        state: d.state,
        subject: d.subject,
    };
    ok(StatusCode::CREATED, &body, None)
}

async fn device_revoke(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let d = r.retail.customers.revoke_device(r.caller, r.name).await?;
    note.key = Some(d.realm.clone());
    note.detail = format!("device {} revoked", d.id);
    let body = wire::DeviceRevoked {
        device_id: d.id,
        state: d.state,
    };
    ok(StatusCode::OK, &body, None)
}

async fn device_token_verify(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::DeviceTokenVerify = json::parse(r.body)?;
    note.key = Some(req.realm.clone());
    let c = r
        .retail
        .customers
        .verify_customer_signed(r.caller, &req.realm, &req.token)
        .await?;
    note.detail = format!(
        "device {}: {}",
        c.device,
        c.reason.as_deref().unwrap_or("valid")
    );
    let body = wire::DeviceTokenChecked {
        device_id: c.device,
        reason: c.reason,
        subject: c.subject,
        valid: c.valid,
    };
    ok(StatusCode::OK, &body, None)
}

async fn challenge_issue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::ChallengeIssue = json::parse(r.body)?;
    note.key = Some(req.key.clone());
    let c = r
        .retail
        .challenges
        .issue_challenge(r.caller, &req.key, &req.subject, req.ttl)
        .await?;
    note.detail = format!("challenge {} for {}", c.id, req.subject);
    let body = wire::ChallengeIssued {
        challenge: json::encode(&c.challenge),
        expires_at: json::rfc3339(c.expires_at),
        id: c.id,
    };
    ok(StatusCode::CREATED, &body, None)
}

async fn challenge_verify(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::ChallengeVerify = json::parse(r.body)?;
    let response = json::b64("response", &req.response)?;
    let (valid, reason, subject) = r
        .retail
        .challenges
        .verify_challenge(r.caller, r.name, &response)
        .await?;
    note.detail = format!(
        "challenge {} for {subject}: {}",
        r.name,
        reason.unwrap_or("valid")
    );
    let body = wire::ChallengeChecked {
        reason,
        subject,
        valid,
    };
    ok(StatusCode::OK, &body, None)
}

async fn seal(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::Seal = json::parse(r.body)?;
    let pt = zeroize::Zeroizing::new(json::b64("plaintext", &req.plaintext)?);
    let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
    let (ct, counter, v) = r
        .retail
        .challenges
        .seal(r.caller, r.name, &req.sender, &pt, &aad)
        .await?;
    note.detail = format!("{} #{counter}", req.sender);
    let body = wire::Sealed {
        ciphertext: json::encode(&ct),
        counter,
        key_version: v,
    };
    ok(StatusCode::OK, &body, Some(v))
}

async fn open(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::Open = json::parse(r.body)?;
    let ct = json::b64("ciphertext", &req.ciphertext)?;
    let aad = json::optional_b64("associated_data", req.associated_data.as_deref())?;
    note.detail = format!("{} #{}", req.sender, req.counter);
    let (pt, v) = r
        .retail
        .challenges
        .open(r.caller, r.name, &req.sender, req.counter, &ct, &aad)
        .await?;
    let pt = zeroize::Zeroizing::new(pt);
    let body = wire::Opened {
        counter: req.counter,
        key_version: v,
        plaintext: json::encode(&pt),
    };
    ok(StatusCode::OK, &body, Some(v))
}

async fn gift_issue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::GiftIssue = json::parse(r.body)?;
    note.key = Some(req.key.clone());
    let c = r
        .retail
        .giftcodes
        .issue_giftcode(r.caller, &req.key, req.pin)
        .await?;
    note.detail = format!("gift code {}", c.id);
    let body = wire::GiftIssued {
        code: c.code,
        id: c.id,
        pin: c.pin,
        supersedes: None,
    };
    ok(StatusCode::CREATED, &body, None)
}

async fn gift_check(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let req: wire::GiftCheck = json::parse(r.body)?;
    note.key = Some(req.key.clone());
    let id = r
        .retail
        .giftcodes
        .check_giftcode(r.caller, &req.key, &req.code, req.pin.as_deref())
        .await?;
    note.detail = match &id {
        Some(id) => format!("gift code {id} valid"),
        None => "refused".into(),
    };
    let body = wire::GiftChecked {
        reason: id.is_none().then_some("invalid"),
        status: id.is_some().then_some("active"),
        valid: id.is_some(),
        id,
    };
    ok(StatusCode::OK, &body, None)
}

async fn gift_reissue(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    let c = r
        .retail
        .giftcodes
        .reissue_giftcode(r.caller, r.name)
        .await?;
    note.detail = format!("gift code {} superseded by {}", r.name, c.id);
    let body = wire::GiftIssued {
        code: c.code,
        id: c.id,
        pin: c.pin,
        supersedes: Some(r.name),
    };
    ok(StatusCode::OK, &body, None)
}

async fn gift_revoke(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    set_gift_state(r, note, "revoke").await
}

async fn gift_unlock(r: Req<'_>, note: &mut Note) -> Result<Outcome, ServiceError> {
    set_gift_state(r, note, "unlock").await
}

async fn set_gift_state(
    r: Req<'_>,
    note: &mut Note,
    action: &str,
) -> Result<Outcome, ServiceError> {
    let state = r
        .retail
        .giftcodes
        .set_giftcode_state(r.caller, r.name, action)
        .await?;
    note.detail = format!("gift code {}: {action}", r.name);
    let body = wire::GiftState {
        id: r.name,
        status: state,
    };
    ok(StatusCode::OK, &body, None)
}
