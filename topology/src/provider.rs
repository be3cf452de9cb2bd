//! Calls to the payment provider, and the dispatcher that turns their outcomes into
//! commands.
//!
//! A call never blocks its task: the dispatcher runs it on its own tokio task and
//! publishes the outcome as a `provider_reply` command keyed by the payment, so the
//! answer is applied in order with everything else about that payment. Every call about
//! a payment carries the same idempotency key (see [`payments::provider_idempotency_key`]),
//! so a repeated or retried call can never charge twice.

use crate::metrics::METRICS;
use crate::processor::ProviderCall;
use payments::retry::Backoff;
use payments::{Command, CommandBody, CommandId, ProviderOp, ProviderOutcome};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::now_ms;
use tokio::sync::Semaphore;
use tracing::Instrument;

#[derive(Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
    base_url: String,
}

/// The provider's answer body.
#[derive(Debug, Deserialize)]
struct ChargeBody {
    status: String,
    #[serde(default)]
    charge_id: Option<String>,
    /// Set instead of `charge_id` in answers about refunds.
    #[serde(default)]
    refund_id: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl ProviderClient {
    pub fn new(base_url: &str, request_timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(2)))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(ProviderClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// Makes the call and classifies the result. Never fails: errors are outcomes.
    pub async fn call(&self, call: &ProviderCall) -> ProviderOutcome {
        let key = &call.idempotency_key;
        let req = match call.op {
            ProviderOp::Charge => self
                .http
                .post(format!("{}/v1/charges", self.base_url))
                .json(&serde_json::json!({
                    "idempotency_key": key,
                    "amount": call.amount,
                    "currency": call.currency,
                    "reference": call.payment_id.to_string(),
                })),
            ProviderOp::Status => self.http.get(format!("{}/v1/charges/{key}", self.base_url)),
            ProviderOp::Cancel => self
                .http
                .post(format!("{}/v1/charges/{key}/cancel", self.base_url)),
            ProviderOp::Refund { refund } => self
                .http
                .post(format!("{}/v1/refunds", self.base_url))
                .json(&serde_json::json!({
                    "idempotency_key": key,
                    "charge_key": payments::provider_idempotency_key(&call.payment_id),
                    "amount": call.amount,
                    "currency": call.currency,
                    "reference": call.payment_id.to_string(),
                    "refund": refund,
                })),
            ProviderOp::RefundStatus { .. } => {
                self.http.get(format!("{}/v1/refunds/{key}", self.base_url))
            }
        };
        let mut req = req.header("Idempotency-Key", key.as_str());
        if let Some(tp) = &call.traceparent {
            req = req.header("traceparent", tp.as_str());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return ProviderOutcome::Transient {
                    error: format!("connect: {e}"),
                }
            }
            Err(e) if e.is_timeout() => {
                return ProviderOutcome::Ambiguous {
                    error: "request timed out".into(),
                }
            }
            Err(e) => {
                return ProviderOutcome::Ambiguous {
                    error: e.to_string(),
                }
            }
        };
        let status = resp.status();
        if status.is_server_error() {
            return ProviderOutcome::Transient {
                error: format!("provider answered {status}"),
            };
        }
        let status_check = matches!(
            call.op,
            ProviderOp::Status | ProviderOp::RefundStatus { .. }
        );
        if status == reqwest::StatusCode::NOT_FOUND && status_check {
            return ProviderOutcome::NotFound;
        }
        let body: ChargeBody = match resp.json().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => {
                return ProviderOutcome::Ambiguous {
                    error: "response body timed out".into(),
                }
            }
            Err(e) => {
                return if status.is_client_error() {
                    ProviderOutcome::Declined {
                        code: "provider_rejected".into(),
                        message: format!("provider answered {status}"),
                    }
                } else {
                    ProviderOutcome::Ambiguous {
                        error: format!("unreadable provider answer ({status}): {e}"),
                    }
                }
            }
        };
        let text = |s: Option<String>, max| s.map(|s| payments::external_text(&s, max));
        let body = ChargeBody {
            status: payments::external_text(&body.status, 32),
            charge_id: text(body.charge_id.or(body.refund_id), 128),
            refund_id: None,
            code: text(body.code, 64),
            message: text(body.message, 512),
        };
        let charge_id = body.charge_id.clone().unwrap_or_default();
        match (call.op, body.status.as_str()) {
            (ProviderOp::Cancel, "canceled") => ProviderOutcome::Canceled,
            (ProviderOp::Cancel, other) => ProviderOutcome::CancelRefused {
                reason: body.message.unwrap_or_else(|| format!("charge is {other}")),
            },
            (_, "succeeded") => ProviderOutcome::Approved {
                provider_ref: charge_id,
            },
            (_, "pending") => ProviderOutcome::Pending {
                provider_ref: charge_id,
            },
            (_, "canceled") => ProviderOutcome::Canceled,
            (_, "declined" | "failed") => ProviderOutcome::Declined {
                code: body.code.unwrap_or_else(|| "declined".into()),
                message: body.message.unwrap_or_default(),
            },
            (_, other) if status.is_client_error() => ProviderOutcome::Declined {
                code: body.code.unwrap_or_else(|| "provider_rejected".into()),
                message: body
                    .message
                    .unwrap_or_else(|| format!("provider answered {status} ({other})")),
            },
            (_, other) => ProviderOutcome::Ambiguous {
                error: format!("unknown provider status {other:?}"),
            },
        }
    }
}

