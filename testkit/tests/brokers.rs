//! The test kit's Kafka: real KRaft nodes that start, answer, die and come back, a proxy
//! that breaks the network to one of them, and logs kept exactly when a run failed.

use std::time::{Duration, Instant};
use testkit::broker::Cluster;
use testkit::kafka::{Fault, Kafka};

/// Produces one record and returns how long the broker took to acknowledge it.
async fn produce_once(kafka: &Kafka, topic: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    kafka.produce(topic, Some(b"k"), b"v").await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_node_can_be_cut_off_slowed_and_killed_and_comes_back() {
    let kafka = Kafka::start_cluster(1).unwrap();
    kafka.create_topic("t", 1).await.unwrap();
    produce_once(&kafka, "t").await.unwrap();

    kafka
        .fault(Fault::Latency(1, Duration::from_millis(300)))
        .unwrap();
    let slow = produce_once(&kafka, "t").await.unwrap();
    assert!(
        slow >= Duration::from_millis(300),
        "latency not applied: {slow:?}"
    );
    kafka.fault(Fault::Latency(1, Duration::ZERO)).unwrap();

    kafka.fault(Fault::BrokerDown(1)).unwrap();
    // The send's own timeout is for a full queue; delivery waits `message.timeout.ms`.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();
    let refused = producer
        .send(
            rdkafka::producer::FutureRecord::to("t")
                .key("k")
                .payload("v"),
            Duration::from_secs(2),
        )
        .await;
    assert!(
        refused.is_err(),
        "a produce to an unreachable broker succeeded"
    );
    kafka.fault(Fault::BrokerUp(1)).unwrap();
    produce_once(&kafka, "t").await.unwrap();

    // SIGKILL and a restart on the same data: the topic and its records are still there.
    tokio::task::block_in_place(|| {
        let mut c = kafka.cluster().unwrap();
        c.kill(1).unwrap();
        assert!(!c.is_running(1));
        c.restart(1).unwrap();
    });
    produce_once(&kafka, "t").await.unwrap();
    let records = tokio::task::block_in_place(|| kafka.read_all("t")).unwrap();
    assert!(
        records.len() >= 4,
        "records lost across the restart: {}",
        records.len()
    );
}

#[test]
fn a_failed_runs_broker_logs_are_kept_and_a_passing_runs_removed() {
    let passing = Cluster::start(1, false).unwrap();
    let root = passing.root().to_owned();
    drop(passing);
    assert!(
        !root.exists(),
        "a passing run's files stay in {}",
        root.display()
    );

    let mut failed = Cluster::start(1, false).unwrap();
    let root = failed.keep_logs();
    drop(failed);
    assert!(
        root.join("node-1/logs/server.log").exists(),
        "the log is gone"
    );
    assert!(!root.join("node-1/data").exists(), "the data is kept too");

    let seen = std::sync::Mutex::new(None);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::start(1, false).unwrap();
        *seen.lock().unwrap() = Some(cluster.root().to_owned());
        panic!("a failing test");
    }));
    assert!(unwound.is_err());
    let root = seen.lock().unwrap().clone().expect("the cluster started");
    assert!(
        root.join("keep").exists(),
        "a cluster dropped by a panic is not marked kept"
    );
    assert!(root.join("node-1/logs/server.log").exists());
}

/// The API computes a create's partition before it publishes it (admission control reads
/// that partition's backlog): every producer of the gateway must put a payment's records
/// exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_producers_put_a_payment_where_the_api_expects_it() {
    let kafka = Kafka::start().unwrap();
    let topic = format!("partitioned-{}", uuid::Uuid::new_v4().simple());
    kafka.create_topic(&topic, 7).await.unwrap();
    let producer = topology::runtime::producer(kafka.brokers(), &[]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64u64 {
        let key = format!("pay_{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let delivery = producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key(&key)
                    .payload("x"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let expected = payments::partition::partition_of(key.as_bytes(), 7);
        assert_eq!(delivery.partition, expected, "{key}");
        seen.insert(delivery.partition);
    }
    assert_eq!(seen.len(), 7, "keys spread over every partition: {seen:?}");
}
