//! `bench`: measures the whole pipeline (POST → terminal state committed in PostgreSQL)
//! beside this machine's raw limits for the same work, on the same broker and database,
//! and what a payment costs in CPU, process by process.
//!
//! The system under test runs as deployed, every role a process of its own
//! ([`testkit::procstack`]: the API, the worker, the sink, the notifier and the provider
//! simulator) on the test kit's Apache Kafka node and PostgreSQL. Unless `--no-pin`, the
//! load generator (this process) runs on CPU 0 and the system under test on the other
//! CPUs, so that the client's work neither slows what it measures nor is charged to it;
//! the raw limits run on the system's CPUs too.
//!
//! With no `--rate` it makes four runs, each on a fresh stack (new topics and database;
//! the one broker serves all), and prints a line for each:
//!
//! - `bench:` maximum throughput, `--concurrency` clients as fast as they go, with the
//!   raw limits measured after it;
//! - `bench-half:` an open loop at half that throughput (the latency a service running
//!   at half its capacity gives);
//! - `bench-overload:` an open loop at twice it, refused creates not retried (what
//!   admission control makes of overload: fast answers, accepted work at capacity);
//! - `bench-fifth:` an open loop at a fifth of it, where a service spends most of its
//!   day;
//!
//! and after each, `bench-cost:` the CPU time per payment of every process of the system
//! under test (`/proc/<pid>/stat`, from the first create sent to the last payment
//! terminal), and of the generator apart.
//!
//! `--rate R` makes one open-loop run at R payments/s and prints its `bench:` and
//! `bench-cost:` lines.
//!
//! - e2e latency uses PostgreSQL's commit time of the terminal row (`projected_at`)
//!   against the client's send time, so polling adds nothing;
//! - raw limits, with warm clients (their start-up is not timed): librdkafka produce,
//!   then consume on two threads, of as many records of the same mean size as the
//!   pipeline wrote to every topic (commands, events, notifications, changelog); and as
//!   many rows as it wrote, updated or deleted (`pg_stat_user_tables`), as event rows
//!   (same table shape, same JSON) by the faster of batched `UNNEST` inserts and
//!   `COPY ... FROM STDIN BINARY`.

use anyhow::Context;
use clap::Parser;
use futures::stream::{self, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use telemetry::now_ms;
use testkit::client::Api;
use testkit::cpu;
use testkit::kafka::Kafka;
use testkit::procstack::{ProcessOptions, ProcessStack};
use testkit::stack::DEMO_KEY;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Throughput, latency and CPU per payment of the payment pipeline beside the machine's raw limits"
)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    payments: usize,
    /// One open-loop run at this many payments per second; 0: one run as fast as
    /// `--concurrency` clients go. Without it: the maximum, half-load, overload and
    /// fifth-load runs.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Print the resident memory of the worker every N seconds.
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
    /// Leave the generator and the system under test on every CPU (by default the
    /// generator runs on CPU 0, the system on the others).
    #[arg(long)]
    no_pin: bool,
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
fn memory_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One run's load: as fast as the clients go, or an open loop at a rate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Max,
    Open { rate: f64, retry_refused: bool },
}

/// Where the generator and the system under test run.
#[derive(Debug, Clone)]
enum Pinning {
    /// Everything on every CPU, and why.
    Off(&'static str),
    On {
        generator: usize,
        system: Vec<usize>,
    },
}

impl Pinning {
    fn choose(wanted: bool) -> Pinning {
        match (wanted, cpu::online_cpus()) {
            (false, _) => Pinning::Off("off"),
            (true, 1) => Pinning::Off("off(one-cpu)"),
            (true, n) => Pinning::On {
                generator: 0,
                system: (1..n).collect(),
            },
        }
    }

