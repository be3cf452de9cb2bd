//! # topology — the streams engine
//!
//! Layout:
//! - [`config`]: `config/topology.toml` → a validated [`config::CompiledTopology`]
//!   (all errors reported at once, each naming its component).
//! - [`registry`]: the single place a processor or sink type is registered (a table).
//! - [`processor`]: the processor API (records, context, the `Processor` trait) and
//!   what a processor type tells the compiler ([`processor::spec`]); processor types
//!   see only this.
//! - [`span`]: lengths of time as the topology file writes them.
//! - [`processors`]: the built-in processor types, one module each.
//! - [`task`]: one partition's batch commit and checkpoint, its graph instance (the
//!   routing of records between nodes, `task/graph.rs`) and its outbox (`task/outbox.rs`).
//! - [`runtime`]: the worker — the consumer loop, the tasks, restores, the record
//!   collector and the exactly-once producer, one file each.
//! - [`provider`]: the provider client and the dispatcher that turns answers into commands.
//! - [`metrics`]: the worker's Prometheus metrics.
//!
//! The engine never changes payment state outside a processor, and never stores a Kafka
//! offset before the effect of the records below it is durable.

pub mod config;
pub mod metrics;
pub mod processor;
pub mod processors;
pub mod provider;
pub mod registry;
pub mod runtime;
pub mod span;
pub mod task;

pub use config::{compile_str, CompiledTopology, ConfigErrors};
pub use runtime::{run_worker, WorkerSettings};

/// Reads and compiles a topology file.
pub fn load(path: &std::path::Path) -> anyhow::Result<CompiledTopology> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read topology file {}: {e}", path.display()))?;
    Ok(compile_str(&text)?)
}
