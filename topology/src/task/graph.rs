//! The processor graph of one task: its nodes, instantiated from the compiled topology,
//! and the routing of a record from a node to the downstream nodes that accept its kind,
//! depth first, within one write set.

use super::outbox::{kafka_entry, OutboxEntry};
use crate::config::{CompiledTopology, NodeRuntimeSpec, Role};
use crate::metrics::METRICS;
use crate::processor::{Context, ProcessError, Processor, Record, RecordKind};
use crate::registry::SinkRuntime;
use stores::{time_key, PartitionStore, WriteSet, TIMERS};

enum NodeRuntime {
    Source,
    Processor(Box<dyn Processor>),
    KafkaSink { topic: String },
    ProviderSink,
}

struct GraphNode {
    id: String,
    runtime: NodeRuntime,
    accepts: &'static [RecordKind],
    downstream: Vec<usize>,
}

/// The processor graph instantiated for one task.
pub struct Graph {
    nodes: Vec<GraphNode>,
}

impl Graph {
    pub fn build(topo: &CompiledTopology) -> Graph {
        let mut nodes = Vec::with_capacity(topo.nodes.len());
        for n in &topo.nodes {
            let runtime = match &n.runtime {
                NodeRuntimeSpec::Source => NodeRuntime::Source,
                NodeRuntimeSpec::Processor(supplier) => NodeRuntime::Processor(supplier.0.get()),
                NodeRuntimeSpec::Sink(SinkRuntime::Kafka { topic }) => NodeRuntime::KafkaSink {
                    topic: topic.clone(),
                },
                NodeRuntimeSpec::Sink(SinkRuntime::Provider) => NodeRuntime::ProviderSink,
            };
            nodes.push(GraphNode {
                id: n.id.clone(),
                runtime,
                accepts: n.accepts,
                downstream: n.downstream.clone(),
            });
        }
        Graph { nodes }
    }

    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Lets every processor do its housekeeping in `ws`.
    pub(super) fn maintain(
        &mut self,
        store: &PartitionStore,
        ws: &mut WriteSet,
        now_ms: i64,
    ) -> Result<(), ProcessError> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let NodeRuntime::Processor(p) = &mut node.runtime {
                let mut ctx = Context {
                    store,
                    ws: &mut *ws,
                    out: vec![],
                    timers: vec![],
                    cancels: vec![],
                    input: None,
                    now_ms,
                    processor_id: &node.id,
                    trace_in: None,
                    trace_out: None,
                };
                p.maintain(&mut ctx)?;
                let (timers, cancels) = (ctx.timers, ctx.cancels);
                stage_timers(ws, i, timers, cancels);
            }
        }
        Ok(())
    }

    pub(super) fn source_for(&self, topo: &CompiledTopology, topic: &str) -> Option<usize> {
        topo.nodes
            .iter()
            .position(|n| n.role == Role::Source && n.topic.as_deref() == Some(topic))
    }
}

/// Everything one step (an input record or a timer) produced.
#[derive(Default)]
pub(super) struct Step {
    pub(super) outbox: Vec<OutboxEntry>,
    /// Where the input record was read; `None` for timers.
    pub(super) input: Option<crate::processor::InputPosition>,
    /// `traceparent` of the input record.
    pub(super) trace_in: Option<String>,
    /// `traceparent` for the records this step publishes.
    pub(super) trace_out: Option<String>,
}

impl Graph {
    pub(super) fn run_timer(
        &mut self,
        store: &PartitionStore,
        node: usize,
        payload: &[u8],
        ws: &mut WriteSet,
        now_ms: i64,
    ) -> Result<Step, ProcessError> {
        let mut step = Step::default();
        self.run_processor(store, node, ws, now_ms, &mut step, |p, ctx| {
            p.on_timer(ctx, payload)
        })?;
        Ok(step)
    }

