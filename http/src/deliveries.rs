//! `/v1/webhook-deliveries`: the merchant's notifications, their delivery and every
//! attempt; and a redelivery on request. Deliveries are the notifier's bookkeeping, not
//! payment state: a redelivery only moves a notification's next attempt to now.

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
    limit: Option<String>,
}

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
    let data = sinks::query::deliveries(&state.pool, merchant.as_str(), payment.as_deref(), limit)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "data": data })))
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
