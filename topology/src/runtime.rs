//! The worker: consumes the source topics in a consumer group and runs one [`Task`] per
//! assigned partition, each on its own tokio task.
//!
//! A task starts when its partition is assigned: it restores its store from the
//! changelog first if the local copy is missing, behind the group or behind the
//! changelog's latest writes, then publishes what its outbox still holds.
//!
//! `at_least_once`: auto-commit is on but auto offset *store* is off; a task stores an
//! offset only after the records up to it are durable in its sled store, their changelog
//! is delivered and their outputs are published (rust-rdkafka's at-least-once pattern).
//! `exactly_once`: auto-commit is off; each publish is one transaction of a per-partition
//! transactional producer holding the changelog, the outputs and the input offset. Either
//! way the sled checkpoint is ahead of or equal to the committed offset, and records
//! below it are skipped.
//!
//! Crash-only: a task that fails (its store broke) stops the worker with the error; the
//! supervisor restarts the process, which resumes from the durable checkpoints.

use crate::config::{CompiledTopology, ProcessingGuarantee};
use crate::metrics::METRICS;
use crate::processor::RawRecord;
use crate::provider::{now_ms, Dispatcher, ProviderClient};
use crate::task::{OutboxEntry, Task};
use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stores::PartitionStore;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

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
}

impl WorkerSettings {
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
            provider_timeout: Duration::from_secs(3),
            commands_topic: commands_topic.to_owned(),
            punctuate_interval: Duration::from_millis(20),
            max_batch: 500,
            max_inflight_provider_calls: 512,
            kafka: vec![],
            changelog: true,
            store_cache_bytes: stores::DEFAULT_CACHE_BYTES,
        }
    }
}

/// The running tasks by `(topic, partition)`, shared with the rebalance callback.
type Tasks = Arc<std::sync::Mutex<HashMap<(String, i32), TaskHandle>>>;

fn lock(tasks: &Tasks) -> std::sync::MutexGuard<'_, HashMap<(String, i32), TaskHandle>> {
    // A poisoned lock only means a panic elsewhere; the map itself is intact.
    tasks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the tasks of revoked partitions before the group moves them, exports consumer
/// lag from librdkafka's statistics, and logs rebalances.
pub struct WorkerContext {
    group: String,
    tasks: Tasks,
    /// Partitions just assigned, for the worker loop to start their tasks at once (not
    /// at their first record: a partition with nothing new to read still has timers to
    /// fire and an outbox to publish).
    assigned: mpsc::UnboundedSender<Vec<(String, i32)>>,
}

impl ClientContext for WorkerContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    METRICS
                        .consumer_lag
                        .with_label_values(&[&self.group, topic, &p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// On revoke, each task of a revoked partition drains what it was given, flushes its
    /// store, publishes its outbox, stores its offset and closes its store — all before
    /// the group hands the partition (and, on a shared state directory, the store) to
    /// another worker.
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(group = %self.group, change = %describe(rebalance), "rebalance starting");
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let stopping: Vec<TaskHandle> = {
            let mut tasks = lock(&self.tasks);
            tpl.elements()
                .iter()
                .filter_map(|e| tasks.remove(&(e.topic().to_owned(), e.partition())))
                .collect()
        };
        if stopping.is_empty() {
            return;
        }
        let n = stopping.len();
        let joins: Vec<JoinHandle<()>> = stopping
            .into_iter()
            .map(|h| {
                drop(h.tx);
                h.join
            })
            .collect();
        // Called from the consumer's poll on a runtime thread: wait without stalling it.
        tokio::task::block_in_place(|| futures::executor::block_on(join_all(joins)));
        tracing::info!(group = %self.group, tasks = n, "tasks of revoked partitions stopped");
    }
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        tracing::info!(group = %self.group, change = %describe(rebalance), "rebalance done");
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            // The worker loop is gone only when the worker is stopping.
            let _ = self.assigned.send(parts);
        }
    }
}

