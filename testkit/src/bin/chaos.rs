//! `make chaos`: the gateway as separate OS processes — the API, two workers, the sink and
//! the provider simulator, and the notifier with a merchant's endpoint — against three
//! Apache Kafka 4.4 KRaft nodes (replication factor 3, `min.insync.replicas` 2) started
//! here, and a throwaway PostgreSQL. It sends payments at a steady rate (with duplicate
//! requests mixed in) while it SIGKILLs and restarts workers (half of the time onto an
//! empty state directory, so the partition's store is restored from the changelog), the
//! sink, the API and the notifier; SIGKILLs or cleanly restarts brokers (among them the
//! leader of a changelog partition and of the transaction state); breaks the network
//! between the gateway's clients and one broker (added latency, a stall, every
//! connection reset, the broker unreachable) through a proxy per broker; lets the
//! provider misbehave (5xx, timeouts, a charge done but its answer lost, duplicated,
//! delayed and reordered webhooks) and restarts PostgreSQL; the merchant's endpoint
//! fails (5xx) or answers slower than the notifier waits. Meanwhile it refunds a quarter
//! of the payments that complete (in full, in two parts, or by two requests racing for
//! more than is left, some sent twice).
//! Then it drains and checks, against the provider's ledger and the events topic: every
//! accepted payment is terminal, none was charged twice or charged without completing,
//! every transition is legal, every history is gap-free, and the projection equals a
//! replay of the events topic; no payment was refunded beyond its amount, no refund
//! returned money twice, every accepted refund is final, and a refund is `SUCCEEDED`
//! exactly when the provider returned its money; every status change of a payment or a
//! refund on the events topic reached the merchant's endpoint, signed, and every delivery
//! describes its event. Exactly-once is judged from outside ([`testkit::txaudit`]), once
//! while the faults run and once after the workers stopped: the events, notifications
//! and changelog topics read whole by a `read_committed` consumer, against the brokers'
//! log segments.
//!
//! The last line it prints:
//!   chaos: payments=<N> accepted=<A> terminal=<T> lost=<L> double_charged=<D>
//!   illegal_transitions=<I> seq_gaps=<G> projection_mismatches=<M> refunds=<RF>
//!   over_refunded=<O> double_refunded=<DR> refunds_lost=<RL> refund_mismatches=<RM>
//!   notifications=<NT> notifications_missing=<NM> notifications_wrong=<NW>
//!   duplicates=<DU> duplicates_differing=<DD> aborted_reads=<AR> open_transactions=<OT>
//!   kills=<K> broker_kills=<BK> net_faults=<NF> kafka_faults=<F> provider_faults=<P>
//!   merchant_faults=<MF> pg_restarts=<R> failover_p50_ms=<FO50> failover_p99_ms=<FO99>
//!   max_refusal_s=<MR> stall_max_s=<ST> crash_loop_kills=<CK> crash_loop_other_stall_s=<CS>
//! (failover: from a worker's kill to the next event on each partition it held; workers
//! are static members of the group unless `--dynamic-members`; max_refusal_s: the longest
//! a create was refused without a break, from its first 503 to its acceptance;
//! stall_max_s: the longest a partition of the workers' or the sink's input had records
//! waiting while its group's committed offset stood still, seen from outside every 2 s;
//! crash_loop_*: a third of the way through the faults, one worker is SIGKILLed and
//! started again every 3 s for a minute with no other fault, and the partitions the other
//! worker holds may stand still meanwhile for at most one rebalance, 30 s) and it exits
//! non-zero if L, D, I, G, M, O, DR, RL, RM, NM, NW, DD, AR or OT is non-zero, if T < A,
//! (under `exactly_once`) if DU is, or (static members) if CS is over 30 s. A run that fails, however it ends,
//! keeps every process's and broker's log. The same `--seed` replays the same schedule
//! of faults (timing still varies).

use anyhow::Context as _;
use clap::Parser;
use payments::Status;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::kafka::{Fault, Kafka};
use testkit::merchant::{MerchantEndpoint, Mode};
use testkit::procs::{
    create, free_addr, in_letters, lock, refund, sibling, GatewayArgs, Load, Proc, RefundLoad,
};
use testkit::stack::{shipped_topology, topology_text, SHIPPED_POLICY};
use testkit::txaudit::{self, TopicAudit};

#[derive(Debug, Parser)]
#[command(
    about = "Kill, break and restart everything while payments flow; then prove nothing was lost or charged twice"
)]
struct Args {
    /// Keep the processes' logs even when the run passes.
    #[arg(long)]
    keep_logs: bool,
    /// Payments to send.
    #[arg(long, default_value_t = 10_000)]
    payments: usize,
    /// Payments per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seed of the fault schedule and the provider's behaviour (random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// `at_least_once` or `exactly_once`.
    #[arg(long, default_value = "at_least_once")]
    guarantee: String,
    /// Keep injecting faults until at least this many processes were killed (and a fifth
    /// as many brokers, two fifths as many network faults and one PostgreSQL restart).
    #[arg(long, default_value_t = 50)]
    min_kills: usize,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Mean pause between faults, in ms (each pause is drawn from half to one and a half
    /// times this). Much shorter pauses keep the consumer groups rebalancing all the time.
    #[arg(long, default_value_t = 1500)]
    pause_ms: u64,
    /// How long every accepted payment has to reach a terminal state after the load.
    #[arg(long, default_value_t = 300)]
    drain_timeout_s: u64,
    /// Workers join the group as dynamic members (no `--instance-id`): a restarted
    /// worker then rebalances the whole group.
    #[arg(long)]
    dynamic_members: bool,
}

#[derive(Default, Debug)]
struct Counters {
    kills: usize,
    crashes: usize,
    restores: usize,
    /// Brokers SIGKILLed, and brokers restarted cleanly.
    broker_kills: usize,
    broker_restarts: usize,
    /// Faults of the network between the clients and a broker.
    net_faults: usize,
    pg_restarts: usize,
    /// Each worker kill: when (ms since the epoch) and the partitions the worker held.
    worker_kills: Vec<(i64, Vec<i32>)>,
}

impl Counters {
    fn kafka_faults(&self) -> usize {
        self.broker_kills + self.broker_restarts + self.net_faults
    }
}

struct Cluster {
    api: Proc,
    sink: Proc,
    workers: Vec<Proc>,
    sim: Proc,
    notifier: Proc,
    /// The merchant's endpoint the notifier delivers to.
    merchant: MerchantEndpoint,
    /// Args of a worker without `--state-dir`, to start one on another directory.
    worker_base: Vec<String>,
    state_root: PathBuf,
    next_dir: usize,
    /// Workers are static members of the group (`--instance-id worker-<i>`).
    static_members: bool,
}

impl Cluster {
    fn worker_args(&mut self, fresh: bool, index: usize) -> Vec<String> {
        if fresh {
            self.next_dir += 1;
        }
        let dir = self.state_root.join(format!(
            "w{index}-{}",
            if fresh { self.next_dir } else { 0 }
        ));
        let mut args = self.worker_base.clone();
        args.extend(["--state-dir".to_owned(), dir.display().to_string()]);
        if self.static_members {
            args.extend(["--instance-id".to_owned(), format!("worker-{index}")]);
        }
        args
    }

