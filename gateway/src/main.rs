//! `gateway`: the payment gateway's roles as subcommands. See the crate docs of the
//! `gateway` library for what each runs.

use clap::{Parser, Subcommand};
use gateway::{ApiOptions, Common};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc (see the workspace's Cargo.toml): for librdkafka's allocations too, freed
/// pages returned to the system by its background threads. Counted
/// (`gateway_heap_live_bytes`), to tell the process's own growth from the allocator's.
/// (Without feature `jemalloc`, the system's: for heap profilers that intercept malloc.)
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: telemetry::heap::Counting<tikv_jemallocator::Jemalloc> =
    telemetry::heap::Counting(tikv_jemallocator::Jemalloc);
#[cfg(not(feature = "jemalloc"))]
#[global_allocator]
static ALLOCATOR: telemetry::heap::Counting<std::alloc::System> =
    telemetry::heap::Counting(std::alloc::System);

#[derive(Debug, Parser)]
#[command(name = "gateway", about = "Asynchronous payment gateway")]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    brokers: String,
    /// PostgreSQL connection string of the projection.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// The processor topology.
    #[arg(
        long,
        env = "GATEWAY_TOPOLOGY",
        default_value = "config/topology.toml",
        global = true
    )]
    topology: PathBuf,
    #[arg(
        long,
        env = "GATEWAY_EVENTS_TOPIC",
        default_value = "payments.events",
        global = true
    )]
    events_topic: String,
    #[arg(
        long,
        env = "GATEWAY_DLQ_TOPIC",
        default_value = "payments.dlq",
        global = true
    )]
    dlq_topic: String,
    /// Extra librdkafka property for every client, `key=value` (repeatable).
    #[arg(long = "kafka-prop", global = true)]
    kafka_props: Vec<String>,
    /// Log lines as JSON.
    #[arg(long, env = "GATEWAY_LOG_JSON", global = true)]
    log_json: bool,
    /// OTLP/HTTP endpoint that receives spans (e.g. `http://jaeger:4318`); unset: spans
    /// are not exported (log lines still carry trace ids).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    /// Seconds a worker, the sink or the notifier may make no progress (records waiting
    /// that it does not process, no partition held, no work picked) before it reports a
    /// stall: a warning, `gateway_stalled`, `/health/ready` 503.
    #[arg(long, env = "STALL_REPORT_S", default_value_t = gateway::watchdog::DEFAULT_STALL_REPORT_S, global = true)]
    stall_report_s: u64,
    /// Seconds of such a stall after which the role exits non-zero, for its supervisor to
    /// start it again (not while it waits on a restore or on PostgreSQL); 0: never.
    #[arg(long, env = "STALL_EXIT_S", default_value_t = gateway::watchdog::DEFAULT_STALL_EXIT_S, global = true)]
    stall_exit_s: u64,
    /// `service.name` of exported spans (default `gateway-<role>`).
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    service_name: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    #[arg(long = "listen", env = "API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// Operational endpoints (/metrics, /health/live, /topology), apart from the
    /// merchant API.
    #[arg(long, env = "OPS_LISTEN", default_value = "127.0.0.1:9100")]
    ops_listen: SocketAddr,
    /// Merchants (hashed API keys) and webhook secrets.
    #[arg(
        long,
        env = "GATEWAY_MERCHANTS",
        default_value = "config/merchants.toml"
    )]
    merchants: PathBuf,
    #[arg(long, env = "API_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    max_body_bytes: u64,
    /// Requests per second per merchant (burst: twice that); 0 disables the limit.
    #[arg(long, env = "API_RATE_LIMIT", default_value_t = 5000.0)]
    rate_limit: f64,
    /// Creates are refused (503 `overloaded`, nothing queued) while more than
    /// ADMISSION_MIN_BACKLOG commands the workers have not processed have waited longer
    /// than this; 0 admits every create.
    #[arg(long, env = "ADMISSION_MAX_BACKLOG_MS", default_value_t = 2000)]
    admission_max_backlog_ms: u64,
    /// ... and more than this many commands have waited that long.
    #[arg(long, env = "ADMISSION_MIN_BACKLOG", default_value_t = 1000)]
    admission_min_backlog: u64,
    /// Creates this API instance handles at once; one more is refused at once (503
    /// `overloaded`). 0: no limit.
    #[arg(long, env = "API_MAX_CREATES_IN_FLIGHT", default_value_t = 256)]
    max_creates_in_flight: usize,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Where the partition stores live.
    #[arg(long, env = "STATE_DIR", default_value = "state")]
    state_dir: PathBuf,
    #[arg(long, env = "PROVIDER_URL", default_value = "http://127.0.0.1:9090")]
    provider_url: String,
    /// Per-request timeout of provider calls (keep below the topology's reply_timeout_ms).
    #[arg(long, env = "PROVIDER_TIMEOUT_MS", default_value_t = topology::runtime::DEFAULT_PROVIDER_TIMEOUT_MS)]
    provider_timeout_ms: u64,
    /// sled's page cache per partition store, in MiB (a worker holds about this much per
    /// partition it owns, besides sled's bookkeeping of what the stores hold).
    #[arg(long, env = "STORE_CACHE_MB", default_value_t = stores::DEFAULT_CACHE_MB, value_parser = clap::value_parser!(u64).range(1..=65536))]
    store_cache_mb: u64,
    /// Restore a partition from a changelog whose first records are gone (its log starts
    /// above offset 0) instead of refusing it: the store then lacks every key last written
    /// before them. Off: such a partition's task fails with what to do.
    #[arg(long, env = "RESTORE_TRUNCATED_CHANGELOG", default_value_t = false, action = clap::ArgAction::Set)]
    restore_truncated_changelog: bool,
    /// This worker's static membership of the group (`group.instance.id`), unique and
    /// stable per worker (e.g. `worker-0`): restarted within the group session (10 s), it
    /// takes its partitions back without a rebalance, so no other worker's partitions
    /// pause. A worker stopped for longer leaves its partitions idle for the session
    /// before they move. `@hostname`: the host's name (a container's is its id, the same
    /// across its restarts and distinct per replica). Empty: a dynamic member.
    #[arg(long, env = "WORKER_INSTANCE_ID", default_value = "")]
    instance_id: String,
}

