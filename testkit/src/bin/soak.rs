//! `make soak`: the gateway as separate OS processes (API, two workers, sink, provider
//! simulator) against an Apache Kafka 4.4 broker and a throwaway PostgreSQL, at a steady rate
//! for a set time, with the payments' `state_retention` shortened to minutes so the
//! steady state (as many payments expiring as arriving) is reached in the first third.
//!
//! Every 5 s it reads the worker processes' resident memory and the size of their stores
//! on disk; every minute it prints, for the workers together, the mean of those readings
//! over the minute and the payments, dedup records and timers their stores hold (the
//! workers' `gateway_store_keys`). At the end of the warm-up third and in the
//! load's last minutes it restores a partition's store from the changelog into a scratch
//! directory with the worker's own restore (so the running workers keep their stores)
//! and times it, under the same load both times (the median of `--probe-repeats`
//! restores); after the load it also kills one worker, starts it on an empty disk and
//! reads how long its partitions took to restore. Then it checks, like `make chaos`, that every
//! accepted payment is terminal and none was charged twice, and prints:
//!
//!   soak: minutes=<m> payments=<n> rate=<r>/s rss_mb_start=.. rss_mb_end=..
//!   rss_slope_mb_per_h=.. store_mb_start=.. store_mb_end=.. store_slope_mb_per_h=..
//!   live_payments=.. restore_s=.. lost=0 double_charged=0
//!
//! where start and end are the first and last minutes of the last two thirds, the slopes
//! are least-squares fits to the 5-second readings of those two thirds, leaving out the
//! readings a restore probe disturbs (while it runs and for a minute after), and
//! `restore_s` is the scratch restore at the end of the load (the one after warm-up is on
//! the detail line, beside the killed worker's). It exits non-zero if a payment was lost
//! or charged twice.
//!
//! The changelog is compacted by the broker as it would be in production (test settings
//! roll a segment every 5 s so the cleaner keeps up within the run): a restore reads
//! every payment still kept, their last records only, from the log's start; the
//! tombstones of expired payments are dropped by the cleaner on a later pass, so the
//! restore's time follows the live payments, not the history.

use anyhow::Context as _;
use clap::Parser;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::kafka::Kafka;
use testkit::procs::{create, free_addr, in_letters, lock, sibling, GatewayArgs, Load, Proc};
use testkit::stack::{component, set_param, shipped_topology, topology_text, SHIPPED_POLICY};

#[derive(Debug, Parser)]
#[command(
    about = "Run the gateway at a steady rate with short retention; show that memory, disk and restore time stay flat"
)]
struct Args {
    /// Length of the run.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Payments per second (about half of this machine's `make bench` maximum).
    #[arg(long, default_value_t = 400.0)]
    rate: f64,
    /// How long a finished payment stays in the stores (the source topic's retention,
    /// the dedup records' and the provider's longest webhook delay are set to half of it).
    #[arg(long, default_value = "3m")]
    retention: String,
    /// Seconds between two printed samples (and reads of the workers' metrics).
    #[arg(long, default_value_t = 60)]
    sample_s: u64,
    /// Seconds between two readings of the workers' resident memory and disk: a printed
    /// sample shows their mean since the one before, and the slopes are fitted to them.
    #[arg(long, default_value_t = 5)]
    usage_every_s: u64,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Partitions whose stores the restore probes rebuild (from partition 0 on).
    #[arg(long, default_value_t = 1)]
    probe_partitions: i32,
    /// Restores per probe, one after another: the probe's figure is their median.
    #[arg(long, default_value_t = 3)]
    probe_repeats: usize,
    /// sled's page cache per partition store of the workers, in MiB.
    #[arg(long, default_value_t = 8)]
    store_cache_mb: u64,
    /// Keep the processes' logs even when the run passes.
    #[arg(long)]
    keep_logs: bool,
}

/// One reading of the worker processes' memory and disk, summed.
#[derive(Debug, Clone)]
struct Usage {
    at_min: f64,
    rss_mb: f64,
    store_mb: f64,
    /// Not within a restore probe's disturbance.
    settled: bool,
}

