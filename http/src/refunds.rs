//! Refunds: `POST /v1/payments/{id}/refunds`, `GET /v1/payments/{id}/refunds`,
//! `GET /v1/refunds/{refund_id}`.
//!
//! A refund request is a command, like a create: the refund state machine, in the
//! partition that owns the payment, decides it against the payment and every refund
//! before it. The API checks what it can see in the projection first (the payment
//! exists, is `COMPLETED`, and has enough left to refund) and answers a request that
//! cannot succeed at once, with its reason. A request it accepts (`202`) is carried out
//! as sent: it either goes to the provider, or, if a concurrent refund took what was
//! left in the meantime, is recorded as a `FAILED` refund with the reason, readable at
//! its `links.self`.

use crate::commands::publish;
use crate::error::{ApiError, ErrorCode};
use crate::recent::{Claim, RecentCreates};
use crate::request::{
    check_json_content_type, command_id, json, merchant, now_ms, parse_body, parse_id,
    reject_card_data, required_idempotency_key, Result,
};
use crate::ApiState;
use bytes::Bytes;
use payments::{Amount, Command, CommandBody, CreateRefund, RefundId, Status};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use warp::http::StatusCode;
use warp::reply::Response;

const MAX_REASON: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundRequest {
    #[serde(default)]
    amount: Option<serde_json::Value>,
    #[serde(default)]
    reason: Option<String>,
}

/// A validated refund request and its canonical hash.
struct ValidRefund {
    amount: Option<Amount>,
    reason: Option<String>,
    hash: String,
}

fn validate(req: RefundRequest) -> Result<ValidRefund> {
    let amount = match req.amount {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let a = v.as_i64().ok_or_else(|| {
                ApiError::invalid(
                    "amount must be an integer number of minor units (e.g. 1050 for 10.50), or absent for what is left",
                )
            })?;
            Some(Amount::new(a).map_err(|e| ApiError::invalid(e.to_string()))?)
        }
    };
    let reason = match req.reason {
        Some(s) if s.chars().count() > MAX_REASON => {
            return Err(ApiError::invalid(format!(
                "reason must be at most {MAX_REASON} characters"
            )))
        }
        Some(s) if s.chars().any(char::is_control) => {
            return Err(ApiError::invalid(
                "reason must not contain control characters",
            ))
        }
        other => other,
    };
    reject_card_data("reason", reason.as_deref())?;
    let canonical = serde_json::json!([amount.map(|a| a.minor_units()), reason]);
    let hash = hex::encode(Sha256::digest(canonical.to_string().as_bytes()));
    Ok(ValidRefund {
        amount,
        reason,
        hash,
    })
}

/// A refund request in Kafka that the projection may not hold yet.
#[derive(Debug, Clone)]
pub struct AcceptedRefund {
    pub payment_id: String,
    /// The refund as `GET /v1/refunds/{id}` shows it (JSON text).
    pub view: Box<str>,
}

fn recent(state: &ApiState) -> std::sync::MutexGuard<'_, RecentCreates<AcceptedRefund>> {
    state
        .recent_refunds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether this instance accepted the payment's create and the projection may not hold
/// it yet (read your writes, as `GET /v1/payments/{id}` does).
fn accepted_here(state: &ApiState, merchant: &payments::MerchantId, payment_id: &str) -> bool {
    crate::payments::recent(state)
        .accepted(merchant.as_str(), payment_id)
        .is_some()
}

fn refund_window(state: &ApiState) -> Result<std::time::Duration> {
    state.cfg.refund_window.ok_or_else(|| {
        ApiError::new(
            ErrorCode::RefundsNotEnabled,
            "this gateway's topology has no refund processor; refunds cannot be carried out",
        )
    })
}

/// The refund as `GET /v1/refunds/{id}` shows it before its request is projected.
fn pending_view(
    id: &RefundId,
    payment: &str,
    amount: Option<i64>,
    currency: &str,
    v: &ValidRefund,
) -> serde_json::Value {
    let at = payments::notify::iso_ms(now_ms());
    serde_json::json!({
        "id": id.to_string(),
        "payment_id": payment,
        "amount": amount,
        "currency": currency,
        "status": payments::RefundStatus::Pending.as_str(),
        "reason": v.reason,
        "provider_reference": null,
        "failure_code": null,
        "failure_message": null,
        "created_at": at,
        "updated_at": at,
        "links": { "self": format!("/v1/refunds/{id}"), "payment": format!("/v1/payments/{payment}") },
    })
}

