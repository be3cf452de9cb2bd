//! The stream thread: one consumer in the group for every source topic. It hands each
//! record to its partition's task, starts tasks as partitions are assigned and stops
//! them (drained, flushed and published) before a revoked partition moves.

use super::restore::ensure_changelog_topics;
use super::tasks::{Spawner, TaskHandle};
use super::{client_config, worker_producer, WorkerSettings};
use crate::config::{CompiledTopology, ProcessingGuarantee};
use crate::metrics::METRICS;
use crate::processor::RawRecord;
use crate::provider::{Dispatcher, ProviderClient};
use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use telemetry::progress::FetchState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The running tasks by `(topic, partition)`, shared with the rebalance callback.
pub(super) type Tasks = Arc<std::sync::Mutex<HashMap<(String, i32), TaskHandle>>>;

pub(super) fn lock(tasks: &Tasks) -> std::sync::MutexGuard<'_, HashMap<(String, i32), TaskHandle>> {
    // A poisoned lock only means a panic elsewhere; the map itself is intact.
    tasks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the tasks of revoked partitions before the group moves them, exports consumer
/// lag from librdkafka's statistics (and says when a held partition is not fetched), and
/// logs rebalances.
pub struct WorkerContext {
    group: String,
    tasks: Tasks,
    /// Partitions just assigned, for the worker loop to start their tasks at once (not
    /// at their first record: a partition with nothing new to read still has timers to
    /// fire and an outbox to publish).
    assigned: mpsc::UnboundedSender<Vec<(String, i32)>>,
    /// The partitions held, for the watchdog.
    progress: Arc<telemetry::progress::Progress>,
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
        self.progress
            .fetch_states(stats.topics.iter().flat_map(|(topic, t)| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0)
                    .map(move |p| FetchState {
                        topic,
                        partition: p.partition,
                        state: &p.fetch_state,
                        leader: p.leader,
                    })
            }));
    }
}

impl ConsumerContext for WorkerContext {
    /// On revoke, each task of a revoked partition drains what it was given, flushes its
    /// store, publishes its outbox, stores its offset and closes its store — all before
    /// the group hands the partition (and, on a shared state directory, the store) to
    /// another worker.
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        tracing::info!(group = %self.group, change = %describe(rebalance), "rebalance starting");
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        self.progress.revoked(parts(tpl));
        // Lost (the session expired, another worker may hold them already) rather than
        // handed over: the tasks stop without draining or publishing.
        let lost = consumer.assignment_lost();
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
                if lost {
                    h.lost.store(true, std::sync::atomic::Ordering::SeqCst);
                }
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
            self.progress.assigned(parts(tpl));
            // The worker loop is gone only when the worker is stopping.
            let _ = self.assigned.send(parts(tpl));
        }
    }
}

fn parts(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// `assign cmd[0,1,2]`, `revoke cmd[3]`, or the error.
fn describe(r: &Rebalance<'_>) -> String {
    let list = |tpl: &TopicPartitionList| {
        telemetry::progress::partition_list(
            tpl.elements().iter().map(|e| (e.topic(), e.partition())),
        )
    };
    match r {
        Rebalance::Assign(tpl) => format!("assign {}", list(tpl)),
        Rebalance::Revoke(tpl) => format!("revoke {}", list(tpl)),
        Rebalance::Error(e) => format!("error {e}"),
    }
}

pub(super) type WorkerConsumer = StreamConsumer<WorkerContext>;

/// The worker's group session (`session.timeout.ms`; a `--kafka` property overrides it).
pub(super) const SESSION_TIMEOUT_MS: u64 = 10_000;

/// The worker consumer's prefetch bound, in KiB (`queued.max.messages.kbytes`; a
/// `--kafka` property overrides it).
pub const PREFETCH_KBYTES: u32 = 8 * 1024;

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
        .set("session.timeout.ms", SESSION_TIMEOUT_MS.to_string())
        .set("heartbeat.interval.ms", "2000")
        // A join waits this long for the members that have not rejoined (the group's
        // rebalance timeout): a frozen worker (a paused VM, a stopped process) that still
        // holds partitions blocks every other worker's rebalance for this long, not
        // librdkafka's 5 minutes. The worker polls all the time, far inside it.
        .set("max.poll.interval.ms", "30000")
        // `fetch.wait.max.ms` stays librdkafka's 500 ms: a broker answers a waiting fetch
        // as soon as a record arrives, so the wait adds no latency, and an idle
        // worker sends two fetches a second rather than a hundred.
        // What librdkafka prefetches ahead of the tasks, for all partitions together
        // (its default is 64 MiB): a worker's memory does not swell with a backlog,
        // which waits in Kafka instead.
        .set("queued.max.messages.kbytes", PREFETCH_KBYTES.to_string());
    if let Some(id) = &settings.instance_id {
        cfg.set("group.instance.id", id);
    }
    for (k, v) in &settings.kafka {
        cfg.set(k, v);
    }
    let consumer: Arc<WorkerConsumer> = Arc::new(
        cfg.create_with_context(WorkerContext {
            group: group.clone(),
            tasks: tasks.clone(),
            assigned: assigned_tx,
            progress: settings.progress.clone(),
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
                // `Spawner::task` starts only what is still assigned (a later rebalance
                // may have taken them again).
                if let Err(e) = parts
                    .iter()
                    .try_for_each(|(topic, partition)| spawner.task(topic, *partition).map(drop))
                {
                    break Err(e);
                }
            }
            msg = consumer.recv() => {
                let m = match msg {
                    Ok(m) => m,
                    // A fatal consumer error (a static member fenced by another with its
                    // instance id, for one) never clears: the consumer holds no partition
                    // from then on. The worker ends, and its supervisor starts it with a
                    // new consumer.
                    Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code)) => {
                        METRICS.errors.with_label_values(&["kafka_consume_fatal"]).inc();
                        // Another worker may hold its partitions already: the tasks stop
                        // without applying or publishing anything more.
                        for h in lock(&tasks).values() {
                            h.lost.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        break Err(anyhow::anyhow!(
                            "the worker's consumer failed for good ({code}); the worker stops so that its supervisor starts it again with a new consumer"
                        ));
                    }
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
                    Ok(Some(tx)) => tx,
                    Ok(None) => continue,
                    Err(e) => break Err(e),
                };
                if let Err(mpsc::error::SendError(raw)) = tx.send(raw).await {
                    // A task that found its partition lost stopped without an error: the
                    // record is left to the partition's owner.
                    let lost = lock(&tasks)
                        .get(&(raw.topic, raw.partition))
                        .is_some_and(|h| h.lost.load(std::sync::atomic::Ordering::SeqCst));
                    if lost {
                        continue;
                    }
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
