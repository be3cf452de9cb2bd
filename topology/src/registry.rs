//! The one place where component types are registered.
//!
//! Adding a processor type: write it under `processors/<name>/`, then add one arm to
//! [`processor_spec`] and its name to [`PROCESSOR_TYPES`]. Nothing else changes.

use crate::config::{CompiledNode, ComponentDecl, StoreDecl, TopologyFile};
use crate::processor::{Processor, RecordKind};
use crate::processors::{amount_limit, command_decoder, payment_state_machine};
use std::collections::BTreeMap;

/// Builds one processor instance for a task from its compiled node and the declared stores.
pub type Builder =
    fn(&CompiledNode, &BTreeMap<String, StoreDecl>) -> anyhow::Result<Box<dyn Processor>>;

/// What the compiler needs to know about a component type.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    pub accepts: &'static [RecordKind],
    pub emits: &'static [RecordKind],
    pub store_roles: &'static [&'static str],
    /// Every problem with the `params` table (unknown keys, wrong types, bad values).
    pub check_params: fn(&toml::Value) -> Vec<String>,
    /// Every problem with how the component fits the rest of the file (a rule between
    /// its params, its stores and its sources), each a sentence naming what to change.
    pub check_wiring: fn(&ComponentDecl, &TopologyFile) -> Vec<String>,
    /// Builds one instance for a task; `None` for sources and sinks (run by the engine).
    pub build: Option<Builder>,
}

pub const PROCESSOR_TYPES: &[&str] = &["amount_limit", "command_decoder", "payment_state_machine"];
pub const SINK_TYPES: &[&str] = &["kafka", "provider"];

pub fn processor_spec(kind: &str) -> Option<NodeSpec> {
    Some(match kind {
        "command_decoder" => command_decoder::SPEC,
        "amount_limit" => amount_limit::SPEC,
        "payment_state_machine" => payment_state_machine::SPEC,
        _ => return None,
    })
}

pub fn sink_spec(kind: &str) -> Option<NodeSpec> {
    Some(match kind {
        "kafka" => NodeSpec {
            accepts: &[
                RecordKind::Event,
                RecordKind::Command,
                RecordKind::DeadLetter,
            ],
            emits: &[],
            store_roles: &[],
            check_params: check_params::<KafkaSinkParams>,
            check_wiring: no_wiring_rules,
            build: None,
        },
        "provider" => NodeSpec {
            accepts: &[RecordKind::ProviderCall],
            emits: &[],
            store_roles: &[],
            check_params: check_params::<NoParams>,
            check_wiring: no_wiring_rules,
            build: None,
        },
        _ => return None,
    })
}

pub fn source_spec() -> NodeSpec {
    NodeSpec {
        accepts: &[],
        emits: &[RecordKind::Raw],
        store_roles: &[],
        check_params: check_params::<NoParams>,
        check_wiring: no_wiring_rules,
        build: None,
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkParams {
    pub topic: String,
    /// The one kind of record this sink publishes.
    pub records: PublishedKind,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishedKind {
    Event,
    Command,
    DeadLetter,
}

/// Narrows a component's spec by its params: a `kafka` sink accepts only the record
/// kind named by `records`, so a topic never receives records of another kind.
pub fn specialise(kind: &str, params: &toml::Value, spec: NodeSpec) -> NodeSpec {
    match (kind, parse_params::<KafkaSinkParams>(params)) {
        ("kafka", Ok(p)) => NodeSpec {
            accepts: match p.records {
                PublishedKind::Event => &[RecordKind::Event],
                PublishedKind::Command => &[RecordKind::Command],
                PublishedKind::DeadLetter => &[RecordKind::DeadLetter],
            },
            ..spec
        },
        _ => spec,
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// For types whose params stand alone.
pub fn no_wiring_rules(_: &ComponentDecl, _: &TopologyFile) -> Vec<String> {
    vec![]
}

/// Parameter problems of a serde-described params type.
pub fn check_params<P: serde::de::DeserializeOwned>(v: &toml::Value) -> Vec<String> {
    match parse_params::<P>(v) {
        Ok(_) => vec![],
        Err(e) => vec![e.to_string()],
    }
}

pub fn parse_params<P: serde::de::DeserializeOwned>(v: &toml::Value) -> Result<P, toml::de::Error> {
    v.clone().try_into()
}
