//! `bench`: measures the whole pipeline (POST → terminal state committed in PostgreSQL)
//! beside this machine's raw limits for the same work, in the same run, on the same
//! broker and database. Prints one `bench:` line.
//!
//! - open loop at `--rate` payments/s, or `--rate 0` for maximum throughput with
//!   `--concurrency` clients;
//! - e2e latency uses PostgreSQL's commit time of the terminal row (`projected_at`)
//!   against the client's send time, so polling adds nothing;
//! - raw limits: librdkafka produce + consume of as many messages of the same size as the
//!   pipeline moved, and batched `UNNEST` inserts of as many event rows (same table shape,
//!   same JSON) as it wrote.

use anyhow::Context;
use clap::Parser;
use futures::stream::{self, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use telemetry::now_ms;
use testkit::stack::{Stack, StackOptions, DEMO_KEY};

/// The gateway's allocator (jemalloc), so the in-process stack measures as deployed.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Throughput and latency of the payment pipeline beside the machine's raw limits"
)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    payments: usize,
    /// Payments per second (open loop); 0 = as fast as `--concurrency` clients go.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Run the worker as its own process (the `gateway` binary beside this one), so its
    /// memory is measured apart from the broker and database stand-ins.
    #[arg(long)]
    worker_process: bool,
    /// Print the resident memory of this process and of the worker every N seconds.
    #[arg(long, default_value_t = 0)]
    memory_every_s: u64,
    /// sled's page cache per partition store of the worker, in MiB.
    #[arg(long, default_value_t = stores::DEFAULT_CACHE_MB)]
    store_cache_mb: u64,
    /// Leave out the raw-limit measurements (long runs: the mock broker scans its logs
    /// linearly, so it slows down as they grow).
    #[arg(long)]
    skip_raw: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A memory figure of a process (`VmHWM`: peak, `VmRSS`: current), in MiB.
