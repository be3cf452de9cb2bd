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

mod graph;
mod outbox;

pub use graph::Graph;
pub use outbox::OutboxEntry;

use crate::config::CompiledTopology;
use crate::metrics::METRICS;
use crate::processor::{ProcessError, RawRecord, Record};
use graph::Step;
use outbox::{outbox_batch_key, OUTBOX_BATCH_KEY_LEN, OUTBOX_RECORD_MAX_BYTES};
use stores::{
    time_key, ChangelogRecord, PartitionStore, WriteSet, CHANGELOG_QUEUE, OUTBOX, TIMERS,
};

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
            if let Some(n) = next.filter(|n| raw.offset > *n) {
                // A source written only by idempotent producers has no holes: offsets
                // skipped here are transaction markers or aborted records, or records
                // the consumer never handed over.
                METRICS.input_gaps.inc();
                tracing::info!(topic = %raw.topic, partition = raw.partition, expected = n, got = raw.offset, "input offsets skipped");
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
            self.graph.forward(
                &self.store,
                self.source,
                Record::Raw(raw),
                &mut ws,
                now_ms,
                &mut step,
            )?;
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
        self.stage_changelog(&mut ws)?;
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
            match node.filter(|n| *n < self.graph.len()) {
                Some(node) => {
                    let mut step =
                        self.graph
                            .run_timer(&self.store, node, &payload, &mut ws, now_ms)?;
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
            self.stage_changelog(&mut ws)?;
            self.store.commit(ws)?;
        }
        Ok(fired)
    }

    /// Lets every processor do its housekeeping, committed as one batch.
    pub fn maintain(&mut self, now_ms: i64) -> Result<(), ProcessError> {
        let mut ws = WriteSet::default();
        self.graph.maintain(&self.store, &mut ws, now_ms)?;
        self.stage_changelog(&mut ws)?;
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
            self.stage_changelog(&mut ws)?;
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
    pub fn removal(&mut self, keys: &[Vec<u8>]) -> Result<Removal, ProcessError> {
        let mut ws = WriteSet::default();
        for k in keys {
            ws.delete(OUTBOX, k);
        }
        let records = match (&self.changelog_topic, ws.is_empty()) {
            (Some(_), false) => {
                self.store.seal(&mut ws)?;
                ws.changelog()
            }
            _ => Vec::new(),
        };
        if !records.is_empty() {
            self.changelog_seq += 1;
            ws.set_changelog_seq(self.changelog_seq);
        }
        Ok(Removal { ws, records })
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
    fn stage_changelog(&mut self, ws: &mut WriteSet) -> Result<(), ProcessError> {
        if self.changelog_topic.is_none() {
            return Ok(());
        }
        self.store.seal(ws)?;
        let records = ws.changelog();
        if !records.is_empty() {
            self.queue_changelog(ws, records);
        }
        Ok(())
    }

    fn queue_changelog(&mut self, ws: &mut WriteSet, records: Vec<ChangelogRecord>) {
        ws.put(CHANGELOG_QUEUE, &self.changelog_seq.to_be_bytes(), &records);
        self.changelog_seq += 1;
        ws.set_changelog_seq(self.changelog_seq);
    }

    /// Stages a commit's outputs as (at most) two outbox records, one for its Kafka
    /// records and one for its provider calls (which are removed at different times
    /// under exactly-once): the outbox is changelogged, and a record per output would
    /// double the changelog's traffic. A part larger than [`OUTBOX_RECORD_MAX_BYTES`]
    /// takes several records: each is one changelog message, which Kafka refuses over
    /// its message size limit (1 MB by default), and a refused one would stop the task
    /// at the same batch after every restart.
    fn stage_outbox(&mut self, ws: &mut WriteSet, outbox: Vec<OutboxEntry>) {
        let (calls, records): (Vec<OutboxEntry>, Vec<OutboxEntry>) = outbox
            .into_iter()
            .partition(|e| matches!(e, OutboxEntry::Provider(_)));
        for part in [records, calls] {
            for chunk in outbox::chunks(part, OUTBOX_RECORD_MAX_BYTES) {
                ws.put(OUTBOX, &outbox_batch_key(self.outbox_seq), &chunk);
                self.outbox_seq += 1;
            }
        }
        ws.set_outbox_seq(self.outbox_seq);
    }
}

/// Tasks of the shipped topology, for tests of processors inside a task.
#[cfg(test)]
pub(crate) mod testing {
    use super::Task;
    use stores::PartitionStore;

    pub(crate) const SHIPPED: &str = include_str!("../../../config/topology.toml");

    /// A task of `config/topology.toml` for partition 0 of `topic`, over `store`.
    pub(crate) fn shipped(store: PartitionStore, topic: &str, changelog: bool) -> Task {
        let topo = crate::config::compile_str(SHIPPED).expect("shipped topology compiles");
        Task::open(&topo, store, topic, 0, changelog).expect("task")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::SHIPPED;
    use super::*;
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
        let mut task = testing::shipped(store, TOPIC, false);
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

    /// A batch whose outputs are larger than one Kafka message is staged as several
    /// outbox records, each one changelog message under the limit, read back in order.
    #[test]
    fn a_large_batch_of_outputs_takes_several_outbox_records_each_under_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let mut task = testing::shipped(store, TOPIC, true);
        let entry = |i: u32| OutboxEntry::Kafka {
            topic: "payments.notifications".into(),
            key: Some(i.to_be_bytes().to_vec()),
            payload: vec![b'x'; 100 * 1024],
            headers: vec![],
        };
        let mut ws = WriteSet::default();
        task.stage_outbox(&mut ws, (0..10).map(entry).collect());
        let records = ws.changelog();
        task.store.commit(ws).expect("commit");
        let outbox: Vec<&ChangelogRecord> = records
            .iter()
            .filter(|(k, _)| stores::store_of(k) == Some(OUTBOX))
            .collect();
        assert_eq!(outbox.len(), 5, "two 100 KiB entries per record");
        for (_, v) in &outbox {
            let len = v.as_ref().map_or(0, Vec::len);
            assert!(len <= OUTBOX_RECORD_MAX_BYTES, "a record of {len} bytes");
        }
        let pending = task.pending().expect("pending");
        let keys: Vec<Vec<u8>> = pending
            .entries
            .iter()
            .map(|(_, e)| match e {
                OutboxEntry::Kafka { key, .. } => key.clone().unwrap_or_default(),
                OutboxEntry::Provider(_) => Vec::new(),
            })
            .collect();
        assert_eq!(
            keys,
            (0..10u32)
                .map(|i| i.to_be_bytes().to_vec())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_entry_larger_than_a_record_is_alone_in_its_record() {
        let entry = |kb: usize| OutboxEntry::Kafka {
            topic: "t".into(),
            key: None,
            payload: vec![0; kb * 1024],
            headers: vec![],
        };
        let sizes: Vec<usize> = outbox::chunks(
            vec![entry(1), entry(300), entry(1), entry(1)],
            OUTBOX_RECORD_MAX_BYTES,
        )
        .iter()
        .map(Vec::len)
        .collect();
        assert_eq!(sizes, [1, 1, 2]);
        assert!(outbox::chunks(Vec::new(), OUTBOX_RECORD_MAX_BYTES).is_empty());
    }
}