    /// Restarts whatever exited on its own (the crash-only processes' supervisor).
    fn supervise(&mut self, c: &mut Counters) -> anyhow::Result<()> {
        for p in std::iter::once(&mut self.api)
            .chain(std::iter::once(&mut self.sink))
            .chain(std::iter::once(&mut self.notifier))
            .chain(self.workers.iter_mut())
        {
            if p.exited() {
                eprintln!("chaos: {} exited on its own; restarting it", p.name);
                c.crashes += 1;
                p.start()?;
            }
        }
        Ok(())
    }
}

async fn sleep_ms(rng: &mut StdRng, lo: u64, hi: u64) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(lo..hi))).await;
}

/// The broker that leads `topic`-`partition` now, if any does.
fn leader_of(kafka: &Kafka, topic: &str, partition: i32) -> Option<u32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .ok()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let leader = md
        .topics()
        .first()?
        .partitions()
        .iter()
        .find(|p| p.id() == partition)?
        .leader();
    u32::try_from(leader).ok()
}

/// The partitions a worker holds now, as the last rebalance its log records says
/// (`rebalance done … change=assign <topic>[0, 1, 2]`; none while it is between a revoke
/// and an assignment).
fn held_partitions(log: &Path) -> Vec<i32> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    let Some(line) = text.lines().rev().find(|l| l.contains("rebalance done")) else {
        return Vec::new();
    };
    let plain = strip_ansi(line);
    let Some(assigned) = plain.split("change=assign ").nth(1) else {
        return Vec::new();
    };
    let Some(list) = assigned
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
    else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Failover: for each worker kill and each partition the worker held, the time from the
/// kill to the partition's next event on the events topic (its first input processed
/// again, by whichever worker holds it then; the load keeps every partition busy).
fn failover_ms(kills: &[(i64, Vec<i32>)], events: &[testkit::kafka::TopicRecord]) -> Vec<i64> {
    let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
    for r in events {
        if let Some(t) = r.timestamp_ms {
            by_partition.entry(r.partition).or_default().push(t);
        }
    }
    for times in by_partition.values_mut() {
        times.sort_unstable();
    }
    let mut out = Vec::new();
    for (killed_at, held) in kills {
        for p in held {
            let Some(times) = by_partition.get(p) else {
                continue;
            };
            let next = times.partition_point(|t| t <= killed_at);
            if let Some(t) = times.get(next) {
                out.push(t - killed_at);
            }
        }
    }
    out.sort_unstable();
    out
}

/// A broker SIGKILLed or cleanly restarted: a random one, the leader of a changelog
/// partition, or the leader of a partition of the transaction state. One at a time, so
/// two of three stay up (`min.insync.replicas` 2).
async fn broker_fault(
    rng: &mut StdRng,
    kafka: &Kafka,
    topics: &[String],
    c: &mut Counters,
) -> anyhow::Result<()> {
    let changelog = topics.iter().find(|t| t.ends_with("-changelog"));
    let target = match rng.random_range(0..3) {
        0 => changelog.and_then(|t| leader_of(kafka, t, rng.random_range(0..4))),
        1 => leader_of(kafka, "__transaction_state", rng.random_range(0..4)),
        _ => None,
    }
    .unwrap_or_else(|| rng.random_range(1..=3));
    let hard = rng.random_bool(0.7);
    let down_ms = rng.random_range(500..4000);
    {
        let mut cluster = kafka.cluster()?;
        if hard {
            cluster.kill(target)?;
        } else {
            tokio::task::block_in_place(|| cluster.stop(target))?;
        }
    }
    if hard {
        c.broker_kills += 1;
    } else {
        c.broker_restarts += 1;
    }
    eprintln!(
        "chaos: broker {target} {} for {down_ms} ms",
        if hard { "killed" } else { "stopped" }
    );
    tokio::time::sleep(Duration::from_millis(down_ms)).await;
    tokio::task::block_in_place(|| kafka.cluster()?.restart(target))
        .with_context(|| format!("restarting broker {target}"))?;
    Ok(())
}

/// The network between the clients and one broker broken for a while: latency, a
/// stall, every connection reset, or the broker unreachable.
async fn net_fault(rng: &mut StdRng, kafka: &Kafka, c: &mut Counters) -> anyhow::Result<()> {
    let broker = rng.random_range(1..=3);
    let (fault, lasting) = match rng.random_range(0..4) {
        0 => (
            Fault::Latency(broker, Duration::from_millis(rng.random_range(50..400))),
            true,
        ),
        1 => (Fault::Stall(broker), true),
        2 => (Fault::Reset(broker), false),
        _ => (Fault::BrokerDown(broker), true),
    };
    kafka.fault(fault)?;
    c.net_faults += 1;
    if lasting {
        sleep_ms(rng, 500, 3000).await;
        kafka.fault(Fault::BrokerUp(broker))?;
    }
    Ok(())
}

/// One step of the fault schedule.
/// One partition seen with records waiting and its group's committed offset standing
/// still: when, which group and partition, and for how long by then.
#[derive(Debug, Clone)]
struct StallSample {
    at: Instant,
    group: &'static str,
    partition: (String, i32),
    age: Duration,
}

/// What the stall watch saw, shared with the run.
type Samples = Arc<std::sync::Mutex<Vec<StallSample>>>;