/// `assign cmd[0,1,2]`, `revoke cmd[3]`, or the error.
fn describe(r: &Rebalance<'_>) -> String {
    let list = |tpl: &TopicPartitionList| {
        let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
        for e in tpl.elements() {
            by_topic
                .entry(e.topic().to_owned())
                .or_default()
                .push(e.partition());
        }
        by_topic
            .iter()
            .map(|(t, ps)| format!("{t}{ps:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match r {
        Rebalance::Assign(tpl) => format!("assign {}", list(tpl)),
        Rebalance::Revoke(tpl) => format!("revoke {}", list(tpl)),
        Rebalance::Error(e) => format!("error {e}"),
    }
}

type WorkerConsumer = StreamConsumer<WorkerContext>;

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
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
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
fn worker_producer(settings: &WorkerSettings) -> anyhow::Result<FutureProducer> {
    let mut extra = vec![
        ("enable.gapless.guarantee".to_owned(), "true".to_owned()),
        ("message.timeout.ms".to_owned(), "0".to_owned()),
    ];
    extra.extend(settings.kafka.iter().cloned());
    producer(&settings.brokers, &extra)
}

struct TaskHandle {
    tx: mpsc::Sender<RawRecord>,
    join: JoinHandle<()>,
}

/// Runs the worker until `shutdown` resolves or a task fails.
pub async fn run_worker(
    topo: Arc<CompiledTopology>,
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let group = topo.application_id.clone();
    let tasks: Tasks = Arc::default();
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel();
    let mut cfg = client_config(&settings.brokers, &[]);
    let auto_commit = topo.processing_guarantee == ProcessingGuarantee::AtLeastOnce;
    cfg.set("group.id", &group)
        .set("enable.auto.commit", auto_commit.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", "5000")
        // A crashed worker's partitions move after 10 s rather than librdkafka's 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        // Every hop of a payment (create, provider reply) waits for a fetch: a broker
        // that answers an empty fetch only after this long adds it to the latency.
        .set("fetch.wait.max.ms", "10");
    for (k, v) in &settings.kafka {
        cfg.set(k, v);
    }
    let consumer: Arc<WorkerConsumer> = Arc::new(
        cfg.create_with_context(WorkerContext {
            group: group.clone(),
            tasks: tasks.clone(),
            assigned: assigned_tx,
        })
        .context("creating the Kafka consumer")?,
    );
    let topics = topo.source_topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .context("subscribing to the source topics")?;
    let producer = worker_producer(&settings)?;
    if settings.changelog {
        ensure_changelog_topics(&producer, &topo)?;
    }
    let client = ProviderClient::new(&settings.provider_url, settings.provider_timeout)?;
    let dispatcher = Dispatcher::new(
        client,
        producer.clone(),
        &settings.commands_topic,
        settings.max_inflight_provider_calls,
    );
    tracing::info!(%group, ?topics, guarantee = ?topo.processing_guarantee, "worker started");

    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<anyhow::Error>();
    let spawner = Spawner {
        topo: topo.clone(),
        settings: settings.clone(),
        tasks: tasks.clone(),
        consumer: consumer.clone(),
        producer: producer.clone(),
        dispatcher,
        fail: fail_tx,
    };
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(e) = fail_rx.recv() => break Err(e),
            Some(parts) = assigned_rx.recv() => {
                // Still assigned (a later rebalance may have taken them again)?
                let current = consumer.assignment().unwrap_or_default();
                let mut failed = None;
                for (topic, partition) in parts {
                    if current.find_partition(&topic, partition).is_some() {
                        if let Err(e) = spawner.task(&topic, partition) {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    break Err(e);
                }
            }
            msg = consumer.recv() => {
                let m = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        METRICS.errors.with_label_values(&["kafka_consume"]).inc();
                        tracing::warn!(error = %e, "consume failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let raw = RawRecord {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m.headers().map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default(),
                    timestamp_ms: m.timestamp().to_millis(),
                };
                drop(m);
                let tx = match spawner.task(&raw.topic, raw.partition) {
                    Ok(tx) => tx,
                    Err(e) => break Err(e),
                };
                if tx.send(raw).await.is_err() {
                    // The task has stopped; its error arrives on `fail_rx`.
                    match fail_rx.recv().await {
                        Some(e) => break Err(e),
                        None => break Err(anyhow::anyhow!("a task stopped")),
                    }
                }
            }
        }
    };
    // Stop every task (dropping its sender), let each flush and publish, then commit.
    let remaining: Vec<TaskHandle> = lock(&tasks).drain().map(|(_, h)| h).collect();
    let joins: Vec<_> = remaining
        .into_iter()
        .map(|h| {
            drop(h.tx);
            h.join
        })
        .collect();
    for j in joins {
        let _ = j.await;
    }
    // Under exactly-once the offsets were committed in the tasks' transactions.
    if topo.processing_guarantee == ProcessingGuarantee::AtLeastOnce {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit skipped");
        }
    }
    // Leave the group now, so the partitions move at once instead of after the session
    // timeout.
    consumer.unsubscribe();
    tracing::info!("worker stopped");
    result
}

/// Starts the tasks of the worker's partitions.
struct Spawner {
    topo: Arc<CompiledTopology>,
    settings: WorkerSettings,
    tasks: Tasks,
    consumer: Arc<WorkerConsumer>,
    producer: FutureProducer,
    dispatcher: Dispatcher,
    fail: mpsc::UnboundedSender<anyhow::Error>,
}

impl Spawner {
    /// The input channel of the partition's task, started first if it is not running.
    fn task(&self, topic: &str, partition: i32) -> anyhow::Result<mpsc::Sender<RawRecord>> {
        let key = (topic.to_owned(), partition);
        if let Some(h) = lock(&self.tasks).get(&key) {
            return Ok(h.tx.clone());
        }
        let handle = spawn_task(
            &self.topo,
            &self.settings,
            topic,
            partition,
            self.consumer.clone(),
            self.producer.clone(),
            self.dispatcher.clone(),
            self.fail.clone(),
        )?;
        let tx = handle.tx.clone();
        lock(&self.tasks).insert(key, handle);
        Ok(tx)
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_task(
    topo: &CompiledTopology,
    settings: &WorkerSettings,
    topic: &str,
    partition: i32,
    consumer: Arc<WorkerConsumer>,
    producer: FutureProducer,
    dispatcher: Dispatcher,
    fail: mpsc::UnboundedSender<anyhow::Error>,
) -> anyhow::Result<TaskHandle> {
    let started = Instant::now();
    let store = open_store(settings, &topo.application_id, topic, partition)?;
    let committed = committed_offset(&consumer, topic, partition)?;
    let watermarks = |t: &str| {
        tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(t, partition, Duration::from_secs(10))
        })
        .with_context(|| format!("reading the extent of {t}-{partition}"))
    };
    let changelog = topo.changelog_topic(topic);
    let changelog_extent = match settings.changelog {
        true => Some(watermarks(&changelog)?),
        false => None,
    };
    let cluster =
        tokio::task::block_in_place(|| consumer.client().fetch_cluster_id(Duration::from_secs(10)));
    let follows = Follows {
        cluster: cluster.as_deref(),
        source_end: watermarks(topic)?.1,
        changelog_end: changelog_extent.map(|(_, high)| high),
    };
    let stale = stale_store(&store, &follows)?;
    if let Some(reason) = &stale {
        METRICS
            .stores_discarded
            .with_label_values(&[reason.label()])
            .inc();
        tracing::warn!(topic, partition, %reason, "the local store follows another log than the broker's: discarding it and starting from what the broker has");
        if !settings.changelog {
            store.clear()?;
        }
    }
    let mut unfinished = Vec::new();
    let source = match changelog_extent {
        Some((low, high)) => {
            // Someone else wrote to the changelog since this copy last followed it (the
            // partition was elsewhere meanwhile), or this copy is new or behind the group.
            let behind_log = store.changelog_end()?.unwrap_or(0) < high;
            let behind_group = match (store.next_offset()?, committed) {
                (Some(l), Some(c)) => l < c,
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if stale.is_some() || behind_log || behind_group {
                let restored = tokio::task::block_in_place(|| {
                    restore_from_changelog(
                        &store,
                        (&settings.brokers, &settings.kafka),
                        &changelog,
                        partition,
                        (low, high),
                    )
                })?;
                tracing::info!(topic, partition, records = restored.applied, unfinished = restored.unfinished.len(), checkpoint = ?store.next_offset()?, "store restored from the changelog");
                unfinished = restored.unfinished;
                "changelog"
            } else {
                "local"
            }
        }
        None if stale.is_some() => "discarded",
        None => "local",
    };
    if let Some(id) = &cluster {
        if store.cluster_id()?.as_ref() != Some(id) {
            let mut ws = stores::WriteSet::default();
            ws.set_cluster_id(id);
            store.commit(ws)?;
        }
    }
    let mut task = Task::open(topo, store, topic, partition, settings.changelog)?;
    // The restored values go over whatever the previous writer left half-written.
    task.republish(unfinished)?;
    ensure_store_is_current(topic, partition, task.next_offset(), committed)?;
    let restore = started.elapsed();
    METRICS
        .restore_seconds
        .with_label_values(&[source])
        .observe(restore.as_secs_f64());
    tracing::info!(topic, partition, checkpoint = ?task.next_offset(), source, restore_ms = restore.as_millis() as u64, "task started");
    let (tx, rx) = mpsc::channel(settings.max_batch * 4);
    let settings = settings.clone();
    let guarantee = topo.processing_guarantee;
    let app = topo.application_id.clone();
    let join = tokio::spawn(async move {
        let label = format!("{}-{}", task.topic, task.partition);
        let run = async {
            let output = match guarantee {
                ProcessingGuarantee::AtLeastOnce => Output::AtLeastOnce(producer),
                ProcessingGuarantee::ExactlyOnce => Output::ExactlyOnce(
                    transactional_producer(&settings, &app, &task.topic, task.partition).await?,
                ),
            };
            task_loop(task, rx, &consumer, &output, &dispatcher, &settings).await
        };
        if let Err(e) = run.await {
            METRICS.errors.with_label_values(&["task_failed"]).inc();
            tracing::error!(task = %label, error = %format!("{e:#}"), "task failed");
            let _ = fail.send(e.context(format!("task {label} failed")));
        }
    });
    Ok(TaskHandle { tx, join })
}

/// What the broker holds for a task's partition: the log its store must follow.
struct Follows<'a> {
    /// The cluster's id, where the broker tells it.
    cluster: Option<&'a str>,
    /// The source partition's end (high watermark).
    source_end: i64,
    /// The changelog partition's end, when changelogs are on.
    changelog_end: Option<i64>,
}

/// Why a local store cannot belong to the broker's log.
#[derive(Debug, PartialEq)]
enum Stale {
    /// The store has processed records the source partition never had.
    AheadOfSource { checkpoint: i64, source_end: i64 },
    /// The store followed a changelog further than the changelog reaches.
    AheadOfChangelog { followed: i64, changelog_end: i64 },
    /// The store was written against another cluster.
    OtherCluster { recorded: String, broker: String },
}

impl Stale {
    fn label(&self) -> &'static str {
        match self {
            Stale::AheadOfSource { .. } => "ahead_of_source",
            Stale::AheadOfChangelog { .. } => "ahead_of_changelog",
            Stale::OtherCluster { .. } => "other_cluster",
        }
    }
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::AheadOfSource { checkpoint, source_end } => write!(
                f,
                "its checkpoint {checkpoint} is past the source partition's end {source_end}"
            ),
            Stale::AheadOfChangelog { followed, changelog_end } => write!(
                f,
                "it followed the changelog to offset {followed}, past the changelog's end {changelog_end}"
            ),
            Stale::OtherCluster { recorded, broker } => write!(
                f,
                "it was written against Kafka cluster {recorded}, the broker is cluster {broker}"
            ),
        }
    }
}