/// One sample of the worker processes, summed.
#[derive(Debug, Clone, Default)]
struct Sample {
    at_min: f64,
    sent: usize,
    rss_mb: f64,
    store_mb: f64,
    /// What the workers' own code holds on the heap (`gateway_heap_live_bytes`).
    heap_mb: f64,
    payments: f64,
    dedup: f64,
    timers: f64,
    outbox: f64,
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn dir_mb(path: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(path) as f64 / (1024.0 * 1024.0)
}

/// Sums a metric's samples whose labels contain `label` (all when empty).
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| label.is_empty() || l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

async fn metrics(http: &reqwest::Client, ops: &str) -> String {
    match http.get(format!("http://{ops}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Restores the stores of the first `partitions` partitions from the changelog into
/// `dir` with the worker's own restore, one after another, as a worker on an empty disk
/// would; returns the seconds it took and the records applied.
async fn restore_probe(
    brokers: String,
    app: String,
    changelog: String,
    partitions: i32,
    dir: PathBuf,
) -> anyhow::Result<(f64, usize)> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut applied = 0;
        for p in 0..partitions {
            let store = stores::PartitionStore::open_with_cache(&dir, &app, "probe", p, 8 << 20)?;
            applied +=
                topology::runtime::restore_partition(&store, &brokers, &[], &changelog, p)?.applied;
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok((started.elapsed().as_secs_f64(), applied))
    })
    .await?
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        f64::NAN
    } else {
        num / den
    }
}

struct Workers {
    procs: Vec<Proc>,
    ops: Vec<String>,
    dirs: Vec<PathBuf>,
    base: Vec<String>,
    root: PathBuf,
    restarts: usize,
}

impl Workers {
    fn args(&self, i: usize) -> Vec<String> {
        let mut a = self.base.clone();
        a.extend([
            "--state-dir".to_owned(),
            self.dirs[i].display().to_string(),
            "--ops-listen".to_owned(),
            self.ops[i].clone(),
        ]);
        a
    }

    /// The workers' resident memory and the size of their stores on disk, in MB.
    fn usage(&self) -> (f64, f64) {
        let mut u = (0.0, 0.0);
        for (i, p) in self.procs.iter().enumerate() {
            if let Some(c) = &p.child {
                u.0 += rss_mb(c.id());
            }
            u.1 += dir_mb(&self.dirs[i]);
        }
        u
    }

    /// The stores' contents, from the workers' metrics.
    async fn sample(&self, http: &reqwest::Client) -> Sample {
        let mut s = Sample::default();
        for i in 0..self.procs.len() {
            let m = metrics(http, &self.ops[i]).await;
            s.heap_mb += metric_sum(&m, "gateway_heap_live_bytes", "") / (1024.0 * 1024.0);
            s.payments += metric_sum(&m, "gateway_store_keys", "store=\"payments\"");
            s.dedup += metric_sum(&m, "gateway_store_keys", "store=\"dedup\"");
            s.timers += metric_sum(&m, "gateway_store_keys", "store=\"__timers\"");
            s.outbox += metric_sum(&m, "gateway_store_keys", "store=\"__outbox\"");
        }
        s
    }

