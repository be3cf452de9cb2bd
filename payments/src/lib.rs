//! # payments — the domain, pure and without I/O
//!
//! Layout:
//! - [`ids`]: `PaymentId`, `MerchantId`, `IdempotencyKey`, `CommandId` — newtypes that parse.
//! - [`money`]: `Amount` (integer minor units, bounded) and `Currency` (ISO 4217).
//! - [`command`]: what may be asked of a payment (create, cancel, provider reply, webhook, timer).
//! - [`event`]: what happened to a payment; every event carries `(payment_id, seq)`.
//! - [`machine`]: the state machine, `decide(state, command) -> Decision`, and `evolve`.
//! - [`wire`]: the JSON encoding used on Kafka topics (versioned envelopes).
//! - [`notify`]: merchant notifications (which events, and the resources they carry).
//! - [`partition`]: the Kafka partition of a payment's key (murmur2, the Java client's).
//! - [`retry`]: the delays of exponential back-off.
//! - [`webhook`]: Standard Webhooks signatures (sign and verify), shared by the provider
//!   simulator and the callback endpoint.
//!
//! Nothing in this crate performs I/O or reads a clock: time enters through the commands,
//! which is what makes replays produce identical events.

pub mod command;
pub mod event;
pub mod ids;
pub mod machine;
pub mod money;
pub mod notify;
pub mod partition;
pub mod retry;
pub mod webhook;
pub mod wire;

pub use command::{
    Command, CommandBody, CreatePayment, CreateRefund, ProviderOp, ProviderOutcome, Screening,
    TimerKind, WebhookOutcome,
};
pub use event::{Event, EventBody};
pub use ids::{CommandId, IdempotencyKey, MerchantId, ParseError, PaymentId, RefundId};
pub use machine::{
    decide, evolve, Decision, Effect, Ignored, Policy, RefundPolicy, RefundState, RefundStatus,
    Rejection,
};
pub use money::{Amount, Currency};

/// Life-cycle status of a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    New,
    Processing,
    Completed,
    Failed,
    Canceled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "NEW",
            Status::Processing => "PROCESSING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Canceled => "CANCELED",
        }
    }

    /// The one transition rule: a payment begins `NEW`; `NEW → PROCESSING → COMPLETED |
    /// FAILED`, `NEW → CANCELED`, `PROCESSING → CANCELED`; a terminal state is never left.
    /// Staying in a state is allowed (events that change something else). The state
    /// machine emits nothing else, and every checker of histories uses this.
    pub fn transition_allowed(from: Option<Status>, to: Status) -> bool {
        use Status::*;
        match (from, to) {
            (None, New) => true,
            (None, _) => false,
            (Some(a), b) if a == b => true,
            (Some(New), Processing | Canceled) => true,
            (Some(Processing), Completed | Failed | Canceled) => true,
            _ => false,
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "NEW" => Status::New,
            "PROCESSING" => Status::Processing,
            "COMPLETED" => Status::Completed,
            "FAILED" => Status::Failed,
            "CANCELED" => Status::Canceled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key sent to the provider for every call about one payment.
///
/// It is derived from the payment id alone, so every attempt, retry and status check
/// names the same charge: a retry can never become a second charge.
pub fn provider_idempotency_key(payment_id: &PaymentId) -> String {
    format!("pay_{}", payment_id.as_uuid().simple())
}

/// The idempotency key sent to the provider for every call about refund number
/// `refund` of a payment: every attempt and status check names the same refund, so a
/// retry can never return money twice.
pub fn provider_refund_key(payment_id: &PaymentId, refund: u32) -> String {
    format!("{}_r{refund}", provider_idempotency_key(payment_id))
}

/// The payment and refund number named by a key of [`provider_refund_key`].
pub fn parse_provider_refund_key(key: &str) -> Option<(PaymentId, u32)> {
    let (charge, n) = key.rsplit_once("_r")?;
    let hex = charge.strip_prefix("pay_")?;
    let payment = PaymentId::parse(&format!("pay_{hex}")).ok()?;
    (provider_idempotency_key(&payment) == charge).then_some(())?;
    Some((payment, n.parse().ok()?))
}

/// Text from outside (provider answers, webhooks) made safe to keep in an event:
/// control characters removed (PostgreSQL cannot store NUL), length bounded.
pub fn external_text(s: &str, max_chars: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect()
}

/// Whether `s` holds something that looks like a card number (PAN): 13 to 19 digits,
/// optionally grouped by single spaces or dashes, starting with a digit the card networks
/// issue under (2 to 6: Mastercard, Amex, Diners, JCB, Visa, Discover, UnionPay, Maestro)
/// and passing the Luhn check. The first-digit rule keeps identifiers built from Unix
/// timestamps (`1…` in milliseconds, microseconds and nanoseconds), one in ten of which
/// pass Luhn, from being taken for cards. The gateway deals in provider tokens and
/// references; card data must never enter it.
pub fn contains_card_number(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A run of digits with single separators between them.
        let mut digits = Vec::new();
        let mut j = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits.push(bytes[j] - b'0');
                j += 1;
            } else if (bytes[j] == b' ' || bytes[j] == b'-')
                && bytes.get(j + 1).is_some_and(u8::is_ascii_digit)
            {
                j += 1;
            } else {
                break;
            }
        }
        if (13..=19).contains(&digits.len()) && (2..=6).contains(&digits[0]) && luhn(&digits) {
            return true;
        }
        i = j.max(i + 1);
    }
    false
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod card_tests {
    use super::contains_card_number;

    #[test]
    fn card_numbers_are_recognised() {
        for pan in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "order for 5500005555555559 ok",
            "378282246310005",
        ] {
            assert!(contains_card_number(pan), "{pan}");
        }
        for fine in [
            "4111111111111112",
            "order-2024-000001",
            "12345",
            "",
            "ref 1234 5678",
            "2024-11-26",
            // Millisecond timestamps that pass Luhn: identifiers, not cards.
            "1764187686001",
            "order-1764187686001",
            "ui-1764187686001-8",
        ] {
            assert!(!contains_card_number(fine), "{fine}");
        }
    }
}
