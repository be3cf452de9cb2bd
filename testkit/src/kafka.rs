//! Kafka for tests: Apache Kafka 4.4 in KRaft mode ([`crate::broker`]), or the brokers
//! named by `KAFKA_BROKERS`.
//!
//! [`Kafka::start`] shares one single-node cluster with every test of the process (each
//! test has its own topics, groups and transactional ids); [`Kafka::start_cluster`]
//! starts a cluster of its own whose nodes can be killed and restarted and whose client
//! network goes through fault-injecting proxies (chaos, outage tests).

use crate::broker::Cluster;
use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use crate::broker::KAFKA_VERSION;
pub use crate::netproxy::NetMode;

/// A fault between the clients and one node of a cluster of the test's own.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The node unreachable: new connections refused, open ones reset.
    BrokerDown(u32),
    /// The node reachable again.
    BrokerUp(u32),
    /// Every chunk to and from the node waits this long (zero: none).
    Latency(u32, Duration),
    /// Nothing reaches the node or comes back until the next fault on it.
    Stall(u32),
    /// Every open connection to the node is reset.
    Reset(u32),
}

/// The changelog's settings as `docker-compose.yml` creates it (compacted, a record kept
/// at least a minute before the cleaner may drop it; Kafka's defaults otherwise: a
/// segment rolls at 1 GB or 7 days, the cleaner waits until half a log is dirty). What a
/// measurement of the deployed system runs with: the test settings below keep the
/// cleaner busy all the time.
pub const CHANGELOG_DEPLOYED_CONFIG: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("min.compaction.lag.ms", "60000"),
];

/// Topic settings under which a compacted changelog is compacted within a test's time
/// (the cleaner never touches the active segment; `segment.ms` rolls it).
///
/// `delete.retention.ms` is how long a tombstone (and a transaction's marker) outlives
/// the record it deletes, and so Kafka's bound on how long a restore may take to read
/// the log from its start, and a replica may be away, and still see every delete: a
/// replica that comes back after the leader's cleaner has dropped a tombstone copies the
/// log past it and keeps the value it deletes for good, and a restore from that replica
/// rebuilds an entry the writer deleted. A minute is longer than any restore or broker
/// outage of the tests (at one second, restores under chaos disagreed with their
/// writer's digest for minutes, whenever a replica that had been killed led the
/// partition).
pub const CHANGELOG_TEST_CONFIG: &[(&str, &str)] = &[
    ("cleanup.policy", "compact"),
    ("segment.ms", "5000"),
    ("min.cleanable.dirty.ratio", "0.01"),
    ("min.compaction.lag.ms", "0"),
    ("delete.retention.ms", "60000"),
];

pub struct Kafka {
    brokers: String,
    /// The nodes this handle started (none when shared or external).
    own: Option<Arc<Mutex<Cluster>>>,
    /// Replicas of a topic created here (-1: the brokers' default).
    replication: i32,
}

static SHARED: OnceLock<Result<SharedCluster, String>> = OnceLock::new();

struct SharedCluster {
    brokers: String,
    root: PathBuf,
    /// Held so the cluster is never dropped; its watchdog ends it with the process.
    cluster: Mutex<Cluster>,
}

/// Marks the shared cluster's logs to be kept when a test of this process panics.
fn keep_shared_logs_on_panic(root: PathBuf) {
    let previous = std::panic::take_hook();
    let told = std::sync::atomic::AtomicBool::new(false);
    std::panic::set_hook(Box::new(move |info| {
        let _ = std::fs::write(root.join("keep"), b"");
        if !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "kafka: a test failed; the broker's log is kept in {}",
                root.display()
            );
        }
        previous(info);
    }));
}

impl Kafka {
    /// The process's shared single-node cluster (started on first use), or the brokers
    /// of `KAFKA_BROKERS`.
    pub fn start() -> anyhow::Result<Kafka> {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            return Ok(Kafka::external(brokers));
        }
        let shared = SHARED
            .get_or_init(|| {
                let cluster = Cluster::start(1, false).map_err(|e| format!("{e:#}"))?;
                let root = cluster.root().to_path_buf();
                keep_shared_logs_on_panic(root.clone());
                Ok(SharedCluster {
                    brokers: cluster.bootstrap(),
                    root,
                    cluster: Mutex::new(cluster),
                })
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = &shared.root;
        Ok(Kafka {
            brokers: shared.brokers.clone(),
            own: None,
            replication: 1,
        })
    }

    /// A cluster of `nodes` KRaft nodes of this handle's own, behind fault proxies
    /// (replication factor 3 and `min.insync.replicas` 2 from three nodes on), unless
    /// `KAFKA_BROKERS` names external ones.
    pub fn start_cluster(nodes: usize) -> anyhow::Result<Kafka> {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            return Ok(Kafka::external(brokers));
        }
        let cluster = Cluster::start(nodes, true)?;
        Ok(Kafka {
            brokers: cluster.bootstrap(),
            own: Some(Arc::new(Mutex::new(cluster))),
            replication: nodes.min(3) as i32,
        })
    }