    /// SIGKILLs worker `i`, starts it on an empty disk, and returns the seconds its
    /// partitions took to restore from the changelog (summed over them) and how many.
    async fn restore(&mut self, i: usize, http: &reqwest::Client) -> anyhow::Result<(f64, f64)> {
        self.procs[i].kill();
        self.restarts += 1;
        self.dirs[i] = self.root.join(format!("worker-{i}-{}", self.restarts));
        self.procs[i].args = self.args(i);
        self.procs[i].start()?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let (mut last, mut stable_since) = (-1.0, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let m = metrics(http, &self.ops[i]).await;
            let count = metric_sum(
                &m,
                "gateway_store_restore_seconds_count",
                "source=\"changelog\"",
            );
            if count != last {
                (last, stable_since) = (count, Instant::now());
            }
            if count > 0.0 && stable_since.elapsed() > Duration::from_secs(15) {
                let sum = metric_sum(
                    &m,
                    "gateway_store_restore_seconds_sum",
                    "source=\"changelog\"",
                );
                return Ok((sum, count));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "worker-{i} restored no partition within 5 minutes of starting on an empty disk"
            );
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.minutes >= 3
            && a.rate > 0.0
            && a.rate.is_finite()
            && a.sample_s > 0
            && (1..=a.sample_s).contains(&a.usage_every_s)
            && a.partitions > 0
            && (1..=a.partitions).contains(&a.probe_partitions),
        "--minutes (at least 3), --rate, --sample-s and --partitions must be positive, --usage-every-s from 1 to --sample-s, --probe-partitions from 1 to --partitions"
    );
    let retention = topology::config::Span::try_from(a.retention.clone())
        .map_err(|e| anyhow::anyhow!("--retention: {e}"))?;
    let half = topology::config::Span::from_ms(retention.as_ms() / 2);
    let gateway = sibling("gateway")?;
    let sim_bin = sibling("provider-sim")?;
    let work = tempfile::Builder::new().prefix("soak-").tempdir()?;
    let root = work.path().to_owned();

    let kafka = Kafka::start_cluster(1)?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (commands, events, dlq) = (
        format!("cmd-{suffix}"),
        format!("evt-{suffix}"),
        format!("dlq-{suffix}"),
    );
    let mut file = shipped_topology(
        &commands,
        &events,
        &dlq,
        &format!("soak-{suffix}"),
        &format!("{SHIPPED_POLICY}, webhook_max_delay_ms = {}", half.as_ms()),
    )?;
    // Refunds wait for late webhooks as long as payments do.
    set_param(
        component(&mut file.processors, "refunds")?,
        "webhook_max_delay_ms",
        half.as_ms().into(),
    )?;
    file.stores
        .get_mut("payments")
        .context("the shipped topology has no store `payments`")?
        .state_retention = Some(retention);
    let dedup = file
        .stores
        .get_mut("dedup")
        .context("the shipped topology has no store `dedup`")?;
    (dedup.retention_hours, dedup.retention) = (None, Some(half));
    file.sources
        .get_mut("commands")
        .context("the shipped topology has no source `commands`")?
        .retention = Some(half);
    let text = topology_text(&file)?;
    let topology = topology::compile_str(&text)?;
    let changelog = topology.changelog_topic(&commands);
    let app = topology.application_id.clone();
    for t in [&commands, &events, &dlq, &changelog]
        .into_iter()
        .cloned()
        .chain(topology.notifications_topic())
    {
        let config = if t == changelog {
            testkit::kafka::CHANGELOG_TEST_CONFIG
        } else {
            &[]
        };
        kafka.create_topic_with(&t, a.partitions, config).await?;
    }
    let topology_file = root.join("topology.toml");
    std::fs::write(&topology_file, &text)?;
    let database_url = testkit::pg::server()?.fresh_database().await?;
    let merchants = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/merchants.toml");
    let (api_addr, sim_addr) = (free_addr()?, free_addr()?);
    let gw = GatewayArgs::new(
        kafka.brokers(),
        &topology_file,
        &events,
        &dlq,
        &database_url,
    );
    let proc =
        |name: &str, program: &Path, args: Vec<String>| Proc::new(name, program, args, &root);
    let mut sim = proc(
        "provider-sim",
        &sim_bin,
        [
            "--listen",
            &sim_addr,
            "--webhook-url",
            &format!("http://{api_addr}/v1/callbacks/sim"),
            "--max-latency-ms",
            "20",
            "--async-rate",
            "0.25",
            "--decline-rate",
            "0.1",
            "--no-magic",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let mut api = proc("api", &gateway, gw.api(&api_addr, &merchants));
    let mut sink = proc(
        "sink",
        &gateway,
        gw.with(&[
            "sink",
            "--group-id",
            "projection",
            "--ops-listen",
            "127.0.0.1:0",
        ]),
    );
    let mut workers = Workers {
        procs: vec![],
        ops: vec![free_addr()?, free_addr()?],
        dirs: vec![root.join("worker-0-0"), root.join("worker-1-0")],
        base: gw.with(&[
            "worker",
            "--provider-url",
            &format!("http://{sim_addr}"),
            "--store-cache-mb",
            &a.store_cache_mb.to_string(),
        ]),
        root: root.clone(),
        restarts: 0,
    };
    for i in 0..2 {
        let args = workers.args(i);
        workers
            .procs
            .push(proc(&format!("worker-{i}"), &gateway, args));
    }
    sim.start()?;
    api.start()?;
    sink.start()?;
    for w in &mut workers.procs {
        w.start()?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let ready = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://{api_addr}/health/ready"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        anyhow::ensure!(
            Instant::now() < ready,
            "the API did not become ready; logs in {}",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "soak: minutes={} rate={}/s retention={retention} (commands topic and dedup {half}) partitions={} logs={}",
        a.minutes,
        a.rate,
        a.partitions,
        root.display()
    );

    // Load: a steady rate for the whole run.
    let total = (a.minutes as f64 * 60.0 * a.rate) as usize;
    let load = Arc::new(Load::default());
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let load_task = {
        let (load, http, api, sent) = (load.clone(), http.clone(), api_addr.clone(), sent.clone());
        let rate = a.rate;
        let run = in_letters(u64::from(std::process::id()));
        tokio::spawn(async move {
            let mut tasks = futures::stream::FuturesUnordered::new();
            for i in 0..total {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let amount = 1_000 + (i as i64 % 50_000);
                tasks.push(tokio::spawn(create(
                    http.clone(),
                    api.clone(),
                    format!("soak-{run}-{i}"),
                    amount,
                    load.clone(),
                )));
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Reap finished requests as we go, so the list stays short.
                while tasks.len() > 4096 {
                    use futures::StreamExt;
                    tasks.next().await;
                }
            }
            use futures::StreamExt;
            while tasks.next().await.is_some() {}
            started.elapsed()
        })
    };

    // Readings of memory and disk every few seconds; a printed sample, with the stores'
    // contents, every minute; a restore at the end of the warm-up third and one in the
    // load's last minutes. A probe takes CPU from the workers and the broker; the
    // readings it disturbs (while it runs and for a minute after) are left out of the
    // fits.
    let mut samples: Vec<Sample> = Vec::new();
    let mut usage: Vec<Usage> = Vec::new();
    let mut settled_from_min = 0.0;
    let warm_up = Duration::from_secs(a.minutes * 60 / 3);
    let mut restore_warm: Option<(f64, usize)> = None;
    let mut restore_end: Option<(f64, usize)> = None;
    let run = Duration::from_secs(a.minutes * 60);
    let every = Duration::from_secs(a.usage_every_s);
    let mut next_reading = started + every;
    let mut next_row = started + Duration::from_secs(a.sample_s);
    let mut row_from = 0;
    println!("soak: minute  sent  rss_mb  heap_mb  store_mb  payments  dedup  timers  outbox");
    while !load_task.is_finished() {
        tokio::time::sleep_until(next_reading.into()).await;
        next_reading += every;
        if load_task.is_finished() {
            // The steady state is the load's: a sample after it would bend the fits.
            break;
        }
        for p in std::iter::once(&mut api)
            .chain(std::iter::once(&mut sink))
            .chain(workers.procs.iter_mut())
        {
            if p.exited() {
                eprintln!("soak: {} exited on its own; restarting it", p.name);
                p.start()?;
            }
        }
        let (rss_mb, store_mb) = workers.usage();
        let at_min = started.elapsed().as_secs_f64() / 60.0;
        usage.push(Usage {
            at_min,
            rss_mb,
            store_mb,
            settled: at_min >= settled_from_min,
        });
        if Instant::now() < next_row {
            continue;
        }
        next_row += Duration::from_secs(a.sample_s);
        let mut s = workers.sample(&http).await;
        let row = &usage[row_from..];
        row_from = usage.len();
        s.rss_mb = row.iter().map(|u| u.rss_mb).sum::<f64>() / row.len() as f64;
        s.store_mb = row.iter().map(|u| u.store_mb).sum::<f64>() / row.len() as f64;
        s.at_min = at_min;
        s.sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "soak: {:6.1} {:6} {:7.1} {:8.1} {:9.1} {:9.0} {:6.0} {:7.0} {:7.0}",
            s.at_min,
            s.sent,
            s.rss_mb,
            s.heap_mb,
            s.store_mb,
            s.payments,
            s.dedup,
            s.timers,
            s.outbox
        );
        samples.push(s);
        // The same restore, under the same load, after warm-up and in the load's last
        // minutes: comparable figures.
        let probe_due = if restore_warm.is_none() {
            started.elapsed() >= warm_up
        } else {
            restore_end.is_none()
                && started.elapsed() >= warm_up * 2
                && started.elapsed() + Duration::from_secs(150) >= run
        };
        if probe_due {
            let mut runs = Vec::new();
            for n in 0..a.probe_repeats.max(1) {
                let r = restore_probe(
                    kafka.brokers().to_owned(),
                    app.clone(),
                    changelog.clone(),
                    a.probe_partitions,
                    root.join(format!("probe-{}-{n}", samples.len())),
                )
                .await?;
                println!(
                    "soak: restore of {} partition(s) under load: {:.2} s, {} records",
                    a.probe_partitions, r.0, r.1
                );
                runs.push(r);
            }
            runs.sort_by(|x, y| x.0.total_cmp(&y.0));
            let r = runs[runs.len() / 2];
            match restore_warm {
                None => restore_warm = Some(r),
                Some(_) => restore_end = Some(r),
            }
            settled_from_min = started.elapsed().as_secs_f64() / 60.0 + 1.0;
            next_reading = Instant::now() + every;
        }
    }
    let load_s = load_task.await?.as_secs_f64();
    let restore_end = restore_end.unwrap_or((f64::NAN, 0));
    let killed = workers.restore(1, &http).await?;
    println!(
        "soak: worker-1 killed and started on an empty disk: its {} partitions restored in {:.2} s",
        killed.1, killed.0
    );

    // Drain and verify: every accepted payment terminal, none charged twice.
    let pool = sinks::connect(&database_url, 2)?;
    let accepted = lock(&load.accepted).clone();
    let ids: Vec<String> = accepted.values().cloned().collect();
    let drain = Instant::now() + Duration::from_secs(300);
    let open = loop {
        let open: i64 = match pool.get().await {
            Ok(c) => c
                .query_one(
                    "SELECT $2::int8 - count(*) FROM payments WHERE payment_id = ANY($1) AND status IN ('COMPLETED','FAILED','CANCELED')",
                    &[&ids, &(ids.len() as i64)],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(i64::MAX),
            Err(_) => i64::MAX,
        };
        if open == 0 || Instant::now() > drain {
            break open;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let ledger: simulator::Ledger = http
        .get(format!("http://{sim_addr}/ledger"))
        .timeout(Duration::from_secs(120))
        .send()
        .await?
        .json()
        .await
        .context("reading the simulator's ledger")?;
    // Statuses are not read here (the drain above waited for terminal ones): only the
    // double captures are judged.
    let double_charged = testkit::verify::ledger(&ledger, &HashMap::new())
        .double_charged
        .len();
    let refused = lock(&load.refused).len();

    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_min >= warm_up.as_secs_f64() / 60.0)
        .collect();
    let fit = |f: &dyn Fn(&Usage) -> f64| {
        let pts: Vec<(f64, f64)> = usage
            .iter()
            .filter(|u| u.settled && u.at_min >= warm_up.as_secs_f64() / 60.0)
            .map(|u| (u.at_min / 60.0, f(u)))
            .collect();
        slope(&pts)
    };
    let (first, last) = (
        steady.first().copied().cloned().unwrap_or_default(),
        samples.last().cloned().unwrap_or_default(),
    );
    let live = steady.iter().map(|s| s.payments).sum::<f64>() / steady.len().max(1) as f64;
    let heap_slope = slope(
        &steady
            .iter()
            .map(|s| (s.at_min / 60.0, s.heap_mb))
            .collect::<Vec<_>>(),
    );
    println!(
        "soak: detail load_s={load_s:.0} accepted={} refused={refused} heap_mb_start={:.1} heap_mb_end={:.1} heap_slope_mb_per_h={heap_slope:.1} restore_warm_s={:.2} restore_warm_records={} restore_end_records={} killed_worker_restore_s={:.2} dedup_end={:.0} timers_end={:.0} logs={}",
        accepted.len(),
        first.heap_mb,
        last.heap_mb,
        restore_warm.map_or(f64::NAN, |r| r.0),
        restore_warm.map_or(0, |r| r.1),
        restore_end.1,
        killed.0,
        last.dedup,
        last.timers,
        root.display()
    );
    println!(
        "soak: minutes={} payments={} rate={:.0}/s rss_mb_start={:.0} rss_mb_end={:.0} rss_slope_mb_per_h={:.1} store_mb_start={:.1} store_mb_end={:.1} store_slope_mb_per_h={:.1} live_payments={live:.0} restore_s={:.2} lost={} double_charged={double_charged}",
        a.minutes,
        accepted.len(),
        accepted.len() as f64 / load_s,
        first.rss_mb,
        last.rss_mb,
        fit(&|u| u.rss_mb),
        first.store_mb,
        last.store_mb,
        fit(&|u| u.store_mb),
        restore_end.0,
        open.max(0),
    );
    let failed = open != 0 || double_charged > 0 || refused > 0;
    if failed || a.keep_logs {
        let kept = work.keep();
        println!("soak: process logs kept in {}", kept.display());
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
