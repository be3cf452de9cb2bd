//! What every handler shares: the authenticated merchant, JSON bodies and answers,
//! identifiers from paths and headers.

use crate::auth;
use crate::error::{ApiError, ErrorCode};
use crate::ApiState;
use payments::{CommandId, IdempotencyKey, MerchantId, PaymentId};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

pub type Result<T> = std::result::Result<T, ApiError>;

pub use telemetry::now_ms;

/// The authenticated merchant, within its rate limit.
pub fn merchant(state: &ApiState, authorization: Option<&str>) -> Result<MerchantId> {
    let merchant = auth::authenticate(&state.cfg.merchants, authorization)
        .ok_or_else(ApiError::unauthorized)?;
    if let Some(limit) = state.cfg.rate_limit {
        state
            .buckets
            .take(merchant.as_str(), limit)
            .map_err(|secs| ApiError {
                retry_after: Some(secs),
                ..ApiError::new(
                    ErrorCode::RateLimited,
                    "too many requests for this merchant; retry after Retry-After seconds",
                )
            })?;
    }
    Ok(merchant)
}

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// Parses a JSON body, turning serde's message into a clear 400.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the request body is empty; send a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| (e.path().to_string(), e.into_inner()))
        .and_then(|v| de.end().map(|()| v).map_err(|e| (String::new(), e)));
    parsed.map_err(|(path, e)| {
        let code = if e.is_syntax() || e.is_eof() {
            ErrorCode::InvalidJson
        } else {
            ErrorCode::InvalidRequest
        };
        let at = if path == "." || path.is_empty() {
            String::new()
        } else {
            format!(" (at `{path}`)")
        };
        ApiError::new(code, format!("request body{at}: {e}"))
    })
}

pub(crate) fn check_json_content_type(content_type: Option<&str>) -> Result<()> {
    match content_type {
        None => Ok(()),
        Some(ct)
            if ct
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) =>
        {
            Ok(())
        }
        Some(ct) => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("content-type {ct:?} is not supported; send application/json"),
        )),
    }
}

/// Card data must never enter the gateway (nor its logs, topics or database).
pub(crate) fn reject_card_data(field: &str, value: Option<&str>) -> Result<()> {
    if value.is_some_and(payments::contains_card_number) {
        return Err(ApiError::new(
            ErrorCode::CardDataRejected,
            format!("{field} looks like a card number; send your provider's token or reference, never card data"),
        ));
    }
    Ok(())
}

/// The `Idempotency-Key` header a write requires: present, 1 to 255 printable ASCII
/// characters, and nothing like a card number.
pub(crate) fn required_idempotency_key(header: Option<String>) -> Result<IdempotencyKey> {
    let key = header.ok_or_else(|| {
        ApiError::new(
            ErrorCode::MissingIdempotencyKey,
            "the Idempotency-Key header is required",
        )
    })?;
    reject_card_data("Idempotency-Key", Some(&key))?;
    IdempotencyKey::parse(&key)
        .map_err(|e| ApiError::new(ErrorCode::InvalidIdempotencyKey, e.to_string()))
}

pub(crate) fn command_id(s: &str) -> Result<CommandId> {
    CommandId::parse(s).map_err(|e| ApiError::invalid(e.to_string()))
}

pub(crate) fn parse_id(id: &str) -> Result<PaymentId> {
    // A malformed id cannot name a payment: same answer as a missing one.
    PaymentId::parse(id).map_err(|_| ApiError::not_found())
}