    fn external(brokers: String) -> Kafka {
        eprintln!("kafka: external brokers={brokers} (KAFKA_BROKERS)");
        Kafka {
            brokers,
            own: None,
            replication: -1,
        }
    }

    /// The nodes of this handle's own cluster, to kill, stop and restart them.
    pub fn cluster(&self) -> anyhow::Result<MutexGuard<'_, Cluster>> {
        let own = self.own.as_ref().context(
            "this test needs a Kafka cluster of its own (Kafka::start_cluster), not shared or external brokers",
        )?;
        Ok(own.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The process ids of the nodes behind this handle (its own cluster's, or the
    /// process's shared one); none for external brokers.
    pub fn pids(&self) -> Vec<u32> {
        let lock = |c: &Mutex<Cluster>| c.lock().unwrap_or_else(|p| p.into_inner()).pids();
        match &self.own {
            Some(own) => lock(own),
            None => match SHARED.get() {
                Some(Ok(shared)) if shared.brokers == self.brokers => lock(&shared.cluster),
                _ => Vec::new(),
            },
        }
    }

    /// Breaks or mends the network between the clients and one node.
    pub fn fault(&self, fault: Fault) -> anyhow::Result<()> {
        let cluster = self.cluster()?;
        match fault {
            Fault::BrokerDown(id) => cluster.proxy(id)?.set_mode(NetMode::Down),
            Fault::BrokerUp(id) => cluster.proxy(id)?.set_mode(NetMode::Pass),
            Fault::Latency(id, d) if d.is_zero() => cluster.proxy(id)?.set_mode(NetMode::Pass),
            Fault::Latency(id, d) => cluster.proxy(id)?.set_mode(NetMode::Latency(d)),
            Fault::Stall(id) => cluster.proxy(id)?.set_mode(NetMode::Stall),
            Fault::Reset(id) => cluster.proxy(id)?.reset_connections(),
        }
        Ok(())
    }

    /// Keeps the brokers' logs of this handle's own cluster; returns where they are.
    pub fn keep_logs(&self) -> Option<PathBuf> {
        self.cluster().ok().map(|mut c| c.keep_logs())
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?)
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// Creates a topic with topic-level settings (e.g. [`CHANGELOG_TEST_CONFIG`]).
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let admin = self.admin()?;
        let replication = if self.replication > 0 {
            TopicReplication::Fixed(self.replication)
        } else {
            TopicReplication::Fixed(-1)
        };
        let mut topic = NewTopic::new(name, partitions, replication);
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        // A topic just deleted (same name) is gone only after a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let res = admin.create_topics([&topic], &opts).await?;
            match res.into_iter().next() {
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists)))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(Err((t, e))) => anyhow::bail!("create topic {t}: {e}"),
                _ => break,
            }
        }
        // Created means the controller has it; wait until a broker serves every
        // partition, so the first produce is not refused.
        self.wait_for_leaders(name, partitions).await
    }

    async fn wait_for_leaders(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ready = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map(|md| {
                        md.topics().iter().any(|t| {
                            t.name() == topic
                                && t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions()
                                    .iter()
                                    .all(|p| p.leader() >= 0 && p.error().is_none())
                        })
                    })
                    .unwrap_or(false);
                if ready {
                    return Ok(());
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "topic {topic} has no leader for every partition after 60 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await?
    }

    /// Deletes topics (those that exist).
    pub async fn delete_topics(&self, names: &[&str]) -> anyhow::Result<()> {
        let admin = self.admin()?;
        for r in admin.delete_topics(names, &AdminOptions::new()).await? {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((t, e)) => anyhow::bail!("delete topic {t}: {e}"),
            }
        }
        Ok(())
    }

    /// Replaces a topic's own settings with `config` (the others revert to the brokers'
    /// defaults), as an operator's `kafka-configs --alter` would.
    pub async fn set_topic_config(
        &self,
        topic: &str,
        config: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        use rdkafka::admin::{AlterConfig, ResourceSpecifier};
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in config {
            alter = alter.set(k, v);
        }
        for r in self
            .admin()?
            .alter_configs([&alter], &AdminOptions::new())
            .await?
        {
            if let Err((_, e)) = r {
                anyhow::bail!("altering the settings of {topic}: {e}");
            }
        }
        Ok(())
    }

    /// Deletes the records of `topic`-`partition` before `before` (the log's start moves
    /// there), as retention would.
    pub async fn delete_records_before(
        &self,
        topic: &str,
        partition: i32,
        before: i64,
    ) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(before))?;
        let out = self
            .admin()?
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .with_context(|| {
                format!("deleting the records of {topic}-{partition} before {before}")
            })?;
        for e in out.elements() {
            if let Err(err) = e.error() {
                anyhow::bail!("deleting the records of {topic}-{partition}: {err}");
            }
        }
        Ok(())
    }

    /// A producer that partitions like the gateway's (a command it writes for a payment
    /// lands where the gateway's own commands for it do).
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("partitioner", payments::partition::PARTITIONER)
            .create()?)
    }

    /// Produces one raw record (for poison messages and redelivery tests).
    pub async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let p = self.producer()?;
        let mut r = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            r = r.key(k);
        }
        p.send(r, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        Ok(())
    }

    fn consumer(&self, committed: bool) -> anyhow::Result<BaseConsumer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set(
                "isolation.level",
                if committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()?)
    }

    /// Each partition's `(log start, end)`: with `committed`, the end is the last stable
    /// offset (before the first open transaction), else the high watermark.
    pub fn extents(
        &self,
        topic: &str,
        committed: bool,
    ) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
        let consumer = self.consumer(committed)?;
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let mut out = HashMap::new();
        for t in md.topics() {
            for p in t.partitions() {
                out.insert(p.id(), consumer.fetch_watermarks(topic, p.id(), timeout)?);
            }
        }
        Ok(out)
    }

    /// Partitions of `topic` whose first record is gone (retention, deleted records).
    pub fn truncated_partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let mut out: Vec<i32> = self
            .extents(topic, false)?
            .into_iter()
            .filter(|(_, (low, _))| *low > 0)
            .map(|(p, _)| p)
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Every committed record of `topic` up to its current end (`read_committed`).
    pub fn read_all(&self, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
        self.read_all_isolated(topic, true)
    }

    /// Every record of `topic` up to its current end, as a `read_committed` reader sees
    /// it or (`committed` false) with the records of open and aborted transactions too.
    pub fn read_all_isolated(
        &self,
        topic: &str,
        committed: bool,
    ) -> anyhow::Result<Vec<TopicRecord>> {
        let consumer = self.consumer(committed)?;
        let ends: HashMap<i32, (i64, i64)> = self.extents(topic, committed)?;
        let mut tpl = TopicPartitionList::new();
        let mut open: HashMap<i32, i64> = HashMap::new();
        for (p, (low, high)) in &ends {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
            if high > low {
                open.insert(*p, *high);
            }
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !open.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "reading {topic} did not reach its end within 120 s (partitions left: {open:?})"
            );
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                // The end (a transaction marker before it is never delivered) once the
                // position has reached it (see `topology::runtime::reached`).
                Some(Err(KafkaError::PartitionEOF(p)))
                    if open.get(&p).is_some_and(|end| {
                        topology::runtime::reached(&consumer, topic, p, *end)
                    }) =>
                {
                    open.remove(&p);
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    if open
                        .get(&m.partition())
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        open.remove(&m.partition());
                    }
                    out.push(TopicRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The record's timestamp (the producer's clock when it was sent).
    pub timestamp_ms: Option<i64>,
}

