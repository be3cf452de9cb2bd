//! The sink service: consumes the events, dead-letter and commands topics and applies
//! them to PostgreSQL in batches; and the rebuild command, which replays the topics into
//! an empty projection.
//!
//! Kafka offsets are committed only after the PostgreSQL transaction that applied the
//! records has committed; since every write is idempotent, a crash in between replays a
//! batch harmlessly. A PostgreSQL outage stalls the sink (retries with back-off); it
//! loses nothing.

use crate::projection::{apply_batch, Applied, InRecord, Topics};
use crate::Pool;
use anyhow::Context as _;
use payments::retry::Backoff;
use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, Histogram, IntCounter,
    IntCounterVec,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::ClientContext;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use telemetry::now_ms;
use telemetry::progress::{FetchState, Progress};
use tokio::sync::mpsc;

struct SinkMetrics {
    records: IntCounterVec,
    batches: IntCounter,
    lag: Histogram,
    write_seconds: Histogram,
    errors: IntCounterVec,
}

#[allow(clippy::expect_used)]
static METRICS: LazyLock<SinkMetrics> = LazyLock::new(|| {
    (|| -> Result<SinkMetrics, prometheus::Error> {
        Ok(SinkMetrics {
            records: register_int_counter_vec!(
                "gateway_projection_records_total",
                "Records applied to the projection",
                &["kind"]
            )?,
            batches: register_int_counter!(
                "gateway_projection_batches_total",
                "Projection transactions committed"
            )?,
            lag: register_histogram!(
                "gateway_projection_lag_seconds",
                "Time from an event to its commit in PostgreSQL",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
            )?,
            write_seconds: register_histogram!(
                "gateway_projection_write_seconds",
                "Time to write one batch to PostgreSQL (its transaction, retries included)",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
            )?,
            errors: register_int_counter_vec!(
                "gateway_projection_errors_total",
                "Projection failures by type",
                &["type"]
            )?,
        })
    })()
    .expect("sink metrics register once")
});

#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub brokers: String,
    pub group_id: String,
    pub topics: Topics,
    /// Records read into one batch, at most (split between the writers).
    pub max_batch: usize,
    /// Transactions applied at once, each on its own share of the partitions (a
    /// partition always goes to the same writer, so its records stay in order).
    pub writers: usize,
    /// How long a batch waits to fill once it has a record.
    pub max_wait: Duration,
    /// Extra librdkafka properties.
    pub kafka: Vec<(String, String)>,
    /// What the sink tells its watchdog: the partitions it holds, a database it waits on.
    pub progress: Arc<Progress>,
}

impl SinkSettings {
    /// The settings of a sink of group `group_id`, with the defaults.
    pub fn new(brokers: &str, group_id: &str, topics: Topics) -> Self {
        SinkSettings {
            brokers: brokers.to_owned(),
            group_id: group_id.to_owned(),
            topics,
            max_batch: 4000,
            writers: 2,
            max_wait: Duration::from_millis(20),
            kafka: vec![],
            progress: Progress::new("sink"),
        }
    }
}

/// Keeps the sink's [`Progress`] told which partitions it holds.
pub struct SinkContext {
    progress: Arc<Progress>,
    /// When a failed commit was last logged: while a broker is down every commit (one a
    /// second) fails the same way.
    commit_warned: std::sync::Mutex<Option<Instant>>,
}

impl ClientContext for SinkContext {
    /// Says when a partition the sink holds is not fetched (see [`Progress::fetch_states`]).
    fn stats(&self, stats: rdkafka::Statistics) {
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

impl ConsumerContext for SinkContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect::<Vec<_>>()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %listed(tpl), "sink assigned partitions");
                self.progress.assigned(parts(tpl))
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %listed(tpl), "sink partitions revoked");
                self.progress.revoked(parts(tpl))
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "sink rebalance failed"),
        }
    }

    /// A commit that failed, as a whole or for some partitions: their committed offsets
    /// stay where they were until a later commit of the same offsets succeeds.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Nothing new to commit is not a failure.
            if matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                return;
            }
            let mut warned = self
                .commit_warned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *warned = Some(Instant::now());
                tracing::warn!(error = %e, partitions = %listed(offsets), "sink offset commit failed (said at most every 10 s)");
            }
            return;
        }
        for e in offsets.elements() {
            if let Err(err) = e.error() {
                tracing::warn!(topic = e.topic(), partition = e.partition(), error = %err, "sink offset commit failed for a partition");
            }
        }
    }
}

/// `topic[0, 1]` for each topic of a list of partitions.
fn listed(tpl: &TopicPartitionList) -> String {
    telemetry::progress::partition_list(tpl.elements().iter().map(|e| (e.topic(), e.partition())))
}

