//! The watchdog of a role that must make progress: a worker or the sink (members of a
//! consumer group), or the notifier (which picks its work from PostgreSQL).
//!
//! A group member is **stalled** when a partition it holds has records waiting that the
//! group has not committed past for `report_after`, or when it has held no partition
//! for `report_after` (and then, worse, when records wait on a partition nobody
//! commits past). Progress is read from outside the role, as an operator would: the
//! group's committed offsets against the partitions' ends, both asked of the brokers;
//! a partition whose committed offset stands still below its end is read once
//! (`read_committed`) to tell records from transaction markers and aborted records.
//! A partition it holds that cannot be judged so for `report_after` (its leader does not
//! answer the watchdog, or the read never tells) is reported too, as a stall it cannot
//! confirm, and never ends the role. The notifier is stalled when it has not picked its
//! work for `report_after`.
//!
//! A stall is logged (a warning, repeated every `report_after` while it lasts), shown
//! (`gateway_stalled`, `gateway_stall_seconds`, `/health/ready` answering 503 with the
//! reason) and, when it lasts `exit_after` and the role is not waiting on a known cause
//! (a restore, an unreachable database: restarting would not help), ends the role with
//! an error, so that the process exits and its supervisor starts it again: a new member
//! that joins the group afresh.

use anyhow::Context as _;
use prometheus::{register_gauge_vec, register_int_counter_vec, GaugeVec, IntCounterVec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use telemetry::progress::Progress;

/// When a stall is reported, and when it ends the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSettings {
    pub report_after: Duration,
    /// `None`: a stall is reported but never ends the role.
    pub exit_after: Option<Duration>,
}

/// Stalls are reported after 30 s and end the role after 90 s unless configured
/// (`STALL_REPORT_S`, `STALL_EXIT_S`).
pub const DEFAULT_STALL_REPORT_S: u64 = 30;
pub const DEFAULT_STALL_EXIT_S: u64 = 90;

impl Default for StallSettings {
    fn default() -> Self {
        StallSettings {
            report_after: Duration::from_secs(DEFAULT_STALL_REPORT_S),
            exit_after: Some(Duration::from_secs(DEFAULT_STALL_EXIT_S)),
        }
    }
}

impl StallSettings {
    /// From seconds as configured; `exit_s` 0 never ends the role.
    pub fn from_secs(report_s: u64, exit_s: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            report_s > 0,
            "STALL_REPORT_S is 0: give the seconds without progress after which a role reports a stall (e.g. {DEFAULT_STALL_REPORT_S})"
        );
        anyhow::ensure!(
            exit_s == 0 || exit_s >= report_s,
            "STALL_EXIT_S ({exit_s}) is below STALL_REPORT_S ({report_s}): a role must report a stall before it exits over it (or set STALL_EXIT_S=0 to never exit)"
        );
        Ok(StallSettings {
            report_after: Duration::from_secs(report_s),
            exit_after: (exit_s > 0).then(|| Duration::from_secs(exit_s)),
        })
    }

    fn period(&self) -> Duration {
        (self.report_after / 6).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }
}

struct Metrics {
    stalled: GaugeVec,
    stall_seconds: GaugeVec,
    exits: IntCounterVec,
}

#[allow(clippy::expect_used)]
static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    (|| -> Result<Metrics, prometheus::Error> {
        Ok(Metrics {
            stalled: register_gauge_vec!(
                "gateway_stalled",
                "1 while the role makes no progress (see /health/ready for why), else 0",
                &["role"]
            )?,
            stall_seconds: register_gauge_vec!(
                "gateway_stall_seconds",
                "How long the role's current stall has lasted (0: none)",
                &["role"]
            )?,
            exits: register_int_counter_vec!(
                "gateway_stall_exits_total",
                "Roles ended over a stall, for their supervisor to start again",
                &["role"]
            )?,
        })
    })()
    .expect("watchdog metrics register once")
});

/// A running watchdog; stopped when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    exit: tokio::sync::oneshot::Receiver<String>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Watchdog {
    /// Resolves, with the reason, when a stall has lasted `exit_after`; never otherwise.
    pub async fn exited(&mut self) -> String {
        match (&mut self.exit).await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }
}

/// Runs `role` until it ends, or until its watchdog ends it over a stall (an error
/// saying why).
pub async fn guarded<F>(role: &str, mut watchdog: Watchdog, run: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::select! {
        r = run => r,
        why = watchdog.exited() => {
            METRICS.exits.with_label_values(&[role]).inc();
            Err(anyhow::anyhow!(
                "{role} ended over a stall: {why}; its supervisor (or the operator) should start it again, and it joins the group afresh"
            ))
        }
    }
}

