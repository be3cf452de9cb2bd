//! # payments — the domain, pure and without I/O
//!
//! Layout:
//! - [`ids`]: `PaymentId`, `MerchantId`, `IdempotencyKey`, `CommandId` — newtypes that parse.
//! - [`money`]: `Amount` (integer minor units, bounded) and `Currency` (ISO 4217).
//! - [`command`]: what may be asked of a payment (create, cancel, provider reply, webhook, timer).
//! - [`event`]: what happened to a payment; every event carries `(payment_id, seq)`.
//! - [`machine`]: the state machine, `decide(state, command) -> Decision`, and `evolve`.
//! - [`wire`]: the JSON encoding used on Kafka topics (versioned envelopes).
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
pub mod webhook;
pub mod wire;

pub use command::{
    Command, CommandBody, CreatePayment, ProviderOp, ProviderOutcome, Screening, TimerKind,
    WebhookOutcome,
};
pub use event::{Event, EventBody};
pub use ids::{CommandId, IdempotencyKey, MerchantId, ParseError, PaymentId};
pub use machine::{decide, evolve, Decision, Effect, Ignored, Policy, Rejection};
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

/// Text from outside (provider answers, webhooks) made safe to keep in an event:
/// control characters removed (PostgreSQL cannot store NUL), length bounded.
pub fn external_text(s: &str, max_chars: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect()
}
