//! Events: facts about a payment, numbered by a gap-free per-payment `seq` starting at 1.

use crate::command::ProviderOp;
use crate::ids::{CommandId, IdempotencyKey, MerchantId, PaymentId, RefundId};
use crate::money::{Amount, Currency};
use crate::Status;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub payment_id: PaymentId,
    pub seq: u64,
    /// Time of the command that caused the event (deterministic on replay).
    pub occurred_at_ms: i64,
    pub caused_by: CommandId,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Created {
        merchant_id: MerchantId,
        amount: Amount,
        currency: Currency,
        idempotency_key: IdempotencyKey,
        request_hash: String,
        reference: Option<String>,
        description: Option<String>,
        traceparent: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        metadata: BTreeMap<String, String>,
    },
    ProcessingStarted,
    ChargeRequested {
        attempt: u32,
    },
    /// The provider accepted the charge and will report the outcome by webhook.
    ChargePending {
        attempt: u32,
        provider_ref: String,
    },
    RetryScheduled {
        attempt: u32,
        /// When the retry is planned, counted from the issue time of the command that
        /// scheduled it (events replay identically). The timer waits the same delay
        /// from when that command was processed, so behind a backlog it fires later.
        due_at_ms: i64,
        reason: String,
    },
    StatusCheckRequested {
        attempt: u32,
        check: u32,
        reason: String,
    },
    /// Status checks have gone unanswered for long: an operator should look.
    MarkedStuck {
        reason: String,
    },
    CancelRequested,
    CancelRefused {
        reason: String,
    },
    Completed {
        provider_ref: String,
    },
    Failed {
        code: String,
        message: String,
    },
    Canceled {
        reason: String,
    },
    /// Refund number `refund` (0, 1, ... in the order requested) is accepted and its
    /// first attempt goes to the provider. Its `amount` is reserved from then on.
    RefundRequested {
        refund: u32,
        refund_id: RefundId,
        amount: Amount,
        idempotency_key: IdempotencyKey,
        request_hash: String,
        reason: Option<String>,
    },
    /// A refund request that cannot be carried out (the payment is not completed, or
    /// the amount exceeds what is left to refund): recorded as a failed refund, with
    /// the reason, and never sent to the provider.
    RefundRefused {
        refund: u32,
        refund_id: RefundId,
        /// What was asked: the amount given, or what was left when none was given.
        amount: i64,
        idempotency_key: IdempotencyKey,
        request_hash: String,
        reason: Option<String>,
        code: String,
        message: String,
    },
    /// Another attempt of the refund goes to the provider (same provider key).
    RefundAttempted {
        refund: u32,
        attempt: u32,
    },
    /// The provider accepted the refund and will report the outcome by webhook.
    RefundPending {
        refund: u32,
        attempt: u32,
        provider_ref: String,
    },
    RefundRetryScheduled {
        refund: u32,
        attempt: u32,
        due_at_ms: i64,
        reason: String,
    },
    RefundStatusCheckRequested {
        refund: u32,
        attempt: u32,
        check: u32,
        reason: String,
    },
    RefundSucceeded {
        refund: u32,
        provider_ref: String,
    },
    RefundFailed {
        refund: u32,
        code: String,
        message: String,
    },
}

impl EventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Created { .. } => "created",
            EventBody::ProcessingStarted => "processing_started",
            EventBody::ChargeRequested { .. } => "charge_requested",
            EventBody::ChargePending { .. } => "charge_pending",
            EventBody::RetryScheduled { .. } => "retry_scheduled",
            EventBody::StatusCheckRequested { .. } => "status_check_requested",
            EventBody::MarkedStuck { .. } => "marked_stuck",
            EventBody::CancelRequested => "cancel_requested",
            EventBody::CancelRefused { .. } => "cancel_refused",
            EventBody::Completed { .. } => "completed",
            EventBody::Failed { .. } => "failed",
            EventBody::Canceled { .. } => "canceled",
            EventBody::RefundRequested { .. } => "refund_requested",
            EventBody::RefundRefused { .. } => "refund_refused",
            EventBody::RefundAttempted { .. } => "refund_attempted",
            EventBody::RefundPending { .. } => "refund_pending",
            EventBody::RefundRetryScheduled { .. } => "refund_retry_scheduled",
            EventBody::RefundStatusCheckRequested { .. } => "refund_status_check_requested",
            EventBody::RefundSucceeded { .. } => "refund_succeeded",
            EventBody::RefundFailed { .. } => "refund_failed",
        }
    }

    /// The status after this event, when the event changes it.
    pub fn new_status(&self) -> Option<Status> {
        match self {
            EventBody::Created { .. } => Some(Status::New),
            EventBody::ProcessingStarted => Some(Status::Processing),
            EventBody::Completed { .. } => Some(Status::Completed),
            EventBody::Failed { .. } => Some(Status::Failed),
            EventBody::Canceled { .. } => Some(Status::Canceled),
            _ => None,
        }
    }

    /// The refund the event is about, if any.
    pub fn refund(&self) -> Option<u32> {
        match self {
            EventBody::RefundRequested { refund, .. }
            | EventBody::RefundRefused { refund, .. }
            | EventBody::RefundAttempted { refund, .. }
            | EventBody::RefundPending { refund, .. }
            | EventBody::RefundRetryScheduled { refund, .. }
            | EventBody::RefundStatusCheckRequested { refund, .. }
            | EventBody::RefundSucceeded { refund, .. }
            | EventBody::RefundFailed { refund, .. } => Some(*refund),
            _ => None,
        }
    }

    /// The provider operation this event asks for, if any.
    pub fn provider_call(&self) -> Option<(ProviderOp, u32)> {
        match self {
            EventBody::ChargeRequested { attempt } => Some((ProviderOp::Charge, *attempt)),
            EventBody::StatusCheckRequested { attempt, .. } => Some((ProviderOp::Status, *attempt)),
            EventBody::RefundRequested { refund, .. } => {
                Some((ProviderOp::Refund { refund: *refund }, 1))
            }
            EventBody::RefundAttempted { refund, attempt } => {
                Some((ProviderOp::Refund { refund: *refund }, *attempt))
            }
            EventBody::RefundStatusCheckRequested {
                refund, attempt, ..
            } => Some((ProviderOp::RefundStatus { refund: *refund }, *attempt)),
            _ => None,
        }
    }
}