/// A store that is ahead of its source partition or of its changelog, or that was
/// written against another cluster, follows a log the broker no longer has (a broker
/// reset, a new cluster, a topic deleted and created again). Trusting its checkpoint
/// would skip the broker's records below it, so such a store is discarded: the broker's
/// log is the truth and the store only its cache.
fn stale_store(store: &PartitionStore, broker: &Follows<'_>) -> anyhow::Result<Option<Stale>> {
    if let (Some(recorded), Some(cluster)) = (store.cluster_id()?, broker.cluster) {
        if recorded != cluster {
            return Ok(Some(Stale::OtherCluster {
                recorded,
                broker: cluster.to_owned(),
            }));
        }
    }
    if let Some(checkpoint) = store.next_offset()? {
        if checkpoint > broker.source_end {
            return Ok(Some(Stale::AheadOfSource {
                checkpoint,
                source_end: broker.source_end,
            }));
        }
    }
    if let (Some(followed), Some(changelog_end)) = (store.changelog_end()?, broker.changelog_end) {
        if followed > changelog_end {
            return Ok(Some(Stale::AheadOfChangelog {
                followed,
                changelog_end,
            }));
        }
    }
    Ok(None)
}

/// Opens a partition's store, waiting up to 30 s for a previous owner (another worker on
/// the same state directory) to release it.
fn open_store(
    settings: &WorkerSettings,
    app: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<PartitionStore> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PartitionStore::open_with_cache(
            &settings.state_dir,
            app,
            topic,
            partition,
            settings.store_cache_bytes,
        ) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, topic, partition, "store busy; retrying");
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(100)));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The group's committed offset for a partition, if any.
fn committed_offset(
    consumer: &WorkerConsumer,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed =
        tokio::task::block_in_place(|| consumer.committed_offsets(tpl, Duration::from_secs(10)))
            .with_context(|| format!("reading the committed offset of {topic}-{partition}"))?;
    Ok(committed
        .find_partition(topic, partition)
        .and_then(|e| e.offset().to_raw())
        .filter(|o| *o >= 0))
}