    /// As the `bench:` line says it: `generator:0,system:1` (or `1-3`), or `off`.
    fn describe(&self) -> String {
        match self {
            Pinning::Off(why) => (*why).to_owned(),
            Pinning::On { generator, system } => {
                let system = match (system.first(), system.last()) {
                    (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
                    (Some(a), _) => a.to_string(),
                    _ => "none".to_owned(),
                };
                format!("generator:{generator},system:{system}")
            }
        }
    }

    /// The CPUs the raw limits run on (the system's), or `None` when not pinned.
    fn system(&self) -> Option<&[usize]> {
        match self {
            Pinning::On { system, .. } => Some(system),
            Pinning::Off(_) => None,
        }
    }

    /// Moves this process's threads to the generator's CPU and every process of the
    /// system under test, with its threads and children, to the system's. Threads
    /// started later inherit their starter's CPUs.
    fn apply(&self, sut: &[(String, u32)]) -> anyhow::Result<()> {
        let Pinning::On { generator, system } = self else {
            return Ok(());
        };
        cpu::pin_process(std::process::id(), &[*generator])?;
        for (name, pid) in sut {
            cpu::pin_tree(*pid, system).with_context(|| format!("pinning the {name}"))?;
        }
        Ok(())
    }
}

/// The components of the system under test, as `bench-cost:` names them.
const COMPONENTS: [&str; 7] = ["worker", "broker", "pg", "api", "sink", "notifier", "sim"];

/// The processes of the system under test, by component: the stack's roles, the
/// broker's node and PostgreSQL's postmaster (its backends are its children).
fn system_processes(stack: &ProcessStack) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = stack
        .pids()
        .into_iter()
        .map(|(role, pid)| (role.replace("provider-", ""), pid))
        .collect();
    out.extend(
        stack
            .kafka
            .pids()
            .into_iter()
            .map(|p| ("broker".to_owned(), p)),
    );
    if let Some(pid) = testkit::pg::server().ok().and_then(|s| s.pid()) {
        out.push(("pg".to_owned(), pid));
    }
    out
}

/// CPU time used from `start` to `finish`, per component and by the generator.
struct CpuMeter {
    from: Vec<(String, u32, u64)>,
    generator_from: u64,
    at: Instant,
}

/// What a run cost: CPU milliseconds per payment, by component.
struct Cost {
    by_component: BTreeMap<String, f64>,
    generator: f64,
    total: f64,
    /// The system's CPU time over the run's wall time: how many of its CPUs it kept busy.
    busy_cpus: f64,
}

impl CpuMeter {
    fn start(processes: Vec<(String, u32)>) -> CpuMeter {
        CpuMeter {
            from: processes
                .into_iter()
                .map(|(n, pid)| {
                    let t = cpu::tree_ticks(pid).unwrap_or(0);
                    (n, pid, t)
                })
                .collect(),
            generator_from: cpu::own_ticks(std::process::id()).unwrap_or(0),
            at: Instant::now(),
        }
    }

