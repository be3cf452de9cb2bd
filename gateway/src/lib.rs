//! # gateway — the service binary's roles
//!
//! One binary, several roles (subcommands): `api`, `worker`, `sink`, `all` (the three in
//! one process), `rebuild-projection`, `topology` (validate and describe), `hash-key`.
//! This library holds what each role runs, so tests start the same code in-process;
//! `main.rs` only parses the command line.

use anyhow::Context as _;
use gateway_http::auth::MerchantKey;
use gateway_http::{ApiConfig, ApiState};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use topology::CompiledTopology;

pub mod watchdog;

/// Settings shared by every role.
#[derive(Debug, Clone)]
pub struct Common {
    pub brokers: String,
    pub database_url: Option<String>,
    pub topology: Arc<CompiledTopology>,
    pub events_topic: String,
    pub dlq_topic: String,
    /// Extra librdkafka properties (`key=value`), for every client.
    pub kafka: Vec<(String, String)>,
    /// When a worker, the sink or the notifier reports a stall, and when it ends over one.
    pub stall: watchdog::StallSettings,
}

impl Common {
    pub fn commands_topic(&self) -> anyhow::Result<String> {
        self.topology
            .source_topics()
            .into_iter()
            .next()
            .context("the topology has no source topic")
    }

    fn database_url(&self) -> anyhow::Result<&str> {
        self.database_url.as_deref().context(
            "DATABASE_URL is not set; pass --database-url postgres://user:pass@host:port/db",
        )
    }

    /// A worker's settings for this deployment (its brokers, client properties and
    /// commands topic), the engine's defaults for the rest: callers set what they change.
    pub fn worker_settings(
        &self,
        state_dir: PathBuf,
        provider_url: &str,
    ) -> anyhow::Result<topology::WorkerSettings> {
        let mut settings = topology::WorkerSettings::new(
            &self.brokers,
            state_dir,
            provider_url,
            &self.commands_topic()?,
        );
        settings.kafka = self.kafka.clone();
        Ok(settings)
    }

    pub fn sink_topics(&self) -> anyhow::Result<sinks::projection::Topics> {
        Ok(sinks::projection::Topics {
            events: self.events_topic.clone(),
            dead_letters: self.dlq_topic.clone(),
            commands: self.commands_topic()?,
            notifications: self.topology.notifications_topic(),
        })
    }
}

/// `config/merchants.toml`: hashed API keys and webhook secrets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantsFile {
    #[serde(default)]
    pub merchants: BTreeMap<String, MerchantEntry>,
    #[serde(default)]
    pub webhooks: BTreeMap<String, WebhookEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantEntry {
    pub key_sha256: String,
    /// Where the merchant's notifications are delivered (none: not notified).
    #[serde(default)]
    pub notify_url: Option<String>,
    /// Secrets that sign its notifications (`whsec_…`); several while one is rotated.
    #[serde(default)]
    pub notify_secrets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEntry {
    pub secrets: Vec<String>,
}

/// Webhook secrets (raw key bytes) per provider name.
pub type WebhookSecrets = HashMap<String, Vec<Vec<u8>>>;

fn read_merchants(path: &Path) -> anyhow::Result<MerchantsFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read merchants file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is invalid", path.display()))
}

/// The merchants' notification endpoints, reporting every problem.
pub fn load_endpoints(path: &Path) -> anyhow::Result<HashMap<String, sinks::notifier::Endpoint>> {
    let file = read_merchants(path)?;
    let mut problems = Vec::new();
    let mut endpoints = HashMap::new();
    for (id, m) in &file.merchants {
        let Some(url) = &m.notify_url else {
            if !m.notify_secrets.is_empty() {
                problems.push(format!(
                    "merchant `{id}`: notify_secrets without notify_url"
                ));
            }
            continue;
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(format!(
                "merchant `{id}`: notify_url {url:?} is not an http:// or https:// URL"
            ));
        }
        if m.notify_secrets.is_empty() {
            problems.push(format!(
                "merchant `{id}`: notify_url needs at least one notify_secrets entry (whsec_…) to sign with"
            ));
        }
        let mut secrets = Vec::new();
        for s in &m.notify_secrets {
            match payments::webhook::secret_bytes(s) {
                Ok(b) => secrets.push(b),
                Err(e) => problems.push(format!("merchant `{id}`: notify_secrets: {e}")),
            }
        }
        endpoints.insert(
            id.clone(),
            sinks::notifier::Endpoint {
                url: url.clone(),
                secrets,
            },
        );
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} is invalid:\n  - {}",
            path.display(),
            problems.join("\n  - ")
        );
    }
    Ok(endpoints)
}

/// Loads merchants and webhook secrets, reporting every problem.
pub fn load_merchants(path: &Path) -> anyhow::Result<(Vec<MerchantKey>, WebhookSecrets)> {
    let file = read_merchants(path)?;
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    for (id, m) in &file.merchants {
        match MerchantKey::from_hash(id, &m.key_sha256) {
            Ok(k) => keys.push(k),
            Err(e) => problems.push(format!("merchant `{id}`: {e}")),
        }
    }
    let mut secrets = HashMap::new();
    for (provider, w) in &file.webhooks {
        let mut list = Vec::new();
        for s in &w.secrets {
            match payments::webhook::secret_bytes(s) {
                Ok(b) => list.push(b),
                Err(e) => problems.push(format!("webhook provider `{provider}`: {e}")),
            }
        }
        secrets.insert(provider.clone(), list);
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "{} is invalid:\n  - {}",
            path.display(),
            problems.join("\n  - ")
        );
    }
    Ok((keys, secrets))
}

