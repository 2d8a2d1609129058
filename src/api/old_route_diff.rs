#![allow(dead_code)]
use crate::error::ServiceError;
use hyper::Method;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    CreateKey,
    BatchCreate,
    ListKeys,
    GetKey,
    UpdateKey,
    Rotate,
    Revoke,
    RevokePrefix,
    RotatePrefix,
    Audit,
    Destroy,
    ListApprovals,
    Approve,
    CancelApproval,
    Export,
    Import,
    WrappingKey,
    StatusList,
    PosRequestIssue,
    PosRequestVerify,
    PosPaidIssue,
    PosPaidVerify,
    OtpIssue,
    OtpRedeem,
    DeviceRegister,
    DeviceRevoke,
    DeviceTokenVerify,
    ChallengeIssue,
    ChallengeVerify,
    Seal,
    Open,
    GiftIssue,
    GiftCheck,
    GiftReissue,
    GiftRevoke,
    GiftUnlock,
    Sign,
    Verify,
    Encrypt,
    Decrypt,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::CreateKey => "create",
            Route::BatchCreate => "batch_create",
            Route::ListKeys => "list",
            Route::GetKey => "get",
            Route::UpdateKey => "update",
            Route::Rotate => "rotate",
            Route::Revoke => "revoke",
            Route::RevokePrefix => "revoke_prefix",
            Route::RotatePrefix => "rotate_prefix",
            Route::Audit => "audit_read",
            Route::Destroy => "destroy",
            Route::ListApprovals => "list_approvals",
            Route::Approve => "approve",
            Route::CancelApproval => "cancel_approval",
            Route::Export => "export",
            Route::Import => "import",
            Route::WrappingKey => "wrapping_key",
            Route::StatusList => "status_list",
            Route::PosRequestIssue => "pos_request_issue",
            Route::PosRequestVerify => "pos_request_verify",
            Route::PosPaidIssue => "pos_paid_issue",
            Route::PosPaidVerify => "pos_paid_verify",
            Route::OtpIssue => "customer_otp_issue",
            Route::OtpRedeem => "customer_otp_redeem",
            Route::DeviceRegister => "device_register",
            Route::DeviceRevoke => "device_revoke",
            Route::DeviceTokenVerify => "customer_signed_verify",
            Route::ChallengeIssue => "challenge_issue",
            Route::ChallengeVerify => "challenge_verify",
            Route::Seal => "seal",
            Route::Open => "open",
            Route::GiftIssue => "giftcode_issue",
            Route::GiftCheck => "giftcode_check",
            Route::GiftReissue => "giftcode_reissue",
            Route::GiftRevoke => "giftcode_revoke",
            Route::GiftUnlock => "giftcode_unlock",
            Route::Sign => "sign",
            Route::Verify => "verify",
            Route::Encrypt => "encrypt",
            Route::Decrypt => "decrypt",
        }
    }

    fn has_body(self) -> bool {
        !matches!(
            self,
            Route::ListKeys
                | Route::GetKey
                | Route::Audit
                | Route::ListApprovals
                | Route::WrappingKey
                | Route::StatusList
        )
    }
}