    fn finish(&self, payments: usize) -> Cost {
        let per_payment =
            |ticks: u64| ticks as f64 / cpu::ticks_per_second() * 1000.0 / payments.max(1) as f64;
        let mut by_component = BTreeMap::new();
        let mut ticks = 0;
        for (name, pid, from) in &self.from {
            // A process gone by now (none should be) counts what it had until then as 0.
            let used = cpu::tree_ticks(*pid).unwrap_or(*from).saturating_sub(*from);
            ticks += used;
            *by_component.entry(name.clone()).or_insert(0.0) += per_payment(used);
        }
        let generator = cpu::own_ticks(std::process::id())
            .unwrap_or(self.generator_from)
            .saturating_sub(self.generator_from);
        Cost {
            by_component,
            generator: per_payment(generator),
            total: per_payment(ticks),
            busy_cpus: ticks as f64
                / cpu::ticks_per_second()
                / self.at.elapsed().as_secs_f64().max(0.001),
        }
    }
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
    cost: Cost,
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
    // The harness's own warnings on stderr (the roles log to files of their own).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let pinning = Pinning::choose(!a.no_pin);
    if let Some(rate) = a.rate {
        let (load, label) = match rate {
            0 => (Load::Max, "max".to_owned()),
            r => (
                Load::Open {
                    rate: r as f64,
                    retry_refused: !a.no_retry,
                },
                format!("{r}/s"),
            ),
        };
        let r = run(&a, load, a.payments, !a.skip_raw, &pinning).await?;
        print_bench(&r, &pinning);
        print_cost(&label, &r);
        return ensure_none_lost(&r);
    }
    let max = run(&a, Load::Max, a.payments, !a.skip_raw, &pinning).await?;
    print_bench(&max, &pinning);
    print_cost("max", &max);
    ensure_none_lost(&max)?;
    let open = |fraction: f64, retry_refused| Load::Open {
        rate: (max.throughput * fraction).max(1.0),
        retry_refused,
    };
    let half = run(&a, open(0.5, true), a.payments, false, &pinning).await?;
    print_open("bench-half", max.throughput * 0.5, &half);
    print_cost("0.5", &half);
    ensure_none_lost(&half)?;
    // Twice the maximum, for as long as the maximum run took: twice its payments.
    let over_rate = max.throughput * 2.0;
    let over = run(&a, open(2.0, false), a.payments * 2, false, &pinning).await?;
    println!(
        "bench-overload: offered={over_rate:.0}/s accepted={:.0}/s refused={} post_p99_ms={:.1} e2e_p99_ms={:.0} lost={}",
        over.throughput, over.refused, over.post_p99_ms, over.e2e_p99_ms, over.lost
    );
    print_cost("2", &over);
    eprintln!(
        "bench: overload detail offered={} accepted={} accepted_to_max={:.2}",
        over.offered,
        over.accepted,
        over.throughput / max.throughput
    );
    ensure_none_lost(&over)?;
    let fifth = run(&a, open(0.2, true), a.payments, false, &pinning).await?;
    print_open("bench-fifth", max.throughput * 0.2, &fifth);
    print_cost("0.2", &fifth);
    eprintln!(
        "bench: cpu per payment at a fifth of the maximum over at the maximum: {:.2}",
        fifth.cost.total / max.cost.total
    );
    ensure_none_lost(&fifth)
}

fn print_bench(r: &Run, pinning: &Pinning) {
    let raw = r.raw.as_ref();
    println!(
        "bench: payments={} throughput={:.0}/s post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0} raw_kafka_msgs_per_s={:.0} raw_pg_rows_per_s={:.0} ratio_to_raw={:.2} peak_rss_mb={:.0} pinning={}",
        r.accepted,
        r.throughput,
        r.post_p99_ms,
        r.e2e_p50_ms,
        r.e2e_p99_ms,
        raw.map_or(f64::NAN, |x| x.kafka_msgs_per_s),
        raw.map_or(f64::NAN, |x| x.pg_rows_per_s),
        raw.map_or(f64::NAN, |x| r.throughput / x.payments_per_s),
        r.peak_rss_mb,
        pinning.describe(),
    );
}

fn print_open(name: &str, offered: f64, r: &Run) {
    println!(
        "{name}: offered={offered:.0}/s post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0}",
        r.post_p99_ms, r.e2e_p50_ms, r.e2e_p99_ms
    );
}

fn print_cost(load: &str, r: &Run) {
    let c = &r.cost;
    let parts: Vec<String> = COMPONENTS
        .iter()
        .map(|name| match c.by_component.get(*name) {
            Some(ms) => format!("{name}={ms:.3}"),
            None => format!("{name}=-"),
        })
        .collect();
    println!(
        "bench-cost: load={load} payments_per_s={:.0} cpu_ms_per_payment={:.3} {} generator={:.3} busy_cpus={:.2}",
        r.throughput,
        c.total,
        parts.join(" "),
        c.generator,
        c.busy_cpus,
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

fn process_options(a: &Args) -> anyhow::Result<ProcessOptions> {
    Ok(ProcessOptions {
        partitions: a.partitions,
        // The payment policy as shipped (the tests' default has short timeouts).
        policy: testkit::stack::SHIPPED_POLICY.into(),
        edit_topology: a.exactly_once.then_some(exactly_once as fn(&mut _)),
        store_cache_mb: a.store_cache_mb,
        max_creates_in_flight: a.max_creates_in_flight,
        kafka_props: gateway::parse_kafka_props(&a.kafka_props)?,
        sink_writers: a.sink_writers,
    })
}

/// Sends `payments` creates to a fresh stack under `load`, waits for every accepted one
/// to be terminal in PostgreSQL, and measures; with `raw`, then the raw limits. A run
/// that fails keeps the roles' logs.
async fn run(
    a: &Args,
    load: Load,
    payments: usize,
    raw: bool,
    pinning: &Pinning,
) -> anyhow::Result<Run> {
    let mut stack = ProcessStack::start(&process_options(a)?).await?;
    let run = measure(a, load, payments, raw, pinning, &mut stack).await;
    if run.is_err() {
        let logs = stack.keep_logs();
        eprintln!(
            "bench: the run failed; the roles' logs are kept in {}",
            logs.display()
        );
    }
    // The run's own error first, if it has one.
    let stopped = stack.shutdown().await;
    let run = run?;
    stopped?;
    Ok(run)
}

/// One answer to a create: the payment id (when accepted), the client's send time (ms
/// since the epoch), the request's latency in ms (its retries included) and the status
/// (0: no answer).
struct Answer {
    id: String,
    sent_ms: i64,
    ms: f64,
    status: u16,
}

async fn measure(
    a: &Args,
    load: Load,
    payments: usize,
    raw: bool,
    pinning: &Pinning,
    stack: &mut ProcessStack,
) -> anyhow::Result<Run> {
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await?;
    // Warm up: consumer groups joined, connections open.
    let w = api.create("warmup", 1000, "EUR").await?;
    let wid = w.body["id"].as_str().unwrap_or_default().to_owned();
    api.wait_for_status(&wid, &["COMPLETED"], Duration::from_secs(60))
        .await?;
    let system = system_processes(stack);
    pinning.apply(&system)?;
    if a.memory_every_s > 0 {
        report_memory(Duration::from_secs(a.memory_every_s), stack.pid("worker"));
    }
    eprintln!(
        "bench: sending {payments} payments ({}; pinning {})",
        match load {
            Load::Max => format!("max, {} clients", a.concurrency),
            Load::Open { rate, .. } => format!("{rate:.0}/s open loop"),
        },
        pinning.describe()
    );
    let started_ms = now_ms();
    let meter = CpuMeter::start(system);
    let answers = send(&api, load, payments, a.concurrency).await;
    let ids: Vec<String> = answers
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| r.id.clone())
        .collect();
    let lost = wait_terminal(&pool, &ids).await?;
    let cost = meter.finish(ids.len());
    stack.ensure_running()?;

    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT payment_id, (extract(epoch FROM projected_at) * 1000)::int8 FROM payments WHERE payment_id = ANY($1)",
            &[&ids],
        )
        .await?;
    let done: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut e2e: Vec<f64> = answers
        .iter()
        .filter(|r| r.status == 202)
        .filter_map(|r| done.get(&r.id).map(|t| (*t - r.sent_ms) as f64))
        .collect();
    e2e.sort_by(f64::total_cmp);
    let post_of = |keep: &dyn Fn(u16) -> bool| {
        let mut v: Vec<f64> = answers
            .iter()
            .filter(|r| keep(r.status))
            .map(|r| r.ms)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let post = post_of(&|_| true);
    let last_done = done.values().copied().max().unwrap_or(started_ms);
    let elapsed_s = ((last_done - started_ms) as f64 / 1000.0).max(0.001);
    let throughput = ids.len() as f64 / elapsed_s;

    let work = work_done(stack, &c).await?;
    let store_bytes = dir_bytes(&stack.worker_state)
        .with_context(|| format!("measuring {}", stack.worker_state.display()))?;
    eprintln!(
        "bench: worker stores on disk {:.0} MB, {:.2} KB per payment",
        store_bytes as f64 / 1e6,
        store_bytes as f64 / 1e3 / ids.len().max(1) as f64
    );
    // Before the raw runs; the broker's and PostgreSQL's are not in it.
    let peak_rss_mb = ["api", "worker", "sink", "notifier"]
        .iter()
        .filter_map(|role| stack.pid(role))
        .map(|pid| memory_mb(pid, "VmHWM:"))
        .fold(0.0, f64::max);
    eprintln!(
        "bench: pipeline done in {elapsed_s:.1}s; its work: {} Kafka records of {} B on average ({:.1} a payment), {} row writes ({:.1} a payment)",
        work.kafka_records,
        work.avg_size,
        work.kafka_records as f64 / ids.len().max(1) as f64,
        work.row_writes,
        work.row_writes as f64 / ids.len().max(1) as f64,
    );
    let raw = match raw {
        true => Some(raw_limits(stack, &work, ids.len(), pinning.system())?),
        false => None,
    };
    if raw.is_some() {
        eprintln!("bench: stages {}", stages(&stack.metrics().await));
    }
    if std::env::var_os("BENCH_PG_STATEMENTS").is_some() {
        pg_statements(&c).await?;
    }
    let refused = answers.iter().filter(|r| r.status == 503).count();
    if lost > 0 || ids.len() + refused != answers.len() {
        eprintln!(
            "bench: {} requests neither accepted nor refused, {lost} payments not terminal",
            answers.len() - ids.len() - refused
        );
    }
    let run = Run {
        offered: answers.len(),
        accepted: ids.len(),
        refused,
        lost,
        throughput,
        post_p99_ms: percentile(&post, 0.99),
        e2e_p50_ms: percentile(&e2e, 0.50),
        e2e_p99_ms: percentile(&e2e, 0.99),
        raw,
        peak_rss_mb,
        cost,
    };
    eprintln!(
        "bench: post detail p50_ms={:.1} p99_ms={:.1} accepted_p99_ms={:.1} refused_p99_ms={:.1}",
        percentile(&post, 0.50),
        run.post_p99_ms,
        percentile(&post_of(&|s| s == 202), 0.99),
        percentile(&post_of(&|s| s == 503), 0.99),
    );
    Ok(run)
}

/// Prints the worker's resident memory every `every`, for as long as it runs.
fn report_memory(every: Duration, worker: Option<u32>) {
    tokio::spawn(async move {
        let t = Instant::now();
        while let Some(pid) = worker {
            tokio::time::sleep(every).await;
            let rss = memory_mb(pid, "VmRSS:");
            if rss.is_nan() {
                break;
            }
            eprintln!(
                "bench: memory t={}s worker_rss_mb={rss:.0}",
                t.elapsed().as_secs()
            );
        }
    });
}

/// Sends `payments` creates: as fast as `concurrency` clients go, or on an open loop
/// (request i due at i / rate, whatever came before). A refused create is retried after
/// `Retry-After` with the same key, as a client does, unless the load says to count it.
async fn send(api: &Api, load: Load, payments: usize, concurrency: usize) -> Vec<Answer> {
    let started = Instant::now();
    let (interval, concurrency, retry_refused) = match load {
        Load::Max => (None, concurrency, true),
        Load::Open {
            rate,
            retry_refused,
        } => (
            Some(Duration::from_secs_f64(1.0 / rate)),
            4096,
            retry_refused,
        ),
    };
    stream::iter(0..payments)
        .map(|i| {
            let api = api.clone();
            async move {
                if let Some(iv) = interval {
                    let due = started + iv * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent_ms = now_ms();
                let t = Instant::now();
                let key = format!("bench-{i}");
                let amount = 1000 + (i as i64 % 7) * 100;
                let mut r = api.create(&key, amount, "EUR").await;
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
                    Ok(r) => Answer {
                        id: r.body["id"].as_str().unwrap_or_default().to_owned(),
                        sent_ms,
                        ms,
                        status: r.status,
                    },
                    Err(_) => Answer {
                        id: String::new(),
                        sent_ms,
                        ms,
                        status: 0,
                    },
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Waits, up to 30 minutes, until every accepted payment is terminal in PostgreSQL;
/// returns how many are not.
async fn wait_terminal(pool: &sinks::Pool, ids: &[String]) -> anyhow::Result<usize> {
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
            let open = open_statuses(pool).await?;
            eprintln!(
                "bench: waiting for {} of {} payments ({open})",
                ids.len() + 1 - n as usize,
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let statuses = testkit::client::wait_all_terminal(pool, ids, Duration::from_secs(60)).await?;
    Ok(ids.len() - statuses.len())
}

/// The work a run made: the records of every topic it wrote and their mean size, and
/// the rows it inserted, updated or deleted.
struct Work {
    kafka_records: usize,
    avg_size: usize,
    row_writes: i64,
    event_bodies: Vec<String>,
}

async fn work_done(stack: &ProcessStack, c: &deadpool_postgres::Object) -> anyhow::Result<Work> {
    let d = &stack.deployment;
    // The events are read once: counted, and kept as the raw rows' JSON.
    let events = stack.kafka.read_all(&d.events)?;
    let event_bodies = events
        .iter()
        .filter_map(|r| {
            std::str::from_utf8(r.payload.as_deref()?)
                .ok()
                .map(str::to_owned)
        })
        .collect();
    let mut records = events;
    for t in std::iter::once(d.commands.clone()).chain(d.topology.notifications_topic()) {
        records.extend(stack.kafka.read_all(&t)?);
    }
    // The changelog is compacted as the run goes: its records are counted by offset
    // (under exactly-once a transaction's commit marker takes one too), its sizes and
    // stores read from what the broker still holds.
    let changelog_topic = d.topology.changelog_topic(&d.commands);
    let changelog = stack.kafka.read_all(&changelog_topic)?;
    let changelog_written: i64 = stack
        .kafka
        .extents(&changelog_topic, false)?
        .values()
        .map(|(_, high)| *high)
        .sum();
    let mut by_store: BTreeMap<String, usize> = BTreeMap::new();
    for r in &changelog {
        let store = r.key.as_deref().and_then(stores::store_of).unwrap_or("?");
        *by_store.entry(store.to_owned()).or_default() += 1;
    }
    eprintln!(
        "bench: changelog {changelog_written} records written, {} still held, by store {by_store:?}",
        changelog.len()
    );
    let size = |r: &testkit::kafka::TopicRecord| r.payload.as_ref().map_or(0, Vec::len);
    let held = records.len() + changelog.len();
    let avg_size = (records.iter().chain(&changelog).map(size).sum::<usize>() / held.max(1)).max(1);
    Ok(Work {
        kafka_records: records.len() + changelog_written as usize,
        avg_size,
        row_writes: row_writes(c).await?,
        event_bodies,
    })
}

/// The rows inserted, updated and deleted in this database, once the statistics have
/// stopped moving: an idle backend reports its counts up to 10 s after its last
/// transaction (PostgreSQL's idle report interval), so the count must hold for longer
/// than that (at most a minute in all).
async fn row_writes(c: &deadpool_postgres::Object) -> anyhow::Result<i64> {
    let read = || async {
        c.query_one(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::int8 FROM pg_stat_user_tables",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
    };
    let started = Instant::now();
    let mut last = read().await?;
    let mut held_since = Instant::now();
    while held_since.elapsed() < Duration::from_secs(12)
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = read().await?;
        if now != last {
            (last, held_since) = (now, Instant::now());
        }
    }
    Ok(last)
}

/// The raw limits for a run's work, on `cpus` (the system's) when pinned: a thread of
/// their own with a runtime of its own, whose clients' threads inherit its CPUs.
fn raw_limits(
    stack: &ProcessStack,
    work: &Work,
    payments: usize,
    cpus: Option<&[usize]>,
) -> anyhow::Result<Raw> {
    let partitions = stack.partitions;
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(cpus) = cpus {
                        cpu::pin_thread(0, cpus)?;
                    }
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let kafka =
                            raw_kafka(&stack.kafka, partitions, work.kafka_records, work.avg_size)
                                .await?;
                        let pool = stack.pool().await?;
                        let pg =
                            raw_pg(&pool, work.row_writes as usize, &work.event_bodies).await?;
                        // A payment's records and rows, one after the other on the same
                        // CPUs (each raw measurement had them to itself: times add up).
                        let payments = payments.max(1) as f64;
                        let per_kafka = work.kafka_records as f64 / payments;
                        let per_pg = work.row_writes as f64 / payments;
                        anyhow::Ok(Raw {
                            kafka_msgs_per_s: kafka,
                            pg_rows_per_s: pg,
                            payments_per_s: 1.0 / (per_kafka / kafka + per_pg / pg),
                        })
                    })
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the raw measurements' thread panicked"))?
        })
    })
}

/// The ten statements PostgreSQL spent most time in (`BENCH_PG_STATEMENTS`; needs
/// `TESTKIT_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements"`).
async fn pg_statements(c: &deadpool_postgres::Object) -> anyhow::Result<()> {
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
        let (ms, calls, rows, q): (i64, i64, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        eprintln!("bench: pg {ms:>7} ms {calls:>7} calls {rows:>7} rows  {q}");
    }
    Ok(())
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

/// Where the time went, from the roles' metrics (`text`: their Prometheus texts one
/// after the other): mean per observation and count of each stage's histogram.
fn stages(text: &str) -> String {
    // `name{labels} value` or `name value`, summed over every line of one name and label
    // set that matters here.
    let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let stage = labels
            .split(',')
            .find_map(|l| l.strip_prefix("stage=\""))
            .map(|v| v.trim_end_matches(['}', '"']).to_owned())
            .unwrap_or_default();
        *sums.entry((name.to_owned(), stage)).or_default() += value;
    }
    let get = |name: &str, stage: &str| {
        sums.get(&(name.to_owned(), stage.to_owned()))
            .copied()
            .unwrap_or(0.0)
    };
    let mean = |name: &str, stage: &str| {
        get(&format!("{name}_sum"), stage) * 1000.0 / get(&format!("{name}_count"), stage).max(1.0)
    };
    let mut out = Vec::new();
    for (name, label) in [
        ("gateway_http_request_duration_seconds", "http"),
        ("gateway_task_batch_seconds", "worker_batch"),
        ("gateway_provider_request_duration_seconds", "provider_call"),
        ("gateway_projection_lag_seconds", "projection_lag"),
        ("gateway_projection_write_seconds", "projection_write"),
    ] {
        out.push(format!(
            "{label}_mean_ms={:.1} {label}_n={:.0}",
            mean(name, ""),
            get(&format!("{name}_count"), "")
        ));
    }
    let stage_names: std::collections::BTreeSet<&str> = sums
        .keys()
        .filter(|(n, s)| n == "gateway_task_stage_seconds_count" && !s.is_empty())
        .map(|(_, s)| s.as_str())
        .collect();
    for stage in stage_names {
        out.push(format!(
            "{stage}_mean_ms={:.1}",
            mean("gateway_task_stage_seconds", stage)
        ));
    }
    for name in [
        "gateway_projection_batches_total",
        "gateway_commands_total",
        "gateway_events_total",
    ] {
        let v: f64 = sums
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum();
        out.push(format!("{}={v:.0}", name.trim_start_matches("gateway_")));
    }
    out.join(" ")
}

/// Produces `n` messages of `size` bytes to a fresh topic and consumes them back, with
/// clients that are connected and have moved a first batch before the clock starts;
/// messages per second over both (their times added).
async fn raw_kafka(kafka: &Kafka, partitions: i32, n: usize, size: usize) -> anyhow::Result<f64> {
    let topic = format!("raw-{}", uuid::Uuid::new_v4().simple());
    let warm = (n / 20).clamp(100, 5_000);
    kafka.create_topic(&topic, partitions).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
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
            .set("bootstrap.servers", kafka.brokers())
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