#[derive(Debug, clap::Args)]
struct SinkArgs {
    #[arg(
        long,
        env = "SINK_GROUP_ID",
        default_value = "payment-gateway-projection"
    )]
    group_id: String,
    /// PostgreSQL transactions the sink applies at once, each for its share of the
    /// partitions.
    #[arg(long, env = "SINK_WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    sink_writers: u16,
}

#[derive(Debug, clap::Args)]
struct NotifierArgs {
    /// Merchants, with their notification endpoints and signing secrets.
    #[arg(
        long = "notify-merchants",
        env = "GATEWAY_MERCHANTS",
        default_value = "config/merchants.toml"
    )]
    notify_merchants: PathBuf,
    /// How long an undelivered notification is retried (Stripe: three days).
    #[arg(long, env = "NOTIFY_MAX_AGE_S", default_value_t = 3 * 24 * 3600)]
    notify_max_age_s: u64,
    /// One delivery attempt's limit.
    #[arg(long, env = "NOTIFY_TIMEOUT_MS", default_value_t = 10_000)]
    notify_timeout_ms: u64,
    /// The first retry's delay (each next one doubles, up to `NOTIFY_BACKOFF_MAX_MS`).
    #[arg(long, env = "NOTIFY_BACKOFF_MS", default_value_t = 5_000)]
    notify_backoff_ms: u64,
    /// The longest delay between two attempts.
    #[arg(long, env = "NOTIFY_BACKOFF_MAX_MS", default_value_t = 3_600_000)]
    notify_backoff_max_ms: u64,
    /// Requests in flight to one merchant's endpoint (a slow endpoint holds no more).
    #[arg(long, env = "NOTIFY_PER_MERCHANT", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    notify_per_merchant: u64,
    /// How long a settled notification and its attempts stay readable (longer than the
    /// notifications topic's retention).
    #[arg(long, env = "NOTIFY_KEEP_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
    notify_keep_days: u64,
    /// Requests in flight to all endpoints together.
    #[arg(long, env = "NOTIFY_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    notify_max_in_flight: u64,
}