fn with_links(mut view: serde_json::Value) -> serde_json::Value {
    if let (Some(id), Some(pay)) = (
        view.get("id").and_then(|v| v.as_str()).map(str::to_owned),
        view.get("payment_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
    ) {
        view["links"] = serde_json::json!({ "self": format!("/v1/refunds/{id}"), "payment": format!("/v1/payments/{pay}") });
    }
    view
}

pub async fn create_refund(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    content_type: Option<String>,
    body: Result<Bytes>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let window = refund_window(&state)?;
    let body = body?;
    let key = required_idempotency_key(idempotency_key)?;
    check_json_content_type(content_type.as_deref())?;
    // An empty body asks for a refund of what is left.
    let valid = validate(if body.is_empty() {
        RefundRequest {
            amount: None,
            reason: None,
        }
    } else {
        parse_body(&body)?
    })?;
    let payment_id = parse_id(&id)?;
    let refund_id = RefundId::derive(&payment_id, &key);
    let conflict = || {
        ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was already used with a different refund request",
        )
    };
    let replay = |view: serde_json::Value| {
        let mut r = json(StatusCode::ACCEPTED, &with_links(view));
        r.headers_mut().insert(
            "idempotent-replayed",
            warp::http::HeaderValue::from_static("true"),
        );
        r
    };
    let (pid, rid) = (payment_id.to_string(), refund_id.to_string());
    // A key already used for this payment: replay or refuse.
    if let Some(r) = sinks::query::refund(&state.pool, merchant.as_str(), &rid)
        .await
        .map_err(|e| ApiError::internal(&e))?
    {
        return if r.request_hash == valid.hash {
            Ok(replay(serde_json::to_value(&r).unwrap_or_default()))
        } else {
            Err(conflict())
        };
    }
    let Some(payment) = sinks::query::get_payment(&state.pool, merchant.as_str(), &pid)
        .await
        .map_err(|e| ApiError::internal(&e))?
    else {
        return Err(if accepted_here(&state, &merchant, &pid) {
            ApiError::new(
                ErrorCode::PaymentNotCompleted,
                "payment is NEW; only a COMPLETED payment can be refunded",
            )
        } else {
            ApiError::not_found()
        });
    };
    if payment.status != Status::Completed.as_str() {
        return Err(ApiError::new(
            ErrorCode::PaymentNotCompleted,
            format!(
                "payment is {}; only a COMPLETED payment can be refunded",
                payment.status
            ),
        ));
    }
    let completed = sinks::query::completed_at_ms(&state.pool, &pid)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    if completed.is_some_and(|at| now_ms().saturating_sub(at) >= window_ms) {
        return Err(ApiError::new(
            ErrorCode::RefundWindowClosed,
            format!(
                "payment completed more than {} s ago; refunds are accepted for that long after completion",
                window.as_secs()
            ),
        ));
    }
    let refunds = sinks::query::refunds_of(&state.pool, merchant.as_str(), &pid)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .unwrap_or_default();
    let reserved: i64 = refunds
        .iter()
        .filter(|r| r.status != payments::RefundStatus::Failed.as_str())
        .map(|r| r.amount)
        .sum();
    let left = payment.amount - reserved;
    let asked = valid.amount.map_or(left, |a| a.minor_units());
    if left <= 0 || asked > left {
        return Err(ApiError::new(
            ErrorCode::AmountExceedsRefundable,
            format!(
                "{asked} exceeds the {left} left to refund of {} captured (succeeded and pending refunds count)",
                payment.amount
            ),
        ));
    }
    let claim_key = format!("{pid}/{key}");
    let claim = recent(&state).claim(merchant.as_str(), &claim_key, &valid.hash, &rid);
    match claim {
        Claim::OtherRequest => return Err(conflict()),
        Claim::SameRequest | Claim::First => {}
    }
    let cmd = Command {
        command_id: command_id(&format!("refund:{rid}"))?,
        payment_id,
        issued_at_ms: now_ms(),
        body: CommandBody::Refund(CreateRefund {
            merchant_id: merchant.clone(),
            refund_id,
            amount: valid.amount,
            idempotency_key: key.clone(),
            request_hash: valid.hash.clone(),
            reason: valid.reason.clone(),
        }),
    };
    let at = match publish(&state, &cmd).await {
        Ok(at) => at,
        Err(e) => {
            recent(&state).release(merchant.as_str(), &claim_key);
            return Err(e);
        }
    };
    let view = pending_view(
        &refund_id,
        &pid,
        valid.amount.map(|a| a.minor_units()),
        &payment.currency,
        &valid,
    );
    recent(&state).published(
        merchant.as_str(),
        &claim_key,
        at.offset,
        AcceptedRefund {
            payment_id: pid.clone(),
            view: view.to_string().into(),
        },
    );
    tracing::info!(payment_id = %pid, refund_id = %rid, merchant = %merchant, partition = at.partition, offset = at.offset, "refund accepted");
    let mut res = json(StatusCode::ACCEPTED, &view);
    if let Ok(loc) = format!("/v1/refunds/{rid}").parse() {
        res.headers_mut().insert("location", loc);
    }
    Ok(res)
}

