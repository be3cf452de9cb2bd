//! `command_decoder`: bytes from a source topic → [`payments::Command`].
//!
//! Anything it cannot decode becomes a [`DeadLetter`] with the reason; it never fails the
//! task, so a poison message cannot stop a partition.

use crate::metrics::METRICS;
use crate::processor::{
    dead_letter, BuildContext, Configured, Context, NodeSpec, ProcessError, Processor, Record,
    RecordKind,
};

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Raw],
    emits: &[RecordKind::Command, RecordKind::DeadLetter],
    store_roles: &[],
    configure,
};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Larger payloads are dead-lettered unread.
    #[serde(default = "default_max")]
    max_payload_bytes: usize,
}

fn default_max() -> usize {
    64 * 1024
}

fn configure(ctx: &BuildContext<'_>) -> Result<Configured, Vec<String>> {
    let Params { max_payload_bytes } = ctx.params()?;
    let id = ctx.id.to_owned();
    Ok(Configured::new(move || -> Box<dyn Processor> {
        Box::new(CommandDecoder {
            id: id.clone(),
            max_payload_bytes,
        })
    }))
}

struct CommandDecoder {
    id: String,
    max_payload_bytes: usize,
}

impl Processor for CommandDecoder {
    fn process(&mut self, ctx: &mut Context<'_>, record: Record) -> Result<(), ProcessError> {
        let Record::Raw(raw) = record else {
            return Err(ProcessError::UnexpectedRecord {
                processor: self.id.clone(),
                kind: record.kind().as_str(),
            });
        };
        let size = raw.payload.as_ref().map_or(0, Vec::len);
        let dead = |reason: &str, detail: String| {
            METRICS.dlq_messages.with_label_values(&[reason]).inc();
            tracing::warn!(topic = %raw.topic, partition = raw.partition, offset = raw.offset, reason, %detail, "dead-lettering input");
            Record::DeadLetter(dead_letter(&raw, &self.id, reason, detail, ctx.now_ms()))
        };
        let out = if size > self.max_payload_bytes {
            dead(
                "oversized",
                format!(
                    "payload of {size} bytes exceeds max_payload_bytes = {}",
                    self.max_payload_bytes
                ),
            )
        } else {
            match payments::wire::decode_command(raw.key.as_deref(), raw.payload.as_deref()) {
                Ok(cmd) => Record::Command(cmd),
                Err(e) => dead("undecodable", e.to_string()),
            }
        };
        ctx.forward(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::{testing, RawRecord};

    fn raw(payload: &[u8]) -> Record {
        Record::Raw(RawRecord {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: vec![],
            timestamp_ms: None,
        })
    }

    fn reason(out: &[Record]) -> String {
        match out {
            [Record::DeadLetter(d)] => d.reason.clone(),
            other => panic!("expected one dead letter, got {other:?}"),
        }
    }

    #[test]
    fn poison_and_oversized_inputs_become_dead_letters() {
        let node = testing::configure(&SPEC, "max_payload_bytes = 16").expect("valid params");
        let mut p = node.0.get();
        assert_eq!(
            reason(&testing::process(p.as_mut(), raw(b"not json"))),
            "undecodable"
        );
        assert_eq!(
            reason(&testing::process(p.as_mut(), raw(&[b'x'; 17]))),
            "oversized"
        );
        assert!(testing::configure(&SPEC, "max_payload_bytes = -1").is_err());
    }
}
