//! Admission control: while the pipeline's backlog is over a bound, a create is refused at
//! once (`503 overloaded` with `Retry-After`) and nothing is queued, instead of waiting in
//! Kafka behind work the workers cannot do in time.
//!
//! The backlog is what the workers have not processed of the commands topic: for each
//! partition, the records after the worker group's committed offset (the number Kafka's
//! consumer-group tools call lag), read from the broker every `every` on a thread of its
//! own. A partition's creates are refused while more than its share of
//! `min_backlog_records` (divided evenly among the partitions) of those records have
//! waited longer than `max_backlog`: those between the committed offset and where the
//! partition ended `max_backlog` ago (from the readings of the last seconds). A few old
//! records are the trail of the workers' offset commits or a partition's pause in a
//! rebalance, not overload; many old ones are. Counting records that have waited does not
//! mistake a burst after a quiet spell for a stall, as a processing rate would, and a
//! worker that processes nothing makes every record of its partitions old.
//!
//! The verdict is per partition: a create goes to the partition its payment id hashes to
//! ([`payments::partition`]: murmur2, the Java client's partitioner, which every
//! producer of the gateway is set to), so a stalled partition refuses only its own creates while the others are
//! accepted. When every partition is behind (the workers are overloaded) every create is
//! refused, as it should be.
//!
//! A second, local bound covers an API instance that is itself the bottleneck (its
//! processes share cores with others, or it has more clients than it can serve): at most
//! `max_creates_in_flight` creates are handled at once, and one more is refused at once.
//!
//! Only creates are refused. A cancel only shortens work, and a provider's webhook
//! reports money that has already moved (refusing it costs a provider retry and the
//! payment's latency): both are always queued. Reads never touch the pipeline. When the
//! backlog cannot be read (the broker is away) creates are admitted: the publish itself
//! then answers, with its own timeout.

use payments::partition::partition_of;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

/// Where to read the backlog and how much of it to accept.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub brokers: String,
    /// Extra librdkafka properties, as for every client.
    pub kafka: Vec<(String, String)>,
    /// The worker group (the topology's application id).
    pub group_id: String,
    /// The topic the workers consume (the commands topic).
    pub topic: String,
    /// A partition's creates are refused while more than its share of
    /// `min_backlog_records` records the workers have not processed have waited longer
    /// than this.
    pub max_backlog: Duration,
    pub min_backlog_records: u64,
    /// How often the backlog is read.
    pub every: Duration,
}

impl AdmissionConfig {
    /// The defaults: refuse while more than 1,000 records have waited over 2 s; read four
    /// times a second.
    pub fn new(brokers: &str, group_id: &str, topic: &str) -> Self {
        AdmissionConfig {
            brokers: brokers.to_owned(),
            kafka: Vec::new(),
            group_id: group_id.to_owned(),
            topic: topic.to_owned(),
            max_backlog: Duration::from_secs(2),
            min_backlog_records: 1_000,
            every: Duration::from_millis(250),
        }
    }
}

/// The latest reading of the backlog and what it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub backlog_records: u64,
    /// Of those, how many have waited longer than the bound.
    pub old_records: u64,
    /// How long the oldest record the workers have not processed has waited (the
    /// largest over the partitions).
    pub backlog_s: f64,
    /// The partitions of the commands topic.
    pub partitions: i32,
    /// The partitions whose creates are refused, each with the longest `Retry-After` to
    /// answer.
    pub refuse: BTreeMap<i32, u32>,
}

impl Verdict {
    const ADMIT: Verdict = Verdict {
        backlog_records: 0,
        old_records: 0,
        backlog_s: 0.0,
        partitions: 0,
        refuse: BTreeMap::new(),
    };

    /// Whether creates for the payment keyed `key` are refused: `Some(longest
    /// Retry-After)` if its partition is over the bound.
    pub fn refuses(&self, key: &[u8]) -> Option<u32> {
        if self.refuse.is_empty() || self.partitions <= 0 {
            return None;
        }
        self.refuse
            .get(&partition_of(key, self.partitions))
            .copied()
    }
}