type SinkConsumer = StreamConsumer<SinkContext>;

fn consumer_config(brokers: &str, group: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // A crashed sink's partitions move after 10 s rather than librdkafka's 45 s.
        .set("session.timeout.ms", "10000")
        // `fetch.wait.max.ms` stays librdkafka's 500 ms: the broker answers a waiting
        // fetch as soon as an event arrives.
        .set("heartbeat.interval.ms", "2000")
        // For `SinkContext::stats`: what the consumer fetches.
        .set("statistics.interval.ms", "5000");
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

fn to_record(m: &impl Message) -> InRecord {
    InRecord {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        traceparent: m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        }),
    }
}

/// One `projection.write` span per traced record, children of the span that published
/// it, open until the batch is committed.
fn write_spans(batch: &[InRecord]) -> Vec<tracing::Span> {
    batch
        .iter()
        .filter(|r| r.traceparent.is_some())
        .map(|r| {
            let span = tracing::info_span!(
                "projection.write",
                otel.name = %format_args!("{} project", r.topic),
                otel.kind = "consumer",
                db.system.name = "postgresql",
                messaging.destination.name = %r.topic,
                messaging.kafka.offset = r.offset,
                payment_id = %String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
                trace_id = tracing::field::Empty,
            );
            telemetry::adopt(&span, r.traceparent.as_deref(), &[]);
            span
        })
        .collect()
}

