//! The whole gateway for one test: its own topics, database, state directory, API,
//! sink, worker and provider simulator.

use crate::kafka::Kafka;
use crate::pg;
use anyhow::Context as _;
use gateway::{ApiOptions, Common};
use gateway_http::auth::MerchantKey;
use simulator::{SimConfig, Simulator};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use topology::config::{ComponentDecl, TopologyFile};

const TOPOLOGY: &str = include_str!("../../config/topology.toml");
/// The payment policy as shipped in `config/topology.toml` (for a stack people use).
pub const SHIPPED_POLICY: &str =
    "reply_timeout_ms = 10000, webhook_timeout_ms = 30000, max_attempts = 4, backoff_base_ms = 200, backoff_max_ms = 10000";
pub const DEMO_KEY: &str = "sk_test_demo";
pub const OTHER_KEY: &str = "sk_test_globex";
pub const WEBHOOK_SECRET: &str = "whsec_c2ltdWxhdG9yLXdlYmhvb2stc2VjcmV0";

#[derive(Debug, Clone)]
pub struct StackOptions {
    pub partitions: i32,
    pub sim: SimConfig,
    /// Run the worker as a child process of this binary (so a test can SIGKILL it).
    pub gateway_bin: Option<PathBuf>,
    pub provider_timeout: Duration,
    /// Replacements applied to the topology's payment parameters.
    pub policy: String,
    pub api_listen: SocketAddr,
    pub sim_listen: SocketAddr,
    /// Changes the topology after the stack's names and policy are set.
    pub edit_topology: Option<fn(&mut TopologyFile)>,
    /// sled's page cache per partition store, in MiB.
    pub store_cache_mb: u64,
    /// Names the topics and the application id (random when `None`): a second stack
    /// with the same names and `worker_state` is the same deployment on a fresh broker.
    pub names: Option<String>,
    /// The worker's state directory (a fresh one inside the stack's when `None`).
    pub worker_state: Option<PathBuf>,
    /// The API's admission control (as shipped: refuse while more than 1,000 records
    /// have waited over 2 s; a zero bound admits every create).
    pub admission_max_backlog: Duration,
    pub admission_min_backlog: u64,
    /// Creates the API handles at once (as shipped: 256).
    pub max_creates_in_flight: usize,
    /// Merchant id → where its notifications go (the notifier retries after 100 ms,
    /// doubling to 1 s, each attempt for at most 2 s).
    pub merchant_endpoints: HashMap<String, sinks::notifier::Endpoint>,
    /// Extra librdkafka properties for every client of the gateway (`--kafka-prop`).
    pub kafka_props: Vec<(String, String)>,
    /// The sink's writers (`SINK_WRITERS`; shipped: 2).
    pub sink_writers: usize,
    /// A Kafka node of the stack's own behind a fault proxy (for outage tests), instead
    /// of the process's shared one.
    pub own_kafka: bool,
    /// The child-process worker's `--instance-id` (static membership); dynamic when
    /// `None`.
    pub worker_instance_id: Option<String>,
    /// Start the sink with the stack; `false` leaves the projection empty until
    /// [`Stack::start_sink`] (a sink that lags, for as long as a test needs).
    pub sink: bool,
    /// Environment variables of the child-process worker (its `OTEL_*` settings: where
    /// it exports its spans).
    pub worker_env: Vec<(String, String)>,
}

impl StackOptions {
    fn store_cache_bytes(&self) -> u64 {
        self.store_cache_mb * 1024 * 1024
    }
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            partitions: 4,
            sim: SimConfig { hang_ms: 1_500, webhook_delay_ms: 30, ..SimConfig::default() },
            gateway_bin: None,
            provider_timeout: Duration::from_millis(500),
            policy: "reply_timeout_ms = 1500, webhook_timeout_ms = 4000, max_attempts = 3, backoff_base_ms = 50, backoff_max_ms = 400, status_poll_max_ms = 3000".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            sim_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            edit_topology: None,
            store_cache_mb: stores::DEFAULT_CACHE_MB,
            names: None,
            worker_state: None,
            admission_max_backlog: Duration::from_secs(2),
            admission_min_backlog: 1_000,
            max_creates_in_flight: 256,
            merchant_endpoints: HashMap::new(),
            kafka_props: vec![],
            sink_writers: 2,
            own_kafka: false,
            worker_instance_id: None,
            sink: true,
            worker_env: vec![],
        }
    }
}