pub async fn list_refunds(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let id = parse_id(&id)?.to_string();
    let asked = Instant::now();
    let refunds = match sinks::query::refunds_of(&state.pool, merchant.as_str(), &id)
        .await
        .map_err(|e| ApiError::internal(&e))?
    {
        Some(r) => r,
        // Accepted here and not projected yet: it has no refunds.
        None if accepted_here(&state, &merchant, &id) => Vec::new(),
        None => return Err(ApiError::not_found()),
    };
    // Then the requests accepted here that the projection does not show yet (read your
    // writes, as `GET /v1/refunds/{id}` does), in the order the worker applies them (one
    // partition holds a payment's commands): after every projected refund, which the
    // worker numbered before them. One the projection shows is shown from it alone.
    let shown: HashSet<&str> = refunds.iter().map(|r| r.id.as_str()).collect();
    let mut accepted = recent(&state).not_in_projection(merchant.as_str(), asked, &shown, |a| {
        (a.payment_id == id).then(|| a.view.clone())
    });
    accepted.sort_by_key(|(offset, _)| *offset);
    let data: Vec<serde_json::Value> = refunds
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .chain(
            accepted
                .iter()
                .filter_map(|(_, view)| serde_json::from_str(view).ok()),
        )
        .map(with_links)
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "payment_id": id, "data": data }),
    ))
}

pub async fn get_refund(
    state: Arc<ApiState>,
    id: String,
    authorization: Option<String>,
) -> Result<Response> {
    let merchant = merchant(&state, authorization.as_deref())?;
    let not_found = || ApiError::new(ErrorCode::RefundNotFound, "no such refund");
    // A malformed id cannot name a refund: same answer as a missing one.
    let id = RefundId::parse(&id).map_err(|_| not_found())?;
    let projected = sinks::query::refund(&state.pool, merchant.as_str(), &id.to_string())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let view = match projected {
        Some(r) => serde_json::to_value(&r).unwrap_or_default(),
        // Accepted here and not projected yet.
        None => recent(&state)
            .accepted(merchant.as_str(), &id.to_string())
            .and_then(|a| serde_json::from_str(&a.view).ok())
            .ok_or_else(not_found)?,
    };
    Ok(json(StatusCode::OK, &with_links(view)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(amount: Option<serde_json::Value>, reason: Option<&str>) -> RefundRequest {
        RefundRequest {
            amount,
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn requests_are_validated_and_hashed_canonically() {
        let a = validate(req(Some(500.into()), Some("damaged"))).expect("valid");
        let b = validate(req(Some(500.into()), Some("damaged"))).expect("valid");
        assert_eq!(a.hash, b.hash);
        let rest = validate(req(None, None)).expect("the rest");
        assert!(rest.amount.is_none());
        assert_ne!(rest.hash, a.hash);
        for bad in [
            req(Some(0.into()), None),
            req(Some((-5).into()), None),
            req(Some("12".into()), None),
            req(Some(1.5.into()), None),
            req(None, Some(&"x".repeat(MAX_REASON + 1))),
            req(None, Some("line\nbreak")),
            req(None, Some("card 4242 4242 4242 4242")),
        ] {
            assert!(validate(bad).is_err());
        }
    }
}