fn notifier_settings(n: &NotifierArgs) -> anyhow::Result<sinks::notifier::NotifierSettings> {
    let mut s =
        sinks::notifier::NotifierSettings::new(gateway::load_endpoints(&n.notify_merchants)?);
    s.max_age = Duration::from_secs(n.notify_max_age_s);
    s.request_timeout = Duration::from_millis(n.notify_timeout_ms.max(1));
    anyhow::ensure!(
        n.notify_backoff_ms >= 1 && n.notify_backoff_max_ms >= n.notify_backoff_ms,
        "NOTIFY_BACKOFF_MS ({}) must be at least 1 and at most NOTIFY_BACKOFF_MAX_MS ({})",
        n.notify_backoff_ms,
        n.notify_backoff_max_ms
    );
    s.backoff_base = Duration::from_millis(n.notify_backoff_ms);
    s.backoff_max = Duration::from_millis(n.notify_backoff_max_ms);
    s.keep = Duration::from_secs(n.notify_keep_days * 24 * 3600);
    s.per_merchant = usize::try_from(n.notify_per_merchant)?;
    s.max_in_flight = usize::try_from(n.notify_max_in_flight)?;
    Ok(s)
}

// Parsed once at start: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// The HTTP API.
    Api(ApiArgs),
    /// The topology worker.
    Worker {
        #[command(flatten)]
        worker: WorkerArgs,
        /// /metrics, /health/live and /topology.
        #[arg(long, env = "OPS_LISTEN", default_value = "127.0.0.1:9101")]
        ops_listen: SocketAddr,
    },
    /// The PostgreSQL projection sink.
    Sink {
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long, env = "OPS_LISTEN", default_value = "127.0.0.1:9102")]
        ops_listen: SocketAddr,
    },
    /// Delivers merchant notifications to the endpoints in the merchants file.
    Notifier {
        #[command(flatten)]
        notifier: NotifierArgs,
        #[arg(long, env = "OPS_LISTEN", default_value = "127.0.0.1:9103")]
        ops_listen: SocketAddr,
    },
    /// API, worker, sink and notifier in one process.
    All {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        sink: SinkArgs,
        #[command(flatten)]
        notifier: NotifierArgs,
    },
    /// Empties the projection and replays the topics into it.
    RebuildProjection,
    /// Validates the topology file and prints the compiled graph.
    Topology,
    /// Prints the SHA-256 of an API key, for config/merchants.toml.
    HashKey { key: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::heap::counting();
    let cli = Cli::parse();
    let role = match &cli.command {
        Cmd::Api(_) => "api",
        Cmd::Worker { .. } => "worker",
        Cmd::Sink { .. } => "sink",
        Cmd::Notifier { .. } => "notifier",
        Cmd::All { .. } => "all",
        _ => "cli",
    };
    let mut telemetry = telemetry::Config::from_env(&format!("gateway-{role}"), cli.log_json);
    telemetry.otlp_endpoint = cli.otlp_endpoint.clone().filter(|e| !e.trim().is_empty());
    if let Some(name) = &cli.service_name {
        telemetry.service_name = name.clone();
    }
    telemetry::init(&telemetry)?;
    let res = run(cli).await;
    telemetry::shutdown();
    res
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::HashKey { key } = &cli.command {
        println!("{}", gateway_http::auth::hash_key(key));
        return Ok(());
    }
    let topology = Arc::new(topology::load(&cli.topology)?);
    let common = Common {
        brokers: cli.brokers,
        database_url: cli.database_url,
        topology,
        events_topic: cli.events_topic,
        dlq_topic: cli.dlq_topic,
        kafka: gateway::parse_kafka_props(&cli.kafka_props)?,
        stall: gateway::watchdog::StallSettings::from_secs(cli.stall_report_s, cli.stall_exit_s)?,
    };
    match cli.command {
        Cmd::HashKey { .. } => Ok(()),
        Cmd::Topology => {
            println!(
                "{}",
                serde_json::to_string_pretty(&common.topology.describe())?
            );
            Ok(())
        }
        Cmd::Api(a) => {
            let ops = ops_server(a.ops_listen, Some(&common)).await?;
            let opts = api_opts(a)?;
            let (_, handle) = gateway::start_api(&common, opts, gateway::shutdown_signal()).await?;
            handle.await?;
            ops.abort();
            Ok(())
        }
        Cmd::Worker { worker, ops_listen } => {
            let ops = ops_server(ops_listen, Some(&common)).await?;
            let settings = worker_settings(&common, worker)?;
            let res = gateway::run_worker(&common, settings, gateway::shutdown_signal()).await;
            ops.abort();
            res
        }
        Cmd::Sink { sink, ops_listen } => {
            let ops = ops_server(ops_listen, None).await?;
            let res = gateway::run_sink(
                &common,
                &sink.group_id,
                sink.sink_writers.into(),
                gateway::shutdown_signal(),
            )
            .await;
            ops.abort();
            res
        }
        Cmd::Notifier {
            notifier,
            ops_listen,
        } => {
            let ops = ops_server(ops_listen, None).await?;
            let settings = notifier_settings(&notifier)?;
            let res = gateway::run_notifier(&common, settings, gateway::shutdown_signal()).await;
            ops.abort();
            res
        }
        Cmd::All {
            api,
            worker,
            sink,
            notifier,
        } => {
            let ops = ops_server(api.ops_listen, Some(&common)).await?;
            let opts = api_opts(api)?;
            let settings = worker_settings(&common, worker)?;
            let notify = notifier_settings(&notifier)?;
            let (tx, _) = tokio::sync::broadcast::channel::<()>(1);
            let wait = |tx: &tokio::sync::broadcast::Sender<()>| {
                let mut rx = tx.subscribe();
                async move {
                    let _ = rx.recv().await;
                }
            };
            let (_, api_handle) = gateway::start_api(&common, opts, wait(&tx)).await?;
            let signal_tx = tx.clone();
            tokio::spawn(async move {
                gateway::shutdown_signal().await;
                let _ = signal_tx.send(());
            });
            // The first role to fail stops the others.
            let res = tokio::try_join!(
                gateway::run_worker(&common, settings, wait(&tx)),
                gateway::run_sink(&common, &sink.group_id, sink.sink_writers.into(), wait(&tx)),
                gateway::run_notifier(&common, notify, wait(&tx)),
            );
            let _ = tx.send(());
            let _ = api_handle.await;
            ops.abort();
            res.map(|_| ())
        }
        Cmd::RebuildProjection => {
            let report = gateway::rebuild_projection(&common).await?;
            println!(
                "rebuilt: records={} events={} dead_letters={} webhooks={}",
                report.records, report.events, report.dead_letters, report.webhooks
            );
            Ok(())
        }
    }
}

