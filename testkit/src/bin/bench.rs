//! `bench`: measures the whole pipeline (POST → terminal state committed in PostgreSQL)
//! beside this machine's raw limits for the same work, on the same broker and database.
//!
//! With no `--rate` it makes three runs, each on a fresh stack, and prints a line for each:
//!
//! - `bench:` maximum throughput, `--concurrency` clients as fast as they go, with the
//!   raw limits measured after it;
//! - `bench-half:` an open loop at half that throughput (the latency a service running
//!   at half its capacity gives);
//! - `bench-overload:` an open loop at twice it, refused creates not retried (what
//!   admission control makes of overload: fast answers, accepted work at capacity).
//!
//! `--rate R` makes one open-loop run at R payments/s and prints its `bench:` line.
//!
//! - e2e latency uses PostgreSQL's commit time of the terminal row (`projected_at`)
//!   against the client's send time, so polling adds nothing;
//! - raw limits, with warm clients (their start-up is not timed): librdkafka produce,
//!   then consume on two threads, of as many messages of the same size as the pipeline
//!   moved; and as many event rows as it wrote (same table shape, same JSON) by the
//!   faster of batched `UNNEST` inserts and `COPY ... FROM STDIN BINARY`.

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
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

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
    /// One open-loop run at this many payments per second; 0: one run as fast as
    /// `--concurrency` clients go. Without it: the maximum, half-load and overload runs.
    #[arg(long)]
    rate: Option<u64>,
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
    /// Leave out the raw-limit measurements.
    #[arg(long)]
    skip_raw: bool,
    /// Creates the API handles at once (`API_MAX_CREATES_IN_FLIGHT`; shipped: 256).
    #[arg(long, default_value_t = 256)]
    max_creates_in_flight: usize,
    /// Run the topology with `processing_guarantee = "exactly_once"` (shipped:
    /// `at_least_once`).
    #[arg(long)]
    exactly_once: bool,
    /// Extra librdkafka property for every client of the gateway, `key=value`
    /// (repeatable), e.g. `compression.type=none`.
    #[arg(long = "kafka-prop")]
    kafka_props: Vec<String>,
    /// The sink's writers (`SINK_WRITERS`; shipped: 2).
    #[arg(long, default_value_t = 2)]
    sink_writers: usize,
    /// With `--rate`: count refused creates instead of retrying them (as the overload
    /// run does).
    #[arg(long)]
    no_retry: bool,
}

fn exactly_once(t: &mut topology::config::TopologyFile) {
    t.processing_guarantee = topology::config::ProcessingGuarantee::ExactlyOnce;
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

/// One run's load: as fast as the clients go, or an open loop at a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Max,
    Open { rate: f64, retry_refused: bool },
}

/// What a run measured.
struct Run {
    offered: usize,
    accepted: usize,
    refused: usize,
    lost: usize,
    throughput: f64,
    post_p99_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    raw: Option<Raw>,
    peak_rss_mb: f64,
}

/// The machine's raw limits for the work a run did, in payments per second and parts.
struct Raw {
    kafka_msgs_per_s: f64,
    pg_rows_per_s: f64,
    payments_per_s: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // The stack's warnings (admission control refusing, a slow restore) on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Some(rate) = a.rate {
        let load = match rate {
            0 => Load::Max,
            r => Load::Open {
                rate: r as f64,
                retry_refused: !a.no_retry,
            },
        };
        let r = run(&a, load, a.payments, !a.skip_raw).await?;
        print_bench(&r);
        return ensure_none_lost(&r);
    }
    let max = run(&a, Load::Max, a.payments, !a.skip_raw).await?;
    print_bench(&max);
    ensure_none_lost(&max)?;
    let half_rate = (max.throughput / 2.0).max(1.0);
    let half = run(
        &a,
        Load::Open {
            rate: half_rate,
            retry_refused: true,
        },
        a.payments,
        false,
    )
    .await?;
    println!(
        "bench-half: offered={half_rate:.0}/s post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0}",
        half.post_p99_ms, half.e2e_p50_ms, half.e2e_p99_ms
    );
    ensure_none_lost(&half)?;
    // Twice the maximum, for as long as the maximum run took: twice its payments.
    let over_rate = max.throughput * 2.0;
    let over = run(
        &a,
        Load::Open {
            rate: over_rate,
            retry_refused: false,
        },
        a.payments * 2,
        false,
    )
    .await?;
    println!(
        "bench-overload: offered={over_rate:.0}/s accepted={:.0}/s refused={} post_p99_ms={:.1} e2e_p99_ms={:.0} lost={}",
        over.throughput, over.refused, over.post_p99_ms, over.e2e_p99_ms, over.lost
    );
    eprintln!(
        "bench: overload detail offered={} accepted={} accepted_to_max={:.2}",
        over.offered,
        over.accepted,
        over.throughput / max.throughput
    );
    ensure_none_lost(&over)
}

