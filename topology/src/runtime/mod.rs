//! The worker: consumes the source topics in a consumer group and runs one [`Task`] per
//! assigned partition, each on its own tokio task.
//!
//! A task starts when its partition is assigned: it restores its store from the
//! changelog first if the local copy is missing, behind the group or behind the
//! changelog's latest writes, then publishes what its outbox still holds.
//!
//! `at_least_once`: auto-commit is on but auto offset *store* is off; a task stores an
//! offset only after the records up to it are durable in its sled store, their changelog
//! is shipped and their outputs are published (rust-rdkafka's at-least-once pattern).
//! `exactly_once`: auto-commit is off; each publish is one transaction of a per-partition
//! transactional producer holding the changelog, the outputs and the input offset. Either
//! way the sled checkpoint is ahead of or equal to the committed offset, and records
//! below it are skipped.
//!
//! Crash-only: a task that fails (its store broke) stops the worker with the error; the
//! supervisor restarts the process, which resumes from the durable checkpoints.
//!
//! The worker is split the way Kafka Streams splits its stream thread:
//!
//! - [`thread`]: the consumer loop and the group's rebalances (`StreamThread`);
//! - [`tasks`]: starting, running and stopping a partition's task (`TaskManager`);
//! - [`restore`]: whether a local store can be trusted, and its rebuild from the
//!   changelog (`StoreChangelogReader`);
//! - [`collector`]: how a task's changelog and outbox reach Kafka (`RecordCollector`);
//! - [`eos`]: the per-partition transactional producer of `exactly_once`
//!   (`StreamsProducer`);
//! - [`freeze`]: holds a task back after the process was frozen, until the group says
//!   whether its partition is still this worker's.
//!
//! Words: a task *ships* its queued changelog (sends it once, in order; a failure fails
//! the task), *produces* an outbox record (retried until the broker acknowledges it) and
//! *dispatches* a provider call.

mod collector;
mod eos;
mod freeze;
mod restore;
mod tasks;
mod thread;

pub(crate) use collector::{unconfirmed, NO_OFFSET};
pub use restore::restore_partition;
pub use thread::{run_worker, PREFETCH_KBYTES};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub brokers: String,
    pub state_dir: PathBuf,
    pub provider_url: String,
    pub provider_timeout: Duration,
    /// Topic the provider replies are published to (the commands topic).
    pub commands_topic: String,
    pub punctuate_interval: Duration,
    pub max_batch: usize,
    pub max_inflight_provider_calls: usize,
    /// Extra librdkafka properties, applied to every client.
    pub kafka: Vec<(String, String)>,
    /// Publish store changes to the changelog topics and restore from them.
    pub changelog: bool,
    /// sled's page cache per partition store.
    pub store_cache_bytes: u64,
    /// Restore from a changelog whose first records are gone (what is left of it) rather
    /// than refuse the partition: the store then misses every key last written before
    /// them. For a deployment that accepts that loss, and for measurements against a
    /// broker that keeps only a partition's latest bytes.
    pub restore_truncated_changelog: bool,
    /// Static membership of the group (`group.instance.id`): a worker restarted within the
    /// session gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// What the worker tells its watchdog: the partitions it holds, the restores it waits
    /// on.
    pub progress: std::sync::Arc<telemetry::progress::Progress>,
}

/// Per-request timeout of provider calls unless configured (`PROVIDER_TIMEOUT_MS`).
pub const DEFAULT_PROVIDER_TIMEOUT_MS: u64 = 3000;

impl WorkerSettings {
    /// The group session in force (`session.timeout.ms`, as the `--kafka` properties may
    /// set it).
    pub fn session_timeout(&self) -> Duration {
        let ms = self
            .kafka
            .iter()
            .rev()
            .find(|(k, _)| k == "session.timeout.ms")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(thread::SESSION_TIMEOUT_MS);
        Duration::from_millis(ms)
    }

    /// A freeze of the process longer than this may have cost the worker its partitions
    /// (half the session: the group has not yet moved them before), and after one a task
    /// waits as long for the group's verdict (a heartbeat, answered at once, brings it).
    pub fn freeze_bound(&self) -> Duration {
        self.session_timeout() / 2
    }

    pub fn new(
        brokers: &str,
        state_dir: PathBuf,
        provider_url: &str,
        commands_topic: &str,
    ) -> Self {
        WorkerSettings {
            brokers: brokers.to_owned(),
            state_dir,
            provider_url: provider_url.to_owned(),
            provider_timeout: Duration::from_millis(DEFAULT_PROVIDER_TIMEOUT_MS),
            commands_topic: commands_topic.to_owned(),
            punctuate_interval: Duration::from_millis(20),
            max_batch: 500,
            max_inflight_provider_calls: 512,
            kafka: vec![],
            changelog: true,
            store_cache_bytes: stores::DEFAULT_CACHE_BYTES,
            restore_truncated_changelog: false,
            instance_id: None,
            progress: telemetry::progress::Progress::new("worker"),
        }
    }
}

/// The offset the consumer fetches next in `topic`-`partition`, once it has one.
pub fn position(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    use rdkafka::consumer::Consumer as _;
    consumer
        .position()
        .ok()?
        .find_partition(topic, partition)?
        .offset()
        .to_raw()
        .filter(|o| *o >= 0)
}

/// Whether a read of `topic`-`partition` has reached `end`, the partition's end as read
/// before it began. A `read_committed` read skips transaction markers without delivering
/// them, and an end-of-partition event says only that the answering leader has nothing
/// more: one that has just taken the lead reports an end below `end` until the other
/// replicas catch up. The consumer's position tells both apart.
pub fn reached(
    consumer: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    end: i64,
) -> bool {
    position(consumer, topic, partition).is_some_and(|p| p >= end)
}

pub fn client_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

pub fn producer(brokers: &str, extra: &[(String, String)]) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(brokers, &[]);
    c.set("partitioner", payments::partition::PARTITIONER)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Changelog values, outbox records and notifications are repetitive JSON and
        // bincode: lz4 (built into librdkafka) shrinks what the brokers store and move.
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "30000");
    for (k, v) in extra {
        c.set(k, v);
    }
    c.create().context("creating the Kafka producer")
}

/// The worker's producer: idempotent and gapless (a failure that would leave a hole in a
/// partition stops it instead), and it never gives up on a record by time — a broker
/// outage stalls publishing rather than failing it. What a changelog partition holds is
/// therefore always a prefix of what its task sent.
pub(super) fn worker_producer(settings: &WorkerSettings) -> anyhow::Result<FutureProducer> {
    let mut extra = vec![
        ("enable.gapless.guarantee".to_owned(), "true".to_owned()),
        ("message.timeout.ms".to_owned(), "0".to_owned()),
    ];
    extra.extend(settings.kafka.iter().cloned());
    producer(&settings.brokers, &extra)
}