pub struct ApiOptions {
    pub listen: SocketAddr,
    pub merchants: Vec<MerchantKey>,
    pub webhook_secrets: WebhookSecrets,
    pub max_body_bytes: u64,
    /// Requests per second per merchant (burst: twice that); 0 disables the limit.
    pub rate_limit_per_second: f64,
    /// Creates are refused while more than `admission_min_backlog` records the workers
    /// have not processed have waited longer than this; zero admits every create.
    pub admission_max_backlog: Duration,
    /// ... and more than this many records have waited that long.
    pub admission_min_backlog: u64,
    /// Creates this instance handles at once; one more is refused. 0: no limit.
    pub max_creates_in_flight: usize,
}

/// Starts the API; returns its address and a handle that ends after `shutdown`.
pub async fn start_api(
    common: &Common,
    opts: ApiOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let pool = sinks::connect(common.database_url()?, 16)?;
    sinks::migrate(&pool).await?;
    let mut producer_cfg = vec![
        ("message.timeout.ms".to_owned(), "5000".to_owned()),
        ("linger.ms".to_owned(), "2".to_owned()),
    ];
    producer_cfg.extend(common.kafka.iter().cloned());
    let producer = topology::runtime::producer(&common.brokers, &producer_cfg)?;
    let mut cfg = ApiConfig::new(&common.commands_topic()?);
    cfg.merchants = opts.merchants;
    cfg.webhook_secrets = opts.webhook_secrets;
    cfg.max_body_bytes = opts.max_body_bytes;
    cfg.rate_limit = (opts.rate_limit_per_second > 0.0).then_some(gateway_http::RateLimit {
        per_second: opts.rate_limit_per_second,
        burst: opts.rate_limit_per_second * 2.0,
    });
    cfg.max_creates_in_flight = opts.max_creates_in_flight;
    cfg.refund_window = common
        .topology
        .refund_window()
        .map(|w| Duration::from_millis(w.as_ms().max(0).unsigned_abs()));
    if !opts.admission_max_backlog.is_zero() {
        let mut a = gateway_http::admission::AdmissionConfig::new(
            &common.brokers,
            &common.topology.application_id,
            &common.commands_topic()?,
        );
        a.kafka = common.kafka.clone();
        a.max_backlog = opts.admission_max_backlog;
        a.min_backlog_records = opts.admission_min_backlog;
        cfg.admission = Some(a);
    }
    let state = ApiState::new(cfg, producer, pool)?;
    let (addr, handle) = gateway_http::serve(state, opts.listen, shutdown).await?;
    tracing::info!(%addr, "API listening");
    Ok((addr, handle))
}

/// Runs the topology worker with `settings` (see [`Common::worker_settings`]) until
/// `shutdown`.
pub async fn run_worker(
    common: &Common,
    settings: topology::WorkerSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dog = watchdog::watch_group(
        settings.progress.clone(),
        &common.brokers,
        &common.topology.application_id,
        common.topology.source_topics(),
        &common.kafka,
        common.stall,
    )?;
    watchdog::guarded(
        "worker",
        dog,
        topology::run_worker(common.topology.clone(), settings, shutdown),
    )
    .await
}

pub async fn run_sink(
    common: &Common,
    group_id: &str,
    writers: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let pool = sinks::connect(common.database_url()?, writers + 2)?;
    let mut settings =
        sinks::runner::SinkSettings::new(&common.brokers, group_id, common.sink_topics()?);
    settings.kafka = common.kafka.clone();
    settings.writers = writers;
    let dog = watchdog::watch_group(
        settings.progress.clone(),
        &common.brokers,
        group_id,
        settings
            .topics
            .all()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        &common.kafka,
        common.stall,
    )?;
    watchdog::guarded(
        "sink",
        dog,
        sinks::runner::run_sink(pool, settings, shutdown),
    )
    .await
}

/// Delivers merchant notifications until `shutdown` (see [`sinks::notifier`]).
pub async fn run_notifier(
    common: &Common,
    settings: sinks::notifier::NotifierSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let pool = sinks::connect(common.database_url()?, 4)?;
    let dog = watchdog::watch_beats(settings.progress.clone(), common.stall)?;
    watchdog::guarded(
        "notifier",
        dog,
        sinks::notifier::run_notifier(pool, settings, shutdown),
    )
    .await
}

pub async fn rebuild_projection(common: &Common) -> anyhow::Result<sinks::runner::RebuildReport> {
    let pool = sinks::connect(common.database_url()?, 2)?;
    sinks::runner::rebuild(
        &pool,
        &common.brokers,
        &common.sink_topics()?,
        &common.kafka,
    )
    .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Parses `key=value` librdkafka properties.
pub fn parse_kafka_props(props: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    props
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("--kafka-prop {p:?} must look like key=value"))
        })
        .collect()
}