fn print_bench(r: &Run) {
    let raw = r.raw.as_ref();
    println!(
        "bench: payments={} throughput={:.0}/s post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0} raw_kafka_msgs_per_s={:.0} raw_pg_rows_per_s={:.0} ratio_to_raw={:.2} peak_rss_mb={:.0}",
        r.accepted,
        r.throughput,
        r.post_p99_ms,
        r.e2e_p50_ms,
        r.e2e_p99_ms,
        raw.map_or(f64::NAN, |x| x.kafka_msgs_per_s),
        raw.map_or(f64::NAN, |x| x.pg_rows_per_s),
        raw.map_or(f64::NAN, |x| r.throughput / x.payments_per_s),
        r.peak_rss_mb,
    );
}

fn ensure_none_lost(r: &Run) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.lost == 0,
        "{} accepted payments did not reach a terminal state",
        r.lost
    );
    Ok(())
}

/// Sends `payments` creates to a fresh stack under `load`, waits for every accepted one
/// to be terminal in PostgreSQL, and measures; with `raw`, then the raw limits.
async fn run(a: &Args, load: Load, payments: usize, raw: bool) -> anyhow::Result<Run> {
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
        max_creates_in_flight: a.max_creates_in_flight,
        edit_topology: a.exactly_once.then_some(exactly_once as fn(&mut _)),
        kafka_props: gateway::parse_kafka_props(&a.kafka_props)?,
        sink_writers: a.sink_writers,
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
        "bench: sending {payments} payments ({})",
        match load {
            Load::Max => format!("max, {} clients", a.concurrency),
            Load::Open { rate, .. } => format!("{rate:.0}/s open loop"),
        }
    );
    let started = Instant::now();
    let started_ms = now_ms();
    let (interval, concurrency, retry_refused) = match load {
        Load::Max => (None, a.concurrency, true),
        Load::Open {
            rate,
            retry_refused,
        } => (
            Some(Duration::from_secs_f64(1.0 / rate)),
            4096,
            retry_refused,
        ),
    };
    let results: Vec<(String, i64, f64, u16)> = stream::iter(0..payments)
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
                let key = format!("bench-{i}");
                let amount = 1000 + (i as i64 % 7) * 100;
                let mut r = api.create(&key, amount, "EUR").await;
                // Refused by admission control: retried after `Retry-After` with the
                // same key, as a client does (not in the overload run, which counts them).
                while let Ok(refused) = &r {
                    if !retry_refused || refused.status != 503 {
                        break;
                    }
                    let after = testkit::client::retry_after(&refused.headers).unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(after)).await;
                    r = api.create(&key, amount, "EUR").await;
                }
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
    let post_of = |keep: &dyn Fn(u16) -> bool| {
        let mut v: Vec<f64> = results.iter().filter(|r| keep(r.3)).map(|r| r.2).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let post = post_of(&|_| true);
    let last_done = done.values().copied().max().unwrap_or(started_ms);
    let elapsed_s = ((last_done - started_ms) as f64 / 1000.0).max(0.001);
    let throughput = ids.len() as f64 / elapsed_s;

    // The work the pipeline did: Kafka records moved (commands, events and merchant
    // notifications) and PostgreSQL rows written (events, payments, notifications).
    let commands = stack.kafka.read_all(&stack.commands_topic())?;
    let events = stack.kafka.read_all(&stack.common.events_topic)?;
    let notifications = match stack.common.topology.notifications_topic() {
        Some(t) => stack.kafka.read_all(&t)?,
        None => Vec::new(),
    };
    let moved = || commands.iter().chain(&events).chain(&notifications);
    let kafka_records = moved().count();
    let avg_size = (moved()
        .map(|r| r.payload.as_ref().map_or(0, Vec::len))
        .sum::<usize>()
        / kafka_records.max(1))
    .max(1);
    let pg_rows: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM payment_events) + (SELECT count(*) FROM payments)
                    + (SELECT count(*) FROM webhook_deliveries)",
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
    // Before the raw runs, whose own buffers would count in the process's peak.
    let peak_rss_mb = peak_rss_mb(worker_pid);
    eprintln!("bench: pipeline done in {elapsed_s:.1}s ({changelog} changelog records besides); measuring raw limits for {kafka_records} Kafka records of {avg_size} B and {pg_rows} rows");

    let event_bodies: Vec<String> = events
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .filter_map(|p| std::str::from_utf8(p).ok())
        .map(str::to_owned)
        .collect();
    let raw = if raw {
        let kafka = raw_kafka(&stack, kafka_records, avg_size).await?;
        let pg = raw_pg(&pool, pg_rows as usize, &event_bodies).await?;
        // Records per payment, topic by topic (every topic is keyed by payment).
        let per_payment_kafka: f64 = [&commands, &events, &notifications]
            .iter()
            .filter(|records| !records.is_empty())
            .map(|records| {
                let payments = records
                    .iter()
                    .filter_map(|r| r.key.as_deref())
                    .collect::<HashSet<_>>()
                    .len();
                records.len() as f64 / payments.max(1) as f64
            })
            .sum();
        let per_payment_pg = pg_rows as f64 / ids.len().max(1) as f64;
        // A payment's Kafka records and its rows, one after the other on the same machine
        // (each raw measurement had the whole machine to itself, so their times add up).
        Some(Raw {
            kafka_msgs_per_s: kafka,
            pg_rows_per_s: pg,
            payments_per_s: 1.0 / (per_payment_kafka / kafka + per_payment_pg / pg),
        })
    } else {
        None
    };
    if raw.is_some() {
        // The stack's metrics are the process's: this is the first run's split.
        eprintln!("bench: stages {}", stages());
    }
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
    let refused = results.iter().filter(|r| r.3 == 503).count();
    if lost > 0 || accepted.len() + refused != results.len() {
        eprintln!(
            "bench: {} requests neither accepted nor refused, {lost} payments not terminal",
            results.len() - accepted.len() - refused
        );
    }
    let run = Run {
        offered: results.len(),
        accepted: accepted.len(),
        refused,
        lost,
        throughput,
        post_p99_ms: percentile(&post, 0.99),
        e2e_p50_ms: percentile(&e2e, 0.50),
        e2e_p99_ms: percentile(&e2e, 0.99),
        raw,
        peak_rss_mb,
    };
    eprintln!(
        "bench: post detail p50_ms={:.1} p99_ms={:.1} accepted_p99_ms={:.1} refused_p99_ms={:.1}",
        percentile(&post, 0.50),
        run.post_p99_ms,
        percentile(&post_of(&|s| s == 202), 0.99),
        percentile(&post_of(&|s| s == 503), 0.99),
    );
    stack.shutdown().await?;
    Ok(run)
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

