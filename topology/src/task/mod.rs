//! A task: one input partition, its stores, and its instance of the processor graph.
//!
//! For a batch of input records the task runs each through the graph (each seeing the
//! writes of those before it), then commits **one** sled batch that holds the state
//! changes, dedup records, timers, the outputs (in an outbox), the next input offset
//! and, when changelogs are on, the batch's changelog records (queued). Then it flushes
//! sled, ships the queued changelog, publishes the outbox, deletes what was
//! published, and only then stores the Kafka offset. A crash anywhere replays from the
//! last durable checkpoint; outputs are deterministic and idempotent, so the replay
//! emits the same `(payment_id, seq)` events.

use crate::config::{CompiledTopology, NodeRuntimeSpec, Role};
use crate::metrics::METRICS;
use crate::processor::{
    Context, ProcessError, Processor, ProviderCall, RawRecord, Record, RecordKind,
};
use crate::registry::SinkRuntime;
use serde::{Deserialize, Serialize};
use stores::{
    time_key, ChangelogRecord, PartitionStore, WriteSet, CHANGELOG_QUEUE, OUTBOX, TIMERS,
};

/// A record the task must publish once its batch is durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OutboxEntry {
    Kafka {
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    },
    Provider(ProviderCall),
}

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

    fn source_for(&self, topo: &CompiledTopology, topic: &str) -> Option<usize> {
        topo.nodes
            .iter()
            .position(|n| n.role == Role::Source && n.topic.as_deref() == Some(topic))
    }
}

/// Everything one step (an input record or a timer) produced.
#[derive(Default)]
struct Step {
    outbox: Vec<OutboxEntry>,
    /// Where the input record was read; `None` for timers.
    input: Option<crate::processor::InputPosition>,
    /// `traceparent` of the input record.
    trace_in: Option<String>,
    /// `traceparent` for the records this step publishes.
    trace_out: Option<String>,
}

pub struct Task {
    pub topic: String,
    pub partition: i32,
    store: PartitionStore,
    graph: Graph,
    source: usize,
    next_offset: Option<i64>,
    outbox_seq: u64,
    changelog_seq: u64,
    changelog_topic: Option<String>,
    /// The declared stores and the engine's own, as [`Task::key_counts`] reports them.
    counted: Vec<String>,
}

/// Outbox entries to delete once their transaction commits, and the changelog batch
/// that says so.
pub struct Removal {
    ws: WriteSet,
    pub records: Vec<ChangelogRecord>,
}

/// A changelog batch waiting to be shipped: its queue key and its records.
pub type QueuedChangelog = (Vec<u8>, Vec<ChangelogRecord>);

/// Keys of the outbox entries staged for publishing.
pub struct Pending {
    pub entries: Vec<(Vec<u8>, OutboxEntry)>,
}

impl Task {
    /// `changelog`: whether the task's store changes are published to the changelog
    /// topic (restores on another worker need it).
    pub fn open(
        topo: &CompiledTopology,
        store: PartitionStore,
        topic: &str,
        partition: i32,
        changelog: bool,
    ) -> anyhow::Result<Task> {
        let graph = Graph::build(topo);
        let source = graph
            .source_for(topo, topic)
            .ok_or_else(|| anyhow::anyhow!("topic `{topic}` is not a source of this topology"))?;
        let next_offset = store.next_offset()?;
        let outbox_seq = store.outbox_seq()?;
        let changelog_seq = store.changelog_seq()?;
        Ok(Task {
            topic: topic.to_owned(),
            partition,
            store,
            graph,
            source,
            next_offset,
            outbox_seq,
            changelog_seq,
            changelog_topic: changelog.then(|| topo.changelog_topic(topic)),
            counted: topo
                .stores
                .keys()
                .cloned()
                .chain([TIMERS, OUTBOX, CHANGELOG_QUEUE].map(str::to_owned))
                .collect(),
        })
    }

    /// How many keys each store of the partition holds: what its state costs, reported
    /// once a minute (a scan of every key, so not on the data path).
    pub fn key_counts(&self) -> Result<Vec<(&str, usize)>, ProcessError> {
        self.counted
            .iter()
            .map(|s| Ok((s.as_str(), self.store.count(s)?)))
            .collect()
    }

    /// Where this task's changelog goes, if it keeps one.
    pub fn changelog_topic(&self) -> Option<&str> {
        self.changelog_topic.as_deref()
    }

    /// The next input offset this task will apply (its durable checkpoint after flush).
    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    pub fn store(&self) -> &PartitionStore {
        &self.store
    }