/// Applies one batch, retrying until PostgreSQL takes it. A batch that PostgreSQL
/// refuses for its data (not for an outage) is applied record by record, and the record
/// it refuses is set aside as a dead letter: one bad record must not stop the sink.
async fn apply_with_retry(
    pool: &Pool,
    topics: &Topics,
    progress: &Arc<Progress>,
    batch: &[InRecord],
) -> Applied {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Set while PostgreSQL refuses the batch: a stall of the sink meanwhile is its, not
    // the consumer's, and a restart would not help.
    let mut waiting = None;
    loop {
        match apply_once(pool, topics, batch).await {
            Ok(a) => return a,
            Err(e) if is_data_error(&e) => return apply_one_by_one(pool, topics, batch).await,
            Err(e) => {
                waiting.get_or_insert_with(|| {
                    progress.busy("PostgreSQL refuses the projection's writes")
                });
                METRICS.errors.with_label_values(&["postgres"]).inc();
                let delay = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "projection batch failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity violation): retrying the same
/// rows cannot help.
fn is_data_error(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .filter_map(|pg| pg.code())
        .any(|code| code.code().starts_with("22") || code.code().starts_with("23"))
}

async fn apply_one_by_one(pool: &Pool, topics: &Topics, batch: &[InRecord]) -> Applied {
    let mut total = Applied::default();
    for r in batch {
        let one = std::slice::from_ref(r);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match apply_once(pool, topics, one).await {
                Ok(a) => {
                    total.absorb(a);
                    break;
                }
                Err(e) if is_data_error(&e) => {
                    METRICS
                        .errors
                        .with_label_values(&["projection_rejected"])
                        .inc();
                    tracing::error!(topic = %r.topic, partition = r.partition, offset = r.offset, error = %format!("{e:#}"), "record refused by PostgreSQL; set aside as a dead letter");
                    let dead =
                        crate::projection::set_aside(r, "projection_rejected", &format!("{e:#}"));
                    if let Err(e) = apply_dead_letter(pool, &dead).await {
                        tracing::error!(error = %format!("{e:#}"), "dead letter for the refused record not stored");
                    }
                    break;
                }
                Err(e) => {
                    METRICS.errors.with_label_values(&["postgres"]).inc();
                    tracing::warn!(error = %format!("{e:#}"), "projection record failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
    total
}

async fn apply_dead_letter(pool: &Pool, dead: &payments::wire::DeadLetter) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    crate::projection::insert_dead_letters(&tx, std::slice::from_ref(dead)).await?;
    tx.commit().await?;
    Ok(())
}

async fn apply_once(pool: &Pool, topics: &Topics, batch: &[InRecord]) -> anyhow::Result<Applied> {
    let mut client = pool.get().await.context("connecting to PostgreSQL")?;
    let tx = client.transaction().await?;
    let applied = apply_batch(&tx, topics, batch).await?;
    tx.commit().await?;
    Ok(applied)
}

fn record_metrics(a: &Applied) {
    METRICS.batches.inc();
    for (kind, n) in [
        ("event", a.events),
        ("dead_letter", a.dead_letters),
        ("webhook", a.webhooks),
        ("undecodable", a.undecodable),
    ] {
        METRICS.records.with_label_values(&[kind]).inc_by(n as u64);
    }
    let now = now_ms();
    for t in &a.event_times_ms {
        METRICS.lag.observe((now - t).max(0) as f64 / 1000.0);
    }
}

/// Runs the sink until `shutdown` resolves.
///
/// Two stages, one batch apart: the consumer collects the next batch while the previous
/// one is written to PostgreSQL; a batch's offsets are stored once it is written, and
/// committed within a second.
pub async fn run_sink(
    pool: Pool,
    settings: SinkSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::migrate(&pool).await?;
    // A written batch's offsets are stored, and librdkafka commits what is stored every
    // second (and on a rebalance): a commit that fails while a broker is down is made by
    // the next one, even when no further record comes for the partition. The `--kafka`
    // properties still win.
    let mut extra: Vec<(String, String)> = [
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "false"),
        ("auto.commit.interval.ms", "1000"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    extra.extend(settings.kafka.iter().cloned());
    let config = consumer_config(&settings.brokers, &settings.group_id, &extra);
    let consumer: Arc<SinkConsumer> = Arc::new(
        config
            .create_with_context(SinkContext {
                progress: settings.progress.clone(),
                commit_warned: std::sync::Mutex::new(None),
            })
            .context("creating the sink's Kafka consumer")?,
    );
    consumer
        .subscribe(&settings.topics.all())
        .context("subscribing the sink")?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "sink started");
    // One writer per share of the partitions: a payment's events are in one partition,
    // so writers never touch the same rows, and each applies its records in order.
    let writers = settings.writers.max(1);
    let mut senders = Vec::with_capacity(writers);
    let mut joins = Vec::with_capacity(writers);
    for _ in 0..writers {
        let (tx, mut to_apply) = mpsc::channel::<Vec<InRecord>>(1);
        senders.push(tx);
        joins.push(tokio::spawn({
            let consumer = consumer.clone();
            let topics = settings.topics.clone();
            let pool = pool.clone();
            let progress = settings.progress.clone();
            async move {
                while let Some(batch) = to_apply.recv().await {
                    write_batch(&pool, &topics, &consumer, &progress, &batch).await;
                }
            }
        }));
    }
    tokio::pin!(shutdown);
    let mut fatal = None;
    'read: loop {
        // Only the wait for a batch's first record gives way to the shutdown: a batch
        // begun is finished and written, so the final commit skips nothing unwritten.
        let first = tokio::select! {
            _ = &mut shutdown => break,
            m = consumer.recv() => m.map(|m| to_record(&m)),
        };
        // A fatal consumer error (a static member fenced, for one) never clears: the
        // sink ends, after finishing what it read, and its supervisor starts it again.
        if let Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code)) = &first {
            METRICS
                .errors
                .with_label_values(&["kafka_consume_fatal"])
                .inc();
            fatal = Some(*code);
            break;
        }
        if let Some(batch) = collect(&consumer, &settings, first).await {
            for (writer, share) in split(batch, writers).into_iter().enumerate() {
                if !share.is_empty() && senders[writer].send(share).await.is_err() {
                    break 'read;
                }
            }
        }
    }
    // The batches being written, and those queued, are finished before the last commit.
    drop(senders);
    for writer in joins {
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "a sink writer stopped abnormally");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final sink commit skipped");
    }
    if let Some(code) = fatal {
        anyhow::bail!(
            "the sink's consumer failed for good ({code}); the sink stops so that its supervisor starts it again with a new consumer"
        );
    }
    tracing::info!("sink stopped");
    Ok(())
}

/// `batch` in `writers` shares by partition, each in the batch's order.
fn split(batch: Vec<InRecord>, writers: usize) -> Vec<Vec<InRecord>> {
    let mut shares: Vec<Vec<InRecord>> = (0..writers).map(|_| Vec::new()).collect();
    for r in batch {
        shares[r.partition.unsigned_abs() as usize % writers].push(r);
    }
    shares
}

/// The batch that starts with `first`: whatever arrives within `max_wait` of it, up to
/// `max_batch` records. `None` after a failed read (retried by the caller).
async fn collect(
    consumer: &SinkConsumer,
    settings: &SinkSettings,
    first: Result<InRecord, rdkafka::error::KafkaError>,
) -> Option<Vec<InRecord>> {
    let first = match first {
        Ok(r) => r,
        Err(e) => {
            METRICS.errors.with_label_values(&["kafka_consume"]).inc();
            tracing::warn!(error = %e, "sink consume failed; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return None;
        }
    };
    let mut batch = vec![first];
    let deadline = Instant::now() + settings.max_wait;
    while batch.len() < settings.max_batch {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(to_record(&m)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sink consume failed");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Writes one batch (retrying until PostgreSQL takes it), then stores its offsets for the
/// next commit.
async fn write_batch(
    pool: &Pool,
    topics: &Topics,
    consumer: &SinkConsumer,
    progress: &Arc<Progress>,
    batch: &[InRecord],
) {
    let started = Instant::now();
    let spans = write_spans(batch);
    let applied = apply_with_retry(pool, topics, progress, batch).await;
    drop(spans);
    METRICS
        .write_seconds
        .observe(started.elapsed().as_secs_f64());
    record_metrics(&applied);
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for r in batch {
        let e = next
            .entry((r.topic.as_str(), r.partition))
            .or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        if let Err(e) = tpl.add_partition_offset(t, p, Offset::Offset(o)) {
            tracing::warn!(error = %e, "offset not recorded");
        }
    }
    // A partition revoked meanwhile: its next owner replays the batch, harmlessly (every
    // write is idempotent). Said at info: while its offset is not stored the group's
    // committed offset stands still, and the watchdog may report a stall.
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::info!(error = %e, partitions = %listed(&tpl), "offsets of a written batch not stored");
    } else {
        for e in tpl.elements() {
            if let Err(err) = e.error() {
                tracing::info!(topic = e.topic(), partition = e.partition(), error = %err, "offset of a written batch not stored for a partition");
            }
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub records: usize,
    pub events: usize,
    pub dead_letters: usize,
    pub webhooks: usize,
}

/// Empties the projection and replays every topic up to its current end.
pub async fn rebuild(
    pool: &Pool,
    brokers: &str,
    topics: &Topics,
    kafka: &[(String, String)],
) -> anyhow::Result<RebuildReport> {
    crate::migrate(pool).await?;
    {
        let client = pool.get().await?;
        client
            .batch_execute(
                "TRUNCATE payments, payment_events, projection_waiting, sink_progress, dead_letters, webhooks_received, refunds",
            )
            .await?;
    }
    let group = format!("projection-rebuild-{}", uuid::Uuid::new_v4());
    let consumer: BaseConsumer = consumer_config(brokers, &group, kafka).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashSet<(String, i32)> = HashSet::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let timeout = Duration::from_secs(10);
    for topic in topics.all() {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                if high > low {
                    remaining.insert((topic.to_owned(), p.id()));
                    ends.insert((topic.to_owned(), p.id()), high);
                }
            }
        }
    }
    consumer.assign(&tpl)?;
    let mut report = RebuildReport::default();
    let mut batch = Vec::new();
    let started = Instant::now();
    while !remaining.is_empty() {
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("rebuild did not reach the end of {remaining:?} within 10 minutes");
        }
        let msg = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
        match msg {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "rebuild consume failed; retrying"),
            Some(Ok(m)) => {
                let key = (m.topic().to_owned(), m.partition());
                if ends.get(&key).is_some_and(|end| m.offset() + 1 >= *end) {
                    remaining.remove(&key);
                }
                batch.push(to_record(&m));
            }
        }
        if batch.len() >= 1000 || (remaining.is_empty() && !batch.is_empty()) {
            let a = apply_once(pool, topics, &batch).await?;
            report.records += batch.len();
            report.events += a.events;
            report.dead_letters += a.dead_letters;
            report.webhooks += a.webhooks;
            batch.clear();
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> InRecord {
        InRecord {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            payload: None,
            traceparent: None,
        }
    }

    #[test]
    fn a_partition_always_goes_to_one_writer_in_its_order() {
        let batch: Vec<InRecord> = (0..40)
            .map(|i| {
                record(
                    if i % 3 == 0 { "events" } else { "commands" },
                    i % 5,
                    i as i64,
                )
            })
            .collect();
        let shares = split(batch.clone(), 2);
        assert_eq!(shares.len(), 2);
        assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), batch.len());
        for (w, share) in shares.iter().enumerate() {
            for r in share {
                assert_eq!(
                    r.partition as usize % 2,
                    w,
                    "partition {} in writer {w}",
                    r.partition
                );
            }
            // Within a share, each partition's records keep the batch's order.
            for p in 0..5 {
                let offsets: Vec<i64> = share
                    .iter()
                    .filter(|r| r.partition == p)
                    .map(|r| r.offset)
                    .collect();
                assert!(offsets.windows(2).all(|o| o[0] < o[1]), "{offsets:?}");
            }
        }
        let one = split(batch.clone(), 1);
        assert_eq!(
            one[0].iter().map(|r| r.offset).collect::<Vec<_>>(),
            batch.iter().map(|r| r.offset).collect::<Vec<_>>()
        );
    }
}
