//! Merchant notifications: which events a merchant is told about, and the resource each
//! one carries, shaped as the API returns it.
//!
//! A notification is made for every status change of a payment or of one of its
//! refunds. Its id, `evt_<payment>_<seq>`, is stable (the same event always makes the
//! same notification, however often it is replayed), so a merchant deduplicates by the
//! `webhook-id` header and orders by `seq`.

use crate::event::{Event, EventBody};
use crate::ids::{MerchantId, PaymentId};
use crate::machine::{PaymentState, RefundState};
use serde::{Deserialize, Serialize};

/// Value of the `content-type` header of notification records.
pub const NOTIFICATION_CONTENT_TYPE: &str = "application/vnd.gateway.notification.v1+json";

/// A merchant notification, as it travels on the notifications topic and as its body is
/// delivered (`merchant_id` is not part of the delivered body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// `evt_<payment hex>_<seq>`: the `webhook-id` of every delivery of it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub merchant_id: MerchantId,
    pub payment_id: PaymentId,
    /// The payment's `seq` of the event: orders what arrives out of order.
    pub seq: u64,
    pub occurred_at: String,
    /// The payment, or for `refund.*` the refund, as the API returns it.
    pub data: serde_json::Value,
}

/// The body a merchant receives: the notification without the merchant's own id.
pub fn delivered_body(n: &Notification) -> String {
    serde_json::json!({
        "id": n.id,
        "type": n.kind,
        "payment_id": n.payment_id.to_string(),
        "seq": n.seq,
        "occurred_at": n.occurred_at,
        "data": n.data,
    })
    .to_string()
}

/// The notification type of an event, if the event changes a status.
pub fn kind(body: &EventBody) -> Option<&'static str> {
    Some(match body {
        EventBody::Created { .. } => "payment.created",
        EventBody::ProcessingStarted => "payment.processing",
        EventBody::Completed { .. } => "payment.completed",
        EventBody::Failed { .. } => "payment.failed",
        EventBody::Canceled { .. } => "payment.canceled",
        EventBody::RefundRequested { .. } => "refund.pending",
        EventBody::RefundSucceeded { .. } => "refund.succeeded",
        EventBody::RefundFailed { .. } | EventBody::RefundRefused { .. } => "refund.failed",
        _ => return None,
    })
}

/// The notification of `event` for its payment, whose state `state` is at least as new
/// as the event (the state after the step that emitted it). `None` if the event changes
/// no status.
pub fn notification(event: &Event, state: &PaymentState) -> Option<Notification> {
    let kind = kind(&event.body)?;
    let data = match event.body.refund() {
        Some(n) => refund_view(state, state.refunds.get(n as usize)?),
        None => payment_view(state),
    };
    Some(Notification {
        id: format!("evt_{}_{}", event.payment_id.as_uuid().simple(), event.seq),
        kind: kind.to_owned(),
        merchant_id: state.merchant_id.clone(),
        payment_id: event.payment_id,
        seq: event.seq,
        occurred_at: iso_ms(event.occurred_at_ms),
        data,
    })
}

/// A payment as `GET /v1/payments/{id}` returns it.
pub fn payment_view(s: &PaymentState) -> serde_json::Value {
    let refunded = s.amount_refunded();
    serde_json::json!({
        "id": s.payment_id.to_string(),
        "status": s.status.as_str(),
        "amount": s.amount.minor_units(),
        "currency": s.currency.as_str(),
        "reference": s.reference,
        "description": s.description,
        "metadata": s.metadata,
        "provider_reference": s.provider_ref,
        "failure_code": s.failure_code,
        "failure_message": s.failure_message,
        "cancel_requested": s.cancel_requested,
        "stuck": s.stuck,
        "attempts": s.attempt,
        "amount_refunded": refunded,
        "refunded": refunded >= s.amount.minor_units(),
        "version": s.seq,
        "created_at": iso_ms(s.created_at_ms),
        "updated_at": iso_ms(s.updated_at_ms),
    })
}

/// A refund as `GET /v1/refunds/{id}` returns it.
pub fn refund_view(s: &PaymentState, r: &RefundState) -> serde_json::Value {
    serde_json::json!({
        "id": r.refund_id.to_string(),
        "payment_id": s.payment_id.to_string(),
        "amount": r.amount,
        "currency": s.currency.as_str(),
        "status": r.status.as_str(),
        "reason": r.reason,
        "provider_reference": r.provider_ref,
        "failure_code": r.failure_code,
        "failure_message": r.failure_message,
        "created_at": iso_ms(r.created_at_ms),
        "updated_at": iso_ms(r.updated_at_ms),
    })
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix time in ms, as the projection formats times.
pub fn iso_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, CommandBody, CreatePayment};
    use crate::ids::{CommandId, IdempotencyKey};
    use crate::machine::{decide, evolve, Decision, Policy};
    use crate::money::{Amount, Currency};

    #[test]
    fn times_are_formatted_as_the_projection_formats_them() {
        assert_eq!(iso_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(iso_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn status_changes_notify_with_a_stable_id_and_the_resource() {
        let merchant = MerchantId::parse("acme").unwrap();
        let key = IdempotencyKey::parse("k-1").unwrap();
        let cmd = Command {
            command_id: CommandId::parse("c-1").unwrap(),
            payment_id: PaymentId::derive(&merchant, &key),
            issued_at_ms: 1_000,
            body: CommandBody::Create(CreatePayment {
                merchant_id: merchant,
                amount: Amount::new(500).unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                idempotency_key: key,
                request_hash: "h".into(),
                reference: None,
                description: None,
                metadata: Default::default(),
                traceparent: None,
                screening: None,
            }),
        };
        let Decision::Apply { events, .. } = decide(None, &cmd, &Policy::default()) else {
            panic!("a create applies")
        };
        let state = events.iter().fold(None, evolve).unwrap();
        let made: Vec<_> = events
            .iter()
            .filter_map(|e| notification(e, &state))
            .collect();
        let kinds: Vec<&str> = made.iter().map(|n| n.kind.as_str()).collect();
        // created, processing_started, charge_requested: the last changes no status.
        assert_eq!(kinds, ["payment.created", "payment.processing"]);
        assert_eq!(
            made[0].id,
            format!("evt_{}_1", state.payment_id.as_uuid().simple())
        );
        assert_eq!(made[1].seq, 2);
        assert_eq!(made[0].data["status"], "PROCESSING");
        assert_eq!(made[0].data["amount"], 500);
        assert_eq!(
            made,
            events
                .iter()
                .filter_map(|e| notification(e, &state))
                .collect::<Vec<_>>()
        );
    }
}