/// Refuses a store that is behind what the group has committed for its partition (after
/// any restore): applying commands to it would diverge from the events already published.
fn ensure_store_is_current(
    topic: &str,
    partition: i32,
    local: Option<i64>,
    committed: Option<i64>,
) -> anyhow::Result<()> {
    match (local, committed) {
        (_, None) => Ok(()),
        (Some(local), Some(c)) if local >= c => Ok(()),
        (local, Some(c)) => anyhow::bail!(
            "the store of {topic}-{partition} is behind the group's committed offset (store: {}, group: {c}) even \
             after restoring: the changelog topic was deleted or is not compacted-retained, or changelogs are off \
             (they are on by default). Restore the changelog topic, or reset the group's offsets to replay the source",
            local.map_or("empty".to_owned(), |l| l.to_string())
        ),
    }
}

/// Changelog values carry a one-byte tag so an empty stored value is not a tombstone.
const CHANGELOG_PUT: u8 = 1;

fn changelog_value(v: &Option<Vec<u8>>) -> Option<Vec<u8>> {
    v.as_ref().map(|v| {
        let mut out = Vec::with_capacity(v.len() + 1);
        out.push(CHANGELOG_PUT);
        out.extend_from_slice(v);
        out
    })
}

/// Rebuilds a partition's store from its changelog partition: empties it, then applies
/// every complete batch of the partition's extent (`low..high`, read just before).
/// Returns the keys of an unfinished batch at the end, left out.
fn restore_from_changelog(
    store: &PartitionStore,
    (brokers, kafka): (&str, &[(String, String)]),
    changelog: &str,
    partition: i32,
    (low, high): (i64, i64),
) -> anyhow::Result<stores::Restored> {
    let mut cfg = client_config(brokers, kafka);
    cfg.set("group.id", format!("{changelog}-restore"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = cfg
        .create()
        .context("creating the changelog restore consumer")?;
    let mut restore = stores::Restore::start(store)?;
    if high <= low {
        return Ok(restore.finish(high)?);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(changelog, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut read = 0;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "restoring {changelog}-{partition} took longer than 10 minutes ({read} records so far)"
        );
        let done = match consumer.poll(Duration::from_millis(500)) {
            None => false,
            Some(Ok(m)) => {
                if let (Some(k), true) = (m.key(), m.offset() < high) {
                    let v = match m.payload() {
                        None => None,
                        Some([CHANGELOG_PUT, rest @ ..]) => Some(rest.to_vec()),
                        Some(_) => anyhow::bail!(
                            "{changelog}-{partition} offset {}: not a changelog record of this version",
                            m.offset()
                        ),
                    };
                    restore.push((k.to_vec(), v))?;
                    read += 1;
                }
                m.offset() >= high - 1
            }
            Some(Err(KafkaError::PartitionEOF(_))) => true,
            Some(Err(e)) => {
                tracing::warn!(error = %e, %changelog, partition, "changelog read failed; retrying");
                false
            }
        };
        if done {
            return Ok(restore.finish(high)?);
        }
    }
}

/// Rebuilds `store` from partition `partition` of `changelog` exactly as a worker does
/// when it takes the partition over without a current local copy: for tools that
/// measure restores without disturbing a running worker (`make soak`).
pub fn restore_partition(
    store: &PartitionStore,
    brokers: &str,
    kafka: &[(String, String)],
    changelog: &str,
    partition: i32,
) -> anyhow::Result<stores::Restored> {
    let consumer: BaseConsumer = client_config(brokers, kafka)
        .create()
        .context("creating a consumer to read the changelog's extent")?;
    let extent = consumer
        .fetch_watermarks(changelog, partition, Duration::from_secs(10))
        .with_context(|| format!("reading the extent of {changelog}-{partition}"))?;
    restore_from_changelog(store, (brokers, kafka), changelog, partition, extent)
}

/// Fails fast, with what to do, when a source's changelog topic is missing or has fewer
/// partitions than the source.
fn ensure_changelog_topics(
    producer: &FutureProducer,
    topo: &CompiledTopology,
) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    for source in topo.source_topics() {
        let changelog = topo.changelog_topic(&source);
        let partitions = |t: &str| -> anyhow::Result<usize> {
            let md = tokio::task::block_in_place(|| {
                producer
                    .client()
                    .fetch_metadata(Some(t), Duration::from_secs(10))
            })
            .with_context(|| format!("reading the metadata of topic {t}"))?;
            Ok(md
                .topics()
                .iter()
                .find(|x| x.name() == t && x.error().is_none())
                .map_or(0, |x| x.partitions().len()))
        };
        let (have, need) = (partitions(&changelog)?, partitions(&source)?);
        anyhow::ensure!(
            have > 0 && have >= need,
            "changelog topic {changelog} has {have} partitions, the source {source} {need}: create it with \
             {need} partitions and cleanup.policy=compact (docker-compose.yml's kafka-init does)"
        );
    }
    Ok(())
}

/// How a task's outputs, changelog and input offsets reach Kafka.
enum Output {
    /// The changelog first, then the outputs; the input offset is stored for the
    /// consumer's auto-commit once both are delivered.
    AtLeastOnce(FutureProducer),
    /// One Kafka transaction per publish: changelog, outputs, their removal from the
    /// outbox and the input offset commit together or not at all. The producer's
    /// transactional id is the partition's, so whoever takes the partition over fences
    /// the previous owner.
    ExactlyOnce(FutureProducer),
}

async fn task_loop(
    mut task: Task,
    mut rx: mpsc::Receiver<RawRecord>,
    consumer: &WorkerConsumer,
    output: &Output,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
) -> anyhow::Result<()> {
    let task_label = format!("{}-{}", task.topic, task.partition);
    // Whatever a crash (or the previous owner) left in the outbox goes out first.
    publish(&mut task, output, consumer, dispatcher).await?;
    let mut tick = tokio::time::interval(settings.punctuate_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { break };
                let started = Instant::now();
                let mut batch = vec![first];
                while batch.len() < settings.max_batch {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let now = now_ms();
                let last = batch.last().map(|r| r.offset);
                off_runtime(|| {
                    task.apply_inputs(batch, now)?;
                    task.fire_timers(now, 1000)
                })?;
                observe_stage("apply", started);
                publish(&mut task, output, consumer, dispatcher).await?;
                if let (Some(offset), Output::AtLeastOnce(_)) = (last, output) {
                    // Stores `offset + 1` for the next commit; fails harmlessly if the
                    // partition was revoked meanwhile.
                    if let Err(e) = consumer.store_offset(&task.topic, task.partition, offset) {
                        tracing::debug!(error = %e, "offset not stored");
                    }
                }
                METRICS.batch_seconds.observe(started.elapsed().as_secs_f64());
            }
            _ = tick.tick() => {
                let now = now_ms();
                if task.timers_due(now)? && off_runtime(|| task.fire_timers(now, 1000))? > 0 {
                    publish(&mut task, output, consumer, dispatcher).await?;
                }
            }
            _ = housekeeping.tick() => {
                let counts = off_runtime(|| {
                    task.maintain(now_ms())?;
                    task.key_counts().map(|c| {
                        c.into_iter().map(|(s, n)| (s.to_owned(), n)).collect::<Vec<_>>()
                    })
                })?;
                for (store, n) in counts {
                    METRICS
                        .store_keys
                        .with_label_values(&[&task_label, &store])
                        .set(n as i64);
                }
            }
        }
    }
    publish(&mut task, output, consumer, dispatcher).await?;
    // Once more for the removal of what was just published, so the next owner does not
    // publish it again.
    publish(&mut task, output, consumer, dispatcher).await?;
    for store in task
        .key_counts()
        .map(|c| c.into_iter().map(|(s, _)| s.to_owned()).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let _ = METRICS
            .store_keys
            .remove_label_values(&[&task_label, &store]);
    }
    tracing::info!(topic = %task.topic, partition = task.partition, checkpoint = ?task.next_offset(), "task stopped");
    Ok(())
}

