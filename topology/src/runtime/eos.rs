//! Exactly-once: one transactional producer per partition's task (its transactional id
//! the partition's, so a new owner fences the old before it restores), and one Kafka
//! transaction per publish holding the changelog, the outbox's records, their removal
//! from the outbox and the input offset.
//!
//! A transaction sends its parts in an order that is safe even for a reader that sees
//! records of transactions that never committed (a broker that does not enforce
//! `read_committed`, a reader configured `read_uncommitted`): first the changelog, the
//! outbox entries included; then, once it is acknowledged, the outbox's records; then,
//! once they are acknowledged, the changelog of their removal beside the input offset.
//! Whatever prefix of it such a reader restores from holds every output the prefix does
//! not, so a restore publishes them; nothing it has seen is ever lost.

use super::collector::{changelog_record, owned_headers, unconfirmed, Outbox, NO_OFFSET};
use super::tasks::observe_stage;
use super::thread::WorkerConsumer;
use super::{producer, WorkerSettings};
use crate::metrics::METRICS;
use crate::provider::Dispatcher;
use crate::task::{OutboxEntry, Removal, Task};
use futures::future::join_all;
use payments::retry::Backoff;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};
use stores::ChangelogRecord;

/// A transactional producer for one partition's task, its earlier incarnations fenced:
/// their open transaction is aborted, so a restore that follows reads every committed
/// record at once and nothing they write afterwards can commit. Blocks (call it from a
/// thread that may block).
pub(super) fn transactional_producer(
    settings: &WorkerSettings,
    app: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<FutureProducer> {
    let mut extra = vec![
        (
            "transactional.id".to_owned(),
            format!("{app}-{topic}-{partition}"),
        ),
        ("transaction.timeout.ms".to_owned(), "60000".to_owned()),
    ];
    extra.extend(settings.kafka.iter().cloned());
    let producer = producer(&settings.brokers, &extra)?;
    tokio::task::block_in_place(|| producer.init_transactions(Duration::from_secs(60))).map_err(
        |e| {
            anyhow::anyhow!(
                "starting the transactional producer of {topic}-{partition} (which fences its previous owner) failed: {e}"
            )
        },
    )?;
    Ok(producer)
}

/// How long a transaction's records may wait for their acknowledgements, from its
/// start, before it is aborted and sent again. Far below `transaction.timeout.ms`, so a
/// record held up in the client (a leader that moved while a request was in flight) costs
/// the partition one retry, not the broker's own abort a minute later.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(20);

/// `sends`, failed as retryable once the transaction's delivery deadline has passed;
/// the abort that follows purges the records still waiting.
async fn before<T>(
    deadline: tokio::time::Instant,
    what: &str,
    sends: impl std::future::Future<Output = Result<T, TxnError>>,
) -> Result<T, TxnError> {
    tokio::time::timeout_at(deadline, sends)
        .await
        .unwrap_or_else(|_| {
            Err(TxnError::Retry(anyhow::anyhow!(
                "{what}: not acknowledged within {} s of the transaction's start",
                DELIVERY_DEADLINE.as_secs()
            )))
        })
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

/// What one transaction sends, in the order it sends it.
pub(super) struct Plan {
    /// The queued changelog batches merged into one, the outbox entries they add
    /// included.
    pub(super) changelog: Vec<ChangelogRecord>,
    /// The outbox's Kafka records.
    pub(super) outputs: Vec<OutboxEntry>,
    /// The removal of those records from the outbox: its changelog batch is sent last,
    /// and it is applied to the store once the transaction has committed.
    pub(super) removal: Removal,
}

/// What a publish under exactly-once does: its transaction's plan, and what to apply
/// once the transaction has committed.
pub(super) struct Publish {
    pub(super) plan: Plan,
    queue_keys: Vec<Vec<u8>>,
    call_keys: Vec<Vec<u8>>,
    calls: Vec<crate::processor::ProviderCall>,
}

impl Publish {
    pub(super) fn of(task: &mut Task) -> anyhow::Result<Publish> {
        let queued = task.pending_changelog()?;
        let Outbox {
            output_keys,
            outputs,
            call_keys,
            calls,
        } = Outbox::of(task)?;
        let removal = task.removal(&output_keys)?;
        let queue_keys = queued.iter().map(|(k, _)| k.clone()).collect();
        Ok(Publish {
            plan: Plan {
                changelog: stores::coalesce(queued.into_iter().map(|(_, r)| r)),
                removal,
                outputs,
            },
            queue_keys,
            call_keys,
            calls,
        })
    }
}

/// One transaction (see the module's documentation for its order), retried after an
/// abort until it commits (records not acknowledged within [`DELIVERY_DEADLINE`] abort
/// it too); a fenced producer fails the task. Provider calls go out after
/// the commit.
pub(super) async fn publish_transaction(
    task: &mut Task,
    producer: &FutureProducer,
    consumer: &WorkerConsumer,
    dispatcher: &Dispatcher,
) -> anyhow::Result<()> {
    let Publish {
        plan,
        queue_keys,
        call_keys,
        calls,
    } = Publish::of(task)?;
    if !queue_keys.is_empty() || !plan.outputs.is_empty() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let t = Instant::now();
        let end = loop {
            match transaction(task, producer, consumer, &plan).await {
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
        tracing::debug!(topic = %task.topic, partition = task.partition, changelog_end = ?end, outputs = plan.outputs.len(), "transaction committed");
        task.changelog_shipped(queue_keys, end, Some(plan.removal))?;
    }
    for call in calls {
        dispatcher.dispatch(call).await;
    }
    task.published(call_keys)?;
    Ok(())
}

/// A record's delivery as a step of the transaction: a failure, or a delivery confirmed
/// without an offset (see [`unconfirmed`]), fails the step.
fn delivered(what: &str, r: OwnedDeliveryResult) -> Result<Delivery, TxnError> {
    let d = r.map_err(|(e, _)| txn_error(what, e))?;
    if unconfirmed(&d) {
        return Err(TxnError::Retry(anyhow::anyhow!("{what}: {NO_OFFSET}")));
    }
    Ok(d)
}

/// Sends changelog records to the task's changelog partition and waits for them;
/// returns the offset of the last one.
async fn send_changelog(
    task: &Task,
    producer: &FutureProducer,
    records: &[ChangelogRecord],
) -> Result<Option<i64>, TxnError> {
    let Some(topic) = task.changelog_topic() else {
        return Ok(None);
    };
    let sends = records.iter().map(|(k, v)| {
        let value = stores::changelog::to_topic(v);
        async move {
            let record = changelog_record(topic, task.partition, k, &value);
            producer.send(record, Duration::from_secs(30)).await
        }
    });
    let mut last = None;
    for r in join_all(sends).await {
        last = last.max(Some(delivered("publishing the changelog", r)?.offset));
    }
    Ok(last)
}

/// Sends the outbox's Kafka records and waits for them.
async fn send_outputs(producer: &FutureProducer, outputs: &[OutboxEntry]) -> Result<(), TxnError> {
    let sends = outputs.iter().filter_map(|entry| match entry {
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
    for r in join_all(sends).await {
        delivered("publishing outputs", r)?;
    }
    Ok(())
}

/// Adds the task's next input offset to the transaction.
async fn send_offset(
    task: &Task,
    producer: &FutureProducer,
    consumer: &WorkerConsumer,
) -> Result<(), TxnError> {
    let Some(next) = task.next_offset() else {
        return Ok(());
    };
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
    .await
}

/// Runs one transaction; returns the changelog offset after its last record.
async fn transaction(
    task: &Task,
    producer: &FutureProducer,
    consumer: &WorkerConsumer,
    plan: &Plan,
) -> Result<Option<i64>, TxnError> {
    txn_call(producer, "beginning a transaction", |p| {
        p.begin_transaction()
    })
    .await?;
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    let changelog = before(
        deadline,
        "publishing the changelog",
        send_changelog(task, producer, &plan.changelog),
    )
    .await?;
    before(
        deadline,
        "publishing outputs",
        send_outputs(producer, &plan.outputs),
    )
    .await?;
    let (removal, offset) = futures::future::join(
        before(
            deadline,
            "publishing the outbox's removal",
            send_changelog(task, producer, &plan.removal.records),
        ),
        send_offset(task, producer, consumer),
    )
    .await;
    let last = changelog.max(removal?);
    offset?;
    txn_call(producer, "committing the transaction", |p| {
        p.commit_transaction(Duration::from_secs(30))
    })
    .await?;
    // The commit marker takes the offset after the transaction's last record.
    Ok(last.map(|o| o + 2))
}

#[cfg(test)]
mod tests {
    use super::Publish;
    use crate::processor::RawRecord;
    use crate::task::testing::shipped;
    use crate::task::OutboxEntry;
    use stores::{ChangelogRecord, PartitionStore, Restore};

    const TOPIC: &str = "payments.commands";

    fn create_record() -> RawRecord {
        let cmd = crate::processor::testing::create_command("order-1", 1_000, "EUR", 1_000_000);
        RawRecord {
            topic: TOPIC.into(),
            partition: 0,
            offset: 0,
            key: Some(cmd.payment_id.to_string().into_bytes()),
            payload: Some(payments::wire::encode_command(&cmd)),
            headers: vec![],
            timestamp_ms: Some(1_000_000),
        }
    }

    /// The Kafka records a store restored from `changelog` would publish.
    fn restored_outputs(changelog: &[ChangelogRecord]) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let mut restore = Restore::start(&store).expect("restore");
        for r in changelog {
            restore.push(r.clone()).expect("push");
        }
        restore.finish(0).expect("finish");
        let task = shipped(store, TOPIC, true);
        let pending = task.pending().expect("outbox");
        pending
            .entries
            .iter()
            .filter_map(|(_, e)| record(e))
            .collect()
    }

    /// A Kafka record of the outbox as its topic and payload.
    fn record(entry: &OutboxEntry) -> Option<String> {
        match entry {
            OutboxEntry::Kafka { topic, payload, .. } => {
                Some(format!("{topic} {}", String::from_utf8_lossy(payload)))
            }
            OutboxEntry::Provider(_) => None,
        }
    }

    /// A reader that sees records of a transaction that never committed (a broker that
    /// does not enforce `read_committed`) restores from a prefix of what it sent. The
    /// changelog sent before the outputs holds them all, and the one sent after removes
    /// them: whatever prefix a new owner restores from publishes every output the prefix
    /// lacks, and none of those it has once the removal is there.
    #[test]
    fn a_restore_from_any_prefix_of_a_transaction_publishes_the_outputs_the_prefix_lacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartitionStore::open(dir.path(), "app", TOPIC, 0).expect("store");
        let mut task = shipped(store, TOPIC, true);
        assert_eq!(
            task.apply_inputs([create_record()], 1_000_000).ok(),
            Some(1)
        );
        let publish = Publish::of(&mut task).expect("plan");
        let plan = &publish.plan;
        let outputs: Vec<String> = plan.outputs.iter().filter_map(record).collect();
        assert!(!outputs.is_empty(), "a create publishes its events");
        // Cut after the changelog, or anywhere among the outputs.
        assert_eq!(restored_outputs(&plan.changelog), outputs);
        // Cut after the removal: every output was acknowledged before it was sent.
        let whole: Vec<ChangelogRecord> = plan
            .changelog
            .iter()
            .chain(&plan.removal.records)
            .cloned()
            .collect();
        assert_eq!(restored_outputs(&whole), Vec::<String>::new());
        // Cut inside the changelog (its commit marker not there): nothing of the batch
        // is applied, so the input is processed again and publishes them anew.
        let cut = &plan.changelog[..plan.changelog.len() - 1];
        assert_eq!(restored_outputs(cut), Vec::<String>::new());
    }
}
