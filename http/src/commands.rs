//! The API's only write path: a command published to the commands topic. Nothing the
//! API does changes a payment's state in any other way.

use crate::error::ApiError;
use crate::request::Result;
use crate::ApiState;
use payments::Command;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::Instrument;

/// Where a published command landed: the commands topic's partition and offset, logged
/// with the request's outcome so an accepted command can be found in the topic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Published {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Publishes a command in a `produce` span (a child of the request's span) whose
/// context travels in the record's `traceparent` header.
pub(crate) async fn publish(state: &ApiState, cmd: &Command) -> Result<Published> {
    let span = tracing::info_span!(
        "kafka.produce",
        otel.name = %format_args!("{} publish", state.cfg.commands_topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.destination.name = %state.cfg.commands_topic,
        payment_id = %cmd.payment_id,
        command = cmd.body.kind(),
        trace_id = tracing::field::Empty,
    );
    let traceparent = telemetry::adopt(&span, telemetry::current().as_deref(), &[]);
    let payload = payments::wire::encode_command(cmd);
    let key = cmd.payment_id.to_string();
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some(payments::wire::COMMAND_CONTENT_TYPE),
    });
    if let Some(tp) = &traceparent {
        headers = headers.insert(Header {
            key: "traceparent",
            value: Some(tp.as_str()),
        });
    }
    let record = FutureRecord::to(&state.cfg.commands_topic)
        .key(&key)
        .payload(&payload)
        .headers(headers);
    match tokio::time::timeout(
        state.cfg.publish_timeout,
        state.producer.send(record, state.cfg.publish_timeout),
    )
    .instrument(span)
    .await
    {
        // No offset: librdkafka's idempotent producer took the record as delivered
        // because the broker acknowledged a later one ("implicit acknowledgement"). A
        // broker that checks idempotent sequences wrote it; one that does not may not
        // have. The client is asked to send it again: a duplicate command is harmless.
        Ok(Ok(d)) if d.offset < 0 => {
            tracing::warn!(payment_id = %cmd.payment_id, partition = d.partition, "command delivery not confirmed with an offset");
            Err(ApiError::unavailable(
                "the request could not be confirmed as queued; retry with the same Idempotency-Key",
            ))
        }
        Ok(Ok(d)) => Ok(Published {
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Err((e, _))) => {
            tracing::warn!(payment_id = %cmd.payment_id, error = %e, "command not published");
            Err(ApiError::unavailable(
                "the payment could not be queued; retry with the same Idempotency-Key",
            ))
        }
        Err(_) => {
            tracing::warn!(payment_id = %cmd.payment_id, "command publish timed out");
            Err(ApiError::unavailable(
                "the payment could not be queued in time; retry with the same Idempotency-Key",
            ))
        }
    }
}