/// Runs a task's processing and store work, which goes on for milliseconds without
/// yielding: the runtime's other tasks (the API's and the sink's when the roles share a
/// process) move to another thread meanwhile.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Makes the task's state durable, then delivers its queued changelog and publishes its
/// outbox as the processing guarantee says; provider calls go out last.
async fn publish(
    task: &mut Task,
    output: &Output,
    consumer: &WorkerConsumer,
    dispatcher: &Dispatcher,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let store = task.store().clone();
    tokio::task::spawn_blocking(move || store.flush())
        .await
        .context("the store flush stopped before finishing")??;
    observe_stage("flush", t);
    match output {
        Output::AtLeastOnce(producer) => publish_at_least_once(task, producer, dispatcher).await,
        Output::ExactlyOnce(producer) => {
            publish_transaction(task, producer, consumer, dispatcher).await
        }
    }
}

/// The changelog, then the Kafka records of the outbox (retried until delivered; a
/// broker outage stalls this partition, it loses nothing), then provider calls.
async fn publish_at_least_once(
    task: &mut Task,
    producer: &FutureProducer,
    dispatcher: &Dispatcher,
) -> anyhow::Result<()> {
    let t = Instant::now();
    deliver_changelog(task, producer).await?;
    observe_stage("changelog", t);
    let t = Instant::now();
    let outbox = Outbox::of(task)?;
    let sends = outbox.outputs.into_iter().filter_map(|entry| match entry {
        OutboxEntry::Kafka {
            topic,
            key,
            payload,
            headers,
        } => Some(send_until_delivered(producer, topic, key, payload, headers)),
        OutboxEntry::Provider(_) => None,
    });
    for r in join_all(sends).await {
        r?;
    }
    observe_stage("outputs", t);
    for call in outbox.calls {
        dispatcher.dispatch(call).await;
    }
    task.published(outbox.output_keys.into_iter().chain(outbox.call_keys))?;
    Ok(())
}