/// Follows the progress of the workers' and the sink's groups from outside (their
/// committed offsets against the partitions' ends, every 2 s) until `stop`: what
/// `stall_max_s` and the crash-loop phase's expectation are measured from.
fn watch_stalls(
    brokers: String,
    groups: Vec<(&'static str, String, Vec<String>)>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Samples, std::thread::JoinHandle<()>)> {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut views = Vec::new();
    for (name, group, topics) in groups {
        let view = gateway::watchdog::GroupProgress::new(
            &brokers,
            &group,
            topics,
            &[],
            &format!("chaos-stalls-{name}"),
        )?;
        views.push((name, view));
    }
    let out = samples.clone();
    let join = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (name, view) in &mut views {
                // A check the brokers' faults keep from finishing is skipped: the next one
                // sees how long the partition has stood still.
                if let Ok(waiting) = view.waiting(Duration::from_secs(3), Instant::now()) {
                    let at = Instant::now();
                    lock(&out).extend(waiting.into_iter().map(|(partition, age)| StallSample {
                        at,
                        group: name,
                        partition,
                        age,
                    }));
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    Ok((samples, join))
}

/// Lines of the processes' logs (`*.log` in `root`) that contain `what`.
fn count_in_logs(root: &Path, what: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(root) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| text.lines().filter(|l| l.contains(what)).count())
        .sum()
}

/// The crash-loop phase: one worker SIGKILLed and started again every 3 s for a minute
/// (as a bad deploy or a poisoned host would), no other fault meanwhile. The other
/// worker's partitions must keep moving: none of them may stand still with records
/// waiting for longer than one rebalance (`CRASH_LOOP_BOUND`).
async fn crash_loop(
    rng: &mut StdRng,
    cluster: &mut Cluster,
    c: &mut Counters,
    samples: &std::sync::Mutex<Vec<StallSample>>,
    commands: &str,
    (brokers, group): (&str, &str),
) -> anyhow::Result<CrashLoop> {
    let i = rng.random_range(0..cluster.workers.len());
    let other = (i + 1) % cluster.workers.len();
    // The group as the coordinator has it, once stable with both workers holding
    // partitions (static members' ids start with `worker-<i>-`).
    let settled = Instant::now()
        + if cluster.static_members {
            Duration::from_secs(90)
        } else {
            Duration::ZERO
        };
    let (looping, healthy) = loop {
        let members = tokio::task::block_in_place(|| testkit::kafka::group_members(brokers, group));
        let of = |w: usize| {
            members
                .iter()
                .find(|(id, _)| id.starts_with(&format!("worker-{w}-")))
                .map(|(_, parts)| parts.clone())
                .unwrap_or_default()
        };
        let (looping, healthy) = (of(i), of(other));
        if !looping.is_empty() && !healthy.is_empty() {
            break (looping, healthy);
        }
        if Instant::now() > settled {
            // Dynamic members cannot be told apart by id: the workers' logs say.
            break (
                held_partitions(&cluster.workers[i].log),
                held_partitions(&cluster.workers[other].log),
            );
        }
        cluster.supervise(c)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < CRASH_LOOP_FOR {
        let next = Instant::now() + Duration::from_secs(3);
        cluster.workers[i].kill();
        kills += 1;
        cluster.workers[i].start()?;
        cluster.supervise(c)?;
        tokio::time::sleep_until(next.into()).await;
    }
    // Stalls that began in the loop are seen a few checks later. A partition's stall
    // runs from its last commit, just before the loop's first kill for one the loop
    // stands still; one that had already lasted `PRE_EXISTING` when the loop began (a
    // broker fault's aftermath) is not the loop's doing and counts in `stall_max_s`.
    const PRE_EXISTING: Duration = Duration::from_secs(10);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let window = |s: &StallSample| {
        s.at >= started
            && s.at
                .checked_sub(s.age)
                .is_none_or(|began| began + PRE_EXISTING >= started)
            && s.group == "workers"
            && s.partition.0 == commands
    };
    let (mut own, mut others) = (Duration::ZERO, Duration::ZERO);
    for s in lock(samples).iter().filter(|s| window(s)) {
        if healthy.contains(&s.partition.1) {
            others = others.max(s.age);
        } else {
            own = own.max(s.age);
        }
    }
    let phase = CrashLoop {
        worker: i,
        kills,
        looping,
        healthy,
        own_stall: own,
        others_stall: others,
    };
    println!(
        "chaos: crash loop: worker-{} killed {} times in {} s; its partitions {:?} stood still up to {:.1} s, the other worker's {:?} up to {:.1} s (bound {} s)",
        phase.worker,
        phase.kills,
        CRASH_LOOP_FOR.as_secs(),
        phase.looping,
        phase.own_stall.as_secs_f64(),
        phase.healthy,
        phase.others_stall.as_secs_f64(),
        CRASH_LOOP_BOUND.as_secs()
    );
    Ok(phase)
}

/// How long the crash-loop phase lasts, and how long the other worker's partitions may
/// stand still meanwhile: one rebalance (the workers' `max.poll.interval.ms`).
const CRASH_LOOP_FOR: Duration = Duration::from_secs(60);
const CRASH_LOOP_BOUND: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct CrashLoop {
    worker: usize,
    kills: usize,
    looping: Vec<i32>,
    healthy: Vec<i32>,
    own_stall: Duration,
    others_stall: Duration,
}

async fn inject(
    rng: &mut StdRng,
    cluster: &mut Cluster,
    kafka: &Kafka,
    topics: &[String],
    c: &mut Counters,
) -> anyhow::Result<()> {
    let roll: u32 = rng.random_range(0..100);
    match roll {
        0..=29 => {
            let i = rng.random_range(0..cluster.workers.len());
            let fresh = rng.random_bool(0.5);
            let held = held_partitions(&cluster.workers[i].log);
            c.worker_kills.push((telemetry::now_ms(), held));
            cluster.workers[i].kill();
            c.kills += 1;
            sleep_ms(rng, 100, 1500).await;
            let args = cluster.worker_args(fresh, i);
            cluster.workers[i].args = args;
            if fresh {
                c.restores += 1;
            }
            cluster.workers[i].start()?;
        }
        30..=39 => {
            cluster.sink.kill();
            c.kills += 1;
            sleep_ms(rng, 100, 1500).await;
            cluster.sink.start()?;
        }
        40..=49 => {
            cluster.api.kill();
            c.kills += 1;
            sleep_ms(rng, 100, 1000).await;
            cluster.api.start()?;
        }
        50..=61 => broker_fault(rng, kafka, topics, c).await?,
        62..=84 => net_fault(rng, kafka, c).await?,
        85..=89 if c.pg_restarts < 3 => {
            tokio::task::spawn_blocking(|| testkit::pg::server()?.restart()).await??;
            c.pg_restarts += 1;
        }
        90..=94 => {
            cluster.notifier.kill();
            c.kills += 1;
            sleep_ms(rng, 100, 1500).await;
            cluster.notifier.start()?;
        }

        _ => {}
    }
    Ok(())
}

/// The notifier's limit on one delivery attempt, and its retry delays, in this run.
const NOTIFY_TIMEOUT_MS: u64 = 1000;
const NOTIFY_BACKOFF_MS: u64 = 200;
const NOTIFY_BACKOFF_MAX_MS: u64 = 3000;
/// The merchant's notification signing secret in this run.
const MERCHANT_SECRET: &str = "whsec_Y2hhb3MtbWVyY2hhbnQtc2VjcmV0";

/// `config/merchants.toml` with the `demo` merchant's notifications sent to `url`.
fn merchants_notifying(url: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/merchants.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut file: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    let demo = file
        .get_mut("merchants")
        .and_then(|m| m.get_mut("demo"))
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("{} has no [merchants.demo]", path.display()))?;
    demo.insert("notify_url".into(), url.into());
    demo.insert(
        "notify_secrets".into(),
        toml::Value::Array(vec![MERCHANT_SECRET.into()]),
    );
    Ok(toml::to_string(&file)?)
}

#[derive(Default, Debug)]
struct Verdict {
    terminal: usize,
    lost: usize,
    /// The first lost payments' ids.
    lost_ids: Vec<String>,
    double_charged: usize,
    charged_not_completed: usize,
    illegal: usize,
    gaps: usize,
    mismatches: usize,
    notifications: testkit::verify::NotificationVerdict,
}

/// Prints where the commands of lost payments and refunds lie in the commands topic: a
/// command the topic holds was lost downstream of it (a worker skipped or dropped it);
/// one it lacks was lost on the way in, although the API had its delivery report.
fn trace_lost(
    kafka: &Kafka,
    commands_topic: &str,
    payments: &[String],
    refunds: &[String],
) -> anyhow::Result<()> {
    if payments.is_empty() && refunds.is_empty() {
        return Ok(());
    }
    let truncated = kafka.truncated_partitions(commands_topic)?;
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in kafka.read_all(commands_topic)? {
        let Ok(cmd) = payments::wire::decode_command(r.key.as_deref(), r.payload.as_deref()) else {
            continue;
        };
        let what = match &cmd.body {
            payments::CommandBody::Refund(req) if refunds.contains(&req.refund_id.to_string()) => {
                req.refund_id.to_string()
            }
            _ if payments.contains(&cmd.payment_id.to_string()) => cmd.payment_id.to_string(),
            _ => continue,
        };
        found.entry(what).or_default().push(format!(
            "{}@{}-{}",
            cmd.body.kind(),
            r.partition,
            r.offset
        ));
    }
    for id in payments.iter().chain(refunds) {
        match found.get(id) {
            Some(at) => println!("chaos: lost {id}: its commands are in the topic at {at:?}"),
            None => println!(
                "chaos: lost {id}: not in the commands topic (partitions whose head is gone: {truncated:?})"
            ),
        }
    }
    Ok(())
}

/// The refunds judged against the provider's ledger (see [`testkit::verify::refunds`]).
async fn verify_refunds(
    pool: &sinks::Pool,
    ledger: &simulator::Ledger,
    accepted: &[String],
) -> anyhow::Result<testkit::verify::RefundVerdict> {
    let c = pool.get().await?;
    let amounts: HashMap<String, i64> = c
        .query("SELECT payment_id, amount FROM payments", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let projected: Vec<testkit::verify::ProjectedRefund> = c
        .query(
            "SELECT refund_id, payment_id, refund_number, amount, status FROM refunds",
            &[],
        )
        .await?
        .iter()
        .map(|r| testkit::verify::ProjectedRefund {
            refund_id: r.get(0),
            payment_id: r.get(1),
            number: r.get::<_, i32>(2).unsigned_abs(),
            amount: r.get(3),
            status: r.get(4),
        })
        .collect();
    Ok(testkit::verify::refunds(
        ledger, &amounts, &projected, accepted,
    ))
}

async fn verify(
    kafka: &Kafka,
    events_topic: &str,
    pool: &sinks::Pool,
    ledger: &simulator::Ledger,
    accepted: &HashMap<String, String>,
    notified: &[(String, serde_json::Value)],
) -> anyhow::Result<Verdict> {
    let mut v = Verdict::default();
    let c = pool.get().await?;
    let rows = c
        .query("SELECT payment_id, status, state FROM payments", &[])
        .await?;
    let projected: HashMap<String, (String, serde_json::Value)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for id in accepted.values() {
        match projected.get(id).map(|(s, _)| Status::parse(s)) {
            Some(Some(s)) if s.is_terminal() => v.terminal += 1,
            _ => {
                v.lost += 1;
                if v.lost_ids.len() < 5 {
                    v.lost_ids.push(id.clone());
                }
            }
        }
    }
    // The provider's ledger: one capture at most, and only for completed payments.
    let statuses: HashMap<String, String> = projected
        .iter()
        .map(|(id, (s, _))| (id.clone(), s.clone()))
        .collect();
    let judged = testkit::verify::ledger(ledger, &statuses);
    v.double_charged = judged.double_charged.len();
    v.charged_not_completed = judged.charged_not_completed.len();
    // The events topic, replayed: identical duplicates only, gap-free, legal, and equal
    // to the projection (every topic was checked whole before).
    // Differing copies are counted by the audit; the replay takes each event's first.
    let topic = testkit::client::first_topic_events(kafka, events_topic)?.events;
    let mut by_payment: BTreeMap<String, Vec<payments::Event>> = BTreeMap::new();
    for ((pid, _), e) in topic {
        let e: payments::Event = serde_json::from_value(e).context("event on the topic")?;
        by_payment.entry(pid).or_default().push(e);
    }
    let event_rows = c
        .query("SELECT payment_id, seq, event FROM payment_events", &[])
        .await?;
    let mut history: HashMap<String, Vec<(i64, serde_json::Value)>> = HashMap::new();
    for r in &event_rows {
        history
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2)));
    }
    for (pid, events) in &by_payment {
        let testkit::verify::Replayed {
            state,
            gap,
            illegal,
        } = testkit::verify::replay(events);
        v.illegal += illegal;
        if gap {
            v.gaps += 1;
            if v.gaps <= 3 {
                let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
                let rows: Vec<i64> = history
                    .get(pid)
                    .map(|r| r.iter().map(|(s, _)| *s).collect())
                    .unwrap_or_default();
                println!("chaos: gap in {pid}: topic seqs {seqs:?}, projection seqs {rows:?}");
            }
        }
        let replayed = state.map(|s| serde_json::to_value(&s)).transpose()?;
        let mut rows = history.remove(pid).unwrap_or_default();
        rows.sort_by_key(|(seq, _)| *seq);
        let topic_json: Vec<serde_json::Value> = events
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        let rows_json: Vec<serde_json::Value> = rows.into_iter().map(|(_, e)| e).collect();
        if replayed.as_ref() != projected.get(pid).map(|(_, s)| s) || topic_json != rows_json {
            v.mismatches += 1;
            if v.mismatches <= 3 {
                println!(
                    "chaos: projection of {pid} differs from the topic: topic events {}, rows {}; state from topic {}, projected {}",
                    topic_json.len(),
                    rows_json.len(),
                    replayed.map(|s| s.to_string()).unwrap_or_default(),
                    projected.get(pid).map(|(_, s)| s.to_string()).unwrap_or_default()
                );
            }
        }
    }
    // Rows the topic does not explain.
    v.mismatches += history.len();
    v.notifications = testkit::verify::notifications(by_payment.values().flatten(), notified);
    Ok(v)
}

