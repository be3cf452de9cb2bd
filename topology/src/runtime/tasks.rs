//! The task manager: starts a partition's task (its store opened, judged and restored
//! if need be), runs its loop (batches of records, timers, housekeeping) and stops it.

use super::collector::{publish, Output};
use super::eos::transactional_producer;
use super::freeze::{FreezeWatch, Lost};
use super::restore::{
    committed_offset, ensure_store_is_current, open_store, restore_from_changelog, stale_store,
    Follows,
};
use super::thread::{lock, Tasks, WorkerConsumer};
use super::WorkerSettings;
use crate::config::{CompiledTopology, ProcessingGuarantee};
use crate::metrics::METRICS;
use crate::processor::RawRecord;
use crate::provider::Dispatcher;
use crate::task::Task;
use futures::FutureExt as _;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::now_ms;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub(super) struct TaskHandle {
    pub(super) tx: mpsc::Sender<RawRecord>,
    pub(super) join: JoinHandle<()>,
    /// Set when the group took the partition away without a clean revoke.
    pub(super) lost: Lost,
}

/// Starts the tasks of the worker's partitions.
pub(super) struct Spawner {
    pub(super) topo: Arc<CompiledTopology>,
    pub(super) settings: WorkerSettings,
    pub(super) tasks: Tasks,
    pub(super) consumer: Arc<WorkerConsumer>,
    pub(super) producer: FutureProducer,
    pub(super) dispatcher: Dispatcher,
    pub(super) fail: mpsc::UnboundedSender<anyhow::Error>,
}

