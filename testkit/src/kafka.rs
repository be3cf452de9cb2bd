//! Kafka for tests: librdkafka's mock cluster, or real brokers from `KAFKA_BROKERS`.
//!
//! The mock cluster is a real Kafka wire-protocol server; other processes (a worker run
//! as a child process) connect to its bootstrap address. It lives on its own thread so
//! the handle can move between tasks; dropping the handle shuts it down.

use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::mpsc;
use std::time::{Duration, Instant};

enum Request {
    CreateTopic(String, i32, mpsc::Sender<anyhow::Result<()>>),
    Fault(Fault, mpsc::Sender<anyhow::Result<()>>),
}

/// A broker fault the mock cluster can inject (chaos runs).
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next requests of this kind fail with these errors, in order.
    RequestErrors {
        api: RDKafkaApiKey,
        errors: Vec<RDKafkaRespErr>,
    },
    BrokerDown(i32),
    BrokerUp(i32),
    /// Round-trip latency added by a broker.
    Latency(i32, Duration),
    /// Moves a partition's leadership.
    Leader {
        topic: String,
        partition: i32,
        broker: i32,
    },
}

fn inject<C: rdkafka::ClientContext>(
    cluster: &MockCluster<'_, C>,
    fault: Fault,
) -> anyhow::Result<()> {
    let r = match fault {
        Fault::RequestErrors { api, errors } => {
            cluster.request_errors(api, &errors);
            Ok(())
        }
        Fault::BrokerDown(b) => cluster.broker_down(b),
        Fault::BrokerUp(b) => cluster.broker_up(b),
        Fault::Latency(b, d) => cluster.broker_round_trip_time(b, d),
        Fault::Leader {
            topic,
            partition,
            broker,
        } => cluster.partition_leader(&topic, partition, Some(broker)),
    };
    r.map_err(|e| anyhow::anyhow!("mock cluster fault: {e}"))
}

pub struct Kafka {
    brokers: String,
    mock: Option<mpsc::Sender<Request>>,
}

impl Kafka {
    pub fn start() -> anyhow::Result<Kafka> {
        Self::start_cluster(1)
    }

    /// A mock cluster of `brokers` brokers (ids 1..=brokers), unless `KAFKA_BROKERS`
    /// names real ones.
    pub fn start_cluster(brokers: i32) -> anyhow::Result<Kafka> {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            return Ok(Kafka {
                brokers,
                mock: None,
            });
        }
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<String>>();
        std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx
                            .send(Err(anyhow::anyhow!("starting the Kafka mock cluster: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serve requests until every handle is gone.
                while let Ok(req) = rx.recv() {
                    match req {
                        Request::CreateTopic(name, partitions, reply) => {
                            let r = cluster
                                .create_topic(&name, partitions, 1)
                                .map_err(|e| anyhow::anyhow!("create topic {name}: {e}"));
                            let _ = reply.send(r);
                        }
                        Request::Fault(fault, reply) => {
                            let _ = reply.send(inject(&cluster, fault));
                        }
                    }
                }
            })?;
        let brokers = ready_rx.recv().context("the mock cluster thread died")??;
        Ok(Kafka {
            brokers,
            mock: Some(tx),
        })
    }

    /// Injects a fault into the mock cluster (an error with real brokers).
    pub fn fault(&self, fault: Fault) -> anyhow::Result<()> {
        let mock = self
            .mock
            .as_ref()
            .context("faults can only be injected into the mock cluster")?;
        let (tx, rx) = mpsc::channel();
        mock.send(Request::Fault(fault, tx))
            .map_err(|_| anyhow::anyhow!("the mock cluster thread died"))?;
        rx.recv().context("the mock cluster thread died")?
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn is_mock(&self) -> bool {
        self.mock.is_some()
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        match &self.mock {
            Some(tx) => {
                let (rtx, rrx) = mpsc::channel();
                tx.send(Request::CreateTopic(name.to_owned(), partitions, rtx))
                    .context("mock cluster gone")?;
                rrx.recv().context("mock cluster gone")?
            }
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create()?;
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                // A topic just deleted (same name) is gone only after a moment.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let res = admin.create_topics([&topic], &AdminOptions::new()).await?;
                    match res.into_iter().next() {
                        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists)))
                            if Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some(Err((t, e))) => anyhow::bail!("create topic {t}: {e}"),
                        _ => return Ok(()),
                    }
                }
            }
        }
    }

    /// Deletes topics from real brokers (those that exist); the mock cluster of a test
    /// is new and has none.
    pub async fn delete_topics(&self, names: &[&str]) -> anyhow::Result<()> {
        if self.mock.is_some() {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        for r in admin.delete_topics(names, &AdminOptions::new()).await? {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((t, e)) => anyhow::bail!("delete topic {t}: {e}"),
            }
        }
        Ok(())
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
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

    /// Every record of `topic` up to its current end.
    /// Partitions of `topic` whose first record is gone (retention, or the mock cluster's
    /// size limit).
    pub fn truncated_partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let mut out = Vec::new();
        for t in md.topics() {
            for p in t.partitions() {
                if consumer.fetch_watermarks(topic, p.id(), timeout)?.0 > 0 {
                    out.push(p.id());
                }
            }
        }
        Ok(out)
    }

    pub fn read_all(&self, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()?;
        let timeout = Duration::from_secs(10);
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = std::collections::HashMap::new();
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                if high > low {
                    ends.insert(p.id(), high);
                }
            }
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "reading {topic} did not reach its end"
            );
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    if ends
                        .get(&m.partition())
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        ends.remove(&m.partition());
                    }
                    out.push(TopicRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
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
}
