//! Query strings of the read endpoints. Unknown parameters are refused rather than ignored, so
//! a misspelt filter cannot silently widen a listing.

use crate::error::ServiceError;
use crate::service::LIST_PAGE;

#[derive(Default)]
pub struct ListQuery {
    pub prefix: String,
    pub page_token: Option<String>,
    pub page_size: Option<usize>,
}

/// `prefix`, `page_token` and `page_size` are the only query parameters. Their values are key-name
/// characters, so no percent-decoding is done: a `%` is refused by the service's check.
pub fn list_query(query: &str) -> Result<ListQuery, ServiceError> {
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
pub fn audit_query(query: &str) -> Result<crate::audit::Query, ServiceError> {
    let mut q = crate::audit::Query {
        limit: 100,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ServiceError::invalid(format!("query parameter '{pair}' has no value"))
        })?;
        // Sequence numbers are stored as signed 64-bit integers: larger ones are refused.
        let number = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|n| i64::try_from(*n).is_ok())
                .ok_or_else(|| {
                    ServiceError::invalid(format!("{k} must be a number from 0 to {}", i64::MAX))
                })
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
