//! The record collector: how a task's queued changelog and outbox reach Kafka under
//! `at_least_once` (the changelog shipped first, then the outbox produced until
//! acknowledged, then provider calls dispatched). `exactly_once` goes through [`super::eos`].

use super::eos::publish_transaction;
use super::tasks::observe_stage;
use super::thread::WorkerConsumer;
use crate::metrics::METRICS;
use crate::provider::Dispatcher;
use crate::task::{OutboxEntry, Task};
use anyhow::Context as _;
use futures::future::{join_all, BoxFuture};
use payments::retry::Backoff;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// How a task's outputs, changelog and input offsets reach Kafka.
pub(super) enum Output {
    /// The changelog first, then the outputs; the input offset is stored for the
    /// consumer's auto-commit once both are acknowledged.
    AtLeastOnce(FutureProducer),
    /// One Kafka transaction per publish: changelog, outputs, their removal from the
    /// outbox and the input offset commit together or not at all. The producer's
    /// transactional id is the partition's, so whoever takes the partition over fences
    /// the previous owner.
    ExactlyOnce(FutureProducer),
}

/// Asks whether the task's partition is still this worker's (see `publish`).
pub(super) type StillOurs<'a> = &'a (dyn Fn() -> BoxFuture<'a, bool> + Send + Sync);

/// Makes the task's state durable, then ships its queued changelog and publishes its
/// outbox as the processing guarantee says; provider calls go out last.
///
/// Under at-least-once nothing fences a worker that was frozen while it published (its
/// partition may be another worker's by the time it runs again), so `still_ours` is asked
/// before the changelog and again between the changelog and the outputs: `false` stops
/// the publish there (returned as `Ok(false)`), and the task must stop without another
/// write.
pub(super) async fn publish(
    task: &mut Task,
    output: &Output,
    consumer: &WorkerConsumer,
    dispatcher: &Dispatcher,
    still_ours: StillOurs<'_>,
) -> anyhow::Result<bool> {
    let t = Instant::now();
    let store = task.store().clone();
    tokio::task::spawn_blocking(move || store.flush())
        .await
        .context("the store flush stopped before finishing")??;
    observe_stage("flush", t);
    match output {
        Output::AtLeastOnce(producer) => {
            publish_at_least_once(task, producer, dispatcher, still_ours).await
        }
        Output::ExactlyOnce(producer) => {
            publish_transaction(task, producer, consumer, dispatcher).await?;
            Ok(true)
        }
    }
}

/// The changelog, then the Kafka records of the outbox (retried until acknowledged; a
/// broker outage stalls this partition, it loses nothing), then provider calls.
async fn publish_at_least_once(
    task: &mut Task,
    producer: &FutureProducer,
    dispatcher: &Dispatcher,
    still_ours: StillOurs<'_>,
) -> anyhow::Result<bool> {
    // Before the changelog too: what a worker that lost its partition hands to
    // librdkafka would land after the new owner's records, and a later restore would
    // read it last.
    if !still_ours().await {
        return Ok(false);
    }
    let t = Instant::now();
    ship_changelog(task, producer).await?;
    observe_stage("changelog", t);
    if !still_ours().await {
        return Ok(false);
    }
    let t = Instant::now();
    let outbox = Outbox::of(task)?;
    let n = outbox.outputs.len();
    let sends = outbox.outputs.into_iter().filter_map(|entry| match entry {
        OutboxEntry::Kafka {
            topic,
            key,
            payload,
            headers,
        } => Some(produce_outbox_record(
            producer, topic, key, payload, headers,
        )),
        OutboxEntry::Provider(_) => None,
    });
    let acks = join_all(sends);
    for r in said_while_slow(acks, task, || {
        format!("{n} outbox record(s) sent to Kafka and not acknowledged")
    })
    .await
    {
        r?;
    }
    observe_stage("outputs", t);
    let calls = outbox.calls.len();
    said_while_slow(
        async {
            for call in outbox.calls {
                dispatcher.dispatch(call).await;
            }
        },
        task,
        || format!("{calls} provider call(s) waiting for a free slot (every slot busy with a call or its reply)"),
    )
    .await;
    task.published(outbox.output_keys.into_iter().chain(outbox.call_keys))?;
    Ok(true)
}

/// A task's pending outbox: Kafka records and provider calls, each with their keys.
pub(super) struct Outbox {
    pub(super) output_keys: Vec<Vec<u8>>,
    pub(super) outputs: Vec<OutboxEntry>,
    pub(super) call_keys: Vec<Vec<u8>>,
    pub(super) calls: Vec<crate::processor::ProviderCall>,
}

impl Outbox {
    pub(super) fn of(task: &Task) -> anyhow::Result<Outbox> {
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

/// Ships the task's queued changelog batches, merged into one (the last write of each
/// key wins; see [`stores::coalesce`]), to its partition of the changelog topic, before
/// anything they account for is published: a restore then never lands behind an output
/// already seen. The producer is idempotent and gapless, so
/// what the topic holds is always a prefix of what was sent.
async fn ship_changelog(task: &Task, producer: &FutureProducer) -> anyhow::Result<()> {
    let Some(topic) = task.changelog_topic() else {
        return Ok(());
    };
    let batches = task.pending_changelog()?;
    if batches.is_empty() {
        return Ok(());
    }
    let keys: Vec<Vec<u8>> = batches.iter().map(|(k, _)| k.clone()).collect();
    let records = stores::coalesce(batches.into_iter().map(|(_, r)| r));
    let records_len = records.len();
    let sends = records.into_iter().map(|(k, v)| {
        ship_record(
            producer,
            topic,
            task.partition,
            k,
            stores::changelog::to_topic(&v),
        )
    });
    let mut end = None;
    let acks = said_while_slow(join_all(sends), task, || {
        format!("{records_len} changelog record(s) sent to Kafka and not acknowledged")
    });
    for r in acks.await {
        end = end.max(Some(r? + 1));
    }
    task.changelog_shipped(keys, end, None)?;
    Ok(())
}

/// How long one step of a publish may take before the task says so (and again every such
/// span while it lasts).
const SLOW_STEP_REPORT: Duration = Duration::from_secs(20);

/// Runs `step`, saying every [`SLOW_STEP_REPORT`] while it has not finished what the
/// partition's task waits on (`doing`): the worker's producer never gives up on a record
/// (see `worker_producer`), so a partition whose leader cannot take records, or has too
/// few in-sync replicas, holds the task in a publish, and nothing else would tell.
async fn said_while_slow<F: std::future::Future>(
    step: F,
    task: &Task,
    doing: impl Fn() -> String,
) -> F::Output {
    let started = Instant::now();
    tokio::pin!(step);
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + SLOW_STEP_REPORT,
        SLOW_STEP_REPORT,
    );
    let task_name = || format!("{}[{}]", task.topic, task.partition);
    loop {
        tokio::select! {
            out = &mut step => {
                if started.elapsed() >= SLOW_STEP_REPORT {
                    tracing::info!(task = %task_name(), waited_s = started.elapsed().as_secs(), "{}: done at last", doing());
                }
                return out;
            }
            _ = every.tick() => {
                METRICS.errors.with_label_values(&["publish_slow"]).inc();
                tracing::warn!(
                    task = %task_name(),
                    waited_s = started.elapsed().as_secs(),
                    "{}: not done yet, and the partition's task waits for it (a broker down or unreachable, too few in-sync replicas, or a provider slower than its timeout)",
                    doing()
                );
            }
        }
    }
}

/// A changelog record for the task's partition (`None`: a tombstone).
pub(super) fn changelog_record<'a>(
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

pub(super) fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
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
/// last. The task fails instead, and its restart ships the whole queue again, in
/// order.
async fn ship_record(
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
        .map_err(|(e, _)| e.to_string())
        .and_then(|d| match unconfirmed(&d) {
            true => Err(NO_OFFSET.to_owned()),
            false => Ok(d.offset),
        })
        .map_err(|e| {
            METRICS.errors.with_label_values(&["changelog_produce"]).inc();
            anyhow::anyhow!("publishing to the changelog {topic}-{partition} failed: {e}; the task restarts and ships its queued changelog again")
        })
}

/// Whether a delivery report lacks an offset. librdkafka's idempotent producer reports a
/// record as delivered without one when the broker acknowledged a later record of the
/// partition (an "implicit acknowledgement", after a timed-out request): a broker that
/// checks idempotent sequences wrote it, one that does not (librdkafka's mock cluster,
/// for producers without a transactional id) may have dropped it. Records reported so
/// are sent again; a duplicate is harmless where a loss is not.
pub(crate) fn unconfirmed(d: &rdkafka::producer::future_producer::Delivery) -> bool {
    d.offset < 0
}

/// What an [`unconfirmed`] delivery is reported as.
pub(crate) const NO_OFFSET: &str = "the broker confirmed no offset";

async fn produce_outbox_record(
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
    produce_until_acked(producer, &topic, key, payload, headers)
        .instrument(span)
        .await
}

async fn produce_until_acked(
    producer: &FutureProducer,
    topic: &str,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut record = FutureRecord::to(topic)
            .payload(&payload)
            .headers(owned_headers(&headers));
        if let Some(k) = &key {
            record = record.key(k);
        }
        let e = match producer.send(record, Duration::from_secs(30)).await {
            Ok(d) if !unconfirmed(&d) => return Ok(()),
            Ok(_) => NO_OFFSET.to_owned(),
            Err((e, _)) => e.to_string(),
        };
        METRICS.errors.with_label_values(&["kafka_produce"]).inc();
        if let Some((code, reason)) = producer.client().fatal_error() {
            anyhow::bail!("the Kafka producer stopped ({code:?}: {reason}); the worker restarts and publishes its outbox again");
        }
        tracing::warn!(%topic, error = %e, "publishing failed; retrying");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