/// Watches a member of `group` consuming `topics`.
pub fn watch_group(
    progress: Arc<Progress>,
    brokers: &str,
    group: &str,
    topics: Vec<String>,
    kafka: &[(String, String)],
    settings: StallSettings,
) -> anyhow::Result<Watchdog> {
    let client_id = format!("{}-watchdog", progress.role());
    let mut view = GroupProgress::new(brokers, group, topics, kafka, &client_id)?;
    spawn(progress.clone(), settings, move |clock| {
        move || view.check(&progress, settings, clock())
    })
}

/// Watches the notifier: stalled when it has not picked its work for `report_after`.
pub fn watch_beats(progress: Arc<Progress>, settings: StallSettings) -> anyhow::Result<Watchdog> {
    spawn(progress.clone(), settings, move |_| {
        move || {
            let quiet = progress.since_beat();
            (quiet >= settings.report_after).then(|| Stall {
                why: format!("picked no work for {} s", quiet.as_secs()),
                age: quiet,
                fatal: true,
            })
        }
    })
}

/// What a check found.
#[derive(Debug, Clone, PartialEq)]
struct Stall {
    why: String,
    /// How long there has been no progress.
    age: Duration,
    /// Whether a fresh start could help (not so for a member that merely has nothing to
    /// hold).
    fatal: bool,
}

fn spawn<C, F>(
    progress: Arc<Progress>,
    settings: StallSettings,
    make: C,
) -> anyhow::Result<Watchdog>
where
    C: FnOnce(fn() -> Instant) -> F + Send + 'static,
    F: FnMut() -> Option<Stall>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit) = tokio::sync::oneshot::channel();
    let role = progress.role().to_owned();
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name(format!("{role}-watchdog"))
        .spawn(move || {
            let mut check = make(Instant::now);
            let mut reported: Option<Instant> = None;
            while !stopped.load(Ordering::SeqCst) {
                let found = check();
                let busy = progress.busy_with();
                match &found {
                    Some(s) => {
                        let why = if busy.is_empty() {
                            s.why.clone()
                        } else {
                            format!("{} (waiting on: {})", s.why, busy.join("; "))
                        };
                        if reported.is_none_or(|t| t.elapsed() >= settings.report_after) {
                            tracing::warn!(role = %role, stall_s = s.age.as_secs(), reason = %why, "no progress");
                            reported = Some(Instant::now());
                        }
                        METRICS.stalled.with_label_values(&[&role]).set(1.0);
                        METRICS
                            .stall_seconds
                            .with_label_values(&[&role])
                            .set(s.age.as_secs_f64());
                        progress.set_stalled(Some(why.clone()));
                        if s.fatal
                            && busy.is_empty()
                            && settings.exit_after.is_some_and(|after| s.age >= after)
                        {
                            tracing::error!(role = %role, stall_s = s.age.as_secs(), reason = %why, "stalled too long: ending the role for a fresh start");
                            let _ = exit_tx.send(why);
                            return;
                        }
                    }
                    None => {
                        if reported.take().is_some() {
                            tracing::info!(role = %role, "progressing again");
                        }
                        METRICS.stalled.with_label_values(&[&role]).set(0.0);
                        METRICS.stall_seconds.with_label_values(&[&role]).set(0.0);
                        progress.set_stalled(None);
                    }
                }
                sleep_unless(&stopped, settings.period());
            }
            progress.set_stalled(None);
        })
        .context("starting the watchdog thread")?;
    Ok(Watchdog { stop, exit })
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
}

/// One partition as the watchdog saw it.
#[derive(Debug, Clone)]
struct Seen {
    committed: i64,
    /// When `committed` last moved (or was first seen).
    since: Instant,
    /// Whether records (not only markers) wait past `committed`, once a read told.
    records_waiting: Option<bool>,
    /// The partition's end when that read was made: a "no record waits" holds only
    /// until the end moves.
    read_to: i64,
}

/// A consumer group's progress over time, partition by partition, as seen from
/// outside: the group's committed offsets against the partitions' ends.
pub struct GroupProgress {
    consumer: BaseConsumer,
    group: String,
    topics: Vec<String>,
    /// Each topic's partitions as last read: a check whose read of them fails (the
    /// broker asked does not answer) judges the partitions known already.
    partitions: BTreeMap<String, Vec<i32>>,
    seen: BTreeMap<(String, i32), Seen>,
    /// Partitions the checks could not judge (their extent or their records could not
    /// be read), each since the first check that could not.
    unjudged: BTreeMap<(String, i32), Instant>,
    /// Since when every check has failed as a whole, if the last one did.
    failing_since: Option<Instant>,
}

