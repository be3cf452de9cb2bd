//! Admission control: while the pipeline's backlog is over a bound, a create is refused at
//! once (`503 overloaded` with `Retry-After`) and nothing is queued, instead of waiting in
//! Kafka behind work the workers cannot do in time.
//!
//! The backlog is what the workers have not processed of the commands topic: over its
//! partitions, the high watermark minus the worker group's committed offset (the number
//! Kafka's consumer-group tools call lag), read from the broker every `every` on a
//! thread of its own. The rate at which the committed offsets advanced over the last
//! seconds turns it into time: the backlog is over the bound when it would take the
//! workers longer than `max_backlog` to process, and it holds more than
//! `min_backlog_records` (smaller backlogs are the trail of the workers' offset commits
//! and the pause of a rebalance, not overload). Workers that process nothing while
//! records wait make the backlog endless, and creates are refused until they resume.
//!
//! Only creates are refused. A cancel only shortens work, and a provider's webhook
//! reports money that has already moved (refusing it costs a provider retry and the
//! payment's latency): both are always queued. Reads never touch the pipeline. When the
//! backlog cannot be read (the broker is away) creates are admitted: the publish itself
//! then answers, with its own timeout.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use std::collections::VecDeque;
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
    /// Creates are refused while the backlog would take the workers longer than this.
    pub max_backlog: Duration,
    /// A backlog of at most this many records is never refused.
    pub min_backlog_records: u64,
    /// How often the backlog is read.
    pub every: Duration,
}

impl AdmissionConfig {
    /// The defaults: refuse beyond 2 s of backlog, and never below 1,000 records; read
    /// four times a second.
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub backlog_records: u64,
    /// How long the workers would take to process the backlog at their recent rate
    /// (infinite when they processed nothing while records waited).
    pub backlog_s: f64,
    /// `Some(seconds)` while creates are refused: when to retry.
    pub refuse: Option<u32>,
}

impl Verdict {
    const ADMIT: Verdict = Verdict {
        backlog_records: 0,
        backlog_s: 0.0,
        refuse: None,
    };
}

/// The API's view of the backlog: [`Admission::admit`] is a lock and a copy.
pub struct Admission {
    verdict: Mutex<Verdict>,
}

struct Metrics {
    backlog_records: prometheus::IntGauge,
    backlog_seconds: prometheus::Gauge,
    refused: prometheus::IntCounter,
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
            "How long the workers would take to process the backlog at their recent rate (+Inf when they process nothing)",
        )
        .expect("a valid metric"),
        refused: prometheus::IntCounter::new(
            "gateway_admission_refused_total",
            "Creates refused by admission control (503 overloaded; nothing queued)",
        )
        .expect("a valid metric"),
    };
    // Registered once per process; a second registration of the same name only fails.
    let _ = prometheus::register(Box::new(m.backlog_records.clone()));
    let _ = prometheus::register(Box::new(m.backlog_seconds.clone()));
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
        Ok(admission)
    }

    /// `Err(retry_after_s)` while the backlog is over the bound.
    pub fn admit(&self) -> Result<(), u32> {
        match self.current().refuse {
            None => Ok(()),
            Some(s) => {
                METRICS.refused.inc();
                Err(s)
            }
        }
    }

    pub fn current(&self) -> Verdict {
        *self.verdict.lock().unwrap_or_else(|e| e.into_inner())
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
        if verdict.refuse.is_some() != admission.current().refuse.is_some() {
            tracing::warn!(
                backlog_records = verdict.backlog_records,
                backlog_s = verdict.backlog_s,
                refusing = verdict.refuse.is_some(),
                "admission control changes"
            );
        }
        METRICS.backlog_records.set(verdict.backlog_records as i64);
        METRICS.backlog_seconds.set(verdict.backlog_s);
        admission.set(verdict);
    }
}

/// One reading: the sum of the group's committed offsets (its progress) and the records
/// after them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    committed: i64,
    backlog: u64,
}

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
    let mut reading = Reading {
        committed: 0,
        backlog: 0,
    };
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        // A partition the group never committed is read from its start.
        let position = committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
            .unwrap_or(low)
            .max(low);
        reading.committed += position;
        reading.backlog += u64::try_from(high - position).unwrap_or(0);
    }
    Ok(reading)
}