/// The API's view of the backlog: [`Admission::admit`] is a lock and a copy.
pub struct Admission {
    verdict: Mutex<Verdict>,
}

struct Metrics {
    backlog_records: prometheus::IntGauge,
    backlog_seconds: prometheus::Gauge,
    refusing_partitions: prometheus::IntGauge,
    refused: prometheus::IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        backlog_records: prometheus::IntGauge::new(
            "gateway_admission_backlog_records",
            "Records of the commands topic the workers have not processed, as admission control last read them",
        )
        .expect("a valid metric"),
        backlog_seconds: prometheus::Gauge::new(
            "gateway_admission_backlog_seconds",
            "How long the oldest record of the commands topic the workers have not processed has waited (the largest over the partitions)",
        )
        .expect("a valid metric"),
        refusing_partitions: prometheus::IntGauge::new(
            "gateway_admission_refusing_partitions",
            "Partitions of the commands topic whose creates admission control refuses now (their backlog is over the bound)",
        )
        .expect("a valid metric"),
        refused: prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "gateway_admission_refused_total",
                "Creates refused by admission control (503 overloaded; nothing queued), by bound: the workers' backlog or the creates in flight in this API",
            ),
            &["bound"],
        )
        .expect("a valid metric"),
    };
    // Registered once per process; a second registration of the same name only fails.
    let _ = prometheus::register(Box::new(m.backlog_records.clone()));
    let _ = prometheus::register(Box::new(m.backlog_seconds.clone()));
    let _ = prometheus::register(Box::new(m.refusing_partitions.clone()));
    let _ = prometheus::register(Box::new(m.refused.clone()));
    m
});

impl Admission {
    /// Admission that admits everything (no bound configured).
    pub fn open() -> Arc<Self> {
        Arc::new(Admission {
            verdict: Mutex::new(Verdict::ADMIT),
        })
    }

    /// Starts reading the backlog on a thread that ends when the returned value is
    /// dropped.
    pub fn start(cfg: AdmissionConfig) -> anyhow::Result<Arc<Self>> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            // The worker group's id, to read its committed offsets; this consumer never
            // subscribes, so it never joins the group.
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false");
        for (k, v) in &cfg.kafka {
            client.set(k, v);
        }
        let consumer: BaseConsumer = client
            .create()
            .map_err(|e| anyhow::anyhow!("creating the admission control's Kafka client: {e}"))?;
        let admission = Admission::open();
        let weak = Arc::downgrade(&admission);
        std::thread::Builder::new()
            .name("admission".into())
            .spawn(move || monitor(&consumer, &cfg, &weak))?;
        LazyLock::force(&METRICS);
        for bound in ["backlog", "in_flight"] {
            METRICS.refused.with_label_values(&[bound]);
        }
        Ok(admission)
    }

    /// `Err(retry_after_s)` while the backlog of the partition a payment keyed `key` goes
    /// to is over the bound. The seconds are spread between 1 and the verdict's, so
    /// refused clients do not all come back at once.
    pub fn admit(&self, key: &[u8]) -> Result<(), u32> {
        let refused = {
            let verdict = self.verdict.lock().unwrap_or_else(|e| e.into_inner());
            verdict.refuses(key)
        };
        match refused {
            None => Ok(()),
            Some(most) => {
                METRICS.refused.with_label_values(&["backlog"]).inc();
                let spread = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                Err(1 + spread % most.max(1))
            }
        }
    }

    /// Counts a create refused because this API had as many creates in flight as it
    /// takes.
    pub fn refused_in_flight() {
        METRICS.refused.with_label_values(&["in_flight"]).inc();
    }

    pub fn current(&self) -> Verdict {
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, v: Verdict) {
        *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// Reads the backlog every `cfg.every` until the [`Admission`] is dropped.
fn monitor(consumer: &BaseConsumer, cfg: &AdmissionConfig, admission: &Weak<Admission>) {
    let mut window = Window::new(cfg.max_backlog, cfg.min_backlog_records);
    let mut failing = false;
    loop {
        std::thread::sleep(cfg.every);
        let Some(admission) = admission.upgrade() else {
            return;
        };
        let verdict = match read(consumer, &cfg.topic, cfg.every.max(Duration::from_secs(1))) {
            Ok(reading) => {
                if failing {
                    tracing::info!(topic = %cfg.topic, "the backlog is readable again");
                    failing = false;
                }
                window.push(Instant::now(), reading)
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(topic = %cfg.topic, error = %e, "cannot read the backlog; admitting every create until it can be read");
                    failing = true;
                }
                window = Window::new(cfg.max_backlog, cfg.min_backlog_records);
                Verdict::ADMIT
            }
        };
        let before: Vec<i32> = admission.current().refuse.into_keys().collect();
        let now: Vec<i32> = verdict.refuse.keys().copied().collect();
        if before != now {
            tracing::warn!(
                backlog_records = verdict.backlog_records,
                old_records = verdict.old_records,
                backlog_s = verdict.backlog_s,
                refusing_partitions = ?now,
                of = verdict.partitions,
                "admission control changes"
            );
        }
        METRICS.backlog_records.set(verdict.backlog_records as i64);
        METRICS.backlog_seconds.set(verdict.backlog_s);
        METRICS.refusing_partitions.set(now.len() as i64);
        admission.set(verdict);
    }
}