/// Serves the operational endpoints (with the topology, for roles that run or publish
/// to it) until the process ends.
async fn ops_server(
    addr: SocketAddr,
    common: Option<&Common>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let topology = common.map(|c| c.topology.describe());
    let (_, handle) = gateway_http::serve_ops(addr, topology, std::future::pending()).await?;
    Ok(handle)
}

/// The host's name, for `WORKER_INSTANCE_ID=@hostname`.
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    name.ok_or_else(|| {
        anyhow::anyhow!(
            "WORKER_INSTANCE_ID=@hostname: the host's name is unknown (no /proc/sys/kernel/hostname, no HOSTNAME); set WORKER_INSTANCE_ID to a name unique per worker instead"
        )
    })
}

fn api_opts(a: ApiArgs) -> anyhow::Result<ApiOptions> {
    let (merchants, webhook_secrets) = gateway::load_merchants(&a.merchants)?;
    Ok(ApiOptions {
        listen: a.api_listen,
        merchants,
        webhook_secrets,
        max_body_bytes: a.max_body_bytes,
        rate_limit_per_second: a.rate_limit,
        admission_max_backlog: Duration::from_millis(a.admission_max_backlog_ms),
        admission_min_backlog: a.admission_min_backlog,
        max_creates_in_flight: a.max_creates_in_flight,
    })
}

fn worker_settings(common: &Common, w: WorkerArgs) -> anyhow::Result<topology::WorkerSettings> {
    let mut settings = common.worker_settings(w.state_dir, &w.provider_url)?;
    settings.provider_timeout = Duration::from_millis(w.provider_timeout_ms);
    settings.store_cache_bytes = w.store_cache_mb * 1024 * 1024;
    settings.restore_truncated_changelog = w.restore_truncated_changelog;
    let id = w.instance_id.trim();
    let host;
    let id = if id == "@hostname" {
        host = hostname()?;
        host.as_str()
    } else {
        id
    };
    if !id.is_empty() {
        anyhow::ensure!(
            id.len() <= 249
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
            "WORKER_INSTANCE_ID {id:?} is not a valid group.instance.id: use up to 249 letters, \
             digits, '.', '_' or '-', one per worker and the same across its restarts"
        );
        settings.instance_id = Some(id.to_owned());
    }
    Ok(settings)
}
