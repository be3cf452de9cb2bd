//! Events: facts about a payment, numbered by a gap-free per-payment `seq` starting at 1.

use crate::command::ProviderOp;
use crate::ids::{CommandId, IdempotencyKey, MerchantId, PaymentId};
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

    /// The provider operation this event asks for, if any.
    pub fn provider_call(&self) -> Option<(ProviderOp, u32)> {
        match self {
            EventBody::ChargeRequested { attempt } => Some((ProviderOp::Charge, *attempt)),
            EventBody::StatusCheckRequested { attempt, .. } => Some((ProviderOp::Status, *attempt)),
            _ => None,
        }
    }
}