/// A task's pending outbox: Kafka records and provider calls, each with their keys.
struct Outbox {
    output_keys: Vec<Vec<u8>>,
    outputs: Vec<OutboxEntry>,
    call_keys: Vec<Vec<u8>>,
    calls: Vec<crate::processor::ProviderCall>,
}

impl Outbox {
    fn of(task: &Task) -> anyhow::Result<Outbox> {
        let mut o = Outbox {
            output_keys: Vec::new(),
            outputs: Vec::new(),
            call_keys: Vec::new(),
            calls: Vec::new(),
        };
        // Entries of one outbox record are adjacent: each key is listed once.
        let once = |keys: &mut Vec<Vec<u8>>, key: Vec<u8>| {
            if keys.last() != Some(&key) {
                keys.push(key);
            }
        };
        for (key, entry) in task.pending()?.entries {
            match entry {
                OutboxEntry::Provider(call) => {
                    once(&mut o.call_keys, key);
                    o.calls.push(call);
                }
                kafka => {
                    once(&mut o.output_keys, key);
                    o.outputs.push(kafka);
                }
            }
        }
        Ok(o)
    }
}

fn observe_stage(stage: &str, since: Instant) {
    METRICS
        .stage_seconds
        .with_label_values(&[stage])
        .observe(since.elapsed().as_secs_f64());
}

/// Delivers the task's queued changelog batches, merged into one (the last write of each
/// key wins; see [`stores::coalesce`]), to its partition of the changelog topic, before
/// anything they account for is published: a restore then never lands behind an output
/// already seen. The producer is idempotent and gapless, so
/// what the topic holds is always a prefix of what was sent.
async fn deliver_changelog(task: &Task, producer: &FutureProducer) -> anyhow::Result<()> {
    let Some(topic) = task.changelog_topic() else {
        return Ok(());
    };
    let batches = task.pending_changelog()?;
    if batches.is_empty() {
        return Ok(());
    }
    let marker = batch_number(batches.last().map(|(k, _)| k.as_slice()));
    let keys: Vec<Vec<u8>> = batches.iter().map(|(k, _)| k.clone()).collect();
    let records = stores::coalesce(batches.into_iter().map(|(_, r)| r), marker);
    let sends = records
        .into_iter()
        .map(|(k, v)| send_changelog(producer, topic, task.partition, k, changelog_value(&v)));
    let mut end = None;
    for r in join_all(sends).await {
        end = end.max(Some(r? + 1));
    }
    task.changelog_delivered(keys, end, None)?;
    Ok(())
}