enum Worker {
    InProcess {
        stop: broadcast::Sender<()>,
        join: JoinHandle<anyhow::Result<()>>,
    },
    Child(std::process::Child),
}

pub struct Stack {
    pub kafka: Kafka,
    pub database_url: String,
    pub common: Common,
    pub api: SocketAddr,
    /// Where the next worker keeps its stores (change it to start a worker on a fresh
    /// disk, which restores from the changelog).
    pub worker_state: PathBuf,
    /// Operational endpoints (`/metrics`, `/health/live`, `/topology`) of the in-process
    /// roles, which share one metrics registry.
    pub ops: SocketAddr,
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    pub state_dir: tempfile::TempDir,
    pub opts: StackOptions,
    topology_file: PathBuf,
    shutdown: broadcast::Sender<()>,
    worker: Option<Worker>,
    sink_group: String,
    sink: Option<(broadcast::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    notifier: Option<JoinHandle<anyhow::Result<()>>>,
}

/// `config/topology.toml`, parsed, with its topics, application id and payment policy
/// (`key = value` pairs, comma-separated, as [`SHIPPED_POLICY`]) set. Tests change the
/// fields of the result (a typed file), never its text.
pub fn shipped_topology(
    commands: &str,
    events: &str,
    dlq: &str,
    application_id: &str,
    policy: &str,
) -> anyhow::Result<TopologyFile> {
    let mut file: TopologyFile =
        toml::from_str(TOPOLOGY).context("config/topology.toml does not parse")?;
    let shipped = file.processors.get("payments").map(|p| p.params.clone());
    anyhow::ensure!(
        shipped == Some(policy_params(SHIPPED_POLICY)?),
        "the payment policy of config/topology.toml is no longer SHIPPED_POLICY: update it"
    );
    file.application_id = application_id.to_owned();
    component(&mut file.processors, "payments")?.params = policy_params(policy)?;
    file.sources
        .get_mut("commands")
        .context("config/topology.toml has no source `commands`")?
        .topic = commands.to_owned();
    for (sink, topic) in [("events", events), ("dead_letters", dlq)] {
        set_param(component(&mut file.sinks, sink)?, "topic", topic.into())?;
    }
    if let Ok(n) = component(&mut file.sinks, "notifications") {
        set_param(n, "topic", notifications_topic(events).into())?;
    }
    Ok(file)
}

/// The notifications topic of a deployment whose events topic is `events`.
pub fn notifications_topic(events: &str) -> String {
    format!("{events}-notifications")
}

/// The file as the worker reads it.
pub fn topology_text(file: &TopologyFile) -> anyhow::Result<String> {
    toml::to_string(file).context("writing the topology as TOML")
}

/// A processor or sink of the file, by id.
pub fn component<'a>(
    section: &'a mut std::collections::BTreeMap<String, ComponentDecl>,
    id: &str,
) -> anyhow::Result<&'a mut ComponentDecl> {
    section
        .get_mut(id)
        .with_context(|| format!("config/topology.toml has no component `{id}`"))
}

/// Sets one key of a component's `params` table.
pub fn set_param(c: &mut ComponentDecl, key: &str, value: toml::Value) -> anyhow::Result<()> {
    c.params
        .as_table_mut()
        .context("params is not a table")?
        .insert(key.to_owned(), value);
    Ok(())
}

/// A deployment's topics on the broker and its topology: what every stack starts from.
pub struct Deployment {
    pub commands: String,
    pub events: String,
    pub dlq: String,
    pub topology: Arc<topology::CompiledTopology>,
    /// The topology as the roles read it (`--topology`).
    pub text: String,
}