/// Produces `n` messages of `size` bytes to a fresh topic and consumes them back, with
/// clients that are connected and have moved a first batch before the clock starts;
/// messages per second over both (their times added).
async fn raw_kafka(stack: &Stack, n: usize, size: usize) -> anyhow::Result<f64> {
    let topic = format!("raw-{}", uuid::Uuid::new_v4().simple());
    let warm = (n / 20).clamp(100, 5_000);
    let partitions = stack.opts.partitions;
    stack.kafka.create_topic(&topic, partitions).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", stack.kafka.brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let payload = vec![b'x'; size];
    let produce = |from: usize, to: usize| {
        let sends = (from..to).map(|i| {
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
        stream::iter(sends)
            .buffer_unordered(10_000)
            .collect::<Vec<_>>()
    };
    // Warm-up: connections, metadata, the idempotent producer's id.
    for r in produce(0, warm).await {
        r?;
    }
    let t = Instant::now();
    for r in produce(warm, warm + n).await {
        r?;
    }
    let produce_s = t.elapsed().as_secs_f64();
    // Consumers on two threads (the machine's cores), each with half of the partitions,
    // connected and past the warm-up records before the clock starts.
    let threads = 2.min(partitions.max(1));
    let mut consumers = Vec::new();
    for c in 0..threads {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", stack.kafka.brokers())
            .set("group.id", format!("raw-{}", uuid::Uuid::new_v4()))
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mine: Vec<i32> = (0..partitions).filter(|p| p % threads == c).collect();
        for p in &mine {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        consumers.push(consumer);
    }
    let total = warm + n;
    let warm_seen: usize = tokio::task::block_in_place(|| {
        consumers
            .iter()
            .map(|c| {
                // Until the first record arrives: the fetch pipeline is running.
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut got = 0;
                while got == 0 && Instant::now() < deadline {
                    if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                        got += usize::from(m.payload().is_some());
                    }
                }
                got
            })
            .sum()
    });
    let t = Instant::now();
    let (got, last): (usize, Option<Instant>) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = consumers
                .iter()
                .map(|c| {
                    scope.spawn(move || {
                        let deadline = Instant::now() + Duration::from_secs(300);
                        let (mut got, mut last) = (0, None);
                        // Until its partitions have had nothing more for half a second
                        // (keys hash unevenly, so a thread's share is not known).
                        let mut idle = 0;
                        while Instant::now() < deadline && idle < 5 {
                            match c.poll(Duration::from_millis(100)) {
                                Some(Ok(m)) => {
                                    got += usize::from(m.payload().is_some());
                                    last = Some(Instant::now());
                                    idle = 0;
                                }
                                None => idle += 1,
                                Some(Err(_)) => {}
                            }
                        }
                        (got, last)
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .fold((0, None), |(n, l), (g, last)| (n + g, l.max(last)))
        })
    });
    // Up to the last record read: the idle polls that end each thread are not consuming.
    let consume_s = last.map_or(f64::NAN, |l| l.duration_since(t).as_secs_f64().max(0.001));
    anyhow::ensure!(
        got + warm_seen == total,
        "raw consume read {} of {total} messages",
        got + warm_seen
    );
    let (produced, consumed) = (n as f64 / produce_s, got as f64 / consume_s);
    eprintln!(
        "bench: raw kafka produce_per_s={produced:.0} consume_per_s={consumed:.0} (warm clients, consume on {threads} threads)"
    );
    Ok(1.0 / (1.0 / produced + 1.0 / consumed))
}

/// JSON text sent as `jsonb` in binary (a version byte, then the text), as the server
/// parses it anyway: no client-side parse.
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl ToSql for JsonbText<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// Writes `n` rows like the projection's events (a logged table with the same columns
/// and indexes, the pipeline's own event JSON) by batched `UNNEST` inserts of 1,000 rows
/// and by `COPY ... FROM STDIN BINARY` of 10,000, each into a fresh table; rows per
/// second of the faster.
async fn raw_pg(pool: &sinks::Pool, n: usize, bodies: &[String]) -> anyhow::Result<f64> {
    anyhow::ensure!(!bodies.is_empty(), "no events to model the raw rows on");
    let c = pool.get().await?;
    let fresh_table = || async {
        let table = format!("raw_events_{}", uuid::Uuid::new_v4().simple());
        c.batch_execute(&format!(
            "CREATE TABLE {table} (LIKE payment_events INCLUDING ALL)"
        ))
        .await
        .map(|_| table)
    };
    let body = |i: usize| bodies[i % bodies.len()].as_str();

    let table = fresh_table().await?;
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
        let batch: Vec<&str> = (done..done + k).map(body).collect();
        let offs: Vec<i64> = (done as i64..(done + k) as i64).collect();
        c.execute(&insert, &[&ids, &seqs, &batch, &offs]).await?;
        done += k;
    }
    let unnest = n as f64 / t.elapsed().as_secs_f64();
    c.batch_execute(&format!("DROP TABLE {table}")).await?;

    let table = fresh_table().await?;
    let copy = format!(
        "COPY {table} (payment_id, seq, type, occurred_at, caused_by, event, kafka_partition, kafka_offset) FROM STDIN BINARY"
    );
    let types = [
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::JSONB,
        Type::INT4,
        Type::INT8,
    ];
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let k = (n - done).min(10_000);
        let sink = c.copy_in(&copy).await?;
        let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
        futures::pin_mut!(writer);
        let now = std::time::SystemTime::now();
        for i in done..done + k {
            let id = format!("pay_{i:032x}");
            let row: [&(dyn ToSql + Sync); 8] = [
                &id,
                &1i64,
                &"completed",
                &now,
                &"x",
                &JsonbText(body(i)),
                &0i32,
                &(i as i64),
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await?;
        done += k;
    }
    let copied = n as f64 / t.elapsed().as_secs_f64();
    c.batch_execute(&format!("DROP TABLE {table}")).await?;
    eprintln!("bench: raw pg unnest_rows_per_s={unnest:.0} copy_binary_rows_per_s={copied:.0}");
    Ok(unnest.max(copied))
}