/// The number of a queued changelog batch, from its queue key.
fn batch_number(key: Option<&[u8]>) -> u64 {
    key.and_then(|k| k.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A transactional producer for one partition's task, its earlier incarnations fenced.
async fn transactional_producer(
    settings: &WorkerSettings,
    app: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<FutureProducer> {
    use rdkafka::producer::Producer;
    let mut extra = vec![
        (
            "transactional.id".to_owned(),
            format!("{app}-{topic}-{partition}"),
        ),
        ("transaction.timeout.ms".to_owned(), "60000".to_owned()),
    ];
    extra.extend(settings.kafka.iter().cloned());
    let producer = producer(&settings.brokers, &extra)?;
    txn_call(&producer, "starting the transactional producer", |p| {
        p.init_transactions(Duration::from_secs(60))
    })
    .await
    .map_err(|e| match e {
        TxnError::Retry(e) | TxnError::Fatal(e) => e.context(format!("{topic}-{partition}")),
    })?;
    Ok(producer)
}

/// Runs one of the producer's blocking transaction calls off the async threads.
async fn txn_call<F>(producer: &FutureProducer, what: &'static str, f: F) -> Result<(), TxnError>
where
    F: FnOnce(&FutureProducer) -> rdkafka::error::KafkaResult<()> + Send + 'static,
{
    let p = producer.clone();
    match tokio::task::spawn_blocking(move || f(&p)).await {
        Ok(r) => r.map_err(|e| txn_error(what, e)),
        Err(e) => Err(TxnError::Fatal(anyhow::anyhow!("{what}: {e}"))),
    }
}

/// Why a transaction did not commit.
enum TxnError {
    /// Aborted; the same transaction can be tried again.
    Retry(anyhow::Error),
    /// The producer is fenced or broken: the task must stop.
    Fatal(anyhow::Error),
}

fn txn_error(what: &str, e: KafkaError) -> TxnError {
    let fatal = match &e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    };
    let e = anyhow::anyhow!("{what}: {e}");
    if fatal {
        TxnError::Fatal(e)
    } else {
        TxnError::Retry(e)
    }
}

/// One transaction: the queued changelog, the outbox's Kafka records, the changelog of
/// their removal from the outbox, and the input offset. Retried (after an abort) until
/// it commits; a fenced producer fails the task. Provider calls go out after the commit.
async fn publish_transaction(
    task: &mut Task,
    producer: &FutureProducer,
    consumer: &WorkerConsumer,
    dispatcher: &Dispatcher,
) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let queued = task.pending_changelog()?;
    let Outbox {
        output_keys,
        outputs,
        call_keys,
        calls,
    } = Outbox::of(task)?;
    if !queued.is_empty() || !outputs.is_empty() {
        let removal = task.removal(&output_keys);
        let marker = batch_number(queued.last().map(|(k, _)| k.as_slice())) + 1;
        let queue_keys: Vec<Vec<u8>> = queued.iter().map(|(k, _)| k.clone()).collect();
        let changelog = stores::coalesce(
            queued
                .into_iter()
                .map(|(_, r)| r)
                .chain([removal.records.clone()]),
            marker,
        );
        let mut delay = Duration::from_millis(100);
        let t = Instant::now();
        let end = loop {
            match transaction(task, producer, consumer, &changelog, &outputs).await {
                Ok(end) => break end,
                Err(TxnError::Fatal(e)) => return Err(e),
                Err(TxnError::Retry(e)) => {
                    METRICS.errors.with_label_values(&["transaction"]).inc();
                    tracing::warn!(topic = %task.topic, partition = task.partition, error = %format!("{e:#}"), "transaction aborted; retrying");
                    let abort = txn_call(producer, "aborting the transaction", |p| {
                        p.abort_transaction(Duration::from_secs(30))
                    });
                    if let Err(TxnError::Fatal(e)) = abort.await {
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        observe_stage("transaction", t);
        task.changelog_delivered(queue_keys, end, Some(removal))?;
    }
    for call in calls {
        dispatcher.dispatch(call).await;
    }
    task.published(call_keys)?;
    Ok(())
}

/// Runs one transaction; returns the changelog offset after its last record.
async fn transaction(
    task: &Task,
    producer: &FutureProducer,
    consumer: &WorkerConsumer,
    changelog: &[stores::ChangelogRecord],
    outputs: &[OutboxEntry],
) -> Result<Option<i64>, TxnError> {
    use rdkafka::producer::Producer;
    txn_call(producer, "beginning a transaction", |p| {
        p.begin_transaction()
    })
    .await?;
    let topic = task.changelog_topic();
    let changelog_sends = changelog.iter().filter_map(|(k, v)| {
        let topic = topic?;
        let value = changelog_value(v);
        Some(async move {
            let record = changelog_record(topic, task.partition, k, &value);
            producer.send(record, Duration::from_secs(30)).await
        })
    });
    let output_sends = outputs.iter().filter_map(|entry| match entry {
        OutboxEntry::Kafka {
            topic,
            key,
            payload,
            headers,
        } => Some(async move {
            let mut record = FutureRecord::to(topic)
                .payload(payload)
                .headers(owned_headers(headers));
            if let Some(k) = key {
                record = record.key(k);
            }
            producer.send(record, Duration::from_secs(30)).await
        }),
        OutboxEntry::Provider(_) => None,
    });
    let (changelog_results, output_results) =
        futures::future::join(join_all(changelog_sends), join_all(output_sends)).await;
    let mut last = None;
    for r in changelog_results {
        let d = r.map_err(|(e, _)| txn_error("publishing the changelog", e))?;
        last = last.max(Some(d.offset));
    }
    for r in output_results {
        r.map_err(|(e, _)| txn_error("publishing outputs", e))?;
    }
    if let Some(next) = task.next_offset() {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&task.topic, task.partition, Offset::Offset(next))
            .map_err(|e| TxnError::Fatal(e.into()))?;
        let group = consumer.group_metadata().ok_or_else(|| {
            TxnError::Retry(anyhow::anyhow!("the consumer has no group metadata yet"))
        })?;
        txn_call(
            producer,
            "adding the input offset to the transaction",
            move |p| p.send_offsets_to_transaction(&offsets, &group, Duration::from_secs(30)),
        )
        .await?;
    }
    txn_call(producer, "committing the transaction", |p| {
        p.commit_transaction(Duration::from_secs(30))
    })
    .await?;
    // The commit marker takes the offset after the transaction's last record.
    Ok(last.map(|o| o + 2))
}

/// A changelog record for the task's partition (`None`: a tombstone).
fn changelog_record<'a>(
    topic: &'a str,
    partition: i32,
    key: &'a [u8],
    value: &'a Option<Vec<u8>>,
) -> FutureRecord<'a, [u8], [u8]> {
    let record = FutureRecord::to(topic).partition(partition).key(key);
    match value {
        Some(v) => record.payload(v),
        None => record,
    }
}

fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(headers.len());
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    h
}

/// Sends one changelog record; returns its offset. A failure is not retried here: a
/// retried record would land after later ones and a restore would apply an older value
/// last. The task fails instead, and its restart delivers the whole queue again, in
/// order.
async fn send_changelog(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
) -> anyhow::Result<i64> {
    producer
        .send(
            changelog_record(topic, partition, &key, &value),
            Duration::from_secs(30),
        )
        .await
        .map(|d| d.offset)
        .map_err(|(e, _)| {
            METRICS.errors.with_label_values(&["changelog_produce"]).inc();
            anyhow::anyhow!("publishing to the changelog {topic}-{partition} failed: {e}; the task restarts and delivers its queued changelog again")
        })
}

async fn send_until_delivered(
    producer: &FutureProducer,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    mut headers: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    // A traced record is published in a `produce` span; its consumer continues from it.
    let span = headers
        .iter_mut()
        .find(|(k, _)| k == "traceparent")
        .and_then(|(_, tp)| {
            let parent = String::from_utf8(tp.clone()).ok()?;
            let span = tracing::info_span!(
                "kafka.produce",
                otel.name = %format_args!("{topic} publish"),
                otel.kind = "producer",
                messaging.system = "kafka",
                messaging.destination.name = %topic,
                trace_id = tracing::field::Empty,
            );
            *tp = telemetry::adopt(&span, Some(&parent), &[])?.into_bytes();
            Some(span)
        })
        .unwrap_or_else(tracing::Span::none);
    deliver(producer, &topic, key, payload, headers)
        .instrument(span)
        .await
}

async fn deliver(
    producer: &FutureProducer,
    topic: &str,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::to(topic)
            .payload(&payload)
            .headers(owned_headers(&headers));
        if let Some(k) = &key {
            record = record.key(k);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => {
                METRICS.errors.with_label_values(&["kafka_produce"]).inc();
                if let Some((code, reason)) = producer.client().fatal_error() {
                    anyhow::bail!("the Kafka producer stopped ({code:?}: {reason}); the worker restarts and publishes its outbox again");
                }
                tracing::warn!(%topic, error = %e, "publishing failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_following(
        next: i64,
        changelog_end: i64,
        cluster: &str,
    ) -> (tempfile::TempDir, PartitionStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = PartitionStore::open(dir.path(), "app", "cmd", 0).expect("open store");
        let mut ws = stores::WriteSet::default();
        ws.set_next_offset(next);
        ws.set_changelog_end(changelog_end);
        ws.set_cluster_id(cluster);
        store.commit(ws).expect("commit");
        (dir, store)
    }

    fn verdict(
        store: &PartitionStore,
        cluster: Option<&str>,
        source_end: i64,
        changelog_end: Option<i64>,
    ) -> Option<&'static str> {
        let follows = Follows {
            cluster,
            source_end,
            changelog_end,
        };
        stale_store(store, &follows)
            .expect("read store")
            .map(|s| s.label())
    }

    #[test]
    fn a_store_is_trusted_only_while_the_broker_holds_what_it_followed() {
        let (_dir, store) = store_following(100, 50, "cluster-a");
        // The same log, grown since: trusted (a restore decides the rest).
        assert_eq!(verdict(&store, Some("cluster-a"), 100, Some(50)), None);
        assert_eq!(verdict(&store, Some("cluster-a"), 250, Some(80)), None);
        // A broker that does not tell its cluster id is judged by the offsets alone.
        assert_eq!(verdict(&store, None, 100, Some(50)), None);
        // A broker reset: the partitions start again below the store's positions.
        assert_eq!(
            verdict(&store, Some("cluster-a"), 40, Some(50)),
            Some("ahead_of_source")
        );
        assert_eq!(
            verdict(&store, Some("cluster-a"), 100, Some(10)),
            Some("ahead_of_changelog")
        );
        assert_eq!(
            verdict(&store, Some("cluster-a"), 100, Some(0)),
            Some("ahead_of_changelog")
        );
        // Another cluster, whatever its offsets.
        assert_eq!(
            verdict(&store, Some("cluster-b"), 500, Some(500)),
            Some("other_cluster")
        );
    }

    #[test]
    fn a_new_store_follows_any_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = PartitionStore::open(dir.path(), "app", "cmd", 0).expect("open store");
        assert_eq!(verdict(&store, Some("cluster-a"), 0, Some(0)), None);
    }
}
