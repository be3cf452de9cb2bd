//! `/v1/callbacks/{provider}`: a provider's signed webhook (Standard Webhooks), verified
//! on the raw body and published as a command.

use crate::commands::publish;
use crate::error::{ApiError, ErrorCode};
use crate::request::{command_id, now_ms, Result};
use crate::ApiState;
use bytes::Bytes;
use payments::{Command, CommandBody, PaymentId, WebhookOutcome};
use serde::Deserialize;
use std::sync::Arc;
use warp::reply::Response;
use warp::Reply;

/// Provider-supplied text, bounded and without control characters, before it enters
/// an event.
fn clean(s: Option<String>, max: usize) -> Option<String> {
    s.map(|s| payments::external_text(&s, max))
}

#[derive(Debug, Deserialize)]
struct WebhookBody {
    #[serde(rename = "type")]
    kind: String,
    data: WebhookData,
}

#[derive(Debug, Deserialize)]
struct WebhookData {
    reference: String,
    #[serde(default)]
    charge_id: Option<String>,
    /// Refund webhooks: the provider's refund id, and our key of the refund, which
    /// names its payment and number.
    #[serde(default)]
    refund_id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

pub struct WebhookHeaders {
    pub id: Option<String>,
    pub timestamp: Option<String>,
    pub signature: Option<String>,
}

/// `POST /v1/callbacks/{provider}`: verifies the signature on the raw body, then turns
/// the webhook into a command. Deduplicated by `webhook-id` (the command id).
pub async fn callback(
    state: Arc<ApiState>,
    provider: String,
    h: WebhookHeaders,
    body: Result<Bytes>,
) -> Result<Response> {
    let body = body?;
    let secrets = state.cfg.webhook_secrets.get(&provider).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownProvider,
            format!("no provider named {provider:?}"),
        )
    })?;
    let now = now_ms() / 1000;
    payments::webhook::verify(
        secrets,
        h.id.as_deref(),
        h.timestamp.as_deref(),
        h.signature.as_deref(),
        &body,
        now,
    )
    .map_err(|e| {
        tracing::warn!(%provider, error = %e, "webhook refused");
        ApiError::new(ErrorCode::InvalidSignature, e.to_string())
    })?;
    let webhook_id = h.id.unwrap_or_default();
    if webhook_id.len() > 100 || !webhook_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            ErrorCode::InvalidWebhook,
            "webhook-id must be at most 100 printable characters",
        ));
    }
    let parsed: WebhookBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidWebhook, format!("webhook body: {e}")))?;
    let payment_id = PaymentId::parse(&parsed.data.reference).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidWebhook,
            "data.reference is not a payment id",
        )
    })?;
    let refund = || -> Result<u32> {
        let named = parsed
            .data
            .idempotency_key
            .as_deref()
            .and_then(payments::parse_provider_refund_key);
        match named {
            Some((p, n)) if p == payment_id => Ok(n),
            _ => Err(ApiError::new(
                ErrorCode::InvalidWebhook,
                "data.idempotency_key does not name a refund of the payment in data.reference",
            )),
        }
    };
    let outcome = match parsed.kind.as_str() {
        "refund.succeeded" => WebhookOutcome::RefundSucceeded {
            refund: refund()?,
            provider_ref: clean(parsed.data.refund_id.clone(), 128).unwrap_or_default(),
        },
        "refund.failed" => WebhookOutcome::RefundFailed {
            refund: refund()?,
            code: clean(parsed.data.code.clone(), 64).unwrap_or_else(|| "refund_failed".into()),
            message: clean(parsed.data.message.clone(), 512).unwrap_or_default(),
        },
        "charge.succeeded" => WebhookOutcome::Succeeded {
            provider_ref: clean(parsed.data.charge_id, 128).unwrap_or_default(),
        },
        "charge.failed" => WebhookOutcome::Failed {
            code: clean(parsed.data.code, 64).unwrap_or_else(|| "declined".into()),
            message: clean(parsed.data.message, 512).unwrap_or_default(),
        },
        "charge.canceled" => WebhookOutcome::Canceled,
        other => {
            // Acknowledge event types we do not act on, so the provider stops resending.
            tracing::info!(%provider, kind = other, "webhook type ignored");
            return Ok(warp::http::StatusCode::NO_CONTENT.into_response());
        }
    };
    let cmd = Command {
        command_id: command_id(&format!("webhook:{provider}:{webhook_id}"))?,
        payment_id,
        issued_at_ms: now_ms(),
        body: CommandBody::Webhook {
            webhook_id,
            outcome,
        },
    };
    publish(&state, &cmd).await?;
    Ok(warp::http::StatusCode::NO_CONTENT.into_response())
}