/// Creates the topics of the deployment named `suffix` (commands, events, dead letters,
/// changelog and notifications, `partitions` each; the changelog with
/// `changelog_config`) and compiles its topology: the shipped one with `policy`, then
/// `edit`. With `reuse`, topics of those names are deleted first (real brokers outlive a
/// stack: the same names start from empty topics).
pub async fn provision(
    kafka: &Kafka,
    suffix: &str,
    partitions: i32,
    (policy, edit): (&str, Option<fn(&mut TopologyFile)>),
    changelog_config: &[(&str, &str)],
    reuse: bool,
) -> anyhow::Result<Deployment> {
    let (commands, events, dlq) = (
        format!("cmd-{suffix}"),
        format!("evt-{suffix}"),
        format!("dlq-{suffix}"),
    );
    let changelog = format!("app-{suffix}-{commands}-changelog");
    if reuse {
        let notifications = notifications_topic(&events);
        kafka
            .delete_topics(&[&commands, &events, &dlq, &changelog, &notifications])
            .await?;
    }
    for t in [&commands, &events, &dlq] {
        kafka.create_topic(t, partitions).await?;
    }
    let mut file = shipped_topology(&commands, &events, &dlq, &format!("app-{suffix}"), policy)?;
    if let Some(edit) = edit {
        edit(&mut file);
    }
    let text = topology_text(&file)?;
    let topology = Arc::new(topology::compile_str(&text)?);
    anyhow::ensure!(
        topology.changelog_topic(&commands) == changelog,
        "the changelog topic is {}, not {changelog}",
        topology.changelog_topic(&commands)
    );
    kafka
        .create_topic_with(&changelog, partitions, changelog_config)
        .await?;
    if let Some(t) = topology.notifications_topic() {
        kafka.create_topic(&t, partitions).await?;
    }
    Ok(Deployment {
        commands,
        events,
        dlq,
        topology,
        text,
    })
}

/// `policy` (`key = value, …`) as a params table.
fn policy_params(policy: &str) -> anyhow::Result<toml::Value> {
    let wrapped: toml::Table = toml::from_str(&format!("p = {{ {policy} }}"))
        .with_context(|| format!("the payment policy {policy:?} is not TOML key = value pairs"))?;
    wrapped.get("p").cloned().context("no policy")
}

fn wait_for(tx: &broadcast::Sender<()>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = tx.subscribe();
    async move {
        let _ = rx.recv().await;
    }
}

