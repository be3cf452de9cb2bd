//! What a processor type tells the compiler, and how it is built.
//!
//! A type is a [`NodeSpec`]: the record kinds it accepts and emits, the store roles it
//! needs, and `configure`, which the compiler calls once per declared node with a
//! [`BuildContext`] (the node's id, its `params` table, the stores bound to its roles
//! and the sources' retentions). `configure` parses the params once, checks every rule
//! between them and the rest of the file, and returns either a [`ProcessorSupplier`]
//! that builds one processor per task, or every problem, each a sentence naming what to
//! change. This is Kafka Streams' `ProcessorSupplier`, and vector's
//! `TransformConfig::build(&TransformContext)`.

use super::{Processor, RecordKind};
pub use crate::span::Span;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    KeyValue,
    Dedup,
}

/// A declared store bound to one of a node's store roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreBinding {
    /// The store's name under `[stores]`.
    pub name: String,
    pub kind: StoreKind,
    /// Dedup stores: how long an id is at least remembered.
    pub retention: Option<Span>,
    /// Key-value stores: how long a finished payment stays after it became terminal
    /// (the default applied).
    pub state_retention: Span,
}

/// Everything `configure` may read about the node it configures.
#[derive(Debug, Clone)]
pub struct BuildContext<'a> {
    /// The node's id in the topology file.
    pub id: &'a str,
    /// Its `params` table, as written.
    pub params: &'a toml::Value,
    /// Its store roles whose stores are declared (a role left out is reported by the
    /// compiler, which then does not need a supplier).
    pub stores: BTreeMap<String, StoreBinding>,
    /// Every source of the topology with how long its topic keeps records: what may
    /// still be redelivered or replayed.
    pub sources: Vec<(String, Span)>,
}

impl BuildContext<'_> {
    /// The params parsed into `P`, or the problem as a sentence.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, Vec<String>> {
        parse_params(self.params).map_err(|e| vec![format!("invalid params: {e}")])
    }

    /// The store bound to `role`. A missing one has been reported by the compiler:
    /// the error carries no sentence of its own.
    pub fn store(&self, role: &str) -> Result<&StoreBinding, Vec<String>> {
        self.stores.get(role).ok_or_else(Vec::new)
    }
}

/// Builds the processor of one node for each task (partition).
pub trait ProcessorSupplier: Send + Sync {
    fn get(&self) -> Box<dyn Processor>;
}

/// A supplier from a closure over the node's parsed configuration.
impl<F> ProcessorSupplier for F
where
    F: Fn() -> Box<dyn Processor> + Send + Sync,
{
    fn get(&self) -> Box<dyn Processor> {
        self()
    }
}

/// A configured node: its supplier, shared by every task.
#[derive(Clone)]
pub struct Configured(pub Arc<dyn ProcessorSupplier>);

impl Configured {
    pub fn new(supplier: impl ProcessorSupplier + 'static) -> Self {
        Configured(Arc::new(supplier))
    }
}

impl fmt::Debug for Configured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Configured")
    }
}

/// What the compiler needs to know about a processor type.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    pub accepts: &'static [RecordKind],
    pub emits: &'static [RecordKind],
    pub store_roles: &'static [&'static str],
    /// Parses the node's params once and checks how it fits the file: its supplier, or
    /// every problem.
    pub configure: fn(&BuildContext<'_>) -> Result<Configured, Vec<String>>,
}

/// Parses a `params` table into a serde-described type.
pub fn parse_params<P: DeserializeOwned>(v: &toml::Value) -> Result<P, toml::de::Error> {
    v.clone().try_into()
}
