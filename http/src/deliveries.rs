//! `/v1/webhook-deliveries`: the merchant's notifications, their delivery and every
//! attempt; and a redelivery on request. Deliveries are the notifier's bookkeeping, not
//! payment state: a redelivery only moves a notification's next attempt to now.
//!
//! The list is the projection's alone, not read-your-writes: the API accepts no
//! notification (the worker makes one per status change, the sink writes it), so it
//! trails its event by the projection's lag, and none is listed for a payment this
//! instance accepted until the projection has its `created` event.

use crate::cursor;
use crate::error::{ApiError, ErrorCode};
use crate::request::{json, merchant, parse_id, Result};
use crate::ApiState;
use serde::Deserialize;
use std::sync::Arc;
use warp::http::StatusCode;
use warp::reply::Response;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    #[serde(default)]
    payment_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

const STATUSES: [&str; 4] = ["pending", "delivered", "failed", "skipped"];

pub async fn list_deliveries(
    state: Arc<ApiState>,
    q: DeliveriesQuery,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::invalid("limit must be an integer from 1 to 100"))?,
    };
    let payment = match q.payment_id.as_deref() {
        None => None,
        Some(p) => Some(
            parse_id(p)
                .map_err(|_| ApiError::invalid("payment_id must look like pay_<32 hex digits>"))?
                .to_string(),
        ),
    };
    let status = match q.status.as_deref() {
        None => None,
        Some(s) if STATUSES.contains(&s) => Some(s.to_owned()),
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "status {s:?} is not one of {}",
                STATUSES.join(", ")
            )))
        }
    };
    // An empty cursor is no cursor (a client passing back a null `next_cursor`).
    let after = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .ok_or_else(|| ApiError::invalid("cursor is not one this API returned"))?,
        ),
    };
    let filter = sinks::query::DeliveriesFilter {
        payment_id: payment,
        status,
        limit,
        after,
    };
    let (data, next) = sinks::query::deliveries(&state.pool, merchant.as_str(), &filter)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let next = next.map(|(us, payment, seq)| cursor::encode(&format!("{us}:{payment}:{seq}")));
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "data": data, "next_cursor": next }),
    ))
}

/// A cursor this API returned: the creation time (µs), payment id and seq of the last
/// notification of a page. Anything else is the client's error.
fn decode_cursor(c: &str) -> Option<(i64, String, i64)> {
    let raw = cursor::decode(c)?;
    let mut parts = raw.splitn(3, ':');
    let us = cursor::micros(parts.next()?)?;
    let payment = payments::PaymentId::parse(parts.next()?).ok()?;
    let seq: i64 = parts.next()?.parse().ok().filter(|s| *s >= 0)?;
    Some((us, payment.to_string(), seq))
}

pub async fn redeliver(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let not_found = || ApiError::new(ErrorCode::DeliveryNotFound, "no such notification");
    let valid = id.starts_with("evt_")
        && id.len() <= 100
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(not_found());
    }
    match sinks::query::redeliver(&state.pool, merchant.as_str(), &id)
        .await
        .map_err(|e| ApiError::internal(&e))?
    {
        sinks::query::Redelivery::Scheduled => Ok(json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": id, "status": "pending" }),
        )),
        sinks::query::Redelivery::NoEndpoint => Err(ApiError::new(
            ErrorCode::NoNotificationEndpoint,
            "no notification endpoint was configured for this merchant when it was made; configure notify_url",
        )),
        sinks::query::Redelivery::NotFound => Err(not_found()),
    }
}
