//! The changelog reader: decides whether a task's local store can be trusted (it
//! follows the broker's log, is not behind the group or the changelog) and rebuilds it
//! from the changelog when it cannot.

use super::thread::WorkerConsumer;
use super::{client_config, position, reached, WorkerSettings};
use crate::config::CompiledTopology;
use crate::metrics::METRICS;
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};
use stores::{OnMismatch, PartitionStore};

/// What the broker holds for a task's partition: the log its store must follow.
pub(super) struct Follows<'a> {
    /// The cluster's id, where the broker tells it.
    pub(super) cluster: Option<&'a str>,
    /// The source partition's end (high watermark).
    pub(super) source_end: i64,
    /// The changelog partition's end, when changelogs are on.
    pub(super) changelog_end: Option<i64>,
}

/// Why a local store cannot belong to the broker's log.
#[derive(Debug, PartialEq)]
pub(super) enum Stale {
    /// The store has processed records the source partition never had.
    AheadOfSource { checkpoint: i64, source_end: i64 },
    /// The store followed a changelog further than the changelog reaches.
    AheadOfChangelog { followed: i64, changelog_end: i64 },
    /// The store was written against another cluster.
    OtherCluster { recorded: String, broker: String },
}

impl Stale {
    pub(super) fn label(&self) -> &'static str {
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
pub(super) fn stale_store(
    store: &PartitionStore,
    broker: &Follows<'_>,
) -> anyhow::Result<Option<Stale>> {
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
pub(super) fn open_store(
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

/// The group's committed offset for a partition, if any. Blocks.
pub(super) fn committed_offset(
    consumer: &WorkerConsumer,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .find_partition(topic, partition)
        .and_then(|e| e.offset().to_raw())
        .filter(|o| *o >= 0))
}

/// Refuses a store that is behind what the group has committed for its partition (after
/// any restore): applying commands to it would diverge from the events already published.
pub(super) fn ensure_store_is_current(
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

/// Rebuilds a partition's store from its changelog partition: empties it, then applies
/// every complete batch of the partition's extent (`low..high`, read just before).
/// Returns the keys of an unfinished batch at the end, left out.
///
/// A rebuilt store is checked against the digest its writer recorded.
///
/// Under exactly-once ([`OnMismatch::Refuse`]) a mismatch means the read missed records
/// of committed transactions: it is read again by a new consumer, a few times, before the
/// task gives up (its worker's restart tries again), since a store that lacks committed
/// writes would publish their outputs again. (A read ends only at the extent's end, not
/// at a new leader's end below it; reads of the whole extent have still been seen to
/// disagree with the digest and, a second later, to match it: see the README.)
///
/// Under at-least-once ([`OnMismatch::Accept`]) the changelog itself has been seen to
/// disagree with its last digest, read whole by another client too (in chaos runs whose
/// worker was killed every 3 s; the README's guarantees say what is known of it): it is
/// the state any restore gets, and at-least-once tolerates the identical duplicates a
/// resurrected outbox entry causes, so the store is kept, counted
/// (`gateway_errors_total{type="restore_digest_mismatch"}`) and its digest reset to what
/// it holds.
pub(super) fn restore_from_changelog(
    store: &PartitionStore,
    kafka: (&str, &[(String, String)]),
    changelog: &str,
    partition: i32,
    extent: (i64, i64),
    on_mismatch: OnMismatch,
) -> anyhow::Result<stores::Restored> {
    let mut attempt = 1;
    loop {
        match read_changelog(store, kafka, changelog, partition, extent, on_mismatch) {
            Ok(restored) => {
                if let Some((recorded, rebuilt)) = restored.digest_mismatch {
                    METRICS
                        .errors
                        .with_label_values(&["restore_digest_mismatch"])
                        .inc();
                    tracing::warn!(%changelog, partition, recorded = %format!("{recorded:016x}"), rebuilt = %format!("{rebuilt:016x}"), "the changelog's state does not match the digest its last writer recorded; restored as the changelog holds it (at-least-once)");
                }
                return Ok(restored);
            }
            Err(e) if attempt < RESTORE_ATTEMPTS && incomplete(&e) => {
                METRICS
                    .errors
                    .with_label_values(&["restore_incomplete"])
                    .inc();
                tracing::warn!(%changelog, partition, attempt, error = %format!("{e:#}"), "the restored store does not match its digest; reading the changelog again");
                std::thread::sleep(Duration::from_secs(u64::from(attempt)));
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Reads of a changelog partition before a restore gives up on a store that does not
/// match its digest.
const RESTORE_ATTEMPTS: u32 = 3;

fn incomplete(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<stores::StoreError>(),
        Some(stores::StoreError::IncompleteRestore { .. })
    )
}

fn read_changelog(
    store: &PartitionStore,
    (brokers, kafka): (&str, &[(String, String)]),
    changelog: &str,
    partition: i32,
    (low, high): (i64, i64),
    on_mismatch: OnMismatch,
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
        return Ok(restore.finish_with(high, on_mismatch)?);
    }
    let mut tpl = TopicPartitionList::new();
    // From the extent's start (where the log began when it was read; a log whose head
    // was deleted since is read from its new start).
    tpl.add_partition_offset(changelog, partition, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut next_report = started + Duration::from_secs(10);
    let mut read = 0;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "restoring {changelog}-{partition} took longer than 10 minutes ({read} records of {low}..{high} so far)"
        );
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            tracing::info!(%changelog, partition, read, low, high, elapsed_s = started.elapsed().as_secs(), "still restoring");
        }
        let done = match consumer.poll(Duration::from_millis(200)) {
            // Nothing fetched: the consumer's position says whether the extent is read
            // (a transaction marker at its end is never delivered as a record).
            None => reached(&consumer, changelog, partition, high),
            Some(Ok(m)) => {
                if let (Some(k), true) = (m.key(), m.offset() < high) {
                    let v = stores::changelog::from_topic(m.payload()).with_context(|| {
                        format!("{changelog}-{partition} offset {}", m.offset())
                    })?;
                    restore.push((k.to_vec(), v))?;
                    read += 1;
                }
                m.offset() >= high - 1
            }
            // The end as the leader answering sees it, which is not the extent's end
            // while it is below: a broker that has just taken the partition's lead
            // advances its high watermark only as the other replicas catch up, so a
            // fetch can reach its end before `high` (a restore that stopped there would
            // miss committed records).
            Some(Err(KafkaError::PartitionEOF(_))) => {
                reached(&consumer, changelog, partition, high)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, %changelog, partition, read, low, high, "changelog read failed; retrying");
                false
            }
        };
        if done {
            let at = position(&consumer, changelog, partition);
            return restore.finish_with(high, on_mismatch).with_context(|| {
                format!(
                    "{read} records read from {changelog}-{partition} {low}..{high}, stopped at offset {}",
                    at.map_or("unknown".to_owned(), |o| o.to_string())
                )
            });
        }
    }
}

/// Rebuilds `store` from partition `partition` of `changelog` as a worker does when it
/// takes the partition over without a current local copy: for tools that measure
/// restores without disturbing a running worker (`make soak`). A store that does not
/// match its digest is kept, as under at-least-once.
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
    restore_from_changelog(
        store,
        (brokers, kafka),
        changelog,
        partition,
        extent,
        OnMismatch::Accept,
    )
}

/// Fails fast, with what to do, when a source's changelog topic is missing or has fewer
/// partitions than the source.
pub(super) fn ensure_changelog_topics(
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