impl Stack {
    pub async fn start(opts: StackOptions) -> anyhow::Result<Stack> {
        crate::init_test_logging();
        let kafka = if opts.own_kafka {
            Kafka::start_cluster(1)?
        } else {
            Kafka::start()?
        };
        let suffix = match &opts.names {
            Some(n) => n.clone(),
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let Deployment {
            commands: _,
            events,
            dlq,
            topology,
            text,
        } = provision(
            &kafka,
            &suffix,
            opts.partitions,
            (&opts.policy, opts.edit_topology),
            crate::kafka::CHANGELOG_TEST_CONFIG,
            opts.names.is_some(),
        )
        .await?;
        let state_dir = tempfile::Builder::new()
            .prefix("gateway-state-")
            .tempdir()?;
        let topology_file = state_dir.path().join("topology.toml");
        std::fs::write(&topology_file, &text)?;
        let database_url = pg::server()?.fresh_database().await?;
        let common = Common {
            brokers: kafka.brokers().to_owned(),
            database_url: Some(database_url.clone()),
            topology,
            events_topic: events,
            dlq_topic: dlq,
            kafka: opts.kafka_props.clone(),
            stall: gateway::watchdog::StallSettings::default(),
        };
        let (shutdown, _) = broadcast::channel(1);
        let merchants = vec![
            MerchantKey::from_plain("demo", DEMO_KEY).map_err(anyhow::Error::msg)?,
            MerchantKey::from_plain("globex", OTHER_KEY).map_err(anyhow::Error::msg)?,
        ];
        let mut secrets = HashMap::new();
        secrets.insert(
            "sim".to_owned(),
            vec![payments::webhook::secret_bytes(WEBHOOK_SECRET)?],
        );
        let api_opts = ApiOptions {
            listen: opts.api_listen,
            merchants,
            webhook_secrets: secrets,
            max_body_bytes: 16 * 1024,
            rate_limit_per_second: 5000.0,
            admission_max_backlog: opts.admission_max_backlog,
            admission_min_backlog: opts.admission_min_backlog,
            max_creates_in_flight: opts.max_creates_in_flight,
        };
        let (api, _api_join) = gateway::start_api(&common, api_opts, wait_for(&shutdown))
            .await
            .with_context(|| format!("starting the API on {}", opts.api_listen))?;
        let (ops, _ops_join) = gateway_http::serve_ops(
            "127.0.0.1:0".parse()?,
            Some(common.topology.describe()),
            wait_for(&shutdown),
        )
        .await?;
        let mut sim_cfg = opts.sim.clone();
        sim_cfg.webhook_url = Some(format!("http://{api}/v1/callbacks/sim"));
        sim_cfg.webhook_secret = WEBHOOK_SECRET.into();
        let sim = Simulator::new(sim_cfg);
        let (sim_addr, _sim_join) =
            gateway_http::spawn_server(sim.routes(), opts.sim_listen, wait_for(&shutdown))
                .await
                .with_context(|| {
                    format!("starting the provider simulator on {}", opts.sim_listen)
                })?;
        let notifier = {
            let common = common.clone();
            let stop = wait_for(&shutdown);
            let mut settings =
                sinks::notifier::NotifierSettings::new(opts.merchant_endpoints.clone());
            settings.request_timeout = Duration::from_secs(2);
            settings.backoff_base = Duration::from_millis(100);
            settings.backoff_max = Duration::from_secs(1);
            settings.poll = Duration::from_millis(50);
            tokio::spawn(async move { gateway::run_notifier(&common, settings, stop).await })
        };
        let mut stack = Stack {
            kafka,
            database_url,
            common,
            api,
            worker_state: opts
                .worker_state
                .clone()
                .unwrap_or_else(|| state_dir.path().join("stores")),
            ops,
            sim,
            sim_addr,
            state_dir,
            opts,
            topology_file,
            shutdown,
            worker: None,
            sink_group: format!("projection-{suffix}"),
            sink: None,
            notifier: Some(notifier),
        };
        if stack.opts.sink {
            stack.start_sink()?;
        }
        stack.start_worker()?;
        Ok(stack)
    }

    pub fn commands_topic(&self) -> String {
        self.common.commands_topic().unwrap_or_default()
    }

    pub fn events_topic(&self) -> String {
        self.common.events_topic.clone()
    }

    pub fn start_worker(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.worker.is_none(), "a worker is already running");
        let provider_url = format!("http://{}", self.sim_addr);
        let state = self.worker_state.clone();
        self.worker = Some(match &self.opts.gateway_bin {
            Some(bin) => {
                let mut cmd = std::process::Command::new(bin);
                cmd.arg("--brokers")
                    .arg(&self.common.brokers)
                    .arg("--topology")
                    .arg(&self.topology_file)
                    .arg("worker")
                    .arg("--state-dir")
                    .arg(&state)
                    .arg("--provider-url")
                    .arg(&provider_url)
                    .arg("--provider-timeout-ms")
                    .arg(self.opts.provider_timeout.as_millis().to_string())
                    .arg("--store-cache-mb")
                    .arg(self.opts.store_cache_mb.to_string())
                    .arg("--ops-listen")
                    .arg("127.0.0.1:0")
                    .stdin(std::process::Stdio::null());
                for (k, v) in &self.common.kafka {
                    cmd.arg("--kafka-prop").arg(format!("{k}={v}"));
                }
                if let Some(id) = &self.opts.worker_instance_id {
                    cmd.arg("--instance-id").arg(id);
                }
                cmd.envs(self.opts.worker_env.iter().cloned());
                if std::env::var_os("TEST_LOG").is_none() {
                    cmd.stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null());
                }
                Worker::Child(
                    cmd.spawn()
                        .with_context(|| format!("starting {}", bin.display()))?,
                )
            }
            None => {
                let (stop, _) = broadcast::channel(1);
                let common = self.common.clone();
                let settings = self.worker_settings(state, &provider_url)?;
                let until = wait_for(&stop);
                let join =
                    tokio::spawn(
                        async move { gateway::run_worker(&common, settings, until).await },
                    );
                Worker::InProcess { stop, join }
            }
        });
        Ok(())
    }

    /// Starts the sink; its group goes on from the offsets it committed.
    pub fn start_sink(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.sink.is_none(), "a sink is already running");
        let (stop, _) = broadcast::channel(1);
        let common = self.common.clone();
        let group = self.sink_group.clone();
        let writers = self.opts.sink_writers;
        let until = wait_for(&stop);
        let join =
            tokio::spawn(async move { gateway::run_sink(&common, &group, writers, until).await });
        self.sink = Some((stop, join));
        Ok(())
    }

    /// Stops the sink: the projection stays as it is until [`Stack::start_sink`].
    pub async fn stop_sink(&mut self) -> anyhow::Result<()> {
        match self.sink.take() {
            None => Ok(()),
            Some((stop, join)) => {
                let _ = stop.send(());
                join.await?
            }
        }
    }

    /// Another in-process worker in the same consumer group, on the same state directory
    /// (partitions, and their stores, move between the two on rebalances).
    pub fn spawn_extra_worker(&self) -> anyhow::Result<ExtraWorker> {
        self.spawn_extra_worker_in(self.worker_state.clone())
    }

    /// Another in-process worker in the same consumer group, on a state directory of its
    /// own (another machine's disk: what it takes over it restores from the changelog).
    pub fn spawn_extra_worker_in(&self, state_dir: PathBuf) -> anyhow::Result<ExtraWorker> {
        self.spawn_extra_worker_as(state_dir, None)
    }

    /// Another in-process worker on a state directory of its own, a static member of the
    /// group (`group.instance.id`) when `instance_id` is given.
    pub fn spawn_extra_worker_as(
        &self,
        state_dir: PathBuf,
        instance_id: Option<&str>,
    ) -> anyhow::Result<ExtraWorker> {
        let (stop, _) = broadcast::channel(1);
        let common = self.common.clone();
        let mut settings = self.worker_settings(state_dir, &format!("http://{}", self.sim_addr))?;
        settings.instance_id = instance_id.map(str::to_owned);
        let until = wait_for(&stop);
        let join = tokio::spawn(async move { gateway::run_worker(&common, settings, until).await });
        Ok(ExtraWorker { stop, join })
    }

    /// The settings of an in-process worker of this stack.
    fn worker_settings(
        &self,
        state_dir: PathBuf,
        provider_url: &str,
    ) -> anyhow::Result<topology::WorkerSettings> {
        let mut settings = self.common.worker_settings(state_dir, provider_url)?;
        settings.provider_timeout = self.opts.provider_timeout;
        settings.store_cache_bytes = self.opts.store_cache_bytes();
        Ok(settings)
    }

    /// Stops the worker: gracefully in-process, or with SIGKILL for a child process.
    pub async fn stop_worker(&mut self) -> anyhow::Result<()> {
        match self.worker.take() {
            None => Ok(()),
            Some(Worker::InProcess { stop, join }) => {
                let _ = stop.send(());
                join.await?
            }
            Some(Worker::Child(mut child)) => {
                child.kill()?;
                child.wait()?;
                Ok(())
            }
        }
    }

    /// The worker's process id, when it runs as a child process.
    pub fn worker_pid(&self) -> Option<u32> {
        match &self.worker {
            Some(Worker::Child(c)) => Some(c.id()),
            _ => None,
        }
    }

    /// Whether the worker is still running (a failed worker is an error here).
    pub fn worker_alive(&mut self) -> anyhow::Result<bool> {
        match &mut self.worker {
            None => Ok(false),
            Some(Worker::InProcess { join, .. }) => Ok(!join.is_finished()),
            Some(Worker::Child(c)) => match c.try_wait()? {
                None => Ok(true),
                Some(status) => anyhow::bail!("worker process exited: {status}"),
            },
        }
    }

    pub fn client(&self, key: &str) -> crate::client::Api {
        crate::client::Api::new(self.api, key)
    }

    pub async fn pool(&self) -> anyhow::Result<sinks::Pool> {
        sinks::connect(&self.database_url, 4)
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_worker().await?;
        let _ = self.shutdown.send(());
        self.stop_sink().await?;
        if let Some(n) = self.notifier.take() {
            n.await??;
        }
        Ok(())
    }
}

pub struct ExtraWorker {
    stop: broadcast::Sender<()>,
    join: JoinHandle<anyhow::Result<()>>,
}

impl ExtraWorker {
    pub fn is_running(&self) -> bool {
        !self.join.is_finished()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.join.await?
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(Worker::Child(c)) = &mut self.worker {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.shutdown.send(());
        if std::thread::panicking() {
            // A failed test's runtime waits, when it shuts down, for whatever its tasks
            // are blocked in (a Kafka client closing against a broker already gone): a
            // failure must end the run, not hang it.
            std::thread::spawn(|| {
                std::thread::sleep(PANIC_GRACE);
                eprintln!(
                    "a test failed and its stack did not shut down within {} s: exiting",
                    PANIC_GRACE.as_secs()
                );
                std::process::exit(101);
            });
        }
    }
}

/// How long a failed test's stack may take to shut down before the test process exits.
const PANIC_GRACE: Duration = Duration::from_secs(300);
