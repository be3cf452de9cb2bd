//! Encoding of commands and events on Kafka topics.
//!
//! Topics are a contract read by other services and by operators with `kcat`, so they
//! carry JSON; the schema version travels in the `content-type` header. The partition
//! key of every record is the payment id, which keeps one payment in one partition.

use crate::command::Command;
use crate::event::Event;
use serde::{Deserialize, Serialize};

/// Value of the `content-type` header of command records.
pub const COMMAND_CONTENT_TYPE: &str = "application/vnd.gateway.command.v1+json";
/// Value of the `content-type` header of event records.
pub const EVENT_CONTENT_TYPE: &str = "application/vnd.gateway.event.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no payload")]
    Empty,
    #[error("payload is not a valid {what}: {source}")]
    Invalid {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("record key {key:?} does not match payment id {payment_id}")]
    KeyMismatch { key: String, payment_id: String },
}

/// An input that could not be processed, with the reason: the value of a DLQ record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Stable machine-readable reason, e.g. `undecodable`, `invalid_command`.
    pub reason: String,
    pub detail: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub processor: String,
    /// Original key and payload, lossily decoded as UTF-8 for reading.
    pub key: Option<String>,
    pub payload: Option<String>,
    pub failed_at_ms: i64,
}

/// Value of the `content-type` header of dead-letter records.
pub const DEAD_LETTER_CONTENT_TYPE: &str = "application/vnd.gateway.dead-letter.v1+json";

pub fn encode_command(c: &Command) -> Vec<u8> {
    // Serialising plain data with string keys cannot fail.
    serde_json::to_vec(c).unwrap_or_default()
}

pub fn encode_event(e: &Event) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

/// Decodes a command and checks that the record key names the same payment.
pub fn decode_command(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Command, DecodeError> {
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(DecodeError::Empty)?;
    let cmd: Command = serde_json::from_slice(payload).map_err(|source| DecodeError::Invalid {
        what: "command",
        source,
    })?;
    check_key(key, &cmd.payment_id.to_string())?;
    Ok(cmd)
}

pub fn decode_event(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Event, DecodeError> {
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(DecodeError::Empty)?;
    let ev: Event = serde_json::from_slice(payload).map_err(|source| DecodeError::Invalid {
        what: "event",
        source,
    })?;
    check_key(key, &ev.payment_id.to_string())?;
    Ok(ev)
}

fn check_key(key: Option<&[u8]>, payment_id: &str) -> Result<(), DecodeError> {
    match key {
        Some(k) if k == payment_id.as_bytes() => Ok(()),
        other => Err(DecodeError::KeyMismatch {
            key: String::from_utf8_lossy(other.unwrap_or_default()).into_owned(),
            payment_id: payment_id.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandBody;
    use crate::ids::{CommandId, PaymentId};

    #[test]
    fn round_trip_and_key_check() {
        let pid = PaymentId::from_uuid(uuid::Uuid::from_u128(7));
        let c = Command {
            command_id: CommandId::parse("x").unwrap(),
            payment_id: pid,
            issued_at_ms: 5,
            body: CommandBody::Cancel {
                merchant_id: crate::MerchantId::parse("m").unwrap(),
            },
        };
        let bytes = encode_command(&c);
        let key = pid.to_string();
        assert_eq!(
            decode_command(Some(key.as_bytes()), Some(&bytes)).unwrap(),
            c
        );
        assert!(matches!(
            decode_command(Some(b"other"), Some(&bytes)),
            Err(DecodeError::KeyMismatch { .. })
        ));
        assert!(matches!(
            decode_command(Some(key.as_bytes()), Some(b"{")),
            Err(DecodeError::Invalid { .. })
        ));
        assert!(matches!(
            decode_command(None, None),
            Err(DecodeError::Empty)
        ));
    }
}