impl Spawner {
    /// The input channel of the partition's task, started first if it is not running;
    /// `None` when the partition is not assigned to this worker (any more): a record
    /// fetched before the group took it away is left to its new owner.
    pub(super) fn task(
        &self,
        topic: &str,
        partition: i32,
    ) -> anyhow::Result<Option<mpsc::Sender<RawRecord>>> {
        let key = (topic.to_owned(), partition);
        if let Some(h) = lock(&self.tasks).get(&key) {
            // A task that found its partition lost has stopped; the revoke that follows
            // removes it, and a later assignment starts a new one.
            if h.lost.load(Ordering::SeqCst) {
                return Ok(None);
            }
            return Ok(Some(h.tx.clone()));
        }
        let assigned = self.consumer.assignment().unwrap_or_default();
        if assigned.find_partition(topic, partition).is_none() {
            tracing::debug!(
                topic,
                partition,
                "record of a partition this worker no longer holds: left to its owner"
            );
            return Ok(None);
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
        Ok(Some(tx))
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
    // Under exactly-once the previous owner is fenced before anything is read: its open
    // transaction is aborted, so the committed offset and the changelog read below are
    // final, and nothing it still sends can commit.
    let output = match topo.processing_guarantee {
        ProcessingGuarantee::AtLeastOnce => Output::AtLeastOnce(producer),
        ProcessingGuarantee::ExactlyOnce => Output::ExactlyOnce(transactional_producer(
            settings,
            &topo.application_id,
            topic,
            partition,
        )?),
    };
    let changelog = topo.changelog_topic(topic);
    let (committed, changelog_extent, cluster, source_end) = {
        let _reading = settings
            .progress
            .busy(format!("reading where {topic}[{partition}] stands"));
        let watermarks = |t: &str| {
            patiently(&format!("reading the extent of {t}-{partition}"), || {
                Ok(consumer.fetch_watermarks(t, partition, Duration::from_secs(10))?)
            })
        };
        let committed = patiently(
            &format!("reading the committed offset of {topic}-{partition}"),
            || committed_offset(&consumer, topic, partition),
        )?;
        let changelog_extent = match settings.changelog {
            true => Some(watermarks(&changelog)?),
            false => None,
        };
        let cluster = tokio::task::block_in_place(|| {
            consumer.client().fetch_cluster_id(Duration::from_secs(10))
        });
        (committed, changelog_extent, cluster, watermarks(topic)?.1)
    };
    let follows = Follows {
        cluster: cluster.as_deref(),
        source_end,
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
                let _restoring = settings
                    .progress
                    .busy(format!("restoring {topic}[{partition}] from the changelog"));
                ensure_changelog_whole(
                    &changelog,
                    partition,
                    low,
                    settings.restore_truncated_changelog,
                )?;
                let restored = tokio::task::block_in_place(|| {
                    restore_from_changelog(
                        &store,
                        (&settings.brokers, &settings.kafka),
                        &changelog,
                        partition,
                        (low, high),
                        match topo.processing_guarantee {
                            ProcessingGuarantee::ExactlyOnce => stores::OnMismatch::Refuse,
                            ProcessingGuarantee::AtLeastOnce => stores::OnMismatch::Accept,
                        },
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
    let lost = Lost::default();
    let lost_in_task = lost.clone();
    let join = tokio::spawn(async move {
        let label = format!("{}-{}", task.topic, task.partition);
        let io = TaskIo {
            consumer: &consumer,
            output: &output,
            dispatcher: &dispatcher,
            lost: &lost_in_task,
            catch_up: CatchUp::new(source_end),
        };
        let run = task_loop(task, rx, io, &settings);
        if let Err(e) = run.await {
            METRICS.errors.with_label_values(&["task_failed"]).inc();
            tracing::error!(task = %label, error = %format!("{e:#}"), "task failed");
            let _ = fail.send(e.context(format!("task {label} failed")));
        }
    });
    Ok(TaskHandle { tx, join, lost })
}

/// How long a task's start-up reads (the group's committed offset, the extent of its
/// partitions) are retried: while a broker fails over they fail with transient errors
/// (not the leader, timed out, a broker handle replaced), and ending the worker for them
/// would only move the wait into a restart and a rebalance.
const START_READ_PATIENCE: Duration = Duration::from_secs(60);

/// Runs a blocking read of the cluster, retried with back-off until it succeeds or
/// [`START_READ_PATIENCE`] has passed.
fn patiently<T>(what: &str, read: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    retried_for(START_READ_PATIENCE, what, read)
}

fn retried_for<T>(
    patience: Duration,
    what: &str,
    mut read: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut backoff =
        payments::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    tokio::task::block_in_place(|| loop {
        match read() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < patience => {
                tracing::warn!(error = %format!("{e:#}"), "{what} failed; retrying");
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{what} still failed after {} s of retries",
                    started.elapsed().as_secs()
                )))
            }
        }
    })
}

/// A restore rebuilds the store from the whole changelog: one whose head is gone
/// (deleted by retention, or by a broker that keeps only the latest bytes) would leave out
/// every key last written before its start, silently: payments, refunds and timers that
/// are still live. Such a partition is refused instead, unless the worker is told to
/// accept that loss.
fn ensure_changelog_whole(
    changelog: &str,
    partition: i32,
    low: i64,
    accept_loss: bool,
) -> anyhow::Result<()> {
    if low > 0 {
        METRICS
            .errors
            .with_label_values(&["changelog_head_missing"])
            .inc();
        if accept_loss {
            tracing::warn!(%changelog, partition, log_start = low, "restoring from a changelog whose first records are gone: keys last written before them are lost (RESTORE_TRUNCATED_CHANGELOG)");
            return Ok(());
        }
        anyhow::bail!(
            "restoring from {changelog}-{partition} needs the changelog from offset 0, but it starts at {low}: \
             its first records were deleted, and a store rebuilt from the rest would miss every key last written \
             before them. The changelog topic must be cleanup.policy=compact without retention (docker-compose.yml's \
             kafka-init creates it so); restore the topic's records, run this partition where its local store \
             is current, or accept the loss with RESTORE_TRUNCATED_CHANGELOG=true"
        );
    }
    Ok(())
}

/// What a task's loop reads from and writes to besides its store.
struct TaskIo<'a> {
    consumer: &'a WorkerConsumer,
    output: &'a Output,
    dispatcher: &'a Dispatcher,
    lost: &'a Lost,
    catch_up: CatchUp,
}

/// A task that has just taken its partition reads what already waits in it before its
/// timers fire: a provider's reply that arrived while nobody held the partition wins over
/// the timeout that fell due meanwhile, as it did for the previous owner. So a takeover
/// replays what the previous owner did, and under `at_least_once` what both of them send
/// for a payment is the same.
struct CatchUp {
    /// The partition's end when the task started.
    until: i64,
    last_input: Instant,
    done: bool,
}

impl CatchUp {
    /// With no record for this long the task is at the end, whatever lies in the log
    /// (a transaction marker is never delivered).
    const IDLE: Duration = Duration::from_secs(2);

    fn new(until: i64) -> Self {
        CatchUp {
            until,
            last_input: Instant::now(),
            done: false,
        }
    }