fn memory_mb(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Peak resident memory of the largest process of the stack (this one or the worker's).
fn peak_rss_mb(worker: Option<u32>) -> f64 {
    let own = memory_mb("self", "VmHWM:");
    worker.map_or(own, |pid| own.max(memory_mb(&pid.to_string(), "VmHWM:")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let defaults = StackOptions::default();
    let gateway_bin = match a.worker_process {
        true => {
            let bin = std::env::current_exe()?.with_file_name("gateway");
            anyhow::ensure!(
                bin.exists(),
                "{} is missing: build it first (cargo build --release -p gateway)",
                bin.display()
            );
            Some(bin)
        }
        false => None,
    };
    let stack = Stack::start(StackOptions {
        partitions: a.partitions,
        gateway_bin,
        // The payment policy as shipped (the tests' default has short timeouts).
        policy: testkit::stack::SHIPPED_POLICY.into(),
        store_cache_mb: a.store_cache_mb,
        ..defaults
    })
    .await?;
    let worker_pid = stack.worker_pid();
    if a.memory_every_s > 0 {
        let every = Duration::from_secs(a.memory_every_s);
        tokio::spawn(async move {
            let t = Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let worker = worker_pid.map_or(f64::NAN, |p| memory_mb(&p.to_string(), "VmRSS:"));
                eprintln!(
                    "bench: memory t={}s bench_rss_mb={:.0} worker_rss_mb={worker:.0}",
                    t.elapsed().as_secs(),
                    memory_mb("self", "VmRSS:"),
                );
            }
        });
    }
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await?;

    // Warm up: consumer groups joined, connections open.
    let w = api.create("warmup", 1000, "EUR").await?;
    let wid = w.body["id"].as_str().unwrap_or_default().to_owned();
    api.wait_for_status(&wid, &["COMPLETED"], Duration::from_secs(60))
        .await?;

    eprintln!(
        "bench: sending {} payments ({})",
        a.payments,
        if a.rate == 0 {
            format!("max, {} clients", a.concurrency)
        } else {
            format!("{}/s open loop", a.rate)
        }
    );
    let started = Instant::now();
    let started_ms = now_ms();
    let interval = if a.rate == 0 {
        None
    } else {
        Some(Duration::from_secs_f64(1.0 / a.rate as f64))
    };
    let concurrency = if a.rate == 0 { a.concurrency } else { 4096 };
    let results: Vec<(String, i64, f64, u16)> = stream::iter(0..a.payments)
        .map(|i| {
            let api = api.clone();
            async move {
                if let Some(iv) = interval {
                    // Open loop: request i is due at i × interval, whatever came before.
                    let due = started + iv * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = now_ms();
                let t = Instant::now();
                let r = api
                    .create(&format!("bench-{i}"), 1000 + (i as i64 % 7) * 100, "EUR")
                    .await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                match r {
                    Ok(r) => (
                        r.body["id"].as_str().unwrap_or_default().to_owned(),
                        sent,
                        ms,
                        r.status,
                    ),
                    Err(_) => (String::new(), sent, ms, 0),
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let accepted: Vec<&(String, i64, f64, u16)> = results.iter().filter(|r| r.3 == 202).collect();
    let ids: Vec<String> = accepted.iter().map(|r| r.0.clone()).collect();
    // A cheap count while waiting (the database holds only this run's payments and the
    // warm-up one), so the waiting adds little load; then one read of every status.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut said = Instant::now();
    while Instant::now() < deadline {
        let n: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM payments WHERE status IN ('COMPLETED', 'FAILED', 'CANCELED')",
                &[],
            )
            .await?
            .get(0);
        if n as usize > ids.len() {
            break;
        }
        if said.elapsed() > Duration::from_secs(10) {
            said = Instant::now();
            let open = open_statuses(&pool).await?;
            eprintln!(
                "bench: waiting for {} of {} payments ({open})",
                ids.len() + 1 - n as usize,
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let statuses = testkit::client::wait_all_terminal(&pool, &ids, Duration::from_secs(60)).await?;
    let lost = ids.len() - statuses.len();

    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT payment_id, (extract(epoch FROM projected_at) * 1000)::int8 FROM payments WHERE payment_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let done: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut e2e: Vec<f64> = accepted
        .iter()
        .filter_map(|r| done.get(&r.0).map(|t| (*t - r.1) as f64))
        .collect();
    e2e.sort_by(f64::total_cmp);
    let mut post: Vec<f64> = results.iter().map(|r| r.2).collect();
    post.sort_by(f64::total_cmp);
    let last_done = done.values().copied().max().unwrap_or(started_ms);
    let elapsed_s = ((last_done - started_ms) as f64 / 1000.0).max(0.001);
    let throughput = ids.len() as f64 / elapsed_s;

    // The work the pipeline did: Kafka records moved and PostgreSQL rows written.
    let commands = stack.kafka.read_all(&stack.commands_topic())?;
    let events = stack.kafka.read_all(&stack.common.events_topic)?;
    let kafka_records = commands.len() + events.len();
    let avg_size = (commands
        .iter()
        .chain(events.iter())
        .map(|r| r.payload.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
        / kafka_records.max(1))
    .max(1);
    let pg_rows: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM payment_events) + (SELECT count(*) FROM payments)",
            &[],
        )
        .await?
        .get(0);
    let changelog_records = stack.kafka.read_all(
        &stack
            .common
            .topology
            .changelog_topic(&stack.commands_topic()),
    )?;
    let changelog = changelog_records.len();
    let mut by_store: BTreeMap<String, usize> = BTreeMap::new();
    for r in &changelog_records {
        let store = r
            .key
            .as_deref()
            .and_then(stores::store_of)
            .unwrap_or("?")
            .to_owned();
        *by_store.entry(store).or_default() += 1;
    }
    eprintln!("bench: changelog records by store (as many as the broker retains) {by_store:?}");
    let store_bytes = dir_bytes(&stack.worker_state)
        .with_context(|| format!("measuring {}", stack.worker_state.display()))?;
    eprintln!(
        "bench: worker stores on disk {:.0} MB, {:.2} KB per payment",
        store_bytes as f64 / 1e6,
        store_bytes as f64 / 1e3 / ids.len().max(1) as f64
    );
    eprintln!("bench: pipeline done in {elapsed_s:.1}s ({changelog} changelog records besides); measuring raw limits for {kafka_records} Kafka records of {avg_size} B and {pg_rows} rows");

    let event_bodies: Vec<String> = events
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(str::to_owned)
        .collect();
    let (raw_kafka, raw_pg) = match a.skip_raw {
        true => (f64::NAN, f64::NAN),
        false => (
            raw_kafka(&stack, kafka_records, avg_size).await?,
            raw_pg(&pool, pg_rows as usize, &event_bodies).await?,
        ),
    };
    // Records per payment from those the broker still holds: the mock cluster keeps the
    // last few MB of each partition, so a long run's early records are gone. Both topics
    // are keyed by payment.
    let retained_payments = commands
        .iter()
        .chain(events.iter())
        .filter_map(|r| r.key.as_deref())
        .collect::<HashSet<_>>()
        .len();
    let per_payment_kafka = kafka_records as f64 / retained_payments.max(1) as f64;
    let per_payment_pg = pg_rows as f64 / ids.len().max(1) as f64;
    // The raw-limit throughput for the same work, in payments per second: a payment's
    // Kafka records and its rows, one after the other on the same machine (each raw
    // measurement had the whole machine to itself, so their times add up).
    let raw_payments = 1.0 / (per_payment_kafka / raw_kafka + per_payment_pg / raw_pg);
    println!(
        "bench: payments={} throughput={:.0}/s post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0} raw_kafka_msgs_per_s={:.0} raw_pg_rows_per_s={:.0} ratio_to_raw={:.2} peak_rss_mb={:.0}",
        ids.len(),
        throughput,
        percentile(&post, 0.99),
        percentile(&e2e, 0.50),
        percentile(&e2e, 0.99),
        raw_kafka,
        raw_pg,
        throughput / raw_payments,
        peak_rss_mb(worker_pid),
    );
    eprintln!("bench: stages {}", stages());
    if std::env::var_os("BENCH_PG_STATEMENTS").is_some() {
        // Needs TESTKIT_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements".
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
        for r in c
            .query(
                "SELECT round(total_exec_time)::int8, calls, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 100)
                 FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 10",
                &[],
            )
            .await?
        {
            let (ms, calls, rows, q): (i64, i64, i64, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            eprintln!("bench: pg {ms:>7} ms {calls:>7} calls {rows:>7} rows  {q}");
        }
    }
    if lost > 0 || accepted.len() != results.len() {
        eprintln!(
            "bench: {} requests not accepted, {lost} payments not terminal",
            results.len() - accepted.len()
        );
    }
    stack.shutdown().await
}

/// How many payments are in each open status.
async fn open_statuses(pool: &sinks::Pool) -> anyhow::Result<String> {
    let rows = pool
        .get()
        .await?
        .query(
            "SELECT status, count(*) FROM payments WHERE status IN ('NEW', 'PROCESSING') GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| format!("{}={}", r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Bytes of the files below `dir`.
fn dir_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Where the time went, from the stack's own metrics (it runs in this process): mean
/// per observation and count of each stage's histogram.
fn stages() -> String {
    let wanted = [
        ("gateway_http_request_duration_seconds", "http"),
        ("gateway_task_batch_seconds", "worker_batch"),
        ("gateway_provider_request_duration_seconds", "provider_call"),
        ("gateway_projection_lag_seconds", "projection_lag"),
        ("gateway_projection_write_seconds", "projection_write"),
    ];
    let mut out = Vec::new();
    for family in prometheus::gather() {
        let Some((_, label)) = wanted.iter().find(|(n, _)| *n == family.name()) else {
            continue;
        };
        let (mut sum, mut count) = (0.0, 0u64);
        for m in family.get_metric() {
            let h = m.get_histogram();
            sum += h.get_sample_sum();
            count += h.get_sample_count();
        }
        out.push(format!(
            "{label}_mean_ms={:.1} {label}_n={count}",
            sum * 1000.0 / count.max(1) as f64
        ));
    }
    for family in prometheus::gather() {
        if family.name() != "gateway_task_stage_seconds" {
            continue;
        }
        for m in family.get_metric() {
            let stage = m
                .get_label()
                .iter()
                .find(|l| l.name() == "stage")
                .map_or("?", |l| l.value());
            let h = m.get_histogram();
            out.push(format!(
                "{stage}_mean_ms={:.1}",
                h.get_sample_sum() * 1000.0 / h.get_sample_count().max(1) as f64
            ));
        }
    }
    for family in prometheus::gather() {
        if matches!(
            family.name(),
            "gateway_projection_batches_total" | "gateway_commands_total" | "gateway_events_total"
        ) {
            let v: f64 = family
                .get_metric()
                .iter()
                .map(|m| m.get_counter().get_value())
                .sum();
            out.push(format!(
                "{}={v:.0}",
                family.name().trim_start_matches("gateway_")
            ));
        }
    }
    out.join(" ")
}

/// Produces `n` messages of `size` bytes to a fresh topic and consumes them back;
/// messages per second over both.
async fn raw_kafka(stack: &Stack, n: usize, size: usize) -> anyhow::Result<f64> {
    let topic = format!("raw-{}", uuid::Uuid::new_v4().simple());
    stack
        .kafka
        .create_topic(&topic, stack.opts.partitions)
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", stack.kafka.brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let payload = vec![b'x'; size];
    let t = Instant::now();
    let sends = (0..n).map(|i| {
        let p = producer.clone();
        let payload = &payload;
        let topic = &topic;
        async move {
            let key = format!("k{i}");
            p.send(
                FutureRecord::to(topic).key(&key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    });
    for r in stream::iter(sends)
        .buffer_unordered(10_000)
        .collect::<Vec<_>>()
        .await
    {
        r?;
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.kafka.brokers())
        .set("group.id", format!("raw-{}", uuid::Uuid::new_v4()))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..stack.opts.partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    tokio::task::block_in_place(|| {
        while got < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                got += usize::from(m.payload().is_some());
            }
        }
    });
    anyhow::ensure!(
        got == n,
        "raw consume read {got} of {n} messages in 5 minutes"
    );
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Inserts `n` rows like the projection's events (a logged table with the same columns
/// and indexes, the pipeline's own event JSON) in batches of 1,000 with `UNNEST`; rows
/// per second.
async fn raw_pg(pool: &sinks::Pool, n: usize, bodies: &[String]) -> anyhow::Result<f64> {
    anyhow::ensure!(!bodies.is_empty(), "no events to model the raw rows on");
    let c = pool.get().await?;
    let table = format!("raw_events_{}", uuid::Uuid::new_v4().simple());
    c.batch_execute(&format!(
        "CREATE TABLE {table} (LIKE payment_events INCLUDING ALL)"
    ))
    .await?;
    let insert = format!(
        "INSERT INTO {table} (payment_id, seq, type, occurred_at, caused_by, event, kafka_partition, kafka_offset)
         SELECT p, s, 'completed', now(), 'x', e::jsonb, 0, o FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[]) AS u(p, s, e, o)"
    );
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let k = (n - done).min(1000);
        let ids: Vec<String> = (done..done + k).map(|i| format!("pay_{i:032x}")).collect();
        let seqs: Vec<i64> = vec![1; k];
        let batch: Vec<&str> = (done..done + k)
            .map(|i| bodies[i % bodies.len()].as_str())
            .collect();
        let offs: Vec<i64> = (done as i64..(done + k) as i64).collect();
        c.execute(&insert, &[&ids, &seqs, &batch, &offs]).await?;
        done += k;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    c.batch_execute(&format!("DROP TABLE {table}")).await?;
    Ok(rate)
}
