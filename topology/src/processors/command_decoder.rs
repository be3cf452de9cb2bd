//! `command_decoder`: bytes from a source topic → [`payments::Command`].
//!
//! Anything it cannot decode becomes a [`DeadLetter`] with the reason; it never fails the
//! task, so a poison message cannot stop a partition.

use crate::config::{CompiledNode, StoreDecl};
use crate::metrics::METRICS;
use crate::processor::{dead_letter, Context, ProcessError, Processor, Record, RecordKind};
use crate::registry::{check_params, no_wiring_rules, parse_params, NodeSpec};
use std::collections::BTreeMap;

pub const SPEC: NodeSpec = NodeSpec {
    accepts: &[RecordKind::Raw],
    emits: &[RecordKind::Command, RecordKind::DeadLetter],
    store_roles: &[],
    check_params: check_params::<Params>,
    check_wiring: no_wiring_rules,
    build: Some(build),
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

struct CommandDecoder {
    id: String,
    max_payload_bytes: usize,
}

fn build(
    node: &CompiledNode,
    _: &BTreeMap<String, StoreDecl>,
) -> anyhow::Result<Box<dyn Processor>> {
    let params: Params = parse_params(
        &node
            .decl
            .as_ref()
            .map(|d| d.params.clone())
            .unwrap_or(toml::Value::Table(Default::default())),
    )?;
    Ok(Box::new(CommandDecoder {
        id: node.id.clone(),
        max_payload_bytes: params.max_payload_bytes,
    }))
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