/// The readings of the last few seconds, and the verdict they give.
struct Window {
    readings: VecDeque<(Instant, Reading)>,
    max_backlog: Duration,
    min_backlog_records: u64,
}

/// How far back the processing rate is measured.
const RATE_OVER: Duration = Duration::from_secs(5);
/// The shortest span a rate is measured over (below it, nothing is refused).
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);
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
        self.readings.push_back((at, reading));
        while self
            .readings
            .get(1)
            .is_some_and(|(t, _)| at.duration_since(*t) >= RATE_OVER)
        {
            self.readings.pop_front();
        }
        let backlog = reading.backlog;
        let Some((first_at, first)) = self.readings.front() else {
            return Verdict::ADMIT;
        };
        let span = at.duration_since(*first_at);
        if backlog <= self.min_backlog_records || span < RATE_MIN_SPAN {
            return Verdict {
                backlog_records: backlog,
                backlog_s: 0.0,
                refuse: None,
            };
        }
        let rate = (reading.committed - first.committed).max(0) as f64 / span.as_secs_f64();
        let backlog_s = if rate > 0.0 {
            backlog as f64 / rate
        } else {
            f64::INFINITY
        };
        let over = backlog_s - self.max_backlog.as_secs_f64();
        Verdict {
            backlog_records: backlog,
            backlog_s,
            refuse: (over > 0.0).then(|| (over.ceil() as u32).clamp(1, RETRY_AFTER_MAX_S)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn reading(committed: i64, backlog: u64) -> Reading {
        Reading { committed, backlog }
    }

    #[test]
    fn a_backlog_the_workers_clear_in_time_is_admitted() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        // 1,000 records/s processed, 1,500 waiting: 1.5 s of work.
        assert_eq!(w.push(t0, reading(0, 1_500)).refuse, None);
        let v = w.push(at(t0, 1_000), reading(1_000, 1_500));
        assert_eq!(v.refuse, None);
        assert!((v.backlog_s - 1.5).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn a_backlog_over_the_bound_is_refused_with_when_to_retry() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        w.push(t0, reading(0, 4_000));
        // 1,000 records/s, 5,500 waiting: 5.5 s, 3.5 s over the bound.
        let v = w.push(at(t0, 1_000), reading(1_000, 5_500));
        assert_eq!(v.refuse, Some(4));
        // Far over: the retry is capped.
        let v = w.push(at(t0, 2_000), reading(2_000, 60_000));
        assert_eq!(v.refuse, Some(RETRY_AFTER_MAX_S));
        // Drained below the bound: admitted again.
        let v = w.push(at(t0, 3_000), reading(3_000, 1_000));
        assert_eq!(v.refuse, None);
    }

    #[test]
    fn workers_that_process_nothing_make_any_real_backlog_refused() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        w.push(t0, reading(500, 50));
        let v = w.push(at(t0, 1_500), reading(500, 101));
        assert_eq!(v.backlog_s, f64::INFINITY);
        assert_eq!(v.refuse, Some(RETRY_AFTER_MAX_S));
        // A small backlog is never refused, whatever the rate.
        let v = w.push(at(t0, 2_000), reading(500, 100));
        assert_eq!(v.refuse, None);
    }

    #[test]
    fn nothing_is_refused_before_a_rate_is_measured() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        assert_eq!(w.push(t0, reading(0, 1_000_000)).refuse, None);
        assert_eq!(w.push(at(t0, 900), reading(0, 1_000_000)).refuse, None);
        assert!(w
            .push(at(t0, 1_000), reading(0, 1_000_000))
            .refuse
            .is_some());
    }

    #[test]
    fn the_rate_is_that_of_the_last_seconds() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        // Fast for a while, then stopped: after the window has passed, the rate is zero.
        for s in 0..5 {
            w.push(at(t0, s * 1_000), reading(s as i64 * 10_000, 500));
        }
        let mut last = None;
        for s in 5..12 {
            last = Some(w.push(at(t0, s * 1_000), reading(40_000, 500)));
        }
        assert_eq!(last.map(|v| v.backlog_s), Some(f64::INFINITY));
    }

    #[test]
    fn a_group_moved_backwards_counts_as_no_progress() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(2), 100);
        w.push(t0, reading(10_000, 200));
        let v = w.push(at(t0, 1_000), reading(0, 10_200));
        assert_eq!(v.backlog_s, f64::INFINITY);
    }
}