/// Match method and path; the second value is the key name from the path, if any.
pub fn route<'p>(method: &Method, path: &'p str) -> Result<(Route, Option<&'p str>), ServiceError> {
    let unknown = || ServiceError::NotFound(format!("no such endpoint: {method} {path}"));
    if path == "/v1/keys" {
        return match *method {
            Method::GET => Ok((Route::ListKeys, None)),
            Method::POST => Ok((Route::CreateKey, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET, POST" }),
        };
    }
    if path == "/v1/audit" {
        return match *method {
            Method::GET => Ok((Route::Audit, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/tokens/") {
        let r = match rest {
            "pos-request:issue" => Route::PosRequestIssue,
            "pos-request:verify" => Route::PosRequestVerify,
            "pos-paid:issue" => Route::PosPaidIssue,
            "pos-paid:verify" => Route::PosPaidVerify,
            "customer-otp:issue" => Route::OtpIssue,
            "customer-otp:redeem" => Route::OtpRedeem,
            "customer-signed:verify" => Route::DeviceTokenVerify,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, None));
    }
    // Flat POST resources and POST custom methods on an id: /v1/{collection}[/{id}]:{method}.
    let simple = |r| {
        if *method == Method::POST {
            Ok(r)
        } else {
            Err(ServiceError::MethodNotAllowed { allow: "POST" })
        }
    };
    match path {
        "/v1/devices" => return simple((Route::DeviceRegister, None)),
        "/v1/challenges" => return simple((Route::ChallengeIssue, None)),
        "/v1/giftcodes:issue" => return simple((Route::GiftIssue, None)),
        "/v1/giftcodes:check" => return simple((Route::GiftCheck, None)),
        _ => {}
    }
    for (collection, methods) in [
        ("/v1/devices/", &[("revoke", Route::DeviceRevoke)][..]),
        ("/v1/challenges/", &[("verify", Route::ChallengeVerify)][..]),
        (
            "/v1/giftcodes/",
            &[
                ("reissue", Route::GiftReissue),
                ("revoke", Route::GiftRevoke),
                ("unlock", Route::GiftUnlock),
            ][..],
        ),
    ] {
        if let Some(rest) = path.strip_prefix(collection) {
            let (id, custom) = rest.rsplit_once(':').ok_or_else(unknown)?;
            let r = methods
                .iter()
                .find(|(m, _)| *m == custom)
                .map(|(_, r)| *r)
                .ok_or_else(unknown)?;
            return simple((r, Some(id)));
        }
    }
    if path == "/v1/status-list" {
        return match *method {
            Method::GET => Ok((Route::StatusList, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if path == "/v1/wrapping-key" {
        return match *method {
            Method::GET => Ok((Route::WrappingKey, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if path == "/v1/approvals" {
        return match *method {
            Method::GET => Ok((Route::ListApprovals, None)),
            _ => Err(ServiceError::MethodNotAllowed { allow: "GET" }),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/approvals/") {
        let (id, custom) = rest.rsplit_once(':').ok_or_else(unknown)?;
        let r = match custom {
            "approve" => Route::Approve,
            "cancel" => Route::CancelApproval,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, Some(id)));
    }
    if let Some(custom) = path.strip_prefix("/v1/keys:") {
        let r = match custom {
            "revokePrefix" => Route::RevokePrefix,
            "rotatePrefix" => Route::RotatePrefix,
            "import" => Route::Import,
            "batchCreate" => Route::BatchCreate,
            _ => return Err(unknown()),
        };
        if *method != Method::POST {
            return Err(ServiceError::MethodNotAllowed { allow: "POST" });
        }
        return Ok((r, None));
    }
    let rest = path.strip_prefix("/v1/keys/").ok_or_else(unknown)?;
    match rest.rsplit_once(':') {
        None => match *method {
            Method::GET => Ok((Route::GetKey, Some(rest))),
            Method::PATCH => Ok((Route::UpdateKey, Some(rest))),
            _ => Err(ServiceError::MethodNotAllowed {
                allow: "GET, PATCH",
            }),
        },
        Some((name, custom)) => {
            let r = match custom {
                "sign" => Route::Sign,
                "verify" => Route::Verify,
                "encrypt" => Route::Encrypt,
                "decrypt" => Route::Decrypt,
                "rotate" => Route::Rotate,
                "revoke" => Route::Revoke,
                "destroy" => Route::Destroy,
                "export" => Route::Export,
                "seal" => Route::Seal,
                "open" => Route::Open,
                _ => return Err(unknown()),
            };
            if *method != Method::POST {
                return Err(ServiceError::MethodNotAllowed { allow: "POST" });
            }
            Ok((r, Some(name)))
        }
    }
}

#[test]
fn differential_old_vs_new() {
    let names = ["", "a", "a/b", "stores/1/pos/2/qr-mac", "a:b", "x/"];
    let mut paths: Vec<String> = vec![
        "/",
        "/v1",
        "/v1/",
        "/v2/keys",
        "/v1/keys",
        "/v1/keys/",
        "/v1/keys:",
        "/v1/keys:x",
        "/v1/audit",
        "/v1/audit/",
        "/v1/tokens",
        "/v1/tokens/",
        "/v1/tokens/pos-paid",
        "/v1/devices",
        "/v1/devices/",
        "/v1/challenges",
        "/v1/challenges/",
        "/v1/giftcodes",
        "/v1/giftcodes/",
        "/v1/giftcodes:",
        "/v1/status-list",
        "/v1/wrapping-key",
        "/v1/approvals",
        "/v1/approvals/",
        "/v1/keysx",
        "/v1/auditx",
        "/v1/keys/:",
        "/v1/keys/a:",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let customs = [
        "",
        ":",
        ":sign",
        ":verify",
        ":encrypt",
        ":decrypt",
        ":rotate",
        ":revoke",
        ":destroy",
        ":export",
        ":seal",
        ":open",
        ":approve",
        ":cancel",
        ":reissue",
        ":unlock",
        ":explode",
        ":issue",
        ":check",
        ":import",
        ":revokePrefix",
        ":rotatePrefix",
        ":batchCreate",
        ":redeem",
    ];
    for base in [
        "/v1/keys/",
        "/v1/devices/",
        "/v1/challenges/",
        "/v1/giftcodes/",
        "/v1/approvals/",
        "/v1/tokens/",
        "/v1/audit/",
    ] {
        for n in names {
            for c in customs {
                paths.push(format!("{base}{n}{c}"));
            }
        }
    }
    for base in [
        "/v1/keys",
        "/v1/giftcodes",
        "/v1/devices",
        "/v1/challenges",
        "/v1/approvals",
        "/v1/audit",
    ] {
        for c in customs {
            paths.push(format!("{base}{c}"));
        }
    }
    for t in [
        "pos-request",
        "pos-paid",
        "customer-otp",
        "customer-signed",
        "x",
    ] {
        for c in customs {
            paths.push(format!("/v1/tokens/{t}{c}"));
        }
    }
    let methods = [
        Method::GET,
        Method::POST,
        Method::PATCH,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ];
    let mut n = 0;
    for p in &paths {
        for m in &methods {
            let old = route(m, p).map(|(r, k)| (r.label(), k.unwrap_or(""), r.has_body()));
            let new = super::routes::route_for_test(m, p).map(|(e, k)| (e.label, k, e.reads_body));
            let fmt = |r: &Result<(&str, &str, bool), ServiceError>| match r {
                Ok(v) => format!("ok {v:?}"),
                Err(ServiceError::MethodNotAllowed { allow }) => format!("405 {allow}"),
                Err(ServiceError::NotFound(s)) => format!("404 {s}"),
                Err(e) => format!("other {e:?}"),
            };
            assert_eq!(fmt(&old), fmt(&new), "{m} {p}");
            n += 1;
        }
    }
    eprintln!("compared {n} requests");
}