/// Timeout of each request of a check.
const ASK: Duration = Duration::from_secs(5);

impl GroupProgress {
    /// A view of `group` on `topics`, through a client of its own that never joins the
    /// group.
    pub fn new(
        brokers: &str,
        group: &str,
        topics: Vec<String>,
        kafka: &[(String, String)],
        client_id: &str,
    ) -> anyhow::Result<Self> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            // A read that reaches the partition's end says so: the only conclusive
            // "no record waits" (see `records_after`).
            .set("enable.partition.eof", "true")
            // A broker that takes connections but does not answer (stalled, or behind a
            // black hole) is dropped after this, not librdkafka's minute: until then it
            // keeps being asked for metadata and the group's coordinator, and every
            // check fails as a whole.
            .set("socket.timeout.ms", (ASK * 2).as_millis().to_string())
            .set("client.id", client_id);
        for (k, v) in kafka {
            cfg.set(k, v);
        }
        // Never subscribes: it asks the group's offsets and reads a partition by
        // assignment, so the group never counts it as a member.
        let consumer: BaseConsumer = cfg
            .create()
            .context("creating a Kafka client to follow the group's progress")?;
        Ok(GroupProgress {
            consumer,
            group: group.to_owned(),
            topics,
            partitions: BTreeMap::new(),
            seen: BTreeMap::new(),
            unjudged: BTreeMap::new(),
            failing_since: None,
        })
    }

    fn check(
        &mut self,
        progress: &Progress,
        settings: StallSettings,
        now: Instant,
    ) -> Option<Stall> {
        let held = progress.held();
        let empty_for = progress.empty_for();
        let waiting = match self.waiting(settings.report_after, now) {
            Ok(w) => {
                self.failing_since = None;
                w
            }
            Err(e) => {
                // The brokers do not answer: judge again at the next check. A role whose
                // progress cannot be read for long is reported, not ended (a fresh start
                // would not reach the brokers either).
                tracing::debug!(group = %self.group, error = %format!("{e:#}"), "watchdog could not read the group's progress");
                let failing = now.saturating_duration_since(*self.failing_since.get_or_insert(now));
                return (failing >= settings.report_after).then(|| Stall {
                    why: format!(
                        "its group's progress could not be read for {} s: {e:#}",
                        failing.as_secs()
                    ),
                    age: failing,
                    fatal: false,
                });
            }
        };
        let mine: Vec<_> = waiting.iter().filter(|(tp, _)| held.contains(tp)).collect();
        if let Some(stall) = over(&mine, true, |n, secs, parts| {
            format!("holds {n} partition(s) with records waiting and has committed past none of them for {secs} s: {parts}")
        }) {
            return Some(stall);
        }
        // A partition it holds whose progress cannot be read (its leader does not answer
        // the watchdog) may be stalled as well: said, not ended over (the role's own
        // clients most likely cannot reach that broker either).
        let unjudged = self.unjudged(now);
        let blind: Vec<_> = unjudged
            .iter()
            .filter(|(tp, d)| held.contains(tp) && *d >= settings.report_after)
            .collect();
        if let Some(stall) = over(&blind, false, |n, secs, parts| {
            format!("cannot tell whether {n} partition(s) it holds progress: their committed offset has not moved and their records could not be read for {secs} s: {parts}")
        }) {
            return Some(stall);
        }
        let empty_for = empty_for.filter(|d| *d >= settings.report_after)?;
        match waiting.iter().map(|(_, age)| *age).max() {
            Some(age) => Some(Stall {
                why: format!(
                    "holds no partition (for {} s) while records wait on partitions nobody has committed past for {} s: {}",
                    empty_for.as_secs(),
                    age.as_secs(),
                    list(waiting.iter().map(|(tp, _)| tp))
                ),
                age: age.min(empty_for),
                fatal: true,
            }),
            None => Some(Stall {
                why: format!(
                    "holds no partition of {} for {} s (more members than partitions, or out of the group)",
                    self.topics.join(", "),
                    empty_for.as_secs()
                ),
                age: empty_for,
                fatal: false,
            }),
        }
    }

    /// The partitions the checks so far could not judge, with for how long they could
    /// not (see [`GroupProgress::waiting`]).
    pub fn unjudged(&self, now: Instant) -> Vec<((String, i32), Duration)> {
        self.unjudged
            .iter()
            .map(|(tp, since)| (tp.clone(), now.saturating_duration_since(*since)))
            .collect()
    }

    /// The partitions with records waiting whose committed offset has not moved for
    /// `after` (at least), with how long it has not. A partition it cannot judge (the
    /// broker leading it does not answer) is listed by [`GroupProgress::unjudged`]
    /// instead.
    pub fn waiting(
        &mut self,
        after: Duration,
        now: Instant,
    ) -> anyhow::Result<Vec<((String, i32), Duration)>> {
        let consumer = &self.consumer;
        let mut tpl = TopicPartitionList::new();
        for topic in &self.topics {
            match consumer.fetch_metadata(Some(topic), ASK) {
                Ok(md) => {
                    let ids = md
                        .topics()
                        .iter()
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect();
                    self.partitions.insert(topic.clone(), ids);
                }
                // A topic's partitions rarely change: those read before are judged.
                Err(e) if self.partitions.contains_key(topic) => {
                    tracing::debug!(topic, error = %e, "watchdog could not read a topic's partitions; judging those it knows");
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading the partitions of {topic}"))
                }
            }
            for p in self.partitions.get(topic).into_iter().flatten() {
                tpl.add_partition(topic, *p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, ASK)
            .with_context(|| format!("reading the committed offsets of group {}", self.group))?;
        let mut out = Vec::new();
        let mut present = BTreeSet::new();
        for e in committed.elements() {
            let tp = (e.topic().to_owned(), e.partition());
            present.insert(tp.clone());
            // A partition whose leader does not answer (a broker down) is judged at the
            // next check; the others are judged now.
            let (low, high) = match consumer.fetch_watermarks(e.topic(), e.partition(), ASK) {
                Ok(extent) => extent,
                Err(err) => {
                    tracing::debug!(topic = e.topic(), partition = e.partition(), error = %err, "watchdog could not read a partition's extent");
                    self.unjudged.entry(tp).or_insert(now);
                    continue;
                }
            };
            let c = match e.offset() {
                Offset::Offset(o) => o.max(low),
                _ => low,
            };
            let fresh = Seen {
                committed: c,
                since: now,
                records_waiting: None,
                read_to: high,
            };
            let seen = self.seen.entry(tp.clone()).or_insert(fresh.clone());
            if seen.committed != c {
                *seen = fresh;
            }
            let age = now.saturating_duration_since(seen.since);
            if high <= c || age < after {
                self.unjudged.remove(&tp);
                continue;
            }
            if seen.records_waiting == Some(false) && seen.read_to != high {
                seen.records_waiting = None;
            }
            if seen.records_waiting.is_none() {
                seen.read_to = high;
                seen.records_waiting = records_after(consumer, &tp, c, high).unwrap_or_else(|err| {
                    tracing::debug!(error = %format!("{err:#}"), "watchdog could not read a partition");
                    None
                });
            }
            match seen.records_waiting {
                Some(true) => {
                    self.unjudged.remove(&tp);
                    out.push((tp, age));
                }
                Some(false) => {
                    self.unjudged.remove(&tp);
                }
                None => {
                    self.unjudged.entry(tp).or_insert(now);
                }
            }
        }
        self.seen.retain(|tp, _| present.contains(tp));
        self.unjudged.retain(|tp, _| present.contains(tp));
        Ok(out)
    }
}

/// Whether a `read_committed` read of `tp` from `offset` returns a record (rather than
/// only the markers and aborted records the end offset counts): `None` when the read
/// neither found one nor reached `high`, the partition's end (a broker that did not answer
/// in time), so that the next check reads again instead of taking a stall for idleness.
fn records_after(
    consumer: &BaseConsumer,
    tp: &(String, i32),
    offset: i64,
    high: i64,
) -> anyhow::Result<Option<bool>> {
    let mut one = TopicPartitionList::new();
    one.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))
        .context("naming the partition to read")?;
    consumer
        .assign(&one)
        .context("assigning the partition to read")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut found = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() >= offset => {
                found = Some(true);
                break;
            }
            // The end, unless it is a new leader's that has not caught up with `high`
            // yet (inconclusive then).
            Some(Err(KafkaError::PartitionEOF(p))) if p == tp.1 => {
                if topology::runtime::reached(consumer, &tp.0, tp.1, high) {
                    found = Some(false);
                }
                break;
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "watchdog read failed");
                break;
            }
        }
    }
    consumer
        .assign(&TopicPartitionList::new())
        .context("releasing the partition read")?;
    Ok(found)
}