/// One reading: per partition, its end (high watermark) and the group's position in it
/// (committed offset).
type Reading = BTreeMap<i32, (i64, i64)>;

fn read(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> anyhow::Result<Reading> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut reading = Reading::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        // A partition the group never committed is read from its start.
        let position = committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
            .unwrap_or(low)
            .max(low);
        reading.insert(p, (high, position));
    }
    Ok(reading)
}

/// The readings of the last seconds, and the verdict they give.
struct Window {
    readings: VecDeque<(Instant, Reading)>,
    max_backlog: Duration,
    min_backlog_records: u64,
}

/// How much longer than the bound readings are kept: an age over the bound is told by
/// a reading older than it.
const KEEP_BEYOND_BOUND: Duration = Duration::from_secs(2);
/// The longest `Retry-After` answered.
const RETRY_AFTER_MAX_S: u32 = 10;

impl Window {
    fn new(max_backlog: Duration, min_backlog_records: u64) -> Self {
        Window {
            readings: VecDeque::new(),
            max_backlog,
            min_backlog_records,
        }
    }

    fn push(&mut self, at: Instant, reading: Reading) -> Verdict {
        let keep = self.max_backlog + KEEP_BEYOND_BOUND;
        while self
            .readings
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > keep)
        {
            self.readings.pop_front();
        }
        let backlog: u64 = reading
            .values()
            .map(|(high, committed)| u64::try_from(high - committed).unwrap_or(0))
            .sum();
        let age = reading
            .iter()
            .map(|(p, (high, committed))| self.age(at, *p, *high, *committed))
            .fold(Duration::ZERO, Duration::max);
        // Where each partition ended `max_backlog` ago: what the group has not processed
        // below that has waited longer. No reading that old yet: nothing is known to be.
        let then = at.checked_sub(self.max_backlog).and_then(|cutoff| {
            self.readings
                .iter()
                .rev()
                .find(|(t, _)| *t <= cutoff)
                .map(|(_, r)| r)
        });
        let old_in = |p: &i32, committed: i64| -> u64 {
            then.and_then(|then| then.get(p))
                .map_or(0, |(high, _)| u64::try_from(high - committed).unwrap_or(0))
        };
        let partitions = reading.len().max(1) as u64;
        // Each partition's share of the bound (at least one record).
        let share = (self.min_backlog_records / partitions).max(1);
        let mut old_records = 0;
        let mut refuse = BTreeMap::new();
        for (p, (high, committed)) in &reading {
            let old = old_in(p, *committed);
            old_records += old;
            if old > share {
                let over = self
                    .age(at, *p, *high, *committed)
                    .saturating_sub(self.max_backlog);
                let retry = u32::try_from(over.as_secs() + 1)
                    .unwrap_or(u32::MAX)
                    .clamp(1, RETRY_AFTER_MAX_S);
                refuse.insert(*p, retry);
            }
        }
        let count = i32::try_from(reading.len()).unwrap_or(i32::MAX);
        self.readings.push_back((at, reading));
        Verdict {
            backlog_records: backlog,
            old_records,
            backlog_s: age.as_secs_f64(),
            partitions: count,
            refuse,
        }
    }

    /// How long the oldest record after `committed` in partition `p` has waited: since
    /// the newest earlier reading whose end was at or before `committed` (every record
    /// the group has not processed arrived after it). Without one, at least since the
    /// oldest reading kept.
    fn age(&self, at: Instant, p: i32, high: i64, committed: i64) -> Duration {
        if committed >= high {
            return Duration::ZERO;
        }
        let since = self
            .readings
            .iter()
            .rev()
            .find(|(_, r)| r.get(&p).is_some_and(|(h, _)| *h <= committed))
            .or(self.readings.front())
            .map_or(at, |(t, _)| *t);
        at.duration_since(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(2);

    /// One partition at `high`, the group at `committed`.
    fn one(high: i64, committed: i64) -> Reading {
        Reading::from([(0, (high, committed))])
    }

    /// Feeds a reading every 250 ms from `t0`; returns the last verdict.
    fn feed(w: &mut Window, t0: Instant, readings: &[Reading]) -> Verdict {
        let mut last = Verdict::ADMIT;
        for (i, r) in readings.iter().enumerate() {
            last = w.push(t0 + Duration::from_millis(250 * i as u64), r.clone());
        }
        last
    }

    #[test]
    fn a_burst_after_a_quiet_spell_is_not_a_stall() {
        let mut w = Window::new(BOUND, 100);
        // Ten quiet seconds, everything processed; then 1,500 records at once.
        let mut readings: Vec<Reading> = (0..40).map(|_| one(1_000, 1_000)).collect();
        readings.push(one(2_500, 1_000));
        let v = feed(&mut w, Instant::now(), &readings);
        assert_eq!(v.backlog_records, 1_500);
        assert!(v.backlog_s <= 0.25 + 1e-9, "{v:?}");
        assert!(v.refuse.is_empty(), "{v:?}");
    }

    #[test]
    fn workers_that_fall_behind_by_more_than_the_bound_are_refused() {
        let mut w = Window::new(BOUND, 100);
        // 1,000 records/s arrive; the group is 3 s behind them.
        let readings: Vec<Reading> = (0..30)
            .map(|i| one(1_000 + 250 * i, (250 * i - 2_000).max(0)))
            .collect();
        let v = feed(&mut w, Instant::now(), &readings);
        assert!((v.backlog_s - 3.0).abs() < 0.26, "{v:?}");
        assert_eq!(v.old_records, 1_000);
        assert_eq!(v.refuse, BTreeMap::from([(0, 2)]));
        // Caught up to 1.5 s behind: admitted again.
        let t = Instant::now() + Duration::from_millis(250 * 30);
        let v = w.push(t, one(1_000 + 250 * 30, 250 * 30 - 500));
        assert!(v.backlog_s < 2.0, "{v:?}");
        assert!(v.refuse.is_empty(), "{v:?}");
    }

    #[test]
    fn stopped_workers_are_refused_once_enough_records_are_older_than_the_bound() {
        let mut w = Window::new(BOUND, 50);
        let t0 = Instant::now();
        // Caught up at 500, then records arrive and nothing is processed.
        let mut readings = vec![one(500, 500)];
        readings.extend((1..=8).map(|i| one(500 + 100 * i, 500)));
        // 2 s after the last caught-up reading: at the bound, not over it.
        assert!(feed(&mut w, t0, &readings).refuse.is_empty());
        let v = w.push(t0 + Duration::from_millis(2_250), one(1_400, 500));
        assert!((v.backlog_s - 2.25).abs() < 1e-9, "{v:?}");
        assert_eq!(v.old_records, 100);
        assert_eq!(v.refuse, BTreeMap::from([(0, 1)]));
        // Long stopped: the age is at least as old as the readings kept.
        let mut last = v;
        for i in 10..40 {
            last = w.push(
                t0 + Duration::from_millis(250 * i),
                one(500 + 100 * i as i64, 500),
            );
        }
        assert!(last.backlog_s >= BOUND.as_secs_f64(), "{last:?}");
        assert!(!last.refuse.is_empty());
    }

    #[test]
    fn a_few_old_records_are_not_overload() {
        let mut w = Window::new(BOUND, 100);
        // A hundred records left behind (a commit not yet made), however old.
        let readings: Vec<Reading> = (0..40).map(|_| one(600, 500)).collect();
        let v = feed(&mut w, Instant::now(), &readings);
        assert!(v.backlog_s > BOUND.as_secs_f64(), "{v:?}");
        assert_eq!(v.old_records, 100);
        assert!(v.refuse.is_empty(), "{v:?}");
        // Thousands of fresh records beside them are not old.
        let v = w.push(Instant::now() + Duration::from_secs(10), one(5_600, 500));
        assert_eq!((v.backlog_records, v.old_records), (5_100, 100));
        assert!(v.refuse.is_empty(), "{v:?}");
    }

    #[test]
    fn a_stuck_partition_refuses_only_its_own_creates() {
        let mut w = Window::new(BOUND, 100);
        // Partition 0 keeps up; partition 1 stops at 100 while its records keep coming.
        let readings: Vec<Reading> = (0..20)
            .map(|i| Reading::from([(0, (100 * i, 100 * i)), (1, (100 + 50 * i, 100))]))
            .collect();
        let v = feed(&mut w, Instant::now(), &readings);
        assert_eq!(v.backlog_records, 950);
        assert_eq!(
            v.refuse.keys().copied().collect::<Vec<_>>(),
            vec![1],
            "{v:?}"
        );
        let key_in = |p: i32| {
            (0..)
                .map(|i: u32| format!("pay_{i:032x}"))
                .find(|k| partition_of(k.as_bytes(), 2) == p)
                .expect("a key for every partition")
        };
        assert_eq!(v.refuses(key_in(0).as_bytes()), None);
        assert!(v.refuses(key_in(1).as_bytes()).is_some());
    }

    #[test]
    fn every_partition_behind_refuses_every_create() {
        let mut w = Window::new(BOUND, 100);
        let readings: Vec<Reading> = (0..20)
            .map(|i| Reading::from([(0, (100 + 50 * i, 100)), (1, (100 + 50 * i, 100))]))
            .collect();
        let v = feed(&mut w, Instant::now(), &readings);
        assert_eq!(v.refuse.len(), 2, "{v:?}");
    }

    #[test]
    fn nothing_is_refused_from_a_first_reading() {
        let mut w = Window::new(BOUND, 100);
        let v = w.push(Instant::now(), one(1_000_000, 0));
        assert!(v.refuse.is_empty(), "{v:?}");
    }

    #[test]
    fn retries_are_spread_up_to_the_verdict() {
        let a = Admission::open();
        assert_eq!(a.admit(b"pay_0"), Ok(()));
        a.set(Verdict {
            backlog_records: 5_000,
            old_records: 5_000,
            backlog_s: 9.0,
            partitions: 1,
            refuse: BTreeMap::from([(0, 7)]),
        });
        for _ in 0..50 {
            let after = a.admit(b"pay_0").expect_err("refused");
            assert!((1..=7).contains(&after), "{after}");
        }
    }
}