    /// Runs one processor call with a fresh context, then stages its timers and routes
    /// its outputs downstream.
    fn run_processor(
        &mut self,
        store: &PartitionStore,
        node: usize,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
        call: impl FnOnce(&mut dyn Processor, &mut Context<'_>) -> Result<(), ProcessError>,
    ) -> Result<(), ProcessError> {
        let GraphNode { id, runtime, .. } = &mut self.nodes[node];
        let NodeRuntime::Processor(p) = runtime else {
            return Ok(());
        };
        let mut ctx = Context {
            store,
            ws,
            out: vec![],
            timers: vec![],
            cancels: vec![],
            input: step.input.as_ref(),
            now_ms,
            processor_id: id,
            trace_in: step.trace_in.as_deref(),
            trace_out: None,
        };
        call(p.as_mut(), &mut ctx)?;
        let (out, timers, cancels) = (ctx.out, ctx.timers, ctx.cancels);
        if ctx.trace_out.is_some() {
            step.trace_out = ctx.trace_out;
        }
        stage_timers(ws, node, timers, cancels);
        for rec in out {
            self.route(store, node, rec, ws, now_ms, step)?;
        }
        Ok(())
    }

    pub(super) fn forward(
        &mut self,
        store: &PartitionStore,
        node: usize,
        record: Record,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
    ) -> Result<(), ProcessError> {
        match &mut self.nodes[node].runtime {
            NodeRuntime::Source => self.route(store, node, record, ws, now_ms, step),
            NodeRuntime::KafkaSink { topic } => {
                let trace = step.trace_out.clone();
                step.outbox.push(kafka_entry(topic, record, trace));
                Ok(())
            }
            NodeRuntime::ProviderSink => {
                if let Record::ProviderCall(call) = record {
                    step.outbox.push(OutboxEntry::Provider(call));
                }
                Ok(())
            }
            NodeRuntime::Processor(_) => {
                self.run_processor(store, node, ws, now_ms, step, |p, ctx| {
                    p.process(ctx, record)
                })
            }
        }
    }

    fn route(
        &mut self,
        store: &PartitionStore,
        from: usize,
        record: Record,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
    ) -> Result<(), ProcessError> {
        let kind = record.kind();
        let targets: Vec<usize> = self.nodes[from]
            .downstream
            .iter()
            .copied()
            .filter(|d| self.nodes[*d].accepts.contains(&kind))
            .collect();
        if targets.is_empty() {
            // The compiler rejects such topologies; this guards against a processor
            // emitting a kind it did not declare.
            METRICS.errors.with_label_values(&["unrouted_record"]).inc();
            tracing::error!(node = %self.nodes[from].id, kind = kind.as_str(), "record has no downstream that accepts it");
            return Err(ProcessError::UnexpectedRecord {
                processor: self.nodes[from].id.clone(),
                kind: kind.as_str(),
            });
        }
        let last = targets.len() - 1;
        let mut record = Some(record);
        for (i, d) in targets.into_iter().enumerate() {
            let r = if i == last {
                record.take()
            } else {
                record.clone()
            };
            if let Some(r) = r {
                self.forward(store, d, r, ws, now_ms, step)?;
            }
        }
        Ok(())
    }
}

/// Stages a step's timer changes: cancellations first, so a timer cancelled and set
/// again in one step stays set.
fn stage_timers(
    ws: &mut WriteSet,
    node: usize,
    timers: Vec<crate::processor::TimerRequest>,
    cancels: Vec<(i64, Vec<u8>)>,
) {
    for (due_at_ms, id) in cancels {
        ws.delete(TIMERS, &timer_key(node, due_at_ms, &id));
    }
    for t in timers {
        ws.put_raw(TIMERS, &timer_key(node, t.due_at_ms, &t.id), t.payload);
    }
}

/// Due time first, so the store lists timers in the order they fire.
fn timer_key(node: usize, due_at_ms: i64, id: &[u8]) -> Vec<u8> {
    let mut key = time_key(due_at_ms).to_vec();
    key.extend_from_slice(&(node as u16).to_be_bytes());
    key.extend_from_slice(id);
    key
}