    /// Applies a batch of input records as **one** sled commit (each record sees the
    /// writes of those before it). Records below the checkpoint were applied already and
    /// are skipped (the consumer may restart behind the store). Returns how many were
    /// applied.
    pub fn apply_inputs(
        &mut self,
        records: impl IntoIterator<Item = RawRecord>,
        now_ms: i64,
    ) -> Result<usize, ProcessError> {
        let mut ws = WriteSet::default();
        let mut outbox = Vec::new();
        let mut applied = 0;
        let mut next = self.next_offset;
        for raw in records {
            if next.is_some_and(|n| raw.offset < n) {
                continue;
            }
            let offset = raw.offset;
            let mut step = Step {
                input: Some(crate::processor::InputPosition {
                    topic: raw.topic.clone(),
                    partition: raw.partition,
                    offset,
                }),
                trace_in: raw
                    .headers
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                    .and_then(|(_, v)| String::from_utf8(v.clone()).ok()),
                ..Step::default()
            };
            self.forward(self.source, Record::Raw(raw), &mut ws, now_ms, &mut step)?;
            outbox.append(&mut step.outbox);
            next = Some(offset + 1);
            applied += 1;
        }
        if applied == 0 {
            return Ok(0);
        }
        if let Some(n) = next {
            ws.set_next_offset(n);
        }
        self.stage_outbox(&mut ws, outbox);
        self.stage_changelog(&mut ws);
        self.store.commit(ws)?;
        self.next_offset = next;
        Ok(applied)
    }

    /// The first `limit` timers due at `now_ms`, in due order.
    fn due_timers(&self, now_ms: i64, limit: usize) -> Result<Vec<stores::Entry>, ProcessError> {
        let until = time_key(now_ms.saturating_add(1));
        Ok(self
            .store
            .range(TIMERS, &time_key(i64::MIN), &until, limit)?)
    }

    /// Whether a timer is due at `now_ms` (one read).
    pub fn timers_due(&self, now_ms: i64) -> Result<bool, ProcessError> {
        Ok(!self.due_timers(now_ms, 1)?.is_empty())
    }

    /// Fires timers due at `now_ms` (at most `limit`) as one sled commit. Returns how
    /// many fired.
    pub fn fire_timers(&mut self, now_ms: i64, limit: usize) -> Result<usize, ProcessError> {
        let due = self.due_timers(now_ms, limit)?;
        let mut fired = 0;
        let mut ws = WriteSet::default();
        let mut outbox = Vec::new();
        for (key, payload) in due {
            let node = key
                .get(8..10)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
            ws.delete(TIMERS, &key);
            match node.filter(|n| *n < self.graph.nodes.len()) {
                Some(node) => {
                    let mut step = self.run_timer(node, &payload, &mut ws, now_ms)?;
                    outbox.append(&mut step.outbox);
                }
                None => {
                    METRICS.errors.with_label_values(&["orphan_timer"]).inc();
                    tracing::error!(
                        partition = self.partition,
                        "timer for an unknown processor removed"
                    );
                }
            }
            fired += 1;
        }
        if fired > 0 {
            self.stage_outbox(&mut ws, outbox);
            self.stage_changelog(&mut ws);
            self.store.commit(ws)?;
        }
        Ok(fired)
    }

    /// Lets every processor do its housekeeping, committed as one batch.
    pub fn maintain(&mut self, now_ms: i64) -> Result<(), ProcessError> {
        let mut ws = WriteSet::default();
        for i in 0..self.graph.nodes.len() {
            let id = self.graph.nodes[i].id.clone();
            if let NodeRuntime::Processor(p) = &mut self.graph.nodes[i].runtime {
                let mut ctx = Context {
                    store: &self.store,
                    ws: &mut ws,
                    out: vec![],
                    timers: vec![],
                    cancels: vec![],
                    input: None,
                    now_ms,
                    processor_id: &id,
                    trace_in: None,
                    trace_out: None,
                };
                p.maintain(&mut ctx)?;
                let (timers, cancels) = (ctx.timers, ctx.cancels);
                stage_timers(&mut ws, i, timers, cancels);
            }
        }
        self.stage_changelog(&mut ws);
        self.store.commit(ws)?;
        Ok(())
    }

    /// Outbox entries not yet published (after a crash, or from the batch just applied),
    /// in the order they were produced, each with the key of the outbox record that
    /// holds it.
    pub fn pending(&self) -> Result<Pending, ProcessError> {
        let mut entries = Vec::new();
        for (k, v) in self.store.scan(OUTBOX, usize::MAX)? {
            if k.len() == OUTBOX_BATCH_KEY_LEN {
                for e in stores::decode::<Vec<OutboxEntry>>(OUTBOX, &v)? {
                    entries.push((k.clone(), e));
                }
            } else {
                // One entry per record, as stores written by earlier versions hold.
                entries.push((k, stores::decode::<OutboxEntry>(OUTBOX, &v)?));
            }
        }
        Ok(Pending { entries })
    }

