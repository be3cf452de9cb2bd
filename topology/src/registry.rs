//! The one place where component types are registered: one line per type.
//!
//! Adding a processor type: write it as `processors/<name>.rs` (or a folder for a large
//! one) exporting its [`NodeSpec`], then add one line to [`PROCESSORS`]. Nothing else
//! changes. A sink is run by the engine itself: a sink type is a line in [`SINKS`] and
//! the [`SinkRuntime`] it configures, which the task's graph runs.

use crate::processor::{BuildContext, NodeSpec, RecordKind};
use crate::processors::{
    amount_limit, command_decoder, merchant_notifier, payment_state_machine, refund_state_machine,
};

/// Every processor type: its name in `config/topology.toml` and its spec.
pub const PROCESSORS: &[(&str, NodeSpec)] = &[
    ("amount_limit", amount_limit::SPEC),
    ("command_decoder", command_decoder::SPEC),
    ("merchant_notifier", merchant_notifier::SPEC),
    ("payment_state_machine", payment_state_machine::SPEC),
    ("refund_state_machine", refund_state_machine::SPEC),
];

/// Every sink type: its name and its spec.
pub const SINKS: &[(&str, SinkSpec)] = &[
    (
        "kafka",
        SinkSpec {
            accepts: &[
                RecordKind::Event,
                RecordKind::Command,
                RecordKind::DeadLetter,
                RecordKind::Notification,
            ],
            configure: configure_kafka_sink,
        },
    ),
    (
        "provider",
        SinkSpec {
            accepts: &[RecordKind::ProviderCall],
            configure: configure_provider_sink,
        },
    ),
];

pub fn processor(kind: &str) -> Option<NodeSpec> {
    PROCESSORS.iter().find(|(k, _)| *k == kind).map(|(_, s)| *s)
}

pub fn sink(kind: &str) -> Option<SinkSpec> {
    SINKS.iter().find(|(k, _)| *k == kind).map(|(_, s)| *s)
}

/// The names of the processor types, for the compiler's "known types".
pub fn processor_names() -> Vec<&'static str> {
    PROCESSORS.iter().map(|(k, _)| *k).collect()
}

/// The names of the sink types.
pub fn sink_names() -> Vec<&'static str> {
    SINKS.iter().map(|(k, _)| *k).collect()
}

/// What the compiler needs to know about a sink type.
#[derive(Debug, Clone, Copy)]
pub struct SinkSpec {
    /// Every kind the type can accept; a configured sink may narrow it.
    pub accepts: &'static [RecordKind],
    pub configure: fn(&BuildContext<'_>) -> Result<ConfiguredSink, Vec<String>>,
}

/// A sink as configured: what it accepts and how the engine runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredSink {
    pub accepts: &'static [RecordKind],
    pub runtime: SinkRuntime,
}

/// What a task does with a record that reaches a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkRuntime {
    /// Publish it to this topic (through the outbox).
    Kafka { topic: String },
    /// Call the provider with it (through the outbox).
    Provider,
}

impl SinkRuntime {
    /// The topic it publishes to, if it publishes to one.
    pub fn topic(&self) -> Option<String> {
        match self {
            SinkRuntime::Kafka { topic } => Some(topic.clone()),
            SinkRuntime::Provider => None,
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaSinkParams {
    topic: String,
    /// The one kind of record this sink publishes.
    records: PublishedKind,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum PublishedKind {
    Event,
    Command,
    DeadLetter,
    Notification,
}

/// A `kafka` sink accepts only the record kind named by `records`, so a topic never
/// receives records of another kind.
fn configure_kafka_sink(ctx: &BuildContext<'_>) -> Result<ConfiguredSink, Vec<String>> {
    let p: KafkaSinkParams = ctx.params()?;
    if p.topic.is_empty() {
        return Err(vec!["invalid params: topic must not be empty".to_owned()]);
    }
    Ok(ConfiguredSink {
        accepts: match p.records {
            PublishedKind::Event => &[RecordKind::Event],
            PublishedKind::Command => &[RecordKind::Command],
            PublishedKind::DeadLetter => &[RecordKind::DeadLetter],
            PublishedKind::Notification => &[RecordKind::Notification],
        },
        runtime: SinkRuntime::Kafka { topic: p.topic },
    })
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn configure_provider_sink(ctx: &BuildContext<'_>) -> Result<ConfiguredSink, Vec<String>> {
    let NoParams {} = ctx.params()?;
    Ok(ConfiguredSink {
        accepts: &[RecordKind::ProviderCall],
        runtime: SinkRuntime::Provider,
    })
}
