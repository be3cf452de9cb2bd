//! Exactly-once: one transactional producer per partition's task (its transactional id
//! the partition's, so a new owner fences the old), and one Kafka transaction per
//! publish holding the changelog, the outbox's records, their removal from the outbox
//! and the input offset.

use super::collector::{changelog_record, owned_headers, Outbox};
use super::tasks::observe_stage;
use super::thread::WorkerConsumer;
use super::{producer, WorkerSettings};
use crate::metrics::METRICS;
use crate::provider::Dispatcher;
use crate::task::{OutboxEntry, Task};
use futures::future::join_all;
use payments::retry::Backoff;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// A transactional producer for one partition's task, its earlier incarnations fenced.
pub(super) async fn transactional_producer(
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
pub(super) async fn publish_transaction(
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
        let queue_keys: Vec<Vec<u8>> = queued.iter().map(|(k, _)| k.clone()).collect();
        let changelog = stores::coalesce(
            queued
                .into_iter()
                .map(|(_, r)| r)
                .chain([removal.records.clone()]),
        );
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
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
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        observe_stage("transaction", t);
        task.changelog_shipped(queue_keys, end, Some(removal))?;
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
        let value = stores::changelog::to_topic(v);
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
