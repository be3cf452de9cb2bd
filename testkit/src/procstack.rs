//! The gateway as it is deployed, for measurements: every role a separate OS process
//! (`gateway api`, `worker`, `sink`, `notifier` and `provider-sim`, the binaries built
//! beside the harness) on the process's shared broker and PostgreSQL, so that each one's
//! CPU time and memory can be read apart and each can be pinned to a CPU (`make bench`).
//! Its changelog has the deployment's settings
//! ([`crate::kafka::CHANGELOG_DEPLOYED_CONFIG`]), not the tests' always-busy cleaner.

use crate::kafka::Kafka;
use crate::pg;
use crate::procs::{free_addr, sibling, GatewayArgs, Proc};
use crate::stack::{provision, Deployment, DEMO_KEY, OTHER_KEY, WEBHOOK_SECRET};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use topology::config::TopologyFile;

/// What differs between the stacks a harness starts.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    pub partitions: i32,
    /// The payment policy (`key = value, …`, as [`crate::stack::SHIPPED_POLICY`]).
    pub policy: String,
    /// Changes the topology after its names and policy are set.
    pub edit_topology: Option<fn(&mut TopologyFile)>,
    /// sled's page cache per partition store of the worker, in MiB.
    pub store_cache_mb: u64,
    /// Creates the API handles at once (`API_MAX_CREATES_IN_FLIGHT`).
    pub max_creates_in_flight: usize,
    /// Extra librdkafka properties for every client of every role.
    pub kafka_props: Vec<(String, String)>,
    /// The sink's writers (`SINK_WRITERS`).
    pub sink_writers: usize,
}

/// One role's process and where its operational endpoints (`/metrics`) answer.
pub struct Role {
    pub proc: Proc,
    pub ops: String,
}

pub struct ProcessStack {
    pub kafka: Kafka,
    pub database_url: String,
    pub deployment: Deployment,
    pub partitions: i32,
    pub api: SocketAddr,
    /// The worker's state directory (its stores).
    pub worker_state: PathBuf,
    /// `provider-sim`, `api`, `worker`, `sink` and `notifier`, in the order they start.
    pub roles: Vec<Role>,
    dir: Option<tempfile::TempDir>,
}

/// The roles, as they are named in [`ProcessStack::roles`] and in its log files.
pub const ROLES: [&str; 5] = ["provider-sim", "api", "worker", "sink", "notifier"];

impl ProcessStack {
    /// Fresh topics and database, then every role started; returns once the API is
    /// ready. A role that exits before that is an error naming its log.
    pub async fn start(opts: &ProcessOptions) -> anyhow::Result<ProcessStack> {
        crate::init_test_logging();
        let (gateway, sim_bin) = (sibling("gateway")?, sibling("provider-sim")?);
        let kafka = Kafka::start()?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let deployment = provision(
            &kafka,
            &suffix,
            opts.partitions,
            (&opts.policy, opts.edit_topology),
            crate::kafka::CHANGELOG_DEPLOYED_CONFIG,
            false,
        )
        .await?;
        let dir = tempfile::Builder::new()
            .prefix("gateway-procs-")
            .tempdir()?;
        let root = dir.path().to_owned();
        let topology_file = root.join("topology.toml");
        std::fs::write(&topology_file, &deployment.text)?;
        // The test merchants, without notification endpoints (their notifications are
        // recorded as skipped), and the simulator's webhook secret.
        let merchants = root.join("merchants.toml");
        std::fs::write(
            &merchants,
            format!(
                "[merchants.demo]\nkey_sha256 = \"{}\"\n\n[merchants.globex]\nkey_sha256 = \"{}\"\n\n[webhooks.sim]\nsecrets = [\"{WEBHOOK_SECRET}\"]\n",
                gateway_http::auth::hash_key(DEMO_KEY),
                gateway_http::auth::hash_key(OTHER_KEY),
            ),
        )?;
        let database_url = pg::server()?.fresh_database().await?;
        let gw = GatewayArgs::new(
            kafka.brokers(),
            &topology_file,
            &deployment.events,
            &deployment.dlq,
            &database_url,
        );
        let props: Vec<String> = opts
            .kafka_props
            .iter()
            .flat_map(|(k, v)| ["--kafka-prop".to_owned(), format!("{k}={v}")])
            .collect();
        let role_args = |extra: &[&str]| {
            let mut a = gw.with(extra);
            a.extend(props.iter().cloned());
            a
        };
        let api_addr = free_addr()?;
        let sim_addr = free_addr()?;
        let worker_state = root.join("stores");
        let (merchants_s, state_s) = (
            merchants.display().to_string(),
            worker_state.display().to_string(),
        );
        let (creates, cache, writers) = (
            opts.max_creates_in_flight.to_string(),
            opts.store_cache_mb.to_string(),
            opts.sink_writers.to_string(),
        );
        let (sim_url, webhook_url, group) = (
            format!("http://{sim_addr}"),
            format!("http://{api_addr}/v1/callbacks/sim"),
            format!("projection-{suffix}"),
        );
        let mut roles = Vec::new();
        for name in ROLES {
            let ops = free_addr()?;
            let args: Vec<String> = match name {
                // Answers at once; webhooks 30 ms after an asynchronous answer.
                "provider-sim" => [
                    "--listen",
                    &sim_addr,
                    "--webhook-url",
                    &webhook_url,
                    "--webhook-delay-ms",
                    "30",
                    "--hang-ms",
                    "1500",
                ]
                .map(str::to_owned)
                .to_vec(),
                "api" => role_args(&[
                    "api",
                    "--listen",
                    &api_addr,
                    "--ops-listen",
                    &ops,
                    "--merchants",
                    &merchants_s,
                    "--rate-limit",
                    "0",
                    "--max-creates-in-flight",
                    &creates,
                ]),
                "worker" => role_args(&[
                    "worker",
                    "--state-dir",
                    &state_s,
                    "--provider-url",
                    &sim_url,
                    "--store-cache-mb",
                    &cache,
                    "--ops-listen",
                    &ops,
                ]),
                "sink" => role_args(&[
                    "sink",
                    "--group-id",
                    &group,
                    "--sink-writers",
                    &writers,
                    "--ops-listen",
                    &ops,
                ]),
                _ => role_args(&[
                    "notifier",
                    "--notify-merchants",
                    &merchants_s,
                    "--ops-listen",
                    &ops,
                ]),
            };
            let program = if name == "provider-sim" {
                &sim_bin
            } else {
                &gateway
            };
            let mut proc = Proc::new(name, program, args, &root);
            proc.start()?;
            roles.push(Role { proc, ops });
        }
        let mut stack = ProcessStack {
            kafka,
            database_url,
            deployment,
            partitions: opts.partitions,
            api: api_addr.parse().context("the API's address")?,
            worker_state,
            roles,
            dir: Some(dir),
        };
        stack.wait_ready(Duration::from_secs(60)).await?;
        Ok(stack)
    }

