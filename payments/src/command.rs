//! Commands: requests to change a payment. Only the topology applies them.
//!
//! Every command carries a [`CommandId`]; the topology applies each id at most once.
//! Every command carries the time it was issued: the state machine never reads a clock.

use crate::ids::{CommandId, IdempotencyKey, MerchantId, PaymentId, RefundId};
use crate::money::{Amount, Currency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: CommandId,
    pub payment_id: PaymentId,
    /// Milliseconds since the Unix epoch, set by whoever issued the command.
    pub issued_at_ms: i64,
    pub body: CommandBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandBody {
    Create(CreatePayment),
    Cancel {
        merchant_id: MerchantId,
    },
    /// The provider answered (or failed to answer) a call the topology made.
    ProviderReply {
        op: ProviderOp,
        attempt: u32,
        outcome: ProviderOutcome,
    },
    /// A verified provider webhook.
    Webhook {
        webhook_id: String,
        outcome: WebhookOutcome,
    },
    /// A timer that the topology scheduled has come due.
    Timer {
        kind: TimerKind,
    },
    /// Refund (part of) a completed payment.
    Refund(CreateRefund),
}

impl CommandBody {
    /// Short, bounded name used in logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandBody::Create(_) => "create",
            CommandBody::Cancel { .. } => "cancel",
            CommandBody::ProviderReply { .. } => "provider_reply",
            CommandBody::Webhook { .. } => "webhook",
            CommandBody::Timer { .. } => "timer",
            CommandBody::Refund(_) => "refund",
        }
    }

    /// Whether the command is about one of the payment's refunds (a refund request, a
    /// provider answer or webhook about a refund, a refund's timer): the refund state
    /// machine's commands, not the payment's.
    pub fn is_refund(&self) -> bool {
        match self {
            CommandBody::Refund(_) => true,
            CommandBody::ProviderReply { op, .. } => op.refund().is_some(),
            CommandBody::Webhook { outcome, .. } => outcome.refund().is_some(),
            CommandBody::Timer { kind } => kind.refund().is_some(),
            CommandBody::Create(_) | CommandBody::Cancel { .. } => false,
        }
    }
}

/// A request to refund a completed payment: `amount` in the payment's currency, or,
/// when absent, what is left to refund when the request is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRefund {
    pub merchant_id: MerchantId,
    /// [`RefundId::derive`] of the payment and `idempotency_key`.
    pub refund_id: RefundId,
    #[serde(default)]
    pub amount: Option<Amount>,
    pub idempotency_key: IdempotencyKey,
    /// SHA-256 of the canonical request: tells a replay from a conflicting reuse of a key.
    pub request_hash: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePayment {
    pub merchant_id: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    pub idempotency_key: IdempotencyKey,
    /// SHA-256 of the canonical request: tells a replay from a conflicting reuse of a key.
    pub request_hash: String,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Merchant key-value pairs, bounded by the API.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// W3C trace context of the request that created the payment.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Set by a screening processor (amount limit, risk) that refuses the payment: the
    /// payment is still created, so the accepted request ends in a visible FAILED.
    #[serde(default)]
    pub screening: Option<Screening>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screening {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderOp {
    Charge,
    Status,
    Cancel,
    /// Refund number `refund` of the payment (its index among the payment's refunds).
    Refund {
        refund: u32,
    },
    /// Ask for the outcome of refund number `refund`.
    RefundStatus {
        refund: u32,
    },
}

impl ProviderOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderOp::Charge => "charge",
            ProviderOp::Status => "status",
            ProviderOp::Cancel => "cancel",
            ProviderOp::Refund { .. } => "refund",
            ProviderOp::RefundStatus { .. } => "refund_status",
        }
    }

    /// The refund the operation is about, if any.
    pub fn refund(self) -> Option<u32> {
        match self {
            ProviderOp::Refund { refund } | ProviderOp::RefundStatus { refund } => Some(refund),
            _ => None,
        }
    }
}

/// What a provider call produced, already classified by the provider client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ProviderOutcome {
    /// The charge is captured.
    Approved { provider_ref: String },
    /// The provider refused the charge; final.
    Declined { code: String, message: String },
    /// Accepted; the outcome will come by webhook.
    Pending { provider_ref: String },
    /// The provider has no charge under our key (status check only).
    NotFound,
    /// The provider confirmed a cancel.
    Canceled,
    /// The provider refused a cancel (for example, already captured).
    CancelRefused { reason: String },
    /// The provider answered with an error before doing anything (5xx, refused connection).
    Transient { error: String },
    /// No answer in time: the call may or may not have taken effect.
    Ambiguous { error: String },
}

impl ProviderOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ProviderOutcome::Approved { .. } => "approved",
            ProviderOutcome::Declined { .. } => "declined",
            ProviderOutcome::Pending { .. } => "pending",
            ProviderOutcome::NotFound => "not_found",
            ProviderOutcome::Canceled => "canceled",
            ProviderOutcome::CancelRefused { .. } => "cancel_refused",
            ProviderOutcome::Transient { .. } => "transient",
            ProviderOutcome::Ambiguous { .. } => "ambiguous",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum WebhookOutcome {
    Succeeded {
        provider_ref: String,
    },
    Failed {
        code: String,
        message: String,
    },
    Canceled,
    /// Refund number `refund` of the payment went through.
    RefundSucceeded {
        refund: u32,
        provider_ref: String,
    },
    /// Refund number `refund` of the payment was refused by the provider; final.
    RefundFailed {
        refund: u32,
        code: String,
        message: String,
    },
}

impl WebhookOutcome {
    /// The refund the webhook is about, if any.
    pub fn refund(&self) -> Option<u32> {
        match self {
            WebhookOutcome::RefundSucceeded { refund, .. }
            | WebhookOutcome::RefundFailed { refund, .. } => Some(*refund),
            _ => None,
        }
    }
}

/// Externally tagged (serde's default): timers are stored with bincode, which cannot
/// read internally tagged enums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Start processing a NEW payment (the window in which a cancel needs no provider).
    Dispatch,
    /// Back-off of a failed charge attempt is over: charge attempt `attempt`.
    Retry { attempt: u32 },
    /// No (final) answer for attempt `attempt` in time: ask the provider for the status.
    /// `wait` names the wait the timer was set for; a timer of an older wait is stale.
    ProviderTimeout { attempt: u32, wait: u32 },
    /// Back-off of a failed attempt of refund `refund` is over: attempt `attempt`.
    RefundRetry { refund: u32, attempt: u32 },
    /// No (final) answer about refund `refund` in time: ask the provider for its status.
    RefundTimeout {
        refund: u32,
        attempt: u32,
        wait: u32,
    },
}

impl TimerKind {
    pub fn label(self) -> &'static str {
        match self {
            TimerKind::Dispatch => "dispatch",
            TimerKind::Retry { .. } => "retry",
            TimerKind::ProviderTimeout { .. } => "provider_timeout",
            TimerKind::RefundRetry { .. } => "refund_retry",
            TimerKind::RefundTimeout { .. } => "refund_timeout",
        }
    }

    /// The refund the timer is about, if any.
    pub fn refund(self) -> Option<u32> {
        match self {
            TimerKind::RefundRetry { refund, .. } | TimerKind::RefundTimeout { refund, .. } => {
                Some(refund)
            }
            _ => None,
        }
    }
}