/// A stall over `parts` (each with how long it has stood still), as old as the oldest,
/// worded by `why` from their count, that age in seconds and their list; `None` when
/// `parts` is empty.
fn over(
    parts: &[&((String, i32), Duration)],
    fatal: bool,
    why: impl FnOnce(usize, u64, String) -> String,
) -> Option<Stall> {
    let age = parts.iter().map(|(_, age)| *age).max()?;
    Some(Stall {
        why: why(
            parts.len(),
            age.as_secs(),
            list(parts.iter().map(|(tp, _)| tp)),
        ),
        age,
        fatal,
    })
}

fn list<'a>(tps: impl Iterator<Item = &'a (String, i32)>) -> String {
    tps.map(|(t, p)| format!("{t}[{p}]"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brokers that cannot be reached at all: the role is reported stalled once that has
    /// lasted `report_after`, but not ended (a fresh start would not reach them either).
    #[test]
    fn a_role_whose_progress_cannot_be_read_is_reported_not_ended() {
        let nobody = testkit::ports::free_addr().unwrap();
        let quiet = [("log_level".to_owned(), "0".to_owned())];
        let mut view = GroupProgress::new(
            &nobody,
            "watchdog-unit",
            vec!["payments.commands".to_owned()],
            &quiet,
            "watchdog-unit",
        )
        .unwrap();
        let progress = Progress::new("sink");
        let settings = StallSettings::default();
        let t0 = Instant::now();
        assert_eq!(view.check(&progress, settings, t0), None);
        let later = t0 + settings.report_after + Duration::from_secs(1);
        let stall = view
            .check(&progress, settings, later)
            .expect("a role whose progress cannot be read for report_after is reported");
        assert!(!stall.fatal, "{stall:?}");
        assert!(
            stall
                .why
                .starts_with("its group's progress could not be read for 31 s"),
            "{}",
            stall.why
        );
    }

    /// A read that could not reach a broker tells nothing: taking it for "no record
    /// waits" would hide that partition's stall until its committed offset moved.
    #[test]
    fn a_read_that_reaches_no_broker_is_inconclusive() {
        let nobody = testkit::ports::free_addr().unwrap();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &nobody)
            .set("group.id", "watchdog-unit")
            .set("enable.partition.eof", "true")
            .set("log_level", "0")
            .create()
            .unwrap();
        let read = records_after(&consumer, &("payments.commands".to_owned(), 0), 7, 9).unwrap();
        assert_eq!(read, None);
    }

    #[test]
    fn stall_settings_refuse_an_exit_before_the_report() {
        assert!(StallSettings::from_secs(0, 90).is_err());
        let e = StallSettings::from_secs(30, 10).unwrap_err().to_string();
        assert!(
            e.contains("STALL_EXIT_S (10) is below STALL_REPORT_S (30)"),
            "{e}"
        );
        let never = StallSettings::from_secs(30, 0).unwrap();
        assert_eq!(never.exit_after, None);
        assert_eq!(
            StallSettings::from_secs(DEFAULT_STALL_REPORT_S, DEFAULT_STALL_EXIT_S).unwrap(),
            StallSettings::default()
        );
    }

    #[tokio::test]
    async fn a_notifier_that_picks_nothing_is_ended_unless_it_waits_on_a_known_cause() {
        let settings = StallSettings {
            report_after: Duration::from_millis(300),
            exit_after: Some(Duration::from_millis(900)),
        };
        // Waiting on PostgreSQL: reported (not ready), never ended.
        let waiting = Progress::new("notifier-test-busy");
        let busy = waiting.busy("PostgreSQL refuses the notifier's claims");
        let mut dog = watch_beats(waiting.clone(), settings).unwrap();
        tokio::select! {
            why = dog.exited() => panic!("ended while waiting on a known cause: {why}"),
            _ = tokio::time::sleep(Duration::from_millis(2000)) => {}
        }
        let why = waiting.stalled().expect("reported as stalled");
        assert!(why.contains("waiting on: PostgreSQL refuses"), "{why}");
        drop(busy);
        // Nothing to wait on: ended after `exit_after`.
        let started = Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(5), dog.exited())
            .await
            .expect("ended over the stall");
        assert!(why.starts_with("picked no work for"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A role that beats is never stalled.
        let fine = Progress::new("notifier-test-fine");
        let dog = watch_beats(fine.clone(), settings).unwrap();
        for _ in 0..15 {
            fine.beat();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(fine.stalled(), None);
        drop(dog);
    }
}