/// The members of `group` once it is stable (none while it rebalances, or when the
/// brokers do not answer), each as its member id (a static member's starts with its
/// `group.instance.id` and a dash) and the partitions of its classic-protocol assignment.
pub fn group_members(brokers: &str, group: &str) -> Vec<(String, Vec<i32>)> {
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<BaseConsumer>()
    else {
        return Vec::new();
    };
    let Ok(list) = consumer.fetch_group_list(Some(group), Duration::from_secs(5)) else {
        return Vec::new();
    };
    // ConsumerProtocolAssignment: version (2 bytes), then per topic its name (2-byte
    // length) and its partitions (4-byte count, 4 bytes each).
    let parse = |b: &[u8]| -> Option<Vec<i32>> {
        let mut at = 2;
        let mut take = |n: usize| {
            let field = b.get(at..at + n)?;
            at += n;
            Some(field)
        };
        let mut parts = Vec::new();
        let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..topics {
            let name_len = i16::from_be_bytes(take(2)?.try_into().ok()?);
            take(usize::try_from(name_len).ok()?)?;
            let n = i32::from_be_bytes(take(4)?.try_into().ok()?);
            for _ in 0..n {
                parts.push(i32::from_be_bytes(take(4)?.try_into().ok()?));
            }
        }
        Some(parts)
    };
    list.groups()
        .iter()
        .filter(|g| g.state() == "Stable")
        .flat_map(|g| g.members().iter())
        .map(|m| {
            (
                m.id().to_owned(),
                m.assignment().and_then(parse).unwrap_or_default(),
            )
        })
        .collect()
}