/// Runs provider calls concurrently (bounded) and publishes their outcomes as commands.
#[derive(Clone)]
pub struct Dispatcher {
    client: ProviderClient,
    producer: FutureProducer,
    commands_topic: Arc<str>,
    inflight: Arc<Semaphore>,
}

impl Dispatcher {
    pub fn new(
        client: ProviderClient,
        producer: FutureProducer,
        commands_topic: &str,
        max_inflight: usize,
    ) -> Self {
        Dispatcher {
            client,
            producer,
            commands_topic: commands_topic.into(),
            inflight: Arc::new(Semaphore::new(max_inflight)),
        }
    }

    /// Makes the call in a `provider.call` span (a child of the step that decided it);
    /// the request and the reply command carry that span's `traceparent`. Waits for a
    /// free slot first: a provider slower than the commands stalls the partitions that
    /// call it (their backlog stays in Kafka) instead of queueing calls in memory.
    pub async fn dispatch(&self, mut call: ProviderCall) {
        let Ok(permit) = self.inflight.clone().acquire_owned().await else {
            return;
        };
        let this = self.clone();
        let span = tracing::info_span!(
            "provider.call",
            otel.name = %format_args!("provider {}", call.op.as_str()),
            otel.kind = "client",
            payment_id = %call.payment_id,
            op = call.op.as_str(),
            attempt = call.attempt,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(tp) = telemetry::adopt(&span, call.traceparent.as_deref(), &[]) {
            call.traceparent = Some(tp);
        }
        let task_span = span.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let outcome = this.client.call(&call).await;
            span.record("outcome", outcome.label());
            let labels = [call.op.as_str(), outcome.label()];
            METRICS.provider_requests.with_label_values(&labels).inc();
            METRICS
                .provider_seconds
                .with_label_values(&labels)
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(payment_id = %call.payment_id, op = call.op.as_str(), attempt = call.attempt, outcome = outcome.label(), "provider call");
            this.publish_reply(&call, outcome).await;
        }.instrument(task_span));
    }

    async fn publish_reply(&self, call: &ProviderCall, outcome: ProviderOutcome) {
        let id = format!("reply:{}:{}", call.payment_id, call.request_key);
        let Ok(command_id) = CommandId::parse(&id) else {
            tracing::error!(%id, "reply command id is not valid; the provider timeout will recover");
            return;
        };
        let cmd = Command {
            command_id,
            payment_id: call.payment_id,
            issued_at_ms: now_ms(),
            body: CommandBody::ProviderReply {
                op: call.op,
                attempt: call.attempt,
                outcome,
            },
        };
        let payload = payments::wire::encode_command(&cmd);
        let key = call.payment_id.to_string();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        for attempt in 1..=8 {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(payments::wire::COMMAND_CONTENT_TYPE),
            });
            if let Some(tp) = &call.traceparent {
                headers = headers.insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                });
            }
            let record = FutureRecord::to(&self.commands_topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            let e = match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(d) if !crate::runtime::unconfirmed(&d) => return,
                Ok(_) => crate::runtime::NO_OFFSET.to_owned(),
                Err((e, _)) => e.to_string(),
            };
            METRICS.errors.with_label_values(&["reply_publish"]).inc();
            tracing::warn!(payment_id = %call.payment_id, attempt, error = %e, "publishing provider reply failed; retrying");
            tokio::time::sleep(backoff.next_delay()).await;
        }
        tracing::error!(payment_id = %call.payment_id, "provider reply not published; the provider timeout will ask for the status");
    }
}