    /// Until the API answers ready; an error, keeping the logs, if a role exits first or
    /// `within` passes.
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + within;
        loop {
            self.ensure_running()?;
            let ready = http
                .get(format!("http://{}/health/ready", self.api))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = self.keep_logs();
                anyhow::bail!(
                    "the API was not ready within {} s; the roles' logs are in {}",
                    within.as_secs(),
                    logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An error naming the first role that exited on its own (its log kept).
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        let gone = self
            .roles
            .iter_mut()
            .find_map(|r| r.proc.exited().then(|| r.proc.log.clone()));
        if let Some(log) = gone {
            self.keep_logs();
            anyhow::bail!(
                "a role of the stack exited on its own; its log: {}",
                log.display()
            );
        }
        Ok(())
    }

    /// Keeps the roles' logs (and the worker's stores) after the stack is gone; returns
    /// where they are.
    pub fn keep_logs(&mut self) -> PathBuf {
        match self.dir.take() {
            Some(d) => d.keep(),
            None => self
                .roles
                .first()
                .and_then(|r| r.proc.log.parent().map(PathBuf::from))
                .unwrap_or_default(),
        }
    }

    /// The process id of each running role, by name.
    pub fn pids(&self) -> Vec<(&str, u32)> {
        self.roles
            .iter()
            .filter_map(|r| Some((r.proc.name.as_str(), r.proc.child.as_ref()?.id())))
            .collect()
    }

    pub fn pid(&self, role: &str) -> Option<u32> {
        self.pids()
            .into_iter()
            .find(|(n, _)| *n == role)
            .map(|(_, p)| p)
    }

    pub fn client(&self, key: &str) -> crate::client::Api {
        crate::client::Api::new(self.api, key)
    }

    pub async fn pool(&self) -> anyhow::Result<sinks::Pool> {
        sinks::connect(&self.database_url, 4)
    }

    /// The Prometheus text of every gateway role (`/metrics` of its operational
    /// endpoints), one after the other; a role that does not answer is left out.
    pub async fn metrics(&self) -> String {
        let http = reqwest::Client::new();
        let mut text = String::new();
        for r in self.roles.iter().filter(|r| r.proc.name != "provider-sim") {
            let got = http
                .get(format!("http://{}/metrics", r.ops))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(r) = got {
                text.push_str(&r.text().await.unwrap_or_default());
            }
        }
        text
    }

    /// Stops every role (SIGTERM, then SIGKILL after 10 s): the API first, so nothing new
    /// comes in, the provider simulator last. Then deletes the deployment's topics, so
    /// that a broker serving several stacks one after the other carries only the
    /// current one's (its cleaner and fetches included).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let n = self.roles.len();
        tokio::task::block_in_place(|| {
            for i in (1..n).chain(0..1) {
                self.roles[i].proc.terminate(Duration::from_secs(10));
            }
        });
        let d = &self.deployment;
        let mut topics = vec![
            d.commands.clone(),
            d.events.clone(),
            d.dlq.clone(),
            d.topology.changelog_topic(&d.commands),
        ];
        topics.extend(d.topology.notifications_topic());
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.kafka.delete_topics(&names).await
    }
}
