//! The worker: consumes the source topics in a consumer group and runs one [`Task`] per
//! assigned partition, each on its own tokio task.
//!
//! Offsets: auto-commit is on but auto offset *store* is off; a task stores an offset
//! only after the records up to it are durable in its sled store and their outputs are
//! published (rust-rdkafka's at-least-once pattern). The sled checkpoint is ahead of or
//! equal to the committed offset, and records below it are skipped.
//!
//! Crash-only: a task that fails (its store broke) stops the worker with the error; the
//! supervisor restarts the process, which resumes from the durable checkpoints.

use crate::config::CompiledTopology;
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
    let mut cfg = client_config(&settings.brokers, &[]);
    cfg.set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", "5000")
        // A crashed worker's partitions move after 10 s rather than librdkafka's 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000");
    for (k, v) in &settings.kafka {
        cfg.set(k, v);
    }
    let consumer: Arc<WorkerConsumer> = Arc::new(
        cfg.create_with_context(WorkerContext {
            group: group.clone(),
            tasks: tasks.clone(),
        })
        .context("creating the Kafka consumer")?,
    );
    let topics = topo.source_topics();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .context("subscribing to the source topics")?;
    let producer = producer(&settings.brokers, &settings.kafka)?;
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
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(e) = fail_rx.recv() => break Err(e),
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
                let key = (raw.topic.clone(), raw.partition);
                let tx = {
                    let mut map = lock(&tasks);
                    if !map.contains_key(&key) {
                        match spawn_task(&topo, &settings, &key.0, key.1, consumer.clone(), producer.clone(), dispatcher.clone(), fail_tx.clone()) {
                            Ok(handle) => {
                                map.insert(key.clone(), handle);
                            }
                            Err(e) => break Err(e),
                        }
                    }
                    map.get(&key).map(|h| h.tx.clone())
                };
                if let Some(tx) = tx {
                    if tx.send(raw).await.is_err() {
                        // The task has stopped; its error arrives on `fail_rx`.
                        match fail_rx.recv().await {
                            Some(e) => break Err(e),
                            None => break Err(anyhow::anyhow!("task for {}-{} stopped", key.0, key.1)),
                        }
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
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final offset commit skipped");
    }
    // Leave the group now, so the partitions move at once instead of after the session
    // timeout.
    consumer.unsubscribe();
    tracing::info!("worker stopped");
    result
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
    let local = store.next_offset()?;
    let behind = match (local, committed) {
        (None, _) => true,
        (Some(l), Some(c)) => l < c,
        (Some(_), None) => false,
    };
    let source = if settings.changelog && behind {
        let changelog = topo.changelog_topic(topic);
        let records = tokio::task::block_in_place(|| {
            restore_from_changelog(&store, settings, &changelog, partition)
        })?;
        tracing::info!(topic, partition, records, checkpoint = ?store.next_offset()?, "store restored from the changelog");
        "changelog"
    } else {
        "local"
    };
    let task = Task::open(topo, store, topic, partition, settings.changelog)?;
    ensure_store_is_current(topic, partition, task.next_offset(), committed)?;
    let restore = started.elapsed();
    METRICS
        .restore_seconds
        .with_label_values(&[source])
        .observe(restore.as_secs_f64());
    tracing::info!(topic, partition, checkpoint = ?task.next_offset(), source, restore_ms = restore.as_millis() as u64, "task started");
    let (tx, rx) = mpsc::channel(settings.max_batch * 4);
    let settings = settings.clone();
    let join = tokio::spawn(async move {
        let label = format!("{}-{}", task.topic, task.partition);
        if let Err(e) = task_loop(task, rx, &consumer, &producer, &dispatcher, &settings).await {
            METRICS.errors.with_label_values(&["task_failed"]).inc();
            tracing::error!(task = %label, error = %format!("{e:#}"), "task failed");
            let _ = fail.send(e.context(format!("task {label} failed")));
        }
    });
    Ok(TaskHandle { tx, join })
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
        match PartitionStore::open(&settings.state_dir, app, topic, partition) {
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
/// every record up to the partition's end. Returns how many records were applied.
fn restore_from_changelog(
    store: &PartitionStore,
    settings: &WorkerSettings,
    changelog: &str,
    partition: i32,
) -> anyhow::Result<usize> {
    let mut cfg = client_config(&settings.brokers, &settings.kafka);
    cfg.set("group.id", format!("{changelog}-restore"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = cfg
        .create()
        .context("creating the changelog restore consumer")?;
    let (low, high) = consumer
        .fetch_watermarks(changelog, partition, Duration::from_secs(10))
        .with_context(|| format!("reading the extent of {changelog}-{partition}"))?;
    store.clear()?;
    if high <= low {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(changelog, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut batch = Vec::new();
    let mut applied = 0;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "restoring {changelog}-{partition} took longer than 10 minutes ({applied} records so far)"
        );
        let done = match consumer.poll(Duration::from_millis(500)) {
            None => false,
            Some(Ok(m)) => {
                if let Some(k) = m.key() {
                    let v = match m.payload() {
                        None => None,
                        Some([CHANGELOG_PUT, rest @ ..]) => Some(rest.to_vec()),
                        Some(_) => anyhow::bail!(
                            "{changelog}-{partition} offset {}: not a changelog record of this version",
                            m.offset()
                        ),
                    };
                    batch.push((k.to_vec(), v));
                }
                m.offset() >= high - 1
            }
            Some(Err(KafkaError::PartitionEOF(_))) => true,
            Some(Err(e)) => {
                tracing::warn!(error = %e, %changelog, partition, "changelog read failed; retrying");
                false
            }
        };
        if batch.len() >= 10_000 || (done && !batch.is_empty()) {
            applied += batch.len();
            store.apply_changelog(batch.drain(..))?;
        }
        if done {
            return Ok(applied);
        }
    }
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

async fn task_loop(
    mut task: Task,
    mut rx: mpsc::Receiver<RawRecord>,
    consumer: &WorkerConsumer,
    producer: &FutureProducer,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
) -> anyhow::Result<()> {
    // Whatever a crash left in the outbox goes out first.
    publish(&task, producer, dispatcher).await?;
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
                let mut last = None;
                for raw in batch {
                    last = Some(raw.offset);
                    task.apply_input(raw, now)?;
                }
                task.fire_timers(now, 1000)?;
                publish(&task, producer, dispatcher).await?;
                if let Some(offset) = last {
                    // Stores `offset + 1` for the next commit; fails harmlessly if the
                    // partition was revoked meanwhile.
                    if let Err(e) = consumer.store_offset(&task.topic, task.partition, offset) {
                        tracing::debug!(error = %e, "offset not stored");
                    }
                }
                METRICS.batch_seconds.observe(started.elapsed().as_secs_f64());
            }
            _ = tick.tick() => {
                if task.fire_timers(now_ms(), 1000)? > 0 {
                    publish(&task, producer, dispatcher).await?;
                }
            }
            _ = housekeeping.tick() => {
                task.maintain(now_ms())?;
            }
        }
    }
    publish(&task, producer, dispatcher).await?;
    tracing::info!(topic = %task.topic, partition = task.partition, checkpoint = ?task.next_offset(), "task stopped");
    Ok(())
}

/// Makes the task's state durable, then publishes its outbox: Kafka records first
/// (retried until delivered; a broker outage stalls this partition, it loses nothing),
/// then provider calls.
async fn publish(
    task: &Task,
    producer: &FutureProducer,
    dispatcher: &Dispatcher,
) -> anyhow::Result<()> {
    task.store().flush().await?;
    let pending = task.pending()?;
    if pending.entries.is_empty() {
        return Ok(());
    }
    let mut calls = Vec::new();
    let mut sends = Vec::new();
    let mut changelog = Vec::new();
    let mut keys = Vec::with_capacity(pending.entries.len());
    for (key, entry) in pending.entries {
        keys.push(key);
        match entry {
            OutboxEntry::Provider(call) => calls.push(call),
            OutboxEntry::Kafka {
                topic,
                key,
                payload,
                headers,
            } => sends.push(send_until_delivered(producer, topic, key, payload, headers)),
            OutboxEntry::Changelog { records } => changelog.extend(records),
        }
    }
    join_all(sends).await;
    // The changelog follows the outputs it accounts for: a restored store never holds a
    // change whose events were not published. Records of one partition keep their order
    // (idempotent producer), so a delivered prefix is a state the task was in.
    if let (Some(topic), false) = (task.changelog_topic(), changelog.is_empty()) {
        let sends = changelog.into_iter().map(|(key, value)| {
            send_changelog(
                producer,
                topic,
                task.partition,
                key,
                changelog_value(&value),
            )
        });
        for r in join_all(sends).await {
            r?;
        }
    }
    for call in calls {
        dispatcher.dispatch(call);
    }
    task.published(keys)?;
    Ok(())
}

/// Sends one changelog record. A failure is not retried here: a retried record would
/// land after later ones and a restore would apply an older value last. The task fails
/// instead, and its restart republishes the whole pending changelog, in order, from the
/// outbox.
async fn send_changelog(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
) -> anyhow::Result<()> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .partition(partition)
        .key(&key);
    if let Some(v) = &value {
        record = record.payload(v);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| {
            METRICS.errors.with_label_values(&["changelog_produce"]).inc();
            anyhow::anyhow!("publishing to the changelog {topic}-{partition} failed: {e}; the task restarts and republishes its pending changelog")
        })
}

async fn send_until_delivered(
    producer: &FutureProducer,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    mut headers: Vec<(String, Vec<u8>)>,
) {
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
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut record = FutureRecord::to(topic).payload(&payload).headers(h);
        if let Some(k) = &key {
            record = record.key(k);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err((e, _)) => {
                METRICS.errors.with_label_values(&["kafka_produce"]).inc();
                tracing::warn!(%topic, error = %e, "publishing failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
