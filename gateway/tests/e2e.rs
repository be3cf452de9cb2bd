//! End-to-end: HTTP → Apache Kafka (one KRaft broker shared by the tests of this binary)
//! → topology with sled → events topic → PostgreSQL, against the provider simulator.
//! Each test has its own topics, groups, database, state directory and services.

use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use testkit::client::{projected_events, topic_events, wait_all_terminal, Api};
use testkit::stack::{Stack, StackOptions, DEMO_KEY, OTHER_KEY, WEBHOOK_SECRET};
use testkit::verify::assert_gap_free;

const TERMINAL: &[&str] = &["COMPLETED", "FAILED", "CANCELED"];

/// Expected final status for each magic amount (last two digits).
fn expected_status(amount: i64) -> &'static str {
    match amount % 100 {
        1 | 4 | 8 => "FAILED",
        _ => "COMPLETED",
    }
}

/// Creates payments concurrently; returns (idempotency key, amount, reply) per request.
async fn create_many(
    api: &Api,
    specs: Vec<(String, i64)>,
    concurrency: usize,
) -> Vec<(String, i64, testkit::client::Reply)> {
    stream::iter(specs)
        .map(|(key, amount)| {
            let api = api.clone();
            async move {
                let r = api.create(&key, amount, "EUR").await.expect("request");
                (key, amount, r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// The provider ledger agrees with the projection: at most one capture per payment, and
/// exactly the COMPLETED payments were captured.
fn check_ledger(stack: &Stack, statuses: &HashMap<String, String>) {
    testkit::verify::ledger(&stack.sim.ledger(), statuses)
        .ensure_clean()
        .unwrap();
}

/// The projection's history equals the events topic, gap-free; returns (events, records on the topic).
async fn check_history_matches_topic(stack: &Stack) -> (usize, usize) {
    let pool = stack.pool().await.unwrap();
    let projected = projected_events(&pool).await.unwrap();
    let (on_topic, records) = topic_events(&stack.kafka, &stack.common.events_topic).unwrap();
    assert_gap_free(&on_topic).unwrap();
    assert_eq!(
        projected.len(),
        on_topic.len(),
        "projection and events topic hold different event counts"
    );
    for (k, v) in &on_topic {
        assert_eq!(
            projected.get(k),
            Some(v),
            "event {k:?} differs between the topic and PostgreSQL"
        );
    }
    (projected.len(), records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_payments_end_to_end_with_duplicates_replays_and_a_rebuild() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let started = Instant::now();

    // 1,000 payments, cycling through the simulator's outcomes: approved, declined,
    // transient error then retry, async webhook success and failure, timeout resolved by
    // a status check, lost response, provider down, webhook before the response (twice).
    let endings = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10];
    let specs: Vec<(String, i64)> = (0..1000)
        .map(|i| {
            (
                format!("order-{i}"),
                10_000 + (i as i64 / 10) * 100 + endings[i % 10],
            )
        })
        .collect();
    let created = create_many(&api, specs.clone(), 32).await;
    let accepted: Vec<(String, i64, String)> = created
        .iter()
        .map(|(k, a, r)| {
            assert_eq!(r.status, 202, "create {k}: {}", r.body);
            (k.clone(), *a, r.body["id"].as_str().unwrap().to_owned())
        })
        .collect();
    let accepted_at = started.elapsed();

    // Duplicates: sequential replays of 50 keys answer the same 202; 20 concurrent
    // copies of one new request make one payment; the same key with another body is 422.
    for (key, amount) in specs.iter().take(50) {
        let r = api.create(key, *amount, "EUR").await.unwrap();
        assert_eq!(r.status, 202);
        let original = created.iter().find(|(k, _, _)| k == key).unwrap();
        assert_eq!(
            r.body, original.2.body,
            "a replay returns the original response"
        );
    }
    let dup = create_many(
        &api,
        (0..20)
            .map(|_| ("concurrent-dup".to_string(), 4242))
            .collect(),
        20,
    )
    .await;
    let dup_ids: std::collections::HashSet<String> = dup
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert!(dup.iter().all(|(_, _, r)| r.status == 202));
    assert_eq!(dup_ids.len(), 1, "concurrent duplicates name one payment");
    let conflict = api.create("order-7", 999, "EUR").await.unwrap();
    assert_eq!(
        (conflict.status, conflict.code()),
        (422, "idempotency_key_reused")
    );

    let pool = stack.pool().await.unwrap();
    let mut ids: Vec<String> = accepted.iter().map(|(_, _, id)| id.clone()).collect();
    ids.extend(dup_ids.iter().cloned());
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(180))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    for (key, amount, id) in &accepted {
        assert_eq!(
            statuses[id],
            expected_status(*amount),
            "payment {key} ({amount}) ended {}",
            statuses[id]
        );
    }
    let count = |s: &str| statuses.values().filter(|v| v.as_str() == s).count();
    let payments_count: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        payments_count as usize,
        ids.len(),
        "one payment per key, no more"
    );

    check_ledger(&stack, &statuses);
    let (events, records) = check_history_matches_topic(&stack).await;

    println!(
        "e2e: payments={} accepted={} completed={} failed={} canceled={} events={} topic_records={} accept_s={:.1} terminal_s={:.1}",
        ids.len(),
        accepted.len() + 1,
        count("COMPLETED"),
        count("FAILED"),
        count("CANCELED"),
        events,
        records,
        accepted_at.as_secs_f64(),
        elapsed.as_secs_f64()
    );

    // Redelivery: every command is published again. Nothing may change.
    let snapshot = projected_events(&pool).await.unwrap();
    let commands = redeliver_all_commands(&stack).await;
    // The redelivered commands are processed once the topic end is consumed again.
    wait_for_consumed(&stack, commands * 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = projected_events(&pool).await.unwrap();
    assert_eq!(snapshot, after, "redelivered commands changed the history");
    check_history_matches_topic(&stack).await;
    println!("e2e: redelivered_commands={commands} new_events=0");

    // Rebuild into an empty database: the same state and history.
    let rebuilt_url = testkit::pg::server()
        .unwrap()
        .fresh_database()
        .await
        .unwrap();
    let mut common = stack.common.clone();
    common.database_url = Some(rebuilt_url.clone());
    let report = gateway::rebuild_projection(&common).await.unwrap();
    let rebuilt = sinks::connect(&rebuilt_url, 2).unwrap();
    assert_eq!(
        projected_events(&rebuilt).await.unwrap(),
        after,
        "rebuilt history differs"
    );
    assert_eq!(
        states(&rebuilt).await,
        states(&pool).await,
        "rebuilt payments differ"
    );
    println!(
        "e2e: rebuild records={} events={} payments={}",
        report.records,
        report.events,
        states(&rebuilt).await.len()
    );
    stack.shutdown().await.unwrap();
}

fn rdkafka_record<'a>(
    topic: &'a str,
    r: &'a testkit::kafka::TopicRecord,
) -> rdkafka::producer::FutureRecord<'a, [u8], [u8]> {
    let mut rec = rdkafka::producer::FutureRecord::to(topic)
        .payload(r.payload.as_deref().unwrap_or_default());
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    rec
}

/// Waits until the worker's group has committed offsets covering `total` records.
async fn wait_for_consumed(stack: &Stack, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (consumed, end) = group_position(stack);
        if consumed >= end && end >= total as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not consume the redelivered commands ({consumed}/{end})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn group_position(stack: &Stack) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = stack.commands_topic();
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", stack.kafka.brokers())
        .set("group.id", &stack.common.topology.application_id)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..stack.opts.partitions {
        tpl.add_partition(&topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let mut consumed = 0;
    let mut end = 0;
    for e in committed.elements() {
        if let rdkafka::Offset::Offset(o) = e.offset() {
            consumed += o;
        }
        end += c
            .fetch_watermarks(&topic, e.partition(), Duration::from_secs(5))
            .unwrap()
            .1;
    }
    (consumed, end)
}

async fn states(pool: &sinks::Pool) -> BTreeMap<String, Value> {
    let c = pool.get().await.unwrap();
    c.query("SELECT payment_id, state FROM payments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn signed_webhook(api: &Api, id: &str, body: &Value) -> reqwest::RequestBuilder {
    signed_with(api, WEBHOOK_SECRET, id, body)
}

fn signed_with(api: &Api, secret: &str, id: &str, body: &Value) -> reqwest::RequestBuilder {
    let secret = payments::webhook::secret_bytes(secret).unwrap();
    let raw = serde_json::to_vec(body).unwrap();
    let ts = simulator::now_secs();
    api.http
        .post(format!("{}/v1/callbacks/sim", api.base))
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            payments::webhook::sign(&secret, id, ts, &raw),
        )
        .body(raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicated_and_reordered_webhooks_change_nothing_beyond_the_first_valid_one() {
    // The provider's own webhook for an amount ending in 07 comes 10 × 300 ms + 0.5 s
    // after the charge: our webhooks arrive first.
    let defaults = StackOptions::default();
    let opts = StackOptions {
        sim: simulator::SimConfig {
            webhook_delay_ms: 300,
            ..defaults.sim.clone()
        },
        ..defaults
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    // Ends in 07: pending at the provider, whose own webhook comes late.
    let r = api.create("slow-1", 2507, "EUR").await.unwrap();
    let id = r.body["id"].as_str().unwrap().to_owned();
    api.wait_for_status(&id, &["PROCESSING"], Duration::from_secs(20))
        .await
        .unwrap();
    let ok = serde_json::json!({"type": "charge.succeeded", "data": {"reference": id, "charge_id": "ch_forged"}});
    let fail = serde_json::json!({"type": "charge.failed", "data": {"reference": id, "code": "late", "message": "x"}});
    for _ in 0..3 {
        let r = api
            .send(signed_webhook(&api, "msg_first", &ok))
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let r = api
        .send(signed_webhook(&api, "msg_second", &fail))
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    // A bad signature is refused and changes nothing.
    let forged = signed_with(&api, "whsec_b3RoZXItc2VjcmV0", "msg_bad", &fail);
    let r = api.send(forged).await.unwrap();
    assert_eq!((r.status, r.code()), (401, "invalid_signature"));

    api.wait_for_status(&id, &["COMPLETED"], Duration::from_secs(20))
        .await
        .unwrap();
    // Let the simulator's own (late) webhook arrive too.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let kinds = api.event_types(&id).await.unwrap();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| ["completed", "failed", "canceled"].contains(&k.as_str()))
            .count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(api.get(&id).await.unwrap().body["status"], "COMPLETED");
    let pool = stack.pool().await.unwrap();
    let hooks: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM webhooks_received WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        hooks >= 2,
        "verified webhooks are recorded once per webhook-id (got {hooks})"
    );
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancels_end_in_exactly_one_terminal_state() {
    // Slow webhooks (amounts ending in 07 settle after 10 × webhook_delay_ms + 0.5 s):
    // a window in which the provider can still cancel.
    let defaults = StackOptions::default();
    let opts = StackOptions {
        sim: simulator::SimConfig {
            webhook_delay_ms: 1_500,
            ..defaults.sim.clone()
        },
        ..defaults
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();

    // A pending charge canceled while PROCESSING: the provider confirms, nothing captured.
    let r = api.create("cancel-slow", 3107, "EUR").await.unwrap();
    let slow = r.body["id"].as_str().unwrap().to_owned();
    api.wait_for_status(&slow, &["PROCESSING"], Duration::from_secs(20))
        .await
        .unwrap();
    let c = api.cancel(&slow).await.unwrap();
    assert_eq!(c.status, 202, "{}", c.body);
    api.wait_for_status(&slow, &["CANCELED"], Duration::from_secs(20))
        .await
        .unwrap();

    // Cancels racing instant approvals: each payment ends in one terminal state, and the
    // provider captured exactly the COMPLETED ones.
    let created = create_many(
        &api,
        (0..60)
            .map(|i| (format!("race-{i}"), 5000 + i * 100))
            .collect(),
        16,
    )
    .await;
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    let cancels = stream::iter(ids.clone())
        .map(|id| {
            let api = api.clone();
            async move {
                // Visible in the projection first (a cancel names a payment it can see).
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let r = api.cancel(&id).await.unwrap();
                    if r.status != 404 || Instant::now() > deadline {
                        return r.status;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<u16>>()
        .await;
    assert!(
        cancels.iter().all(|s| *s == 202 || *s == 409),
        "{cancels:?}"
    );
    let mut all = ids.clone();
    all.push(slow.clone());
    let statuses = wait_all_terminal(&pool, &all, Duration::from_secs(60))
        .await
        .unwrap();
    check_ledger(&stack, &statuses);
    let events = projected_events(&pool).await.unwrap();
    for id in &all {
        let terminal = events
            .iter()
            .filter(|((p, _), e)| {
                p == id
                    && ["completed", "failed", "canceled"]
                        .contains(&e["body"]["type"].as_str().unwrap_or(""))
            })
            .count();
        assert_eq!(terminal, 1, "payment {id} has {terminal} terminal events");
    }
    assert_eq!(statuses[&slow], "CANCELED");
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_payment_is_canceled_without_calling_the_provider() {
    let opts = StackOptions {
        // Long enough to outlast the consumer groups' first join.
        policy: format!(
            "{}, dispatch_delay_ms = 10000",
            StackOptions::default().policy
        ),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let id = api.create("early", 1200, "EUR").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_for_status(&id, &["NEW"], Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(api.cancel(&id).await.unwrap().status, 202);
    api.wait_for_status(&id, &["CANCELED"], Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10_500)).await; // past the dispatch timer
    assert_eq!(
        api.get(&id).await.unwrap().body["status"],
        "CANCELED",
        "a terminal state is never left"
    );
    assert!(
        stack.sim.ledger().charges.iter().all(|c| c.reference != id),
        "the provider never saw it"
    );
    let again = api.cancel(&id).await.unwrap();
    assert_eq!((again.status, again.code()), (409, "already_terminal"));
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_resumes_from_its_checkpoint_without_loss_or_duplicate_effects() {
    let opts = StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        ..StackOptions::default()
    };
    let mut stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let endings = [0, 2, 3, 5, 6, 9];
    let specs: Vec<(String, i64)> = (0..300)
        .map(|i| (format!("kill-{i}"), 7000 + i as i64 * 100 + endings[i % 6]))
        .collect();
    let created = create_many(&api, specs, 16).await;
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    // Kill the worker (SIGKILL) once part of the work is done, then restart it.
    wait_for_terminal_count(&pool, 50).await;
    assert!(stack.worker_alive().unwrap());
    stack.stop_worker().await.unwrap();
    stack.start_worker().unwrap();
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(120))
        .await
        .unwrap();
    for ((_, amount, _), id) in created.iter().zip(&ids) {
        assert_eq!(statuses[id], expected_status(*amount));
    }
    check_ledger(&stack, &statuses);
    let (events, records) = check_history_matches_topic(&stack).await;
    println!("e2e: killed worker: payments={} events={} topic_records={} (duplicates on the topic are identical replays)", ids.len(), events, records);
    stack.shutdown().await.unwrap();
}

/// Overload: with the worker stopped the backlog grows past its bound, and creates are
/// refused at once (503 `overloaded`, `Retry-After`, nothing queued) while cancels and
/// webhooks are still queued. Once the worker is back, each refused create retried with
/// its key is accepted, and every payment is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_backlog_bound_creates_are_refused_and_safe_to_retry() {
    let opts = StackOptions {
        admission_min_backlog: 20,
        ..StackOptions::default()
    };
    let mut stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    stack.stop_worker().await.unwrap();
    let early = api.create("early", 1000, "EUR").await.unwrap();
    assert_eq!(early.status, 202, "{}", early.body);
    let early_id = early.body["id"].as_str().unwrap().to_owned();

    // Creates pile up in the commands topic until admission control sees the backlog
    // (read four times a second) and refuses.
    let mut accepted = vec![early_id.clone()];
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "no create refused with the worker stopped"
        );
        let key = format!("pile-{i}");
        let r = api.create(&key, 1000, "EUR").await.unwrap();
        match r.status {
            202 => accepted.push(r.body["id"].as_str().unwrap().to_owned()),
            503 => {
                assert_eq!(r.code(), "overloaded", "{}", r.body);
                let retry: u32 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=10).contains(&retry), "Retry-After {retry}");
                refused = Some(key);
                break;
            }
            s => panic!("create answered {s}: {}", r.body),
        }
        if i >= 25 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let refused = refused.unwrap();
    let refused_id = payments::PaymentId::derive(
        &payments::MerchantId::parse("demo").unwrap(),
        &payments::IdempotencyKey::parse(&refused).unwrap(),
    )
    .to_string();
    // A refused create is refused again, fast, and never queued.
    let again = api.create(&refused, 1000, "EUR").await.unwrap();
    assert_eq!(
        (again.status, again.code()),
        (503, "overloaded"),
        "{}",
        again.body
    );
    // Cancels and webhooks are never refused.
    let cancel = api.cancel(&early_id).await.unwrap();
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    let hook = serde_json::json!({"type": "charge.succeeded", "data": {"reference": "pay_00000000000000000000000000000001", "charge_id": "ch_1"}});
    let r = api
        .send(signed_webhook(&api, "msg_overload", &hook))
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let metrics = reqwest::get(format!("http://{}/metrics", stack.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("gateway_admission_refused_total{bound=\"backlog\"} ")
            && l.split(' ').nth(1).and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)),
        "refusals are not counted: {metrics}"
    );
    let queued = stack.kafka.read_all(&stack.commands_topic()).unwrap();
    assert!(
        queued
            .iter()
            .all(|r| r.key.as_deref() != Some(refused_id.as_bytes())),
        "a refused create reached the commands topic"
    );

    // The worker is back: the backlog drains and the refused create, retried with its
    // key, is accepted.
    stack.start_worker().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let retried = loop {
        let r = api.create(&refused, 1000, "EUR").await.unwrap();
        if r.status == 202 {
            break r;
        }
        assert_eq!((r.status, r.code()), (503, "overloaded"), "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "the create is still refused after the backlog drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(retried.body["id"], refused_id.as_str());
    accepted.push(refused_id);
    let statuses = wait_all_terminal(
        &stack.pool().await.unwrap(),
        &accepted,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    check_ledger(&stack, &statuses);
    println!(
        "e2e: admission: accepted={} refused_after={} then accepted on retry",
        accepted.len(),
        accepted.len() - 1
    );
    stack.shutdown().await.unwrap();
}

/// The workers' disk outlives the broker (`docker compose down && up` when Kafka kept no
/// volume, or workers pointed at a new cluster): every store's checkpoint is past its
/// partition on the fresh broker. The stores are discarded, not trusted, and every
/// payment accepted afterwards is processed and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_outlived_its_broker_is_discarded_and_every_new_payment_processed() {
    let disk = tempfile::tempdir().unwrap();
    let opts = StackOptions {
        names: Some(uuid::Uuid::new_v4().simple().to_string()),
        worker_state: Some(disk.path().to_owned()),
        ..StackOptions::default()
    };
    let endings = [0, 2, 3, 5, 6, 9];
    let amount = |i: usize| 4000 + i as i64 * 100 + endings[i % 6];
    let ids_of = |created: &[(String, i64, testkit::client::Reply)]| -> Vec<String> {
        created
            .iter()
            .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let first = Stack::start(opts.clone()).await.unwrap();
    let created = create_many(
        &first.client(DEMO_KEY),
        (0..120)
            .map(|i| (format!("before-reset-{i}"), amount(i)))
            .collect(),
        16,
    )
    .await;
    let pool = first.pool().await.unwrap();
    wait_all_terminal(&pool, &ids_of(&created), Duration::from_secs(120))
        .await
        .unwrap();
    first.shutdown().await.unwrap();

    // The same deployment and worker disk, on a broker whose partitions start at 0.
    let discarded_before = discarded_stores();
    let mut second = Stack::start(opts).await.unwrap();
    // Fewer than before: every new record lies below the old stores' checkpoints.
    let created = create_many(
        &second.client(DEMO_KEY),
        (0..40)
            .map(|i| (format!("after-reset-{i}"), amount(i)))
            .collect(),
        8,
    )
    .await;
    let ids = ids_of(&created);
    let pool = second.pool().await.unwrap();
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(60))
        .await
        .expect("every payment accepted after the broker reset is processed");
    for ((_, amount, _), id) in created.iter().zip(&ids) {
        assert_eq!(statuses[id], expected_status(*amount));
    }
    check_ledger(&second, &statuses);
    assert!(second.worker_alive().unwrap());
    let discarded = discarded_stores() - discarded_before;
    assert!(
        discarded >= second.opts.partitions as u64,
        "{discarded} stores discarded, expected every partition's"
    );
    println!(
        "e2e: broker reset under a kept worker disk: payments={} stores_discarded={discarded}",
        ids.len()
    );
    second.shutdown().await.unwrap();
}

/// Stores discarded so far by the in-process workers of this test binary.
fn discarded_stores() -> u64 {
    let m = &topology::metrics::METRICS.stores_discarded;
    ["ahead_of_source", "ahead_of_changelog", "other_cluster"]
        .iter()
        .map(|r| m.with_label_values(&[*r]).get())
        .sum()
}

/// Concurrent creates with one key and different bodies: exactly one body is ever
/// acknowledged (same body: the same 202; another: 422), and the payment created and
/// charged is that body's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_key_get_one_answer() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let mut ids = Vec::new();
    for round in 0..5 {
        let key = format!("race-{round}");
        // Two requests per body, ten bodies, all at once.
        let replies = futures::future::join_all((0..20).map(|i| {
            let (api, key) = (api.clone(), key.clone());
            async move {
                let amount = 5000 + (i / 2) as i64 * 100;
                (amount, api.create(&key, amount, "EUR").await.unwrap())
            }
        }))
        .await;
        let acknowledged: std::collections::BTreeSet<i64> = replies
            .iter()
            .filter(|(_, r)| r.status == 202)
            .map(|(amount, r)| {
                assert_eq!(
                    r.body["amount"], *amount,
                    "a 202 for a body it did not take"
                );
                *amount
            })
            .collect();
        assert_eq!(
            acknowledged.len(),
            1,
            "bodies acknowledged: {acknowledged:?}"
        );
        for (amount, r) in &replies {
            if !acknowledged.contains(amount) {
                assert_eq!(
                    (r.status, r.code()),
                    (422, "idempotency_key_reused"),
                    "{:?}",
                    r.body
                );
            }
        }
        let amount = *acknowledged.iter().next().unwrap();
        let id = replies
            .iter()
            .find(|(_, r)| r.status == 202)
            .map(|(_, r)| r.body["id"].as_str().unwrap().to_owned())
            .unwrap();
        let statuses = wait_all_terminal(&pool, std::slice::from_ref(&id), Duration::from_secs(60))
            .await
            .unwrap();
        let got = api.get(&id).await.unwrap();
        assert_eq!(
            got.body["amount"], amount,
            "created with another body than acknowledged"
        );
        assert_eq!(statuses[&id], expected_status(amount));
        ids.push(id);
    }
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(60))
        .await
        .unwrap();
    check_ledger(&stack, &statuses);
    stack.shutdown().await.unwrap();
}

/// Right after a 202, the payment and its history read back at once (on the instance
/// that accepted it), and it can be canceled before the projection has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_created_payment_is_readable_at_once() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let other = stack.client(OTHER_KEY);
    for i in 0..20 {
        let created = api.create(&format!("ryw-{i}"), 4200, "EUR").await.unwrap();
        assert_eq!(created.status, 202);
        let id = created.body["id"].as_str().unwrap();
        let got = api.get(id).await.unwrap();
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(got.body["id"], id);
        assert_eq!(got.body["amount"], 4200);
        assert!(
            ["NEW", "PROCESSING", "COMPLETED"].contains(&got.body["status"].as_str().unwrap()),
            "{:?}",
            got.body
        );
        assert!(got.body["version"].as_i64().unwrap() >= 1);
        assert_eq!(got.headers["x-content-type-options"], "nosniff");
        let events = api.events(id).await.unwrap();
        assert_eq!(events.status, 200, "{:?}", events.body);
        assert_eq!(
            events.body["events"][0]["type"], "created",
            "{:?}",
            events.body
        );
        assert_eq!(events.body["events"][0]["seq"], 1);
        // Its refunds read too (none yet), and a refund is refused for what it is.
        let refunds = api.refunds(id).await.unwrap();
        assert_eq!(refunds.status, 200, "{:?}", refunds.body);
        let refund = api.refund(id, &format!("ryw-rf-{i}"), None).await.unwrap();
        assert!(
            [202, 409].contains(&refund.status),
            "a refund right after the create: {} {:?}",
            refund.status,
            refund.body
        );
        // Another merchant still sees nothing.
        assert_eq!(other.get(id).await.unwrap().status, 404);
        assert_eq!(other.refunds(id).await.unwrap().status, 404);
    }
    let created = api.create("ryw-cancel", 4200, "EUR").await.unwrap();
    let id = created.body["id"].as_str().unwrap();
    let canceled = api.cancel(id).await.unwrap();
    assert!(
        [202, 409].contains(&canceled.status),
        "a cancel right after the create: {} {:?}",
        canceled.status,
        canceled.body
    );
    stack.shutdown().await.unwrap();
}

/// A cursor the API could not have returned (its time outside what the projection
/// holds) is the client's error: 400 in the JSON shape, never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_cursor_is_a_client_error() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pid = "pay_00000000000000000000000000000000";
    for us in [
        i64::MAX.to_string(),
        i64::MIN.to_string(),
        "-1".into(),
        "253402300800000000".into(),
    ] {
        let cursor = b64.encode(format!("{us}:{pid}"));
        let r = api.list(&format!("cursor={cursor}")).await.unwrap();
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request"),
            "cursor time {us}: {:?}",
            r.body
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // The largest time a cursor may hold is still a valid (empty) page.
    let cursor = b64.encode(format!("253402300799999999:{pid}"));
    let r = api.list(&format!("cursor={cursor}")).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let post = |key: Option<&str>, body: &str| {
        let mut r = api
            .request(reqwest::Method::POST, "/v1/payments")
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        api.send(r)
    };
    let long_key = "x".repeat(300);
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (Some("k1"), "{not json".into(), 400, "invalid_json"),
        (
            Some("k2"),
            r#"{"amount": 100, "currency": "EUR", "extra": 1}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k3"),
            r#"{"amount": 0, "currency": "EUR"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k4"),
            r#"{"amount": -5, "currency": "EUR"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k5"),
            r#"{"amount": 1000000000000000, "currency": "EUR"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k6"),
            r#"{"amount": 10.5, "currency": "EUR"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k7"),
            r#"{"amount": 100, "currency": "XYZ"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            Some("k8"),
            r#"{"amount": 100}"#.into(),
            400,
            "invalid_request",
        ),
        (
            None,
            r#"{"amount": 100, "currency": "EUR"}"#.into(),
            400,
            "missing_idempotency_key",
        ),
        (
            Some(long_key.as_str()),
            r#"{"amount": 100, "currency": "EUR"}"#.into(),
            400,
            "invalid_idempotency_key",
        ),
        (
            Some("k9"),
            format!(
                r#"{{"amount": 100, "currency": "EUR", "description": "{}"}}"#,
                "d".repeat(20_000)
            ),
            413,
            "payload_too_large",
        ),
        (Some("k10"), "".into(), 400, "invalid_json"),
        (Some("k12"), "[]".into(), 400, "invalid_request"),
        (
            Some("k13"),
            r#"{"amount": 100, "currency": "EUR", "metadata": {"order": 7}}"#.into(),
            400,
            "invalid_request",
        ),
    ];
    for (key, body, status, code) in &cases {
        let r = post(*key, body).await.unwrap();
        assert_eq!(
            (r.status, r.code()),
            (*status, *code),
            "body {:.60}: {}",
            body,
            r.body
        );
        assert!(r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Metadata travels with the payment and comes back on reads; a replay with other
    // metadata is a different request.
    let meta = r#"{"amount": 1000, "currency": "EUR", "metadata": {"order_id": "A-17", "channel": "web"}}"#;
    let created = post(Some("with-metadata"), meta).await.unwrap();
    assert_eq!(created.status, 202, "{}", created.body);
    assert_eq!(created.body["metadata"]["order_id"], "A-17");
    let meta_id = created.body["id"].as_str().unwrap().to_owned();
    let read = api
        .wait_for_status(&meta_id, TERMINAL, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        read.body["metadata"],
        serde_json::json!({"order_id": "A-17", "channel": "web"})
    );
    let changed = post(
        Some("with-metadata"),
        r#"{"amount": 1000, "currency": "EUR", "metadata": {"order_id": "A-18"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (changed.status, changed.code()),
        (422, "idempotency_key_reused")
    );
    // Authentication and isolation: another merchant's payment is a 404.
    let unauth = api
        .with_key("wrong")
        .create("k11", 100, "EUR")
        .await
        .unwrap();
    assert_eq!((unauth.status, unauth.code()), (401, "unauthorized"));
    let id = api.create("mine", 1300, "EUR").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_for_status(&id, TERMINAL, Duration::from_secs(20))
        .await
        .unwrap();
    let other = api.with_key(OTHER_KEY);
    assert_eq!(other.get(&id).await.unwrap().status, 404);
    assert_eq!(other.events(&id).await.unwrap().status, 404);
    assert_eq!(other.cancel(&id).await.unwrap().status, 404);
    assert_eq!(
        other.list("").await.unwrap().body["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(api.get("pay_nonsense").await.unwrap().status, 404);
    let bad_list = api.list("status=DONE").await.unwrap();
    assert_eq!((bad_list.status, bad_list.code()), (400, "invalid_request"));
    assert_eq!(api.list("limit=0").await.unwrap().status, 400);
    assert_eq!(api.list("cursor=garbage").await.unwrap().status, 400);
    // Webhooks with a bad signature or missing headers.
    let bare = api
        .http
        .post(format!("{}/v1/callbacks/sim", api.base))
        .body("{}");
    let r = api.send(bare).await.unwrap();
    assert_eq!((r.status, r.code()), (401, "invalid_signature"));
    let r = api
        .send(
            api.http
                .post(format!("{}/v1/callbacks/nobody", api.base))
                .body("{}"),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (404, "unknown_provider"));

    // Poison on the commands topic goes to the DLQ with its reason; the partition goes on.
    let topic = stack.commands_topic();
    stack
        .kafka
        .produce(&topic, Some(b"pay_0"), b"\x00\x01 not a command")
        .await
        .unwrap();
    stack
        .kafka
        .produce(&topic, None, br#"{"command_id":"x"}"#)
        .await
        .unwrap();
    let after = api.create("after-poison", 1400, "EUR").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_for_status(&after, &["COMPLETED"], Duration::from_secs(20))
        .await
        .unwrap();
    let pool = stack.pool().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = pool
            .get()
            .await
            .unwrap()
            .query("SELECT reason, detail FROM dead_letters", &[])
            .await
            .unwrap();
        if rows.len() == 2 {
            for r in rows {
                let (reason, detail): (String, String) = (r.get(0), r.get(1));
                assert_eq!(reason, "undecodable");
                assert!(!detail.is_empty());
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters not projected ({} rows)",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_filters_and_cursor_pagination() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let created = create_many(
        &api,
        (0..25)
            .map(|i| (format!("list-{i}"), if i % 5 == 0 { 2001 } else { 2000 }))
            .collect(),
        8,
    )
    .await;
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    wait_all_terminal(&stack.pool().await.unwrap(), &ids, Duration::from_secs(30))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=10&cursor={c}"),
            None => "limit=10".to_owned(),
        };
        let page = api.list(&q).await.unwrap();
        assert_eq!(page.status, 200, "{}", page.body);
        seen.extend(
            page.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted_seen = seen.clone();
    sorted_seen.sort();
    sorted_seen.dedup();
    assert_eq!(
        sorted_seen.len(),
        25,
        "every payment exactly once across pages"
    );
    let failed = api.list("status=FAILED").await.unwrap();
    assert_eq!(failed.body["data"].as_array().unwrap().len(), 5);
    stack.shutdown().await.unwrap();
}

/// Waits until at least `n` payments are terminal in the projection (work under way
/// before a fault is injected).
async fn wait_for_terminal_count(pool: &sinks::Pool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM payments WHERE status IN ('COMPLETED','FAILED')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes every record of the commands topic again, to its own partition.
async fn redeliver_all_commands(stack: &Stack) -> usize {
    let commands = stack.kafka.read_all(&stack.commands_topic()).unwrap();
    let producer = stack.kafka.producer().unwrap();
    let topic = stack.commands_topic();
    let sends = commands.iter().map(|r| {
        let p = producer.clone();
        let topic = topic.clone();
        async move {
            let rec = rdkafka_record(&topic, r).partition(r.partition);
            p.send(rec, Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    commands.len()
}

/// Workers on separate disks: a worker is SIGKILLed mid-stream and its partitions go to
/// a worker whose state directory is empty, which restores every store from the
/// changelog topic before processing; then that one is stopped and a third, again on a
/// fresh disk, takes over. No payment is lost or charged twice, histories stay gap-free,
/// and every command redelivered afterwards is recognised by the restored dedup store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_on_fresh_disks_restore_their_stores_from_the_changelog() {
    let opts = StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        ..StackOptions::default()
    };
    let mut stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let endings = [0, 2, 3, 5, 6, 9, 10];
    let specs: Vec<(String, i64)> = (0..280)
        .map(|i| {
            (
                format!("restore-{i}"),
                9000 + i as i64 * 100 + endings[i % 7],
            )
        })
        .collect();
    let mut created = create_many(&api, specs, 16).await;
    wait_for_terminal_count(&pool, 60).await;
    let disks: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    stack.stop_worker().await.unwrap(); // SIGKILL
    stack.worker_state = disks[0].path().to_owned();
    stack.start_worker().unwrap();
    created.extend(
        create_many(
            &api,
            (0..40)
                .map(|i| {
                    (
                        format!("after-kill-{i}"),
                        30_000 + i as i64 * 100 + endings[i % 7],
                    )
                })
                .collect(),
            8,
        )
        .await,
    );
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(120))
        .await
        .unwrap();
    for ((_, amount, _), id) in created.iter().zip(&ids) {
        assert_eq!(statuses[id], expected_status(*amount));
    }
    assert!(stack.worker_alive().unwrap(), "the restored worker stopped");

    // A second move, to another empty disk, then every command again.
    let snapshot = projected_events(&pool).await.unwrap();
    stack.stop_worker().await.unwrap();
    stack.worker_state = disks[1].path().to_owned();
    stack.start_worker().unwrap();
    let redelivered = redeliver_all_commands(&stack).await;
    let end = group_position(&stack).1 as usize;
    wait_for_consumed(&stack, end).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        stack.worker_alive().unwrap(),
        "the twice-restored worker stopped"
    );
    let after = projected_events(&pool).await.unwrap();
    assert_eq!(
        snapshot, after,
        "redelivered commands changed the history after a restore"
    );
    check_ledger(&stack, &statuses);
    let (events, records) = check_history_matches_topic(&stack).await;
    let changelog = stack
        .kafka
        .read_all(
            &stack
                .common
                .topology
                .changelog_topic(&stack.commands_topic()),
        )
        .unwrap()
        .len();
    println!(
        "e2e: restored from the changelog twice: payments={} events={events} topic_records={records} changelog_records={changelog} redelivered_commands={redelivered} new_events=0",
        ids.len()
    );
    stack.shutdown().await.unwrap();
}

/// A changelog whose first records are gone cannot rebuild a store: the keys last written
/// before them would be missing (payments a refund or a late webhook still needs). A
/// worker on a fresh disk refuses the partition with what to do, instead of restoring
/// what is left. The head goes as retention takes it on a changelog topic misconfigured
/// with `cleanup.policy=delete` (a compacted topic refuses to delete records).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changelog_whose_head_is_gone_is_refused_not_restored_from() {
    let mut stack = Stack::start(StackOptions {
        partitions: 1,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    create_many(
        &api,
        (0..5)
            .map(|i| (format!("head-{i}"), 10_000 + i * 100))
            .collect(),
        5,
    )
    .await;
    wait_for_terminal_count(&pool, 5).await;
    stack.stop_worker().await.unwrap();

    let changelog = stack
        .common
        .topology
        .changelog_topic(&stack.commands_topic());
    stack
        .kafka
        .set_topic_config(&changelog, &[("cleanup.policy", "delete")])
        .await
        .unwrap();
    stack
        .kafka
        .delete_records_before(&changelog, 0, 2)
        .await
        .unwrap();
    assert_eq!(
        stack.kafka.truncated_partitions(&changelog).unwrap(),
        vec![0],
        "the changelog's head should be gone"
    );

    let disk = tempfile::tempdir().unwrap();
    stack.worker_state = disk.path().to_owned();
    stack.start_worker().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.worker_alive().unwrap() {
        assert!(
            Instant::now() < deadline,
            "the worker took the partition from a changelog without its head"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = format!("{:#}", stack.stop_worker().await.unwrap_err());
    assert!(
        err.contains("needs the changelog from offset 0, but it starts at")
            && err.contains("cleanup.policy=compact"),
        "unexpected error: {err}"
    );
    println!("e2e: changelog without its head refused: {err}");
    stack.shutdown().await.unwrap();
}

/// The README's worked example: a processor added by editing `config/topology.toml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_amount_limit_configured_in_the_topology_fails_payments_over_it() {
    let opts = StackOptions {
        edit_topology: Some(|t| {
            let limits = testkit::stack::component(&mut t.processors, "limits").unwrap();
            let jpy: toml::Table = toml::from_str("JPY = 5000").unwrap();
            testkit::stack::set_param(limits, "per_currency", toml::Value::Table(jpy)).unwrap();
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let over = api.create("jpy-over", 6000, "JPY").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let under = api.create("jpy-under", 4000, "JPY").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = api
        .wait_for_status(&over, &["FAILED"], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        r.body["failure_code"], "amount_limit_exceeded",
        "{}",
        r.body
    );
    api.wait_for_status(&under, &["COMPLETED"], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        stack
            .sim
            .ledger()
            .charges
            .iter()
            .all(|c| c.reference != over),
        "a refused payment never reaches the provider"
    );
    stack.shutdown().await.unwrap();
}

/// Two workers in one consumer group on one state directory: partitions (and their
/// stores) move between them on every join and leave, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_between_two_workers_without_loss() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let endings = [0, 1, 2, 3, 5, 9];
    let batch = |from: usize| -> Vec<(String, i64)> {
        (from..from + 150)
            .map(|i| (format!("two-{i}"), 8000 + i as i64 * 100 + endings[i % 6]))
            .collect()
    };
    let mut created = create_many(&api, batch(0), 16).await;
    let second = stack.spawn_extra_worker().expect("second worker"); // joins: partitions are split
    created.extend(create_many(&api, batch(150), 16).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(second.is_running(), "the second worker stopped");
    second.stop().await.unwrap(); // leaves: its partitions come back
    created.extend(create_many(&api, batch(300), 16).await);
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(120))
        .await
        .unwrap();
    for (key, amount, r) in &created {
        let id = r.body["id"].as_str().unwrap();
        assert_eq!(statuses[id], expected_status(*amount), "{key}");
    }
    check_ledger(&stack, &statuses);
    let (events, records) = check_history_matches_topic(&stack).await;
    println!(
        "e2e: two workers: payments={} events={events} topic_records={records}",
        ids.len()
    );
    stack.shutdown().await.unwrap();
}

/// Kafka unreachable: a create is answered at once-ish (within the publish timeout) with
/// 503 `unavailable` and `Retry-After`, never accepted without being published and never
/// left hanging. Once the broker is back, the client's retry of the same request is
/// accepted, and the payment is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_is_a_clear_503_and_the_retry_is_charged_once() {
    // A broker of the test's own, behind a proxy that makes it unreachable; a webhook
    // slow enough (3.5 s) to see the payment PROCESSING first.
    let defaults = StackOptions::default();
    let stack = Stack::start(StackOptions {
        own_kafka: true,
        sim: simulator::SimConfig {
            webhook_delay_ms: 300,
            ..defaults.sim.clone()
        },
        ..defaults
    })
    .await
    .unwrap();
    let api = stack.client(DEMO_KEY);
    // Pending at the provider with a slow webhook: still cancelable during the outage.
    let before = api.create("before-outage", 4207, "EUR").await.unwrap();
    assert_eq!(before.status, 202, "{}", before.body);
    api.wait_for_status(
        before.body["id"].as_str().unwrap(),
        &["PROCESSING"],
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    stack
        .kafka
        .fault(testkit::kafka::Fault::BrokerDown(1))
        .unwrap();
    let started = Instant::now();
    let refused = api.create("during-outage", 4300, "EUR").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.code(), "unavailable", "{}", refused.body);
    assert!(
        refused.headers.contains_key("retry-after"),
        "a 503 says when to retry"
    );
    let cancel = api
        .cancel(before.body["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (cancel.status, cancel.code()),
        (503, "unavailable"),
        "a cancel that cannot be queued is refused, not accepted: {}",
        cancel.body
    );

    stack
        .kafka
        .fault(testkit::kafka::Fault::BrokerUp(1))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        let r = api.create("during-outage", 4300, "EUR").await.unwrap();
        if r.status == 202 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = accepted.body["id"].as_str().unwrap().to_owned();
    let done = api
        .wait_for_status(&id, &["COMPLETED"], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.body["amount"], 4300);
    let charges: Vec<u32> = stack
        .sim
        .ledger()
        .charges
        .iter()
        .filter(|c| c.reference == id)
        .map(|c| c.captures)
        .collect();
    assert_eq!(
        charges,
        vec![1],
        "the retried create is charged exactly once"
    );
    println!(
        "e2e: broker outage answered 503 in {} ms",
        waited.as_millis()
    );
    stack.shutdown().await.unwrap();
}

/// Creates a payment of `amount` and waits until it is terminal; returns its id.
async fn settled_payment(api: &Api, key: &str, amount: i64) -> String {
    let id = api.create(key, amount, "EUR").await.unwrap().body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.wait_for_status(&id, TERMINAL, Duration::from_secs(30))
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_return_at_most_what_was_captured_and_each_only_once() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let wait = Duration::from_secs(30);
    let paid = settled_payment(&api, "to-refund", 1000).await;
    let declined = settled_payment(&api, "declined", 2001).await;
    let raced = settled_payment(&api, "raced", 1000).await;
    assert_eq!(api.get(&paid).await.unwrap().body["status"], "COMPLETED");

    // A partial refund: accepted as PENDING, readable at once, then SUCCEEDED.
    let first = api.refund(&paid, "rf-1", Some(400)).await.unwrap();
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["status"], "PENDING");
    let first_id = first.body["id"].as_str().unwrap().to_owned();
    assert!(first_id.starts_with("re_"), "{first_id}");
    assert_eq!(api.get_refund(&first_id).await.unwrap().status, 200);
    api.wait_for_refund(&first_id, &["SUCCEEDED"], wait)
        .await
        .unwrap();
    // The same key and body replay; another body under the key is refused.
    let replay = api.refund(&paid, "rf-1", Some(400)).await.unwrap();
    assert_eq!(
        (replay.status, &replay.body["id"]),
        (202, &first.body["id"])
    );
    assert_eq!(
        replay
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let reused = api.refund(&paid, "rf-1", Some(300)).await.unwrap();
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused")
    );

    // Pending at the provider, settled by a signed `refund.succeeded` webhook (03).
    let hooked = api.refund(&paid, "rf-2", Some(303)).await.unwrap();
    let hooked_id = hooked.body["id"].as_str().unwrap().to_owned();
    api.wait_for_refund(&hooked_id, &["SUCCEEDED"], wait)
        .await
        .unwrap();
    // Refused by the provider (01): FAILED, and its amount is free again.
    let refused = api.refund(&paid, "rf-3", Some(201)).await.unwrap();
    let refused_id = refused.body["id"].as_str().unwrap().to_owned();
    let failed = api
        .wait_for_refund(&refused_id, &["FAILED"], wait)
        .await
        .unwrap();
    assert_eq!(failed.body["failure_code"], "refund_declined");
    // No amount: what is left, 1000 - 400 - 303.
    let rest = api.refund(&paid, "rf-4", None).await.unwrap();
    assert_eq!(rest.status, 202, "{}", rest.body);
    let rest_id = rest.body["id"].as_str().unwrap().to_owned();
    let done = api
        .wait_for_refund(&rest_id, &["SUCCEEDED"], wait)
        .await
        .unwrap();
    assert_eq!(done.body["amount"], 297);
    let payment = api
        .wait_for_status(&paid, &["COMPLETED"], wait)
        .await
        .unwrap();
    let deadline = Instant::now() + wait;
    let mut payment = payment;
    while payment.body["amount_refunded"] != 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        payment = api.get(&paid).await.unwrap();
    }
    assert_eq!(
        (&payment.body["amount_refunded"], &payment.body["refunded"]),
        (&Value::from(1000), &Value::from(true)),
        "{}",
        payment.body
    );
    let more = api.refund(&paid, "rf-5", Some(1)).await.unwrap();
    assert_eq!(
        (more.status, more.code()),
        (409, "amount_exceeds_refundable")
    );
    let list = api.refunds(&paid).await.unwrap();
    let statuses: Vec<&str> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["SUCCEEDED", "SUCCEEDED", "FAILED", "SUCCEEDED"]);

    // Only a COMPLETED payment can be refunded; unknown refunds and other merchants' are 404.
    let not_done = api.refund(&declined, "rf-x", None).await.unwrap();
    assert_eq!(
        (not_done.status, not_done.code()),
        (409, "payment_not_completed")
    );
    for missing in ["re_0123456789abcdef0123456789abcdef", "re_nothex", "pay_1"] {
        let r = api.get_refund(missing).await.unwrap();
        assert_eq!((r.status, r.code()), (404, "refund_not_found"), "{missing}");
    }
    let other = stack.client(OTHER_KEY);
    assert_eq!(other.get_refund(&first_id).await.unwrap().status, 404);
    assert_eq!(other.refunds(&paid).await.unwrap().status, 404);
    let foreign = other.refund(&paid, "rf-o", None).await.unwrap();
    assert_eq!((foreign.status, foreign.code()), (404, "payment_not_found"));

    // Two refunds racing for more than is left: at most one succeeds; the other is
    // refused at once or, if both passed the API, recorded as FAILED with the reason.
    let (a, b) = tokio::join!(
        api.refund(&raced, "race-a", Some(700)),
        api.refund(&raced, "race-b", Some(700))
    );
    let mut outcomes = Vec::new();
    for r in [a.unwrap(), b.unwrap()] {
        match r.status {
            202 => {
                let id = r.body["id"].as_str().unwrap().to_owned();
                let end = api
                    .wait_for_refund(&id, &["SUCCEEDED", "FAILED"], wait)
                    .await
                    .unwrap();
                if end.body["status"] == "FAILED" {
                    assert_eq!(end.body["failure_code"], "amount_exceeds_refundable");
                }
                outcomes.push(end.body["status"].as_str().unwrap().to_owned());
            }
            409 => outcomes.push(r.code().to_owned()),
            other => panic!("unexpected answer {other}: {}", r.body),
        }
    }
    outcomes.sort();
    assert_eq!(outcomes[1], "SUCCEEDED", "{outcomes:?}");
    assert_ne!(outcomes[0], "SUCCEEDED", "{outcomes:?}");

    // The provider returned money once per refund, never more than was captured.
    let ledger = stack.sim.ledger();
    let mut returned: HashMap<String, i64> = HashMap::new();
    for r in &ledger.refunds {
        assert!(
            r.refunds_made <= 1,
            "refund {} made twice",
            r.idempotency_key
        );
        if r.refunds_made == 1 {
            *returned.entry(r.reference.clone()).or_default() += r.amount;
        }
    }
    assert_eq!(returned.get(&paid), Some(&1000));
    assert_eq!(returned.get(&raced), Some(&700));
    assert_eq!(returned.get(&declined), None);
    let (events, _) = check_history_matches_topic(&stack).await;
    println!(
        "e2e: refunds: statuses={statuses:?} race={outcomes:?} events={events} ledger_refunds={}",
        ledger.refunds.len()
    );
    stack.shutdown().await.unwrap();
}

/// Refunds are a processor in `config/topology.toml`: without it, the gateway runs as
/// before and says refunds are not enabled; with a short retention, a refund of a
/// payment that completed longer ago than its window is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_follow_the_topology_switched_off_or_with_a_short_window() {
    let off = StackOptions {
        edit_topology: Some(|t| {
            t.processors.remove("refunds").unwrap();
            testkit::stack::component(&mut t.processors, "payments")
                .unwrap()
                .inputs = vec!["limits".into()];
            for c in t.sinks.values_mut().chain(t.processors.values_mut()) {
                c.inputs.retain(|i| i != "refunds");
            }
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(off).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let id = settled_payment(&api, "no-refunds", 1000).await;
    assert_eq!(api.get(&id).await.unwrap().body["status"], "COMPLETED");
    let r = api.refund(&id, "rf-1", None).await.unwrap();
    assert_eq!((r.status, r.code()), (501, "refunds_not_enabled"));
    stack.shutdown().await.unwrap();

    let short = StackOptions {
        // Payments stay 10 minutes after they finish; a refund's webhook may come 599.5 s
        // late: refunds start within half a second of completion.
        policy: format!(
            "{}, webhook_max_delay_ms = 120000",
            StackOptions::default().policy
        ),
        edit_topology: Some(|t| {
            t.stores.get_mut("payments").unwrap().state_retention =
                Some(topology::config::Span::from_ms(600_000));
            t.sources.get_mut("commands").unwrap().retention =
                Some(topology::config::Span::from_ms(300_000));
            let refunds = testkit::stack::component(&mut t.processors, "refunds").unwrap();
            testkit::stack::set_param(refunds, "webhook_max_delay_ms", 599_500.into()).unwrap();
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(short).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let id = settled_payment(&api, "old-payment", 1000).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = api.refund(&id, "rf-late", None).await.unwrap();
    assert_eq!(
        (r.status, r.code()),
        (409, "refund_window_closed"),
        "{}",
        r.body
    );
    stack.shutdown().await.unwrap();
}

/// Every status change of a merchant's payments and refunds reaches its endpoint, signed,
/// through an endpoint that fails, then is slow, then comes back; the deliveries and their
/// attempts are readable, and one can be redelivered. A merchant without an endpoint is
/// not notified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merchants_are_notified_of_every_status_change_through_a_failing_endpoint() {
    use testkit::merchant::{MerchantEndpoint, Mode};
    let secret =
        payments::webhook::secret_bytes("whsec_bWVyY2hhbnQtbm90aWZpY2F0aW9uLXNlY3JldA==").unwrap();
    let endpoint = MerchantEndpoint::start(vec![secret.clone()], std::future::pending())
        .await
        .unwrap();
    endpoint.set_mode(Mode::Fail);
    let opts = StackOptions {
        merchant_endpoints: [(
            "demo".to_owned(),
            sinks::notifier::Endpoint {
                url: endpoint.url(),
                secrets: vec![secret],
            },
        )]
        .into(),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let completed = settled_payment(&api, "n-ok", 1000).await;
    let declined = settled_payment(&api, "n-declined", 2001).await;
    let hooked = settled_payment(&api, "n-async", 1003).await;
    let refund = api.refund(&completed, "n-rf", Some(400)).await.unwrap();
    let refund_id = refund.body["id"].as_str().unwrap().to_owned();
    api.wait_for_refund(&refund_id, &["SUCCEEDED"], Duration::from_secs(30))
        .await
        .unwrap();
    let other = stack.client(OTHER_KEY);
    let unnotified = settled_payment(&other, "n-other", 1000).await;
    // Failing, then slower than the notifier waits, then working.
    tokio::time::sleep(Duration::from_millis(600)).await;
    endpoint.set_mode(Mode::Slow(Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    endpoint.set_mode(Mode::Ok);

    let expected: Vec<(&str, &str)> = vec![
        (&completed, "payment.created"),
        (&completed, "payment.processing"),
        (&completed, "payment.completed"),
        (&completed, "refund.pending"),
        (&completed, "refund.succeeded"),
        (&declined, "payment.created"),
        (&declined, "payment.processing"),
        (&declined, "payment.failed"),
        (&hooked, "payment.created"),
        (&hooked, "payment.processing"),
        (&hooked, "payment.completed"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let got: Vec<(String, String)> = endpoint
            .received()
            .iter()
            .map(|r| {
                (
                    r.body["payment_id"].as_str().unwrap_or_default().to_owned(),
                    r.body["type"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(p, t)| !got.iter().any(|(gp, gt)| gp == p && gt == t))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(endpoint.forged(), 0, "every delivery is signed");
    // One webhook-id per status change, one body per webhook-id, the resource inside.
    let received = endpoint.received();
    let mut bodies: HashMap<String, Value> = HashMap::new();
    for r in &received {
        let first = bodies.entry(r.webhook_id.clone()).or_insert(r.body.clone());
        assert_eq!(first, &r.body, "a redelivery is the same notification");
        assert_eq!(r.body["id"], r.webhook_id.as_str());
    }
    let done = received
        .iter()
        .find(|r| {
            r.body["payment_id"] == completed.as_str() && r.body["type"] == "payment.completed"
        })
        .unwrap();
    assert_eq!(done.body["data"]["status"], "COMPLETED");
    assert_eq!(done.body["data"]["id"], completed.as_str());
    let rf = received
        .iter()
        .find(|r| r.body["type"] == "refund.succeeded")
        .unwrap();
    assert_eq!(rf.body["data"]["id"], refund_id.as_str());
    assert_eq!(rf.body["data"]["status"], "SUCCEEDED");
    assert!(
        received
            .iter()
            .all(|r| r.body["payment_id"] != unnotified.as_str()),
        "a merchant without an endpoint is not notified"
    );

    // The deliveries, with the failed attempts before the one that worked.
    let list = api
        .send(api.request(
            reqwest::Method::GET,
            &format!("/v1/webhook-deliveries?payment_id={completed}"),
        ))
        .await
        .unwrap();
    assert_eq!(list.status, 200, "{}", list.body);
    let data = list.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 5, "{}", list.body);
    let created = data
        .iter()
        .find(|d| d["type"] == "payment.created")
        .unwrap();
    assert_eq!(created["status"], "delivered", "{created}");
    let log = created["attempt_log"].as_array().unwrap();
    assert!(log.len() >= 2, "failed attempts are recorded: {created}");
    assert_eq!(log[0]["status_code"], 500, "{created}");
    assert_eq!(log.last().unwrap()["status_code"], 200, "{created}");
    // A page at a time: the pages join up to the whole list, newest seq first, and
    // filter by status; a forged cursor or an unknown status is refused.
    let mut paged: Vec<serde_json::Value> = Vec::new();
    let mut cursor = String::new();
    for _ in 0..10 {
        let page = api
            .send(api.request(
                reqwest::Method::GET,
                &format!("/v1/webhook-deliveries?payment_id={completed}&limit=2&cursor={cursor}"),
            ))
            .await
            .unwrap();
        assert_eq!(page.status, 200, "{}", page.body);
        let rows = page.body["data"].as_array().unwrap();
        assert!(rows.len() <= 2, "{}", page.body);
        paged.extend(rows.iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let ids = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&paged), ids(data), "pages join up to the list");
    let seqs: Vec<i64> = paged.iter().map(|d| d["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    let delivered = api
        .send(api.request(
            reqwest::Method::GET,
            &format!("/v1/webhook-deliveries?payment_id={completed}&status=delivered"),
        ))
        .await
        .unwrap();
    // Delivered is final: at least what the list showed, and nothing else.
    let delivered = delivered.body["data"].as_array().unwrap();
    assert!(
        delivered.iter().all(|d| d["status"] == "delivered"),
        "{delivered:?}"
    );
    assert!(
        delivered.len() >= data.iter().filter(|d| d["status"] == "delivered").count(),
        "{delivered:?}"
    );
    let none = api
        .send(api.request(
            reqwest::Method::GET,
            &format!("/v1/webhook-deliveries?payment_id={completed}&status=failed"),
        ))
        .await
        .unwrap();
    assert_eq!(none.body["data"], serde_json::json!([]), "{}", none.body);
    for query in [
        "status=DELIVERED",
        "status=gone",
        "cursor=bm9wZQ",
        "cursor=%21",
        "limit=0",
    ] {
        let bad = api
            .send(api.request(
                reqwest::Method::GET,
                &format!("/v1/webhook-deliveries?{query}"),
            ))
            .await
            .unwrap();
        assert_eq!(
            (bad.status, bad.code()),
            (400, "invalid_request"),
            "{query}: {}",
            bad.body
        );
    }

    // Another merchant's deliveries: none visible; its own were skipped.
    let theirs = other
        .send(other.request(reqwest::Method::GET, "/v1/webhook-deliveries"))
        .await
        .unwrap();
    assert!(theirs.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["status"] == "skipped" || d["status"] == "pending"));

    // Redelivery on request: the same webhook-id arrives once more.
    let id = created["id"].as_str().unwrap().to_owned();
    let before = endpoint.counts().get(&id).copied().unwrap_or(0);
    let r = api
        .send(api.request(
            reqwest::Method::POST,
            &format!("/v1/webhook-deliveries/{id}/redeliver"),
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while endpoint.counts().get(&id).copied().unwrap_or(0) <= before {
        assert!(Instant::now() < deadline, "redelivery never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = api
        .send(api.request(
            reqwest::Method::POST,
            "/v1/webhook-deliveries/evt_0123/redeliver",
        ))
        .await
        .unwrap();
    assert_eq!((bad.status, bad.code()), (404, "delivery_not_found"));
    println!(
        "e2e: notifications: received={} distinct={} endpoint_requests={}",
        received.len(),
        bodies.len(),
        endpoint.requests()
    );
    stack.shutdown().await.unwrap();
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{signal} {pid} failed");
}

/// A task's previous owner that keeps running (a worker paused past its session, as a
/// long GC pause or a frozen VM would): its partitions move to another worker, whose
/// transactional producers fence the paused one's. Resumed, the old owner's next
/// transaction is refused; a `read_committed` reader never sees what it wrote after the
/// new owner started (the brokers' log says which transactions aborted), every payment
/// ends once and nobody is charged twice. Under at-least-once no producer is fenced:
/// resumed, the old owner applies nothing more (it waits for the group, which tells it
/// the partitions are lost), but what it had handed to librdkafka before the pause still
/// reaches the events topic and the changelog after the new owner's records. Every
/// payment still ends in its expected status, once, and the ledger holds one charge
/// each; copies of an event that differ are possible there (the README's limits) and are
/// counted, not refused.
async fn a_paused_worker_is_fenced_when_it_resumes(exactly_once: bool) {
    let opts = StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        own_kafka: true,
        edit_topology: Some(if exactly_once {
            |t| t.processing_guarantee = topology::config::ProcessingGuarantee::ExactlyOnce
        } else {
            |t| t.processing_guarantee = topology::config::ProcessingGuarantee::AtLeastOnce
        }),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let endings = [0, 2, 3, 5, 6, 9];
    let batch = |from: usize, n: usize| -> Vec<(String, i64)> {
        (from..from + n)
            .map(|i| (format!("fence-{i}"), 6000 + i as i64 * 100 + endings[i % 6]))
            .collect()
    };
    let mut created = create_many(&api, batch(0, 60), 8).await;
    wait_for_terminal_count(&pool, 30).await;

    // Paused mid-stream: more creates wait for it while a second worker joins and,
    // once the paused one's session ends, takes every partition.
    let pid = stack
        .worker_pid()
        .expect("the worker runs as a child process");
    signal(pid, "STOP");
    created.extend(create_many(&api, batch(60, 60), 8).await);
    // Another machine's disk: the paused process still holds its stores.
    let disk = tempfile::tempdir().unwrap();
    let second = stack
        .spawn_extra_worker_in(disk.path().to_owned())
        .expect("second worker");
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    let statuses = wait_all_terminal(&pool, &ids, Duration::from_secs(120))
        .await
        .expect("the new owner finishes every payment while the old one is paused");

    // Resumed: whatever it still had in flight meets a fenced producer.
    signal(pid, "CONT");
    created.extend(create_many(&api, batch(120, 30), 8).await);
    let ids: Vec<String> = created
        .iter()
        .map(|(_, _, r)| r.body["id"].as_str().unwrap().to_owned())
        .collect();
    let statuses_after = wait_all_terminal(&pool, &ids, Duration::from_secs(120))
        .await
        .unwrap();
    for (id, status) in &statuses {
        assert_eq!(&statuses_after[id], status, "{id} left a terminal state");
    }
    for ((_, amount, _), id) in created.iter().zip(&ids) {
        assert_eq!(statuses_after[id], expected_status(*amount), "{id}");
    }
    check_ledger(&stack, &statuses_after);
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.stop().await.unwrap();
    let kafka = &stack.kafka;
    let events = stack.common.events_topic.clone();
    let audit = tokio::task::block_in_place(|| {
        testkit::txaudit::audit(kafka, &events, Some(testkit::txaudit::event_identity))
    })
    .unwrap();
    assert_eq!(audit.aborted_reads, 0, "{audit:?}");
    if exactly_once {
        assert_eq!(audit.duplicates, 0, "{audit:?}");
        assert!(audit.markers > 0, "transactions left markers: {audit:?}");
    } else if let Some(first) = &audit.first_differing {
        println!("e2e: paused worker resumed (at_least_once): a differing copy: {first}");
    }
    println!(
        "e2e: paused worker resumed ({}): payments={} records={} duplicates={} differing={} aborted_in_log={} aborted_reads=0 markers={}",
        if exactly_once { "exactly_once" } else { "at_least_once" },
        ids.len(),
        audit.records,
        audit.duplicates,
        audit.duplicates_differing,
        audit.aborted_in_log,
        audit.markers
    );
    stack.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_is_fenced_under_exactly_once() {
    a_paused_worker_is_fenced_when_it_resumes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_under_at_least_once_ends_every_payment_once() {
    a_paused_worker_is_fenced_when_it_resumes(false).await;
}

/// The partitions each member of `group` holds (the classic consumer protocol's
/// assignment: version, then per topic its name and partitions).
fn group_assignments(brokers: &str, group: &str) -> Vec<Vec<i32>> {
    testkit::kafka::group_members(brokers, group)
        .into_iter()
        .map(|(_, parts)| parts)
        .collect()
}

/// A crash-looping worker (SIGKILLed and started again every 3 s for a minute, as a bad
/// deploy or a poisoned host leaves it) stops only its own partitions. The workers are
/// static members of the group (`--instance-id`; the looping one's is `@hostname`, the
/// host's name, as compose sets it), so the looping worker's restarts
/// rebalance nothing: every create keyed to the other worker's partitions is accepted
/// during the loop, and each finishes as fast as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_looping_worker_stops_only_its_own_partitions() {
    let mut stack = Stack::start(StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        worker_instance_id: Some("@hostname".into()),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let api = stack.client(DEMO_KEY);
    let disk = tempfile::tempdir().unwrap();
    let healthy = stack
        .spawn_extra_worker_as(disk.path().to_owned(), Some("healthy"))
        .expect("second worker");
    let group = stack.common.topology.application_id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let healthy_parts: std::collections::BTreeSet<i32> = loop {
        let members = tokio::task::block_in_place(|| {
            testkit::kafka::group_members(stack.kafka.brokers(), &group)
        });
        if members.len() == 2 && members.iter().all(|(_, parts)| !parts.is_empty()) {
            let (_, parts) = members
                .iter()
                .find(|(id, _)| id.starts_with("healthy-"))
                .unwrap_or_else(|| panic!("no member of instance `healthy`: {members:?}"));
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
            assert!(
                members
                    .iter()
                    .any(|(id, _)| id.starts_with(&format!("{}-", host.trim()))),
                "no member named after the host {host:?}: {members:?}"
            );
            break parts.iter().copied().collect();
        }
        assert!(
            Instant::now() < deadline,
            "the group never split: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let partitions = stack.opts.partitions;
    let merchant = payments::MerchantId::parse("demo").unwrap();
    let mut next_key = 0;
    let mut healthy_key = || loop {
        next_key += 1;
        let key = format!("loop-{next_key}");
        let id =
            payments::PaymentId::derive(&merchant, &payments::IdempotencyKey::parse(&key).unwrap())
                .to_string();
        let p = payments::partition::partition_of(id.as_bytes(), partitions);
        if healthy_parts.contains(&p) {
            return (key, id, p);
        }
    };

    let started = Instant::now();
    let mut next_kill = started;
    let mut kills = 0;
    let mut accepted = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        if Instant::now() >= next_kill {
            stack.stop_worker().await.unwrap();
            stack.start_worker().unwrap();
            kills += 1;
            next_kill += Duration::from_secs(3);
        }
        let (key, id, p) = healthy_key();
        let r = api.create(&key, 1000, "EUR").await.unwrap();
        assert_eq!(
            r.status,
            202,
            "a create for partition {p}, the healthy worker's, answered {} {:.1} s into the crash loop: {}",
            r.status,
            started.elapsed().as_secs_f64(),
            r.body
        );
        accepted.push(id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = stack.pool().await.unwrap();
    let statuses = wait_all_terminal(&pool, &accepted, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(statuses.values().all(|s| s == "COMPLETED"), "{statuses:?}");
    let mut took: Vec<f64> = pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT extract(epoch FROM updated_at - created_at)::float8 FROM payments WHERE payment_id = ANY($1)",
            &[&accepted],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    took.sort_by(f64::total_cmp);
    let slowest = took.last().copied().unwrap_or_default();
    println!(
        "e2e: crash loop: kills={kills} healthy_partitions={healthy_parts:?} of {partitions} creates={} refused=0 p50_s={:.2} slowest_s={slowest:.2}",
        accepted.len(),
        took[took.len() / 2],
    );
    // The normal bound of a payment here (the provider simulator answers within its
    // latency; a rebalance alone would take longer).
    assert!(
        slowest < 10.0,
        "a payment on the healthy worker's partitions took {slowest:.1} s to finish during the crash loop"
    );
    healthy.stop().await.unwrap();
    stack.shutdown().await.unwrap();
}

/// Admission per partition: one of two workers stopped (SIGSTOP, as a crash loop or a
/// hung process would leave it) stalls only the partitions it holds. Creates for those
/// are refused (`503 overloaded`, `Retry-After`) once their backlog passes the bound,
/// while creates for the other worker's partitions are accepted all along; after the
/// stopped worker is back, the refused creates retried with their keys are accepted and
/// every payment ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_partition_refuses_only_its_own_creates() {
    let stack = Stack::start(StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        admission_min_backlog: 8,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let api = stack.client(DEMO_KEY);
    let disk = tempfile::tempdir().unwrap();
    let second = stack
        .spawn_extra_worker_in(disk.path().to_owned())
        .expect("second worker");
    let group = stack.common.topology.application_id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let members =
            tokio::task::block_in_place(|| group_assignments(stack.kafka.brokers(), &group));
        if members.len() == 2 && members.iter().all(|m| !m.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never split: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let partitions = stack.opts.partitions;
    let pid = stack
        .worker_pid()
        .expect("the worker runs as a child process");
    signal(pid, "STOP");
    let stopped = Instant::now();
    let mut first_refusal = None;
    let mut refused_partitions = std::collections::BTreeSet::new();
    let mut refused_keys = Vec::new();
    let mut accepted = Vec::new();
    let mut accepted_after_refusal: BTreeMap<i32, usize> = BTreeMap::new();
    // Within the stopped worker's session (10 s) the group leaves its partitions to it.
    for i in 0.. {
        if stopped.elapsed() > Duration::from_secs(8) {
            break;
        }
        let key = format!("stall-{i}");
        let id = payments::PaymentId::derive(
            &payments::MerchantId::parse("demo").unwrap(),
            &payments::IdempotencyKey::parse(&key).unwrap(),
        )
        .to_string();
        let p = payments::partition::partition_of(id.as_bytes(), partitions);
        let r = api.create(&key, 1000, "EUR").await.unwrap();
        match r.status {
            202 => {
                accepted.push(id);
                if first_refusal.is_some() {
                    *accepted_after_refusal.entry(p).or_default() += 1;
                }
            }
            503 => {
                assert_eq!(r.code(), "overloaded", "{}", r.body);
                let retry: u32 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=10).contains(&retry), "Retry-After {retry}");
                first_refusal.get_or_insert(stopped.elapsed());
                refused_partitions.insert(p);
                refused_keys.push(key);
            }
            s => panic!("create answered {s}: {}", r.body),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(pid, "CONT");
    let first_refusal = first_refusal.expect("no create refused while a worker was stopped");
    assert!(
        refused_partitions.len() < partitions as usize,
        "every partition refused creates: {refused_partitions:?}"
    );
    let others: usize = accepted_after_refusal
        .iter()
        .filter(|(p, _)| !refused_partitions.contains(p))
        .map(|(_, n)| n)
        .sum();
    assert!(
        others > 0,
        "no create for a healthy partition accepted after the first refusal: {accepted_after_refusal:?}"
    );

    // Back: each refused create, retried with its key, is accepted; every payment ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    for key in &refused_keys {
        loop {
            let r = api.create(key, 1000, "EUR").await.unwrap();
            if r.status == 202 {
                accepted.push(r.body["id"].as_str().unwrap().to_owned());
                break;
            }
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(Instant::now() < deadline, "{key} still refused");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pool = stack.pool().await.unwrap();
    let statuses = wait_all_terminal(&pool, &accepted, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(statuses.values().all(|s| s == "COMPLETED"), "{statuses:?}");
    println!(
        "e2e: stalled partition: refused_partitions={refused_partitions:?} of {partitions} first_refusal_s={:.1} refused={} accepted_on_other_partitions_after={others} payments={}",
        first_refusal.as_secs_f64(),
        refused_keys.len(),
        accepted.len()
    );
    second.stop().await.unwrap();
    stack.shutdown().await.unwrap();
}

/// The partitions `view` finds waiting at `at`, asked again for up to a minute while a
/// check fails as a whole (the group's coordinator or the broker asked for the
/// partitions not answering yet), as the watchdog asks again at its next check.
fn waiting_patiently(
    view: &mut gateway::watchdog::GroupProgress,
    after: Duration,
    at: Instant,
) -> Vec<(String, i32)> {
    let asked = Instant::now();
    loop {
        match tokio::task::block_in_place(|| view.waiting(after, at)) {
            Ok(w) => return w.into_iter().map(|(tp, _)| tp).collect(),
            Err(e) if asked.elapsed() < Duration::from_secs(60) => {
                eprintln!("watchdog view: {e:#}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the group's progress could not be read for 60 s: {e:#}"),
        }
    }
}

/// A broker that does not answer hides from the watchdog only the partitions it leads:
/// the others are judged at every check, and its own again once it answers (a stall that
/// began during a broker fault used to go unreported until every broker answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_judges_the_partitions_it_can_read_while_a_broker_does_not_answer() {
    use gateway::watchdog::GroupProgress;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::FutureRecord;
    use testkit::kafka::{Fault, Kafka};
    let kafka = Kafka::start_cluster(3).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("wd-deaf-{id}"), format!("wd-deaf-group-{id}"));
    kafka.create_topic(&topic, 6).await.unwrap();
    let producer = kafka.producer().unwrap();
    for p in 0..6 {
        producer
            .send(
                FutureRecord::to(&topic).partition(p).key("k").payload("x"),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    let mut view = GroupProgress::new(
        kafka.brokers(),
        &group,
        vec![topic.clone()],
        &[],
        "watchdog-deaf-test",
    )
    .unwrap();
    let t0 = Instant::now();
    let after = Duration::from_millis(500);
    // A check fails as a whole while the group's coordinator or the broker asked for the
    // partitions does not answer (see `waiting_patiently`).
    let waiting = |view: &mut GroupProgress, at: Instant| {
        waiting_patiently(view, after, at)
            .into_iter()
            .map(|(_, p)| p)
            .collect::<std::collections::BTreeSet<i32>>()
    };
    assert!(
        waiting(&mut view, t0).is_empty(),
        "nothing has stood still for 500 ms yet"
    );

    // The broker to silence: one that leads partitions of the topic but is not the
    // group's coordinator (the leader of the group's partition of `__consumer_offsets`,
    // which has 4 here, chosen by the Java hash of the group id).
    let md: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let leaders = |t: &str| -> BTreeMap<i32, i32> {
        md.fetch_metadata(Some(t), Duration::from_secs(10))
            .unwrap()
            .topics()[0]
            .partitions()
            .iter()
            .map(|p| (p.id(), p.leader()))
            .collect()
    };
    let hash = group
        .bytes()
        .fold(0i32, |h, b| h.wrapping_mul(31).wrapping_add(i32::from(b)));
    let coordinator = leaders("__consumer_offsets")[&((hash & 0x7fff_ffff) % 4)];
    let topic_leaders = leaders(&topic);
    let deaf = *topic_leaders.values().find(|l| **l != coordinator).expect(
        "some partition of a 6-partition topic is led by another broker than the coordinator",
    );
    let readable: std::collections::BTreeSet<i32> = topic_leaders
        .iter()
        .filter(|(_, l)| **l != deaf)
        .map(|(p, _)| *p)
        .collect();
    kafka.fault(Fault::Stall(deaf as u32)).unwrap();
    assert_eq!(
        waiting(&mut view, t0 + Duration::from_secs(1)),
        readable,
        "with broker {deaf} silent, the partitions the others lead are judged (leaders: {topic_leaders:?})"
    );
    // The others are not taken for idle: they are listed as not judged, since the first
    // check that could not judge them (a role holding one for long is told so).
    let deaf_led: std::collections::BTreeSet<i32> = topic_leaders
        .iter()
        .filter(|(_, l)| **l == deaf)
        .map(|(p, _)| *p)
        .collect();
    let blind = view.unjudged(t0 + Duration::from_secs(4));
    assert_eq!(
        blind
            .iter()
            .map(|((_, p), _)| *p)
            .collect::<std::collections::BTreeSet<i32>>(),
        deaf_led,
        "the partitions broker {deaf} leads are not judged while it is silent: {blind:?}"
    );
    assert!(
        blind.iter().all(|(_, d)| *d == Duration::from_secs(3)),
        "not judged since the check at t0 + 1 s: {blind:?}"
    );
    kafka
        .fault(Fault::Latency(deaf as u32, Duration::ZERO))
        .unwrap();
    let _ = waiting(&mut view, t0 + Duration::from_secs(2));
    assert_eq!(
        waiting(&mut view, t0 + Duration::from_secs(3)),
        (0..6).collect(),
        "once broker {deaf} answers again, its partitions are judged too"
    );
    assert_eq!(
        view.unjudged(t0 + Duration::from_secs(3)),
        vec![],
        "once broker {deaf} answers again, every partition is judged"
    );
}

/// The watchdog reads a group's progress as an operator would: a partition whose
/// committed offset stands still below its end waits only if a `read_committed` read
/// finds a record there (an aborted transaction's records and its marker are not work),
/// a commit past the records ends the wait, and a member that holds no partition while
/// records wait unprocessed is reported (the process not ready) and then ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_tells_waiting_records_from_markers_and_ends_a_member_holding_nothing() {
    use gateway::watchdog::{watch_group, GroupProgress, StallSettings};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let kafka = testkit::kafka::Kafka::start().unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (work, aborted, group) = (
        format!("wd-work-{id}"),
        format!("wd-aborted-{id}"),
        format!("wd-group-{id}"),
    );
    kafka.create_topic(&work, 2).await.unwrap();
    kafka.create_topic(&aborted, 1).await.unwrap();
    let plain = kafka.producer().unwrap();
    for _ in 0..3 {
        plain
            .send(
                FutureRecord::to(&work).partition(0).key("k").payload("x"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let tx: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("transactional.id", format!("wd-{id}"))
        .create()
        .unwrap();
    tokio::task::block_in_place(|| tx.init_transactions(Duration::from_secs(30))).unwrap();
    tx.begin_transaction().unwrap();
    for _ in 0..2 {
        tx.send(
            FutureRecord::to(&aborted)
                .partition(0)
                .key("k")
                .payload("y"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    tokio::task::block_in_place(|| tx.abort_transaction(Duration::from_secs(30))).unwrap();

    let mut view = GroupProgress::new(
        kafka.brokers(),
        &group,
        vec![work.clone(), aborted.clone()],
        &[],
        "watchdog-test",
    )
    .unwrap();
    let t0 = Instant::now();
    let after = Duration::from_millis(500);
    // A broker answers "not coordinator" until it has loaded the group's offsets
    // partition (the first group of a new cluster creates it; see `waiting_patiently`).
    let mut waiting = |at: Instant| waiting_patiently(&mut view, after, at);
    assert_eq!(
        waiting(t0),
        vec![],
        "nothing has stood still for 500 ms yet"
    );
    assert_eq!(
        waiting(t0 + Duration::from_secs(1)),
        vec![(work.clone(), 0)],
        "only the partition with records waits, not the one with an aborted transaction"
    );
    let member: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut past = TopicPartitionList::new();
    past.add_partition_offset(&work, 0, Offset::Offset(3))
        .unwrap();
    tokio::task::block_in_place(|| member.commit(&past, CommitMode::Sync)).unwrap();
    assert_eq!(
        waiting(t0 + Duration::from_secs(2)),
        vec![],
        "the group committed past the records"
    );

    // A member of the group that holds nothing while a record waits on partition 1.
    plain
        .send(
            FutureRecord::to(&work).partition(1).key("k").payload("z"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let progress = telemetry::progress::Progress::new("watchdog-test-sink");
    let settings = StallSettings {
        report_after: Duration::from_secs(1),
        exit_after: Some(Duration::from_secs(3)),
    };
    let started = Instant::now();
    let mut dog = watch_group(
        progress.clone(),
        kafka.brokers(),
        &group,
        vec![work.clone()],
        &[],
        settings,
    )
    .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(60), dog.exited())
        .await
        .expect("the watchdog ended the member");
    assert!(
        why.contains("holds no partition") && why.contains(&format!("{work}[1]")),
        "{why}"
    );
    assert!(
        telemetry::progress::not_ready()
            .iter()
            .any(|r| r.starts_with("watchdog-test-sink: holds no partition")),
        "the process was not ready while the member stalled: {:?}",
        telemetry::progress::not_ready()
    );
    println!(
        "watchdog: waiting partitions told from an aborted transaction; a member holding nothing ended after {:.1} s: {why}",
        started.elapsed().as_secs_f64()
    );
}