    /// Removes published outbox entries (a change of state like any other: it goes to
    /// the changelog, so a restore does not publish them again).
    pub fn published(
        &mut self,
        keys: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<(), ProcessError> {
        let mut ws = WriteSet::default();
        for k in keys {
            ws.delete(OUTBOX, &k);
        }
        if !ws.is_empty() {
            self.stage_changelog(&mut ws);
            self.store.commit(ws)?;
        }
        Ok(())
    }

    /// Changelog batches committed but not yet shipped, in commit order.
    pub fn pending_changelog(&self) -> Result<Vec<QueuedChangelog>, ProcessError> {
        let mut batches = Vec::new();
        for (k, v) in self.store.scan(CHANGELOG_QUEUE, usize::MAX)? {
            batches.push((k, stores::decode(CHANGELOG_QUEUE, &v)?));
        }
        Ok(batches)
    }

    /// Forgets shipped changelog batches; `end` is the changelog offset after the last
    /// record shipped; `removal`, shipped with them, is applied too.
    pub fn changelog_shipped(
        &self,
        keys: impl IntoIterator<Item = Vec<u8>>,
        end: Option<i64>,
        removal: Option<Removal>,
    ) -> Result<(), ProcessError> {
        let mut ws = removal.map(|r| r.ws).unwrap_or_default();
        for k in keys {
            ws.delete(CHANGELOG_QUEUE, &k);
        }
        if let Some(end) = end {
            ws.set_changelog_end(end);
        }
        self.store.commit(ws)?;
        Ok(())
    }

    /// The removal of outbox entries about to be published in a transaction, with its
    /// changelog batch to publish in the same transaction; applied once it commits.
    pub fn removal(&mut self, keys: &[Vec<u8>]) -> Removal {
        let mut ws = WriteSet::default();
        for k in keys {
            ws.delete(OUTBOX, k);
        }
        let records = match (&self.changelog_topic, ws.is_empty()) {
            (Some(_), false) => ws.changelog(),
            _ => Vec::new(),
        };
        if !records.is_empty() {
            self.changelog_seq += 1;
            ws.set_changelog_seq(self.changelog_seq);
        }
        Removal { ws, records }
    }

    /// Queues the current values of `full_keys` for the changelog, as one batch: after a
    /// restore, they go over a batch the previous writer left unfinished at the log's end.
    pub fn republish(&mut self, full_keys: Vec<Vec<u8>>) -> Result<(), ProcessError> {
        if full_keys.is_empty() || self.changelog_topic.is_none() {
            return Ok(());
        }
        let mut records = self.store.current(full_keys)?;
        records.push(stores::commit_marker());
        let mut ws = WriteSet::default();
        self.queue_changelog(&mut ws, records);
        self.store.commit(ws)?;
        Ok(())
    }

    /// Queues the write set's changelog batch in the same atomic commit. The batch is
    /// shipped before any output of the write set is published, so every output ever
    /// published comes from a state a restore can reach, and a restored outbox publishes
    /// whatever the previous owner had not.
    fn stage_changelog(&mut self, ws: &mut WriteSet) {
        if self.changelog_topic.is_none() {
            return;
        }
        let records = ws.changelog();
        if !records.is_empty() {
            self.queue_changelog(ws, records);
        }
    }

    fn queue_changelog(&mut self, ws: &mut WriteSet, records: Vec<ChangelogRecord>) {
        ws.put(CHANGELOG_QUEUE, &self.changelog_seq.to_be_bytes(), &records);
        self.changelog_seq += 1;
        ws.set_changelog_seq(self.changelog_seq);
    }

    /// Stages a commit's outputs as (at most) two outbox records, one for its Kafka
    /// records and one for its provider calls (which are removed at different times
    /// under exactly-once): the outbox is changelogged, and a record per output would
    /// double the changelog's traffic.
    fn stage_outbox(&mut self, ws: &mut WriteSet, outbox: Vec<OutboxEntry>) {
        let (calls, records): (Vec<OutboxEntry>, Vec<OutboxEntry>) = outbox
            .into_iter()
            .partition(|e| matches!(e, OutboxEntry::Provider(_)));
        for part in [records, calls] {
            if part.is_empty() {
                continue;
            }
            ws.put(OUTBOX, &outbox_batch_key(self.outbox_seq), &part);
            self.outbox_seq += 1;
        }
        ws.set_outbox_seq(self.outbox_seq);
    }

    fn run_timer(
        &mut self,
        node: usize,
        payload: &[u8],
        ws: &mut WriteSet,
        now_ms: i64,
    ) -> Result<Step, ProcessError> {
        let mut step = Step::default();
        self.run_processor(node, ws, now_ms, &mut step, |p, ctx| {
            p.on_timer(ctx, payload)
        })?;
        Ok(step)
    }

    /// Runs one processor call with a fresh context, then stages its timers and routes
    /// its outputs downstream.
    fn run_processor(
        &mut self,
        node: usize,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
        call: impl FnOnce(&mut dyn Processor, &mut Context<'_>) -> Result<(), ProcessError>,
    ) -> Result<(), ProcessError> {
        let GraphNode { id, runtime, .. } = &mut self.graph.nodes[node];
        let NodeRuntime::Processor(p) = runtime else {
            return Ok(());
        };
        let mut ctx = Context {
            store: &self.store,
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
            self.route(node, rec, ws, now_ms, step)?;
        }
        Ok(())
    }

    fn forward(
        &mut self,
        node: usize,
        record: Record,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
    ) -> Result<(), ProcessError> {
        match &mut self.graph.nodes[node].runtime {
            NodeRuntime::Source => self.route(node, record, ws, now_ms, step),
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
                self.run_processor(node, ws, now_ms, step, |p, ctx| p.process(ctx, record))
            }
        }
    }

    fn route(
        &mut self,
        from: usize,
        record: Record,
        ws: &mut WriteSet,
        now_ms: i64,
        step: &mut Step,
    ) -> Result<(), ProcessError> {
        let kind = record.kind();
        let targets: Vec<usize> = self.graph.nodes[from]
            .downstream
            .iter()
            .copied()
            .filter(|d| self.graph.nodes[*d].accepts.contains(&kind))
            .collect();
        if targets.is_empty() {
            // The compiler rejects such topologies; this guards against a processor
            // emitting a kind it did not declare.
            METRICS.errors.with_label_values(&["unrouted_record"]).inc();
            tracing::error!(node = %self.graph.nodes[from].id, kind = kind.as_str(), "record has no downstream that accepts it");
            return Err(ProcessError::UnexpectedRecord {
                processor: self.graph.nodes[from].id.clone(),
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
                self.forward(d, r, ws, now_ms, step)?;
            }
        }
        Ok(())
    }
}

/// Length of the key of an outbox record that holds a list of entries: the outbox
/// sequence number and a `b` (records of one entry have 8-byte keys).
const OUTBOX_BATCH_KEY_LEN: usize = 9;

fn outbox_batch_key(seq: u64) -> [u8; OUTBOX_BATCH_KEY_LEN] {
    let mut k = [b'b'; OUTBOX_BATCH_KEY_LEN];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k
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

/// The Kafka record for `record`; `trace` (the step's trace context) goes in its
/// `traceparent` header unless the record names its own.
fn kafka_entry(topic: &str, record: Record, trace: Option<String>) -> OutboxEntry {
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

    const SHIPPED: &str = include_str!("../../config/topology.toml");
    const TOPIC: &str = "payments.commands";

    fn create_record(issued_at_ms: i64) -> RawRecord {
        let cmd = crate::processor::testing::create_command("order-1", 1_000, "EUR", issued_at_ms);
        let payment_id = cmd.payment_id;
        RawRecord {
            topic: TOPIC.into(),
            partition: 0,
            offset: 0,
            key: Some(payment_id.to_string().into_bytes()),
            payload: Some(payments::wire::encode_command(&cmd)),
            headers: vec![],
            timestamp_ms: Some(issued_at_ms),
        }
    }

    #[test]
    fn a_wait_starts_when_its_step_runs_not_when_the_command_was_issued() {
        let topo = crate::config::compile_str(SHIPPED).expect("shipped topology compiles");
        let file: crate::config::TopologyFile = toml::from_str(SHIPPED).expect("shipped file");
        let policy: payments::Policy = file
            .processors
            .values()
            .find(|p| p.kind == "payment_state_machine")
            .map(|p| crate::processor::parse_params(&p.params).expect("policy"))
            .expect("the shipped topology has a payment state machine");
        assert_eq!(policy.dispatch_delay_ms, 0, "the create sends the charge");
        let timeout = policy.reply_timeout_ms;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let mut task = Task::open(&topo, store, TOPIC, 0, false).expect("task");
        // Processed 60 s after it was issued (a backlog): the charge goes out now, so its
        // reply timeout is due a whole timeout from now, not already past.
        let issued = 1_000_000;
        let now = issued + 60_000;
        assert_eq!(
            task.apply_inputs([create_record(issued)], now).ok(),
            Some(1)
        );
        assert!(!task.timers_due(now).expect("read timers"));
        assert!(!task.timers_due(now + timeout - 1).expect("read timers"));
        assert!(task.timers_due(now + timeout).expect("read timers"));
        assert_eq!(
            task.fire_timers(now + timeout, 10).ok(),
            Some(1),
            "the reply timeout fires once"
        );
    }
}