/// Exactly-once judged from outside: the output topics read whole by a `read_committed`
/// consumer against the brokers' logs (see [`testkit::txaudit`]).
fn audit_outputs(
    kafka: &Kafka,
    events: &str,
    notifications: Option<&str>,
    changelog: &str,
) -> anyhow::Result<TopicAudit> {
    let mut total = TopicAudit::default();
    let mut parts = vec![(events, Some(txaudit::event_identity as txaudit::Identity))];
    if let Some(n) = notifications {
        parts.push((n, Some(txaudit::notification_identity)));
    }
    parts.push((changelog, None));
    for (topic, identity) in parts {
        let a = txaudit::audit(kafka, topic, identity)?;
        println!(
            "chaos: audit {topic}: records={} duplicates={} differing={} aborted_reads={} open_transactions={} aborted_in_log={} markers={}",
            a.records, a.duplicates, a.duplicates_differing, a.aborted_reads, a.open_transactions, a.aborted_in_log, a.markers
        );
        if let Some(d) = &a.first_differing {
            println!("chaos: differing duplicate {d}");
        }
        total.add(&a);
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let root = tempfile::Builder::new().prefix("chaos-").tempdir()?.keep();
    let kafka = match Kafka::start_cluster(3) {
        Ok(k) => k,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&root);
            return Err(e);
        }
    };
    let outcome = run(&a, &kafka, &root).await;
    let passed = matches!(outcome, Ok(true));
    if passed && !a.keep_logs {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        // A failed run keeps every log, however it ended.
        let brokers = kafka.keep_logs();
        println!(
            "chaos: {}; process logs kept in {}, the brokers' in {}",
            if passed { "passed" } else { "FAILED" },
            root.display(),
            brokers.map(|b| b.display().to_string()).unwrap_or_default()
        );
    }
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(1),
        Err(e) => Err(e),
    }
}

