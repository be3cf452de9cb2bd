//! `config/topology.toml`: the declared graph, and its compiler.
//!
//! The compiler checks the whole file before anything runs and reports **every** error,
//! each naming its component: unknown types (with the known ones), inputs that match no
//! component, cycles, missing stores, invalid parameters, and records that would have
//! nowhere to go. The passes are in [`compile`].

mod compile;

pub use crate::processor::StoreKind;
pub use crate::span::Span;
pub use compile::compile;

use crate::processor::{Configured, RecordKind};
use crate::registry::SinkRuntime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingGuarantee {
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub application_id: String,
    #[serde(default = "default_guarantee")]
    pub processing_guarantee: ProcessingGuarantee,
    #[serde(default)]
    pub stores: BTreeMap<String, StoreDecl>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceDecl>,
    #[serde(default)]
    pub processors: BTreeMap<String, ComponentDecl>,
    #[serde(default)]
    pub sinks: BTreeMap<String, ComponentDecl>,
}

fn default_guarantee() -> ProcessingGuarantee {
    ProcessingGuarantee::AtLeastOnce
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDecl {
    #[serde(rename = "type")]
    pub kind: StoreKind,
    /// Dedup stores: how long an id is at least remembered (at most one and a half
    /// times that: records go by time segments of half the retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_hours: Option<u64>,
    /// Dedup stores: the same as `retention_hours`, with a unit (`"30m"`, `"7d"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Span>,
    /// Key-value stores that hold payments: how long a finished payment stays after it
    /// became terminal (default [`DEFAULT_STATE_RETENTION`]). Then a step of its
    /// partition deletes it, which reaches the changelog as a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_retention: Option<Span>,
}

impl StoreDecl {
    /// A dedup store's retention, however it is written.
    pub fn dedup_retention(&self) -> Option<Span> {
        self.retention.or_else(|| {
            self.retention_hours
                .and_then(|h| i64::try_from(h).ok())
                .and_then(|h| h.checked_mul(3_600_000))
                .map(Span::from_ms)
        })
    }
}

/// The shipped retention of finished payments: longer than Kafka's default topic
/// retention (7 days) for the commands, and than a provider's webhook retries (3 days).
pub const DEFAULT_STATE_RETENTION: Span = Span::days(8);
/// The retention a source topic is assumed to have when it does not say (Kafka's
/// `log.retention.hours` default).
pub const DEFAULT_SOURCE_RETENTION: Span = Span::days(7);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceDecl {
    pub topic: String,
    /// How long the topic keeps records (its `retention.ms`; default
    /// [`DEFAULT_SOURCE_RETENTION`]): what may still be redelivered or replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Span>,
}

impl SourceDecl {
    pub fn retention(&self) -> Span {
        self.retention.unwrap_or(DEFAULT_SOURCE_RETENTION)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentDecl {
    #[serde(rename = "type")]
    pub kind: String,
    pub inputs: Vec<String>,
    /// Store roles the type needs, mapped to declared store names.
    #[serde(default)]
    pub stores: BTreeMap<String, String>,
    #[serde(default = "empty_table")]
    pub params: toml::Value,
}

fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

/// One problem found while compiling, naming the component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub component: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.component, self.message)
    }
}

/// All errors of one compilation.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        let plural = if n == 1 { "" } else { "s" };
        writeln!(f, "topology is invalid ({n} error{plural}):")?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Processor,
    Sink,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Processor => "processor",
            Role::Sink => "sink",
        }
    }
}

/// A node after compilation, in topological order.
#[derive(Debug, Clone)]
pub struct CompiledNode {
    pub id: String,
    pub role: Role,
    pub kind: String,
    pub accepts: &'static [RecordKind],
    pub emits: &'static [RecordKind],
    /// As declared (for describing the graph).
    pub inputs: Vec<String>,
    pub stores: BTreeMap<String, String>,
    /// As declared (valid: the node compiled).
    pub params: toml::Value,
    /// The source's topic, or the topic a `kafka` sink publishes to.
    pub topic: Option<String>,
    /// What a task instantiates for this node.
    pub runtime: NodeRuntimeSpec,
    /// Indices of downstream nodes.
    pub downstream: Vec<usize>,
}

/// What each task builds for a node.
#[derive(Debug, Clone)]
pub enum NodeRuntimeSpec {
    Source,
    Processor(Configured),
    Sink(SinkRuntime),
}

#[derive(Debug, Clone)]
pub struct CompiledTopology {
    pub application_id: String,
    pub processing_guarantee: ProcessingGuarantee,
    pub stores: BTreeMap<String, StoreDecl>,
    pub nodes: Vec<CompiledNode>,
}

impl CompiledTopology {
    /// The compacted topic that holds the changelog of the stores of `source`'s tasks
    /// (partition `p` of the source ↔ partition `p` of the changelog).
    pub fn changelog_topic(&self, source: &str) -> String {
        format!("{}-{source}-changelog", self.application_id)
    }

    pub fn source_topics(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|n| n.topic.clone().filter(|_| n.role == Role::Source))
            .collect()
    }

    /// How long after a payment completed a refund of it may still start, if the graph
    /// has a refund processor (see [`crate::processors::refund_state_machine::window`]).
    pub fn refund_window(&self) -> Option<Span> {
        crate::processors::refund_state_machine::window(self)
    }

    /// The topic merchant notifications are published to, if the graph makes them.
    pub fn notifications_topic(&self) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.role == Role::Sink && n.accepts.contains(&RecordKind::Notification))
            .and_then(|n| n.topic.clone())
    }

    /// Whether a processor of type `kind` is part of the graph.
    pub fn has_processor_type(&self, kind: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.role == Role::Processor && n.kind == kind)
    }

    /// The graph as JSON, one entry per component: `GET /topology` and `gateway topology`.
    pub fn describe(&self) -> serde_json::Value {
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id,
                    "role": n.role.as_str(),
                    "type": n.kind,
                    "topic": n.topic,
                    "inputs": n.inputs,
                    "stores": n.stores,
                    "downstream": n.downstream.iter().map(|i| self.nodes[*i].id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "application_id": self.application_id,
            "processing_guarantee": format!("{:?}", self.processing_guarantee),
            "stores": self.stores.keys().collect::<Vec<_>>(),
            "nodes": nodes,
        })
    }
}

/// Parses and compiles a topology file's text.
pub fn compile_str(text: &str) -> Result<CompiledTopology, ConfigErrors> {
    let file: TopologyFile = toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            component: "topology.toml".into(),
            message: e.to_string(),
        }])
    })?;
    compile(file)
}

#[cfg(test)]
mod tests;
