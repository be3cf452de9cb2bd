//! Refunds: money returned on a captured charge, in one or several parts.
//!
//! `POST /v1/refunds`, header `Idempotency-Key: <refund key>`, body
//! `{idempotency_key, charge_key, amount, currency, reference, refund}` (unknown fields
//! refused). `charge_key` is the idempotency key of the charge; `reference` (the payment
//! id) and `refund` (the refund's index within the payment) are only echoed in webhooks.
//!
//! | answer | body `status` | meaning |
//! |---|---|---|
//! | 200 | `succeeded` | money returned (`refund_id`, `amount`, `currency`) |
//! | 202 | `pending` | outcome later by webhook `refund.succeeded` / `refund.failed` |
//! | 422 | `failed` | refused, final, nothing refunded (`code` below) |
//! | 400 | `error` | malformed request (`invalid_request`); nothing recorded |
//! | 500 / 503 / hang | `error` | the charge fault modes: see below |
//!
//! Every refusal is **422** (never 404, which belongs to `GET /v1/refunds/{key}`, nor
//! 409): the request was understood and is refused for what it asks. Codes:
//! `charge_not_found`, `charge_not_captured`, `currency_mismatch`,
//! `amount_exceeds_captured` (succeeded + pending refunds of the charge would exceed its
//! captured amount), `refund_declined` (the magic amount ending in 01, or a pending refund
//! that failed), and `idempotency_key_reused` (the key names a refund of another charge,
//! amount or currency). All but the last are stored under the key as a `failed` refund,
//! so a repeat and `GET` tell the same; a key reuse leaves the existing refund untouched.
//!
//! Faults are the charges' own ([`Behaviour`] from the refunded amount's magic digits, else
//! `error_rate`, `timeout_rate`, `lost_response_rate`, `async_rate`; `decline_rate` is a
//! card's business and does not apply): 503 before refunding, a hang past the client's
//! timeout after refunding, a 500 after refunding (the answer is lost), a pending refund
//! whose webhook is late, duplicated or sent before the 202. Refusals are judged before
//! any fault is drawn, so a refused refund is refused at once, on every attempt.
//!
//! Idempotency: a repeat of a key answers the current state of the same refund, with the
//! status code that state has (200, 202 or 422); money moves at most once per key
//! (`refunds_made` in the ledger).

use crate::{error, Answer, Behaviour, ChargeStatus, Inner, Outcome, Settlement, Simulator};
use serde::{Deserialize, Serialize};
use warp::http::StatusCode;

/// The status code of every refusal.
pub const REFUSED: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    Pending,
    Succeeded,
    Failed,
}

/// A refund in the ledger, under its own idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refund {
    pub refund_id: String,
    pub idempotency_key: String,
    /// The idempotency key of the refunded charge.
    pub charge_key: String,
    /// The payment id, echoed in webhooks.
    pub reference: String,
    /// The refund's index within the payment, echoed in webhooks.
    pub refund: u32,
    pub amount: i64,
    pub currency: String,
    pub status: RefundStatus,
    pub code: Option<String>,
    pub message: Option<String>,
    /// Times money was returned for this key: must never exceed 1.
    pub refunds_made: u32,
    pub requests: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefundRequest {
    idempotency_key: String,
    charge_key: String,
    amount: i64,
    currency: String,
    #[serde(default)]
    reference: String,
    #[serde(default)]
    refund: u32,
}

/// The answer body of a refund, the same for `POST` and `GET`.
fn refund_body(r: &Refund) -> serde_json::Value {
    serde_json::json!({
        "refund_id": r.refund_id,
        "status": r.status,
        "amount": r.amount,
        "currency": r.currency,
        "code": r.code,
        "message": r.message,
    })
}

/// A refund's current state as a `POST` answer: its status code follows its status, so
/// a repeat of a refused or failed refund is a refusal again.
fn refund_answer(r: &Refund) -> Answer {
    let status = match r.status {
        RefundStatus::Succeeded => StatusCode::OK,
        RefundStatus::Pending => StatusCode::ACCEPTED,
        RefundStatus::Failed => REFUSED,
    };
    (status, refund_body(r))
}

/// A refusal that records nothing (the key already names another refund).
fn refused(code: &str, message: &str) -> Answer {
    (
        REFUSED,
        serde_json::json!({ "status": "failed", "code": code, "message": message }),
    )
}

/// A refund webhook's `data`.
fn refund_event(r: &Refund) -> serde_json::Value {
    serde_json::json!({
        "refund_id": r.refund_id,
        "idempotency_key": r.idempotency_key,
        "charge_key": r.charge_key,
        "reference": r.reference,
        "refund": r.refund,
        "status": r.status,
        "code": r.code,
        "message": r.message,
    })
}

/// Why the charge cannot give `req` back, if it cannot: checked before any fault so the
/// answer does not depend on luck. Pending refunds count, since they may still succeed.
fn refusal(g: &Inner, req: &RefundRequest) -> Option<(&'static str, String)> {
    let Some(c) = g.charges.get(&req.charge_key) else {
        return Some((
            "charge_not_found",
            format!("no charge under the key {:?}", req.charge_key),
        ));
    };
    if c.status != ChargeStatus::Succeeded {
        return Some((
            "charge_not_captured",
            format!(
                "the charge is {:?}; only a captured charge can be refunded",
                c.status
            )
            .to_lowercase(),
        ));
    }
    if c.currency != req.currency {
        return Some((
            "currency_mismatch",
            format!(
                "the charge is in {}, the refund in {}",
                c.currency, req.currency
            ),
        ));
    }
    let committed: i64 = g
        .refunds_by_charge
        .get(&req.charge_key)
        .into_iter()
        .flatten()
        .filter_map(|k| g.refunds.get(k))
        .filter(|r| r.status != RefundStatus::Failed)
        .map(|r| r.amount)
        .fold(0, i64::saturating_add);
    if committed.saturating_add(req.amount) > c.amount {
        return Some((
            "amount_exceeds_captured",
            format!(
                "{} captured, {committed} already refunded or pending: {} more is too much",
                c.amount, req.amount
            ),
        ));
    }
    None
}