/// One run; `Ok(false)` is a verdict that failed.
async fn run(a: &Args, kafka: &Kafka, root: &Path) -> anyhow::Result<bool> {
    let root = root.to_owned();
    anyhow::ensure!(
        a.payments > 0 && a.rate.is_finite() && a.rate > 0.0 && a.partitions > 0,
        "--payments, --rate and --partitions must be positive"
    );
    anyhow::ensure!(
        a.guarantee == "at_least_once" || a.guarantee == "exactly_once",
        "--guarantee {}: use at_least_once or exactly_once",
        a.guarantee
    );
    let seed = a.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: seed={seed} guarantee={} payments={} rate={}/s (replay: make chaos ARGS=\"--seed {seed} --payments {} --guarantee {}\")",
        a.guarantee, a.payments, a.rate, a.payments, a.guarantee
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let gateway = sibling("gateway")?;
    let sim_bin = sibling("provider-sim")?;
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
        &format!("chaos-{suffix}"),
        // The shipped policy: timeouts sized for a loaded pipeline. Far shorter reply
        // timeouts than the command queue's latency under a backlog turn every timeout
        // into another status check, and the checks into more backlog.
        SHIPPED_POLICY,
    )?;
    file.processing_guarantee = toml::Value::String(a.guarantee.clone())
        .try_into()
        .map_err(|_| {
            anyhow::anyhow!(
                "--guarantee {}: use at_least_once or exactly_once",
                a.guarantee
            )
        })?;
    let text = topology_text(&file)?;
    let topology = topology::compile_str(&text)?;
    let changelog = topology.changelog_topic(&commands);
    let mut topics = vec![
        commands.clone(),
        events.clone(),
        dlq.clone(),
        changelog.clone(),
    ];
    let notifications = topology.notifications_topic();
    topics.extend(notifications.clone());
    for t in &topics {
        let config = if *t == changelog {
            testkit::kafka::CHANGELOG_TEST_CONFIG
        } else {
            &[]
        };
        kafka.create_topic_with(t, a.partitions, config).await?;
    }
    let topology_file = root.join("topology.toml");
    std::fs::write(&topology_file, &text)?;
    let database_url = testkit::pg::server()?.fresh_database().await?;
    let merchant = MerchantEndpoint::start(
        vec![payments::webhook::secret_bytes(MERCHANT_SECRET)?],
        std::future::pending(),
    )
    .await?;
    let merchants = root.join("merchants.toml");
    std::fs::write(&merchants, merchants_notifying(&merchant.url())?)?;
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
    let sim_args: Vec<String> = [
        "--listen",
        &sim_addr,
        "--webhook-url",
        &format!("http://{api_addr}/v1/callbacks/sim"),
        "--no-magic",
        "--seed",
        &seed.to_string(),
        "--max-latency-ms",
        "20",
        "--error-rate",
        "0.05",
        "--timeout-rate",
        "0.03",
        "--lost-response-rate",
        "0.03",
        "--async-rate",
        "0.25",
        "--decline-rate",
        "0.1",
        "--duplicate-webhook-rate",
        "0.3",
        "--webhook-jitter-ms",
        "400",
        "--hang-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let worker_base = gw.with(&[
        "worker",
        "--provider-url",
        &format!("http://{sim_addr}"),
        "--provider-timeout-ms",
        "800",
        "--ops-listen",
        "127.0.0.1:0",
    ]);
    // Admission control reads the workers' progress from their group's committed
    // offsets (under exactly_once, those their transactions commit).
    let api_args = gw.api(&api_addr, &merchants);
    let mut cluster = Cluster {
        api: proc("api", &gateway, api_args),
        sink: proc(
            "sink",
            &gateway,
            gw.with(&[
                "sink",
                "--group-id",
                "projection",
                "--ops-listen",
                "127.0.0.1:0",
            ]),
        ),
        workers: vec![],
        sim: proc("provider-sim", &sim_bin, sim_args),
        notifier: proc(
            "notifier",
            &gateway,
            gw.with(&[
                "notifier",
                "--notify-merchants",
                &merchants.display().to_string(),
                "--notify-timeout-ms",
                &NOTIFY_TIMEOUT_MS.to_string(),
                "--notify-backoff-ms",
                &NOTIFY_BACKOFF_MS.to_string(),
                "--notify-backoff-max-ms",
                &NOTIFY_BACKOFF_MAX_MS.to_string(),
                "--ops-listen",
                "127.0.0.1:0",
            ]),
        ),
        merchant,
        worker_base,
        state_root: root.join("state"),
        next_dir: 0,
        static_members: !a.dynamic_members,
    };
    for i in 0..2 {
        let args = cluster.worker_args(false, i);
        cluster
            .workers
            .push(proc(&format!("worker-{i}"), &gateway, args));
    }
    cluster.sim.start()?;
    cluster.api.start()?;
    cluster.sink.start()?;
    cluster.notifier.start()?;
    for w in &mut cluster.workers {
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

    // The groups' progress, from outside, for the whole run.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let sink_topics = sinks::projection::Topics {
        events: events.clone(),
        dead_letters: dlq.clone(),
        commands: commands.clone(),
        notifications: notifications.clone(),
    };
    let (stalls, stall_watch) = watch_stalls(
        kafka.brokers().to_owned(),
        vec![
            (
                "workers",
                topology.application_id.clone(),
                vec![commands.clone()],
            ),
            (
                "sink",
                "projection".to_owned(),
                sink_topics.all().into_iter().map(str::to_owned).collect(),
            ),
        ],
        watch_stop.clone(),
    )?;

    // Load: a steady rate, a tenth of the requests sent twice.
    let load = Arc::new(Load::default());
    let started = Instant::now();
    let load_task = {
        let (load, http, api) = (load.clone(), http.clone(), api_addr.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let (n, rate) = (a.payments, a.rate);
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let key = format!("chaos-{}-{i}", in_letters(seed));
                let amount = rng.random_range(100..100_000);
                tasks.push(tokio::spawn(create(
                    http.clone(),
                    api.clone(),
                    key.clone(),
                    amount,
                    load.clone(),
                )));
                if rng.random_bool(0.1) {
                    load.duplicates.fetch_add(1, Ordering::Relaxed);
                    tasks.push(tokio::spawn(create(
                        http.clone(),
                        api.clone(),
                        key,
                        amount,
                        load.clone(),
                    )));
                }
            }
            futures::future::join_all(tasks).await;
        })
    };

    // Refunds of some of the payments that complete, while the faults run.
    let pool = sinks::connect(&database_url, 2)?;
    let refunds = Arc::new(RefundLoad::default());
    let load_done = Arc::new(AtomicBool::new(false));
    let refund_task = tokio::spawn(refund_load(
        http.clone(),
        api_addr.clone(),
        pool.clone(),
        load.clone(),
        refunds.clone(),
        StdRng::seed_from_u64(seed ^ 0x4ef0),
        load_done.clone(),
    ));

    // The merchant's endpoint fails or slows down every few seconds while the load runs.
    let merchant_faults = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let merchant_task = {
        let (merchant, faults, stop) = (
            cluster.merchant.clone(),
            merchant_faults.clone(),
            load_done.clone(),
        );
        let mut rng = StdRng::seed_from_u64(seed ^ 0x3e7c);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sleep_ms(&mut rng, 2000, 6000).await;
                // Failing, or slower than the notifier waits; then back.
                merchant.set_mode(if rng.random_bool(0.5) {
                    Mode::Fail
                } else {
                    Mode::Slow(Duration::from_millis(NOTIFY_TIMEOUT_MS + 500))
                });
                faults.fetch_add(1, Ordering::Relaxed);
                sleep_ms(&mut rng, 1000, 3000).await;
                merchant.set_mode(Mode::Ok);
            }
        })
    };

    // Faults until the load is done and enough of each kind happened.
    let mut counters = Counters::default();
    let mut audit_during: Option<TopicAudit> = None;
    let mut crash_phase: Option<CrashLoop> = None;
    while !load_task.is_finished()
        || counters.kills < a.min_kills
        || counters.broker_kills < a.min_kills / 5
        || counters.net_faults < a.min_kills * 2 / 5
        || counters.pg_restarts < 1
    {
        sleep_ms(&mut rng, a.pause_ms / 2, a.pause_ms * 3 / 2 + 1).await;
        cluster.supervise(&mut counters)?;
        // Once, a third of the way through the faults: the crash loop, on its own.
        if crash_phase.is_none() && counters.kills >= a.min_kills / 3 {
            crash_phase = Some(
                crash_loop(
                    &mut rng,
                    &mut cluster,
                    &mut counters,
                    &stalls,
                    &commands,
                    (kafka.brokers(), &topology.application_id),
                )
                .await?,
            );
            continue;
        }
        inject(&mut rng, &mut cluster, kafka, &topics, &mut counters).await?;
        // Once, half-way through the faults: what a reader sees while transactions are
        // aborted, fenced and retried (open ones are expected here).
        if audit_during.is_none() && counters.kills >= a.min_kills / 2 {
            audit_during = Some(tokio::task::block_in_place(|| {
                audit_outputs(kafka, &events, notifications.as_deref(), &changelog)
            })?);
        }
    }
    load_task.await?;
    load_done.store(true, Ordering::Relaxed);
    refund_task.await?;
    merchant_task.await?;
    let load_s = started.elapsed().as_secs_f64();

    // Drain: every process up, no faults left, every accepted payment terminal.
    let accepted = lock(&load.accepted).clone();
    let ids: Vec<String> = accepted.values().cloned().collect();
    let drain = Instant::now() + Duration::from_secs(a.drain_timeout_s);
    let mut last_report = Instant::now();
    loop {
        cluster.supervise(&mut counters)?;
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
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "chaos: draining: {open} of {} payments not terminal yet ({:.0} s)",
                ids.len(),
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And every accepted refund.
    let refund_ids: Vec<String> = lock(&refunds.accepted).keys().cloned().collect();
    loop {
        cluster.supervise(&mut counters)?;
        let open: i64 = match pool.get().await {
            Ok(c) => c
                .query_one(
                    "SELECT $2::int8 - count(*) FROM refunds WHERE refund_id = ANY($1) AND status <> 'PENDING'",
                    &[&refund_ids, &(refund_ids.len() as i64)],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(i64::MAX),
            Err(_) => i64::MAX,
        };
        if open == 0 || Instant::now() > drain {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "chaos: draining: {open} of {} refunds not final yet",
                refund_ids.len()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And every notification the sink recorded delivered, once the sink's count of them
    // stops growing.
    let mut last = (i64::MAX, i64::MAX);
    loop {
        cluster.supervise(&mut counters)?;
        let now: (i64, i64) = match pool.get().await {
            Ok(c) => c
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE status = 'pending') FROM webhook_deliveries",
                    &[],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .unwrap_or((i64::MAX, i64::MAX)),
            Err(_) => (i64::MAX, i64::MAX),
        };
        if (now.1 == 0 && now == last) || Instant::now() > drain {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "chaos: draining: {} of {} notifications not delivered yet",
                now.1, now.0
            );
            last_report = Instant::now();
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let drained_s = started.elapsed().as_secs_f64();
    // Let the sink settle what the topic holds beyond the terminal events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ledger: simulator::Ledger = http
        .get(format!("http://{sim_addr}/ledger"))
        .send()
        .await?
        .json()
        .await?;
    let notified: Vec<(String, serde_json::Value)> = cluster
        .merchant
        .received()
        .into_iter()
        .map(|r| (r.webhook_id, r.body))
        .collect();
    // The replay check needs every event; a worker refuses a changelog without its head,
    // and a consumer cannot read commands that are gone: either would show as losses the
    // gateway did not make.
    for topic in [&events, &commands, &changelog] {
        let truncated = kafka.truncated_partitions(topic)?;
        anyhow::ensure!(
            truncated.is_empty(),
            "{topic} no longer starts at offset 0 in partitions {truncated:?}: its records were deleted"
        );
    }
    let v = verify(kafka, &events, &pool, &ledger, &accepted, &notified).await?;
    let n = &v.notifications;
    let distinct = notified
        .iter()
        .map(|(id, _)| id)
        .collect::<HashSet<_>>()
        .len();
    let forged = cluster.merchant.forged();
    println!(
        "chaos: notifications: distinct={distinct} deliveries={} endpoint_requests={} forged={forged} missing={:?} wrong={:?}",
        notified.len(),
        cluster.merchant.requests(),
        n.missing.iter().take(5).collect::<Vec<_>>(),
        n.wrong.iter().take(5).collect::<Vec<_>>(),
    );
    let r = verify_refunds(&pool, &ledger, &refund_ids).await?;
    let mut refused = lock(&load.refused).clone();
    refused.extend(lock(&refunds.refused).iter().cloned());
    println!(
        "chaos: refunds: accepted={} conflicts_409={} duplicate_requests={} client_retries={} provider_refunds={} over_refunded={:?} double_refunded={:?} lost={:?} mismatched={:?}",
        refund_ids.len(),
        refunds.conflicts.load(Ordering::Relaxed),
        refunds.duplicates.load(Ordering::Relaxed),
        refunds.retries.load(Ordering::Relaxed),
        ledger.refunds.iter().filter(|x| x.refunds_made > 0).count(),
        r.over_refunded.iter().take(5).collect::<Vec<_>>(),
        r.double_refunded.iter().take(5).collect::<Vec<_>>(),
        r.lost.iter().take(5).collect::<Vec<_>>(),
        r.mismatched.iter().take(5).collect::<Vec<_>>(),
    );
    let lost_refunds: Vec<String> = r.lost.iter().take(5).cloned().collect();
    if let Err(e) = trace_lost(kafka, &commands, &v.lost_ids, &lost_refunds) {
        println!("chaos: the commands topic could not be searched for what was lost: {e:#}");
    }
    println!(
        "chaos: detail load_s={load_s:.1} drained_s={drained_s:.1} duplicate_requests={} client_retries={} refused={} crashes_restarted={} fresh_disk_restores={} charged_not_completed={} provider_requests={} webhooks_sent={} logs={}",
        load.duplicates.load(Ordering::Relaxed),
        load.retries.load(Ordering::Relaxed),
        refused.len(),
        counters.crashes,
        counters.restores,
        v.charged_not_completed,
        ledger.requests,
        ledger.webhooks_sent,
        root.display()
    );
    for r in refused.iter().take(5) {
        println!("chaos: refused {r}");
    }
    // The stalls are those of the run, load and drain: not of the workers' stop below.
    watch_stop.store(true, Ordering::Relaxed);
    if stall_watch.join().is_err() {
        println!("chaos: the stall watch stopped abnormally; stall_max_s counts what it saw");
    }
    // The workers stop cleanly (their last transactions end), then the outputs are
    // audited whole.
    for w in &mut cluster.workers {
        w.terminate(Duration::from_secs(30));
    }
    let audit = tokio::task::block_in_place(|| {
        audit_outputs(kafka, &events, notifications.as_deref(), &changelog)
    })?;
    let event_records = tokio::task::block_in_place(|| kafka.read_all(&events))?;
    let failover = failover_ms(&counters.worker_kills, &event_records);
    let pct = |q: f64| -> i64 {
        if failover.is_empty() {
            return 0;
        }
        let i = ((failover.len() - 1) as f64 * q).round() as usize;
        failover[i.min(failover.len() - 1)]
    };
    println!(
        "chaos: failover: members={} worker_kills={} partitions={} p50_ms={} p99_ms={} max_ms={}",
        if a.dynamic_members {
            "dynamic"
        } else {
            "static"
        },
        counters.worker_kills.len(),
        failover.len(),
        pct(0.5),
        pct(0.99),
        failover.last().copied().unwrap_or(0)
    );
    let longest = |group: Option<&str>| {
        lock(&stalls)
            .iter()
            .filter(|s| group.is_none_or(|g| s.group == g))
            .max_by_key(|s| s.age)
            .cloned()
    };
    let stall_max = |group: Option<&str>| longest(group).map_or(0.0, |s| s.age.as_secs_f64());
    for group in ["workers", "sink"] {
        if let Some(s) = longest(Some(group)) {
            println!(
                "chaos: longest stall of the {group}: {}[{}] stood still {:.1} s with records waiting, seen {:.0} s into the run",
                s.partition.0,
                s.partition.1,
                s.age.as_secs_f64(),
                s.at.saturating_duration_since(started).as_secs_f64()
            );
        }
    }
    let stall_exits = count_in_logs(&root, "ended over a stall");
    let stall_reports = count_in_logs(&root, "no progress");
    println!(
        "chaos: stalls: workers_max_s={:.1} sink_max_s={:.1} reported={stall_reports} exits={stall_exits}",
        stall_max(Some("workers")),
        stall_max(Some("sink")),
    );
    // Static members only: a dynamic member's restart rebalances every partition.
    let crash_loop_failed = match crash_phase.as_ref().filter(|_| !a.dynamic_members) {
        // With every partition on the looping worker the loop stalls the whole gateway:
        // the other worker held none after the phase's 90 s wait for a settled group.
        Some(c) if c.healthy.is_empty() => {
            println!(
                "chaos: FAILED: when the crash loop began the other worker held no partition of the commands topic, so the loop stood every partition still"
            );
            true
        }
        Some(c) if c.others_stall > CRASH_LOOP_BOUND => {
            println!(
                "chaos: FAILED: the crash-looping worker stalled the other worker's partitions for longer than one rebalance ({} s)",
                CRASH_LOOP_BOUND.as_secs()
            );
            true
        }
        _ => false,
    };
    let during = audit_during.unwrap_or_default();
    println!(
        "chaos: audit during faults: duplicates={} differing={} aborted_reads={} open_transactions={}",
        during.duplicates, during.duplicates_differing, during.aborted_reads, during.open_transactions
    );
    let exactly_once = a.guarantee == "exactly_once";
    let failed = v.lost > 0
        || v.double_charged > 0
        || v.charged_not_completed > 0
        || v.illegal > 0
        || v.gaps > 0
        || v.mismatches > 0
        || v.terminal < accepted.len()
        || r != testkit::verify::RefundVerdict::default()
        || !n.missing.is_empty()
        || !n.wrong.is_empty()
        || forged > 0
        || !refused.is_empty()
        || audit.duplicates_differing + during.duplicates_differing > 0
        || audit.aborted_reads + during.aborted_reads > 0
        || audit.open_transactions > 0
        || (exactly_once && audit.duplicates + during.duplicates > 0)
        || crash_loop_failed;
    println!(
        "chaos: payments={} accepted={} terminal={} lost={} double_charged={} illegal_transitions={} seq_gaps={} projection_mismatches={} refunds={} over_refunded={} double_refunded={} refunds_lost={} refund_mismatches={} notifications={} notifications_missing={} notifications_wrong={} duplicates={} duplicates_differing={} aborted_reads={} open_transactions={} kills={} broker_kills={} net_faults={} kafka_faults={} provider_faults={} merchant_faults={} pg_restarts={} failover_p50_ms={} failover_p99_ms={} max_refusal_s={:.1} stall_max_s={:.1} crash_loop_kills={} crash_loop_other_stall_s={:.1}",
        a.payments,
        accepted.len(),
        v.terminal,
        v.lost,
        v.double_charged,
        v.illegal,
        v.gaps,
        v.mismatches,
        refund_ids.len(),
        r.over_refunded.len(),
        r.double_refunded.len(),
        r.lost.len(),
        r.mismatched.len(),
        distinct,
        n.missing.len(),
        n.wrong.len() + forged,
        audit.duplicates.max(during.duplicates),
        audit.duplicates_differing.max(during.duplicates_differing),
        audit.aborted_reads.max(during.aborted_reads),
        audit.open_transactions,
        counters.kills,
        counters.broker_kills,
        counters.net_faults,
        counters.kafka_faults(),
        ledger.faults,
        merchant_faults.load(Ordering::Relaxed),
        counters.pg_restarts,
        pct(0.5),
        pct(0.99),
        load.max_refusal_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        stall_max(None),
        crash_phase.as_ref().map_or(0, |c| c.kills),
        crash_phase
            .as_ref()
            .map_or(0.0, |c| c.others_stall.as_secs_f64()),
    );
    drop(cluster);
    Ok(!failed)
}

/// Refunds a quarter of the payments that complete while the faults run (on a machine
/// slower than the load, of the first that complete after it): in full, in
/// two parts (the second for what is left), or by two requests racing for more than is
/// left (one of them must fail); a tenth of the first requests are sent twice.
async fn refund_load(
    http: reqwest::Client,
    api: String,
    pool: sinks::Pool,
    payments: Arc<Load>,
    load: Arc<RefundLoad>,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) {
    let mut seen: HashSet<String> = HashSet::new();
    let mut tasks = Vec::new();
    let mut next = 0u64;
    let mut key = |rng: &mut StdRng| {
        next += 1;
        format!("rf-{}-{}", in_letters(rng.random()), in_letters(next))
    };
    // On a machine slower than the load, few payments complete while it runs: then the
    // first refunds go out after it, for at most two minutes.
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if !tasks.is_empty() || since.elapsed() > Duration::from_secs(120) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ids: Vec<String> = lock(&payments.accepted)
            .values()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        let Ok(c) = pool.get().await else { continue };
        let Ok(rows) = c
            .query(
                "SELECT payment_id, amount FROM payments WHERE status = 'COMPLETED' AND payment_id = ANY($1)",
                &[&ids],
            )
            .await
        else {
            continue;
        };
        for row in rows {
            let (id, amount): (String, i64) = (row.get(0), row.get(1));
            seen.insert(id.clone());
            if !rng.random_bool(0.25) {
                continue;
            }
            let send = |key: String, amount: Option<i64>| {
                refund(
                    http.clone(),
                    api.clone(),
                    id.clone(),
                    key,
                    amount,
                    load.clone(),
                )
            };
            match rng.random_range(0..3) {
                0 => {
                    let k = key(&mut rng);
                    if rng.random_bool(0.1) {
                        load.duplicates.fetch_add(1, Ordering::Relaxed);
                        tasks.push(tokio::spawn(send(k.clone(), None)));
                    }
                    tasks.push(tokio::spawn(send(k, None)));
                }
                1 if amount > 1 => {
                    let (first, rest) = (
                        send(key(&mut rng), Some(rng.random_range(1..amount))),
                        send(key(&mut rng), None),
                    );
                    tasks.push(tokio::spawn(async move {
                        first.await;
                        rest.await;
                    }));
                }
                _ => {
                    let part = (amount * 3 / 5).max(1);
                    tasks.push(tokio::spawn(send(key(&mut rng), Some(part))));
                    tasks.push(tokio::spawn(send(key(&mut rng), Some(part))));
                }
            }
        }
    }
    futures::future::join_all(tasks).await;
}