    /// Whether the task may fire its timers.
    fn caught_up(&mut self, task: &Task) -> bool {
        if !self.done
            && (task.next_offset().unwrap_or(0) >= self.until
                || self.last_input.elapsed() >= Self::IDLE)
        {
            self.done = true;
            tracing::debug!(topic = %task.topic, partition = task.partition, "caught up with the input: timers fire");
        }
        self.done
    }
}

/// Whether the task may act on its partition now; `false` ends the task without another
/// write. A partition lost meanwhile ends it.
///
/// After a freeze of the process longer than the group allows (see [`super::freeze`]),
/// another worker may hold the partition already. Under exactly-once the broker fences
/// whatever this worker would still send, so the task only waits for the group's verdict
/// to save the work. Under at-least-once nothing fences it, and no verdict is certain to
/// arrive in time (the rebalance callback runs only when the worker polls), so the task
/// acts again only once the group's coordinator has accepted a commit from this worker as
/// the partition's holder: Kafka's own check of a member, which a worker the group has
/// dropped fails (see [`membership`]).
///
/// A consumer that failed for good (librdkafka's fatal error: a static member fenced by
/// another with its instance id, which is how a worker frozen past its session learns it
/// was replaced) holds no partition any more, so its tasks stop as if the partitions were
/// lost: the rebalance callback that would say so is not called.
async fn may_act(
    watch: &FreezeWatch,
    lost: &Lost,
    rx: &mpsc::Receiver<RawRecord>,
    (topic, partition): (&str, i32),
    consumer: &WorkerConsumer,
    prove: bool,
) -> bool {
    let fenced = || consumer.client().fatal_error().is_some();
    if lost.load(Ordering::SeqCst) || fenced() {
        return false;
    }
    if !watch.frozen() {
        return true;
    }
    tracing::warn!(topic, partition, "the process was frozen for longer than its group session: waiting for the group before acting on the partition again");
    if !prove {
        return !(watch
            .wait_for_the_group(lost, || rx.is_closed() || fenced())
            .await
            || fenced());
    }
    let asked = Instant::now();
    loop {
        if lost.load(Ordering::SeqCst) || fenced() {
            return false;
        }
        match off_runtime(|| membership(consumer, topic, partition)) {
            Membership::Member => {
                watch.forget();
                tracing::info!(
                    topic,
                    partition,
                    waited_ms = asked.elapsed().as_millis() as u64,
                    "the group still counts this worker as the partition's holder: acting again"
                );
                return true;
            }
            Membership::Dropped(why) => {
                tracing::warn!(topic, partition, %why, "the group no longer counts this worker as the partition's holder");
                return false;
            }
            // Revoked without a proof: the task stops without another write, as if
            // lost; the next holder carries on from what reached Kafka.
            Membership::Unknown(_) if rx.is_closed() => return false,
            Membership::Unknown(why) => {
                tracing::debug!(topic, partition, %why, "membership not confirmed yet; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What the group's coordinator says of this worker as a partition's holder.
enum Membership {
    Member,
    /// The coordinator refused the commit: the worker is not (or no longer) the member
    /// the group assigned the partition to.
    Dropped(String),
    /// No answer either way (the coordinator unreachable, a rebalance under way, nothing
    /// committed for the partition yet).
    Unknown(String),
}

/// Commits the partition's committed offset again (its first offset when nothing is
/// committed, which is where the group starts it then): the coordinator checks a
/// commit's member id and generation, and refuses it from a member it has dropped
/// (unknown member, an older generation, a fenced instance id). The offset does not move,
/// unless the worker's own automatic commit lands between the read and this commit: then
/// it goes back by what that commit covered, which is replayed, as at-least-once allows.
fn membership(consumer: &WorkerConsumer, topic: &str, partition: i32) -> Membership {
    use rdkafka::consumer::CommitMode;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
    let offset = match committed_offset(consumer, topic, partition) {
        Ok(Some(o)) => o,
        Ok(None) => match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((low, _)) => low,
            Err(e) => {
                return Membership::Unknown(format!("reading the partition's first offset: {e}"))
            }
        },
        Err(e) => return Membership::Unknown(format!("{e:#}")),
    };
    let mut again = rdkafka::TopicPartitionList::new();
    if let Err(e) = again.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset)) {
        return Membership::Unknown(e.to_string());
    }
    match consumer.commit(&again, CommitMode::Sync) {
        Ok(()) => Membership::Member,
        Err(KafkaError::ConsumerCommit(
            code @ (Code::UnknownMemberId | Code::IllegalGeneration | Code::FencedInstanceId),
        )) => Membership::Dropped(code.to_string()),
        Err(e) => Membership::Unknown(e.to_string()),
    }
}

async fn task_loop(
    mut task: Task,
    mut rx: mpsc::Receiver<RawRecord>,
    io: TaskIo<'_>,
    settings: &WorkerSettings,
) -> anyhow::Result<()> {
    let TaskIo {
        consumer,
        output,
        dispatcher,
        lost,
        mut catch_up,
    } = io;
    let task_label = format!("{}-{}", task.topic, task.partition);
    let watch = FreezeWatch::new(settings.freeze_bound(), settings.freeze_bound());
    let (topic, partition) = (task.topic.clone(), task.partition);
    let prove = matches!(output, Output::AtLeastOnce(_));
    // Asked between a publish's changelog and its outputs (see `publish`).
    macro_rules! still_ours {
        () => {
            &|| may_act(&watch, lost, &rx, (&topic, partition), consumer, prove).boxed()
        };
    }
    // Whatever a crash (or the previous owner) left in the outbox goes out first.
    if !publish(&mut task, output, consumer, dispatcher, still_ours!()).await? {
        return stop_lost(&task, lost);
    }
    let mut tick = tokio::time::interval(settings.punctuate_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { break };
                if !may_act(&watch, lost, &rx, (&topic, partition), consumer, prove).await {
                    return stop_lost(&task, lost);
                }
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
                catch_up.last_input = Instant::now();
                off_runtime(|| {
                    task.apply_inputs(batch, now)?;
                    if catch_up.caught_up(&task) {
                        task.fire_timers(now, 1000)?;
                    }
                    anyhow::Ok(())
                })?;
                observe_stage("apply", started);
                if !publish(&mut task, output, consumer, dispatcher, still_ours!()).await? {
                    return stop_lost(&task, lost);
                }
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
                if !may_act(&watch, lost, &rx, (&topic, partition), consumer, prove).await {
                    return stop_lost(&task, lost);
                }
                let now = now_ms();
                if catch_up.caught_up(&task) && task.timers_due(now)? && off_runtime(|| task.fire_timers(now, 1000))? > 0
                    && !publish(&mut task, output, consumer, dispatcher, still_ours!()).await?
                {
                    return stop_lost(&task, lost);
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
    if lost.load(Ordering::SeqCst) {
        return stop_lost(&task, lost);
    }
    for _ in 0..2 {
        // Twice: the second for the removal of what the first published, so the next
        // owner does not publish it again.
        if !publish(&mut task, output, consumer, dispatcher, still_ours!()).await? {
            return stop_lost(&task, lost);
        }
    }
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

/// A task whose partition was lost stops without applying or publishing anything more:
/// the partition's new owner carries on from what reached Kafka. Its store stays on disk,
/// judged like any other when the partition comes back.
fn stop_lost(task: &Task, lost: &Lost) -> anyhow::Result<()> {
    // The worker's loop leaves the partition's records to its owner from now on.
    lost.store(true, Ordering::SeqCst);
    METRICS.errors.with_label_values(&["partition_lost"]).inc();
    tracing::warn!(topic = %task.topic, partition = task.partition, checkpoint = ?task.next_offset(), "task stopped: the group gave its partition to another worker");
    Ok(())
}

/// Runs a task's processing and store work, which goes on for milliseconds without
/// yielding: the runtime's other tasks (the API's and the sink's when the roles share a
/// process) move to another thread meanwhile.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub(super) fn observe_stage(stage: &str, since: Instant) {
    METRICS
        .stage_seconds
        .with_label_values(&[stage])
        .observe(since.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::retried_for;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_start_up_read_is_retried_until_it_succeeds_then_given_up_with_what_failed() {
        let mut calls = 0;
        let v = retried_for(Duration::from_secs(5), "reading the extent of t-0", || {
            calls += 1;
            match calls {
                1 | 2 => anyhow::bail!("Not leader for partition"),
                _ => Ok(calls),
            }
        })
        .expect("the third read succeeds");
        assert_eq!(v, 3);

        let e = retried_for::<()>(
            Duration::from_millis(300),
            "reading the extent of t-0",
            || anyhow::bail!("Broker handle destroyed"),
        )
        .expect_err("a read that keeps failing is given up");
        let text = format!("{e:#}");
        assert!(
            text.starts_with("reading the extent of t-0 still failed after")
                && text.ends_with("Broker handle destroyed"),
            "{text}"
        );
    }
}
