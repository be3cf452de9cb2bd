//! The task's outbox: what a committed batch must publish (Kafka records and provider
//! calls), kept in the store until it is published, as at most two records per batch.

use crate::processor::{ProviderCall, Record};
use serde::{Deserialize, Serialize};

/// A record the task must publish once its batch is durable.
///
/// The key and payload are (de)serialized as bytes: bincode writes them exactly as a
/// sequence of `u8` (a length, then the bytes), so stored entries read the same either
/// way, and they decode in one copy instead of byte by byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OutboxEntry {
    Kafka {
        topic: String,
        #[serde(with = "serde_bytes")]
        key: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    },
    Provider(ProviderCall),
}

/// The most one outbox record holds, about: a quarter of Kafka's default message size
/// limit, as every outbox record is a changelog message.
pub(super) const OUTBOX_RECORD_MAX_BYTES: usize = 256 * 1024;

impl OutboxEntry {
    /// About how many bytes the entry takes in an outbox record (never less).
    pub(super) fn approx_len(&self) -> usize {
        match self {
            OutboxEntry::Kafka {
                topic,
                key,
                payload,
                headers,
            } => {
                32 + topic.len()
                    + key.as_ref().map_or(0, Vec::len)
                    + payload.len()
                    + headers
                        .iter()
                        .map(|(k, v)| 16 + k.len() + v.len())
                        .sum::<usize>()
            }
            OutboxEntry::Provider(c) => {
                256 + c.request_key.len()
                    + c.idempotency_key.len()
                    + c.currency.len()
                    + c.traceparent.as_ref().map_or(0, String::len)
            }
        }
    }
}

/// `entries` in order, cut into lists of at most `max_bytes` each (an entry larger than
/// that alone in its list); none empty.
pub(super) fn chunks(entries: Vec<OutboxEntry>, max_bytes: usize) -> Vec<Vec<OutboxEntry>> {
    let mut out: Vec<Vec<OutboxEntry>> = Vec::new();
    let mut size = 0;
    for e in entries {
        let len = e.approx_len();
        match out.last_mut() {
            Some(last) if size + len <= max_bytes => {
                size += len;
                last.push(e);
            }
            _ => {
                size = len;
                out.push(vec![e]);
            }
        }
    }
    out
}

/// Length of the key of an outbox record that holds a list of entries: the outbox
/// sequence number and a `b` (records of one entry have 8-byte keys).
pub(super) const OUTBOX_BATCH_KEY_LEN: usize = 9;

pub(super) fn outbox_batch_key(seq: u64) -> [u8; OUTBOX_BATCH_KEY_LEN] {
    let mut k = [b'b'; OUTBOX_BATCH_KEY_LEN];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The Kafka record for `record`; `trace` (the step's trace context) goes in its
/// `traceparent` header unless the record names its own.
pub(super) fn kafka_entry(topic: &str, record: Record, trace: Option<String>) -> OutboxEntry {
    let (key, payload, content_type, own_trace) = match record {
        Record::Event(e) => (
            Some(e.payment_id.to_string().into_bytes()),
            payments::wire::encode_event(&e),
            payments::wire::EVENT_CONTENT_TYPE,
            None,
        ),
        Record::Command(c) => (
            Some(c.payment_id.to_string().into_bytes()),
            payments::wire::encode_command(&c),
            payments::wire::COMMAND_CONTENT_TYPE,
            None,
        ),
        Record::DeadLetter(d) => (
            d.key.clone().map(String::into_bytes),
            serde_json::to_vec(&d).unwrap_or_default(),
            payments::wire::DEAD_LETTER_CONTENT_TYPE,
            None,
        ),
        Record::Notification(n) => (
            Some(n.payment_id.to_string().into_bytes()),
            serde_json::to_vec(&n).unwrap_or_default(),
            payments::notify::NOTIFICATION_CONTENT_TYPE,
            None,
        ),
        Record::Raw(r) => (
            r.key,
            r.payload.unwrap_or_default(),
            "application/octet-stream",
            None::<String>,
        ),
        Record::ProviderCall(c) => (
            Some(c.payment_id.to_string().into_bytes()),
            serde_json::to_vec(&c).unwrap_or_default(),
            "application/vnd.gateway.provider-call.v1+json",
            c.traceparent.clone(),
        ),
    };
    let mut headers = vec![("content-type".to_owned(), content_type.as_bytes().to_vec())];
    if let Some(tp) = own_trace.or(trace) {
        headers.push(("traceparent".to_owned(), tp.into_bytes()));
    }
    OutboxEntry::Kafka {
        topic: topic.to_owned(),
        key,
        payload,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry as earlier versions declared it (byte fields as sequences of `u8`).
    #[derive(Debug, Serialize, Deserialize)]
    enum SequenceEncoded {
        Kafka {
            topic: String,
            key: Option<Vec<u8>>,
            payload: Vec<u8>,
            headers: Vec<(String, Vec<u8>)>,
        },
        #[allow(dead_code)]
        Provider(ProviderCall),
    }

    #[test]
    fn stored_entries_read_the_same_as_bytes_and_as_sequences() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for key in [None, Some(Vec::new()), Some(b"pay_01J7".to_vec())] {
            let old = SequenceEncoded::Kafka {
                topic: "payments.events".into(),
                key: key.clone(),
                payload: payload.clone(),
                headers: vec![("traceparent".into(), b"00-ab-cd-01".to_vec())],
            };
            let new = vec![OutboxEntry::Kafka {
                topic: "payments.events".into(),
                key: key.clone(),
                payload: payload.clone(),
                headers: vec![("traceparent".into(), b"00-ab-cd-01".to_vec())],
            }];
            let old_bytes = stores::encode(&vec![old]);
            assert_eq!(stores::encode(&new), old_bytes, "key {key:?}");
            let read: Vec<OutboxEntry> = stores::decode("__outbox", &old_bytes).expect("decodes");
            match &read[..] {
                [OutboxEntry::Kafka {
                    key: k, payload: p, ..
                }] => assert_eq!((k, p), (&key, &payload)),
                other => panic!("read back as {other:?}"),
            }
        }
    }
}