impl Inner {
    fn insert_refund(&mut self, r: Refund) {
        self.refunds_by_charge
            .entry(r.charge_key.clone())
            .or_default()
            .push(r.idempotency_key.clone());
        self.refunds.insert(r.idempotency_key.clone(), r);
    }
}

impl Simulator {
    /// `POST /v1/refunds`. `header_key`: the `Idempotency-Key` header, which must agree
    /// with the body's key when given.
    pub(crate) async fn refund(&self, header_key: Option<String>, req: RefundRequest) -> Answer {
        self.latency().await;
        if header_key.is_some_and(|h| h != req.idempotency_key) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the Idempotency-Key header and the body's idempotency_key differ",
            );
        }
        if req.amount <= 0
            || req.idempotency_key.is_empty()
            || req.charge_key.is_empty()
            || req.currency.len() != 3
        {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "amount > 0, idempotency_key, charge_key and a 3-letter currency are required",
            );
        }
        let (answer, settlement, hang) = {
            let mut g = self.lock();
            g.requests += 1;
            let attempt = {
                let a = g
                    .refund_attempts
                    .entry(req.idempotency_key.clone())
                    .or_insert(0);
                *a += 1;
                *a
            };
            if let Some(r) = g.refunds.get_mut(&req.idempotency_key) {
                r.requests += 1;
                if r.charge_key != req.charge_key
                    || r.amount != req.amount
                    || r.currency != req.currency
                {
                    return refused(
                        "idempotency_key_reused",
                        &format!(
                            "the key names a refund of {} {} on charge {:?}",
                            r.amount, r.currency, r.charge_key
                        ),
                    );
                }
                // Idempotency: the same key is the same refund, whatever the attempt.
                return refund_answer(r);
            }
            let new_refund =
                |status: RefundStatus, code: Option<&str>, message: Option<&str>| Refund {
                    refund_id: format!("re_sim_{}", uuid::Uuid::new_v4().simple()),
                    idempotency_key: req.idempotency_key.clone(),
                    charge_key: req.charge_key.clone(),
                    reference: req.reference.clone(),
                    refund: req.refund,
                    amount: req.amount,
                    currency: req.currency.clone(),
                    status,
                    code: code.map(str::to_owned),
                    message: message.map(str::to_owned),
                    refunds_made: u32::from(status == RefundStatus::Succeeded),
                    requests: 1,
                };
            if let Some((code, message)) = refusal(&g, &req) {
                let r = new_refund(RefundStatus::Failed, Some(code), Some(&message));
                let answer = refund_answer(&r);
                g.insert_refund(r);
                return answer;
            }
            let magic = if self.cfg.magic_amounts {
                Behaviour::for_amount(req.amount)
            } else {
                None
            };
            let behaviour = match magic {
                Some(b) => b,
                None => self.pick_random(&mut g, false),
            };
            let outcome = behaviour.outcome(attempt == 1);
            let refund = match outcome {
                Outcome::Unavailable { .. } => None,
                Outcome::Declined => Some(new_refund(
                    RefundStatus::Failed,
                    Some("refund_declined"),
                    Some("the provider declined the refund"),
                )),
                Outcome::Done { .. } => Some(new_refund(RefundStatus::Succeeded, None, None)),
                Outcome::Pending => Some(new_refund(RefundStatus::Pending, None, None)),
            };
            let answer = match (outcome.fault(), &refund) {
                (Some(fault), _) => fault,
                (None, Some(r)) => refund_answer(r),
                // Unreachable: only `Unavailable` makes no refund, and it is a fault.
                (None, None) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no refund"),
            };
            let hang = outcome.hangs();
            if hang || answer.0.is_server_error() {
                g.faults += 1;
            }
            if let Some(r) = refund {
                g.insert_refund(r);
            }
            let settlement = match outcome {
                Outcome::Pending => behaviour.settlement(self.cfg.webhook_delay_ms),
                _ => None,
            };
            (answer, settlement, hang)
        };
        if let Some(s) = settlement {
            self.settle_refund_later(req.idempotency_key.clone(), s);
        }
        self.deliver_answer(answer, settlement, hang).await
    }

    /// Resolves a pending refund after the settlement's delay and sends its webhook. Only
    /// a pending refund moves, so money is returned at most once per key.
    fn settle_refund_later(&self, key: String, s: Settlement) {
        self.settle_later(s.delay_ms, s.webhook_first, move |g| {
            let r = g.refunds.get_mut(&key)?;
            if r.status != RefundStatus::Pending {
                return None;
            }
            let kind = if s.succeed {
                r.status = RefundStatus::Succeeded;
                r.refunds_made += 1;
                "refund.succeeded"
            } else {
                r.status = RefundStatus::Failed;
                r.code = Some("refund_declined".into());
                r.message = Some("the provider declined the refund".into());
                "refund.failed"
            };
            Some((kind, refund_event(r)))
        });
    }

    /// `GET /v1/refunds/{key}`: 200 with the refund, whatever its status, or 404 when no
    /// refund exists under the key (a request that faulted before refunding leaves none).
    pub(crate) async fn refund_status(&self, key: String) -> Answer {
        self.latency().await;
        let mut g = self.lock();
        g.requests += 1;
        match g.refunds.get(&key) {
            Some(r) => (StatusCode::OK, refund_body(r)),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no refund under this idempotency key",
            ),
        }
    }
}
