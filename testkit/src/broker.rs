//! Apache Kafka brokers for tests: KRaft nodes (each broker and controller at once) run
//! as Java processes from the jars `make kafka` caches, on 127.0.0.1 ports, each with its
//! own log directory.
//!
//! A cluster removes its files when it is dropped and, through a watchdog, when the
//! process that started it ends however it ends; a cluster marked failed (a test that
//! panicked, a harness that failed) keeps the brokers' logs and says where they are.
//! With `proxied`, every node's client listener is advertised through a
//! [`NetProxy`](crate::netproxy::NetProxy), so a test can break the network between the
//! clients and one broker; the brokers reach each other directly.

use crate::netproxy::NetProxy;
use anyhow::{bail, Context as _};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Kafka release the tests run, as `kafka/pom.xml` pins it and docker-compose.yml's
/// image names it.
pub const KAFKA_VERSION: &str = "4.4.0";

/// How long a node may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where `make kafka` puts the broker's jars: `KAFKA_LIBS`, else the user's cache.
pub fn jars_dir() -> PathBuf {
    crate::cached("KAFKA_LIBS", &format!("kafka-{KAFKA_VERSION}"))
}

/// The classpath of the cached jars, checked: the broker's own jar must be there.
fn classpath() -> anyhow::Result<String> {
    let dir = jars_dir();
    let broker = dir.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"));
    if !broker.exists() {
        bail!(
            "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: run `make kafka` (it fetches them from Maven \
             Central with kafka/pom.xml; needs Java 17+ and Maven), or set KAFKA_BROKERS to a running cluster",
            dir.display()
        );
    }
    Ok(format!("{}/*", dir.display()))
}

fn java() -> anyhow::Result<PathBuf> {
    let candidate = std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("java"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("java"));
    match Command::new(&candidate)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(candidate),
        _ => bail!(
            "no Java runtime to run Apache Kafka ({} -version failed): install Java 17 or newer \
             (apt-get install openjdk-17-jre-headless) or set JAVA_HOME",
            candidate.display()
        ),
    }
}

/// One KRaft node.
struct Node {
    id: u32,
    dir: PathBuf,
    /// The client listener the broker binds.
    client_port: u16,
    /// Where clients are told to connect (the proxy's port when proxied).
    advertised_port: u16,
    child: Option<Child>,
}

impl Node {
    fn log_file(&self) -> PathBuf {
        self.dir.join("logs").join("server.log")
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let out = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().chain(out.lines()).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A running cluster of `n` KRaft nodes.
pub struct Cluster {
    root: PathBuf,
    nodes: Vec<Node>,
    proxies: Vec<NetProxy>,
    java: PathBuf,
    classpath: String,
    keep: bool,
}

/// Broker settings the tests depend on: replication to match the node count,
/// compaction, retention and transaction timeouts that act within a test's time.
fn server_properties(
    n: usize,
    node: &Node,
    internal: u16,
    controller: u16,
    voters: &str,
) -> String {
    let rf = n.min(3);
    let min_isr = if n >= 3 { 2 } else { 1 };
    format!(
        "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=INTERNAL://127.0.0.1:{internal},EXTERNAL://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=INTERNAL://127.0.0.1:{internal},EXTERNAL://127.0.0.1:{advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,EXTERNAL:PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
num.partitions=1
default.replication.factor={rf}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
# Compaction, retention and aborts of timed-out transactions within a test's time.
log.initial.task.delay.ms=1000
log.retention.check.interval.ms=5000
log.cleaner.backoff.ms=500
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
# A dead node leaves the in-sync replicas within seconds.
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=1000
",
        id = node.id,
        client = node.client_port,
        advertised = node.advertised_port,
        data = node.dir.join("data").display(),
    )
}

const LOG4J: &str = "status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.apache.name = org.apache.kafka
logger.apache.level = info
";

impl Cluster {
    /// Formats and starts `n` nodes; returns once every broker answers metadata.
    pub fn start(n: usize, proxied: bool) -> anyhow::Result<Cluster> {
        anyhow::ensure!(n >= 1, "a cluster needs at least one node");
        let java = java()?;
        let classpath = classpath()?;
        let root = tempfile::Builder::new()
            .prefix("gateway-kafka-")
            .tempdir()
            .context("creating the brokers' directory")?
            .keep();
        std::fs::write(root.join("log4j2.properties"), LOG4J)?;
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        let mut proxies = Vec::new();
        for i in 0..n {
            let (client, internal, controller) = (
                crate::ports::free_port()?,
                crate::ports::free_port()?,
                crate::ports::free_port()?,
            );
            let advertised = if proxied {
                let proxy = NetProxy::start(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    SocketAddr::from(([127, 0, 0, 1], client)),
                )?;
                let port = proxy.listen.port();
                proxies.push(proxy);
                port
            } else {
                client
            };
            let id = i as u32 + 1;
            let dir = root.join(format!("node-{id}"));
            std::fs::create_dir_all(dir.join("logs"))?;
            nodes.push(Node {
                id,
                dir,
                client_port: client,
                advertised_port: advertised,
                child: None,
            });
            ports.push((internal, controller));
        }
        let voters = nodes
            .iter()
            .zip(&ports)
            .map(|(node, (_, c))| format!("{}@127.0.0.1:{c}", node.id))
            .collect::<Vec<_>>()
            .join(",");
        for (node, (internal, controller)) in nodes.iter().zip(&ports) {
            std::fs::write(
                node.dir.join("server.properties"),
                server_properties(n, node, *internal, *controller, &voters),
            )?;
        }
        let mut cluster = Cluster {
            root,
            nodes,
            proxies,
            java,
            classpath,
            keep: false,
        };
        cluster.watchdog()?;
        let cluster_id = cluster.storage_tool(&["random-uuid"])?.trim().to_owned();
        for i in 0..n {
            let props = cluster.nodes[i].dir.join("server.properties");
            cluster.storage_tool(&[
                "format",
                "-t",
                &cluster_id,
                "-c",
                &props.display().to_string(),
            ])?;
        }
        let started = Instant::now();
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(started)?;
        eprintln!(
            "kafka: Apache Kafka {KAFKA_VERSION} KRaft nodes={n} brokers={} started in {:.1} s (logs: {})",
            cluster.bootstrap(),
            started.elapsed().as_secs_f64(),
            cluster.root.display()
        );
        Ok(cluster)
    }

    /// Stops the brokers and removes their files when the current process ends, however
    /// it ends (a static cluster is never dropped); keeps the logs when marked failed.
    fn watchdog(&self) -> anyhow::Result<()> {
        let root = self.root.display();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done
             for f in {root}/node-*/pid; do [ -f \"$f\" ] && kill -9 \"$(cat \"$f\")\" 2>/dev/null; done
             sleep 1
             if [ -e {root}/keep ]; then rm -rf {root}/node-*/data; else rm -rf {root}; fi",
            pid = std::process::id(),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the brokers' watchdog")?;
        Ok(())
    }

    fn storage_tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.java)
            .arg("-cp")
            .arg(&self.classpath)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.root.join("log4j2.properties").display()
            ))
            .arg(format!("-Dkafka.logs.dir={}", self.root.display()))
            .arg("kafka.tools.StorageTool")
            .args(args)
            .output()
            .context("running Kafka's StorageTool")?;
        if !out.status.success() {
            bail!(
                "kafka.tools.StorageTool {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        anyhow::ensure!(
            node.child.is_none(),
            "kafka node {} is already running",
            node.id
        );
        let stdout = std::fs::File::create(node.dir.join("stdout.log"))?;
        let child = Command::new(&self.java)
            .args([
                "-Xms128m",
                "-Xmx768m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .arg("-Djava.awt.headless=true")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.root.join("log4j2.properties").display()
            ))
            .arg(format!(
                "-Dkafka.logs.dir={}",
                node.dir.join("logs").display()
            ))
            .arg("-cp")
            .arg(&self.classpath)
            .arg("kafka.Kafka")
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout)
            .spawn()
            .with_context(|| format!("starting kafka node {}", node.id))?;
        let mut pid = std::fs::File::create(node.dir.join("pid"))?;
        write!(pid, "{}", child.id())?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running node answers as a broker, failing with its log when one
    /// exits or the time runs out.
    fn wait_ready(&mut self, started: Instant) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some())
            .collect();
        for i in running {
            loop {
                if let Some(status) = self.nodes[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.nodes[i].child = None;
                    bail!(
                        "kafka node {} exited at start ({status}); a port in use or a bad setting is in its log \
                         ({}):\n{}",
                        self.nodes[i].id,
                        self.nodes[i].log_file().display(),
                        self.nodes[i].log_tail(30)
                    );
                }
                let log = std::fs::read_to_string(self.nodes[i].log_file()).unwrap_or_default();
                if log.contains("Kafka Server started") {
                    break;
                }
                if started.elapsed() > START_TIMEOUT {
                    bail!(
                        "kafka node {} did not start within {} s (a loaded machine, or a port in use); its log ({}):\n{}",
                        self.nodes[i].id,
                        START_TIMEOUT.as_secs(),
                        self.nodes[i].log_file().display(),
                        self.nodes[i].log_tail(30)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.wait_metadata(started)
    }

    /// Waits until a client sees every running broker in the cluster's metadata.
    fn wait_metadata(&self, started: Instant) -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let want = self.nodes.iter().filter(|n| n.child.is_some()).count();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("log_level", "3")
            .create()?;
        loop {
            let seen = consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|m| m.brokers().len())
                .unwrap_or(0);
            if seen >= want {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "the Kafka cluster did not list its {want} brokers within {} s (it lists {seen}); logs in {}",
                    START_TIMEOUT.as_secs(),
                    self.root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The clients' bootstrap list (through the proxies when proxied).
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.advertised_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process ids of the nodes running now.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The node ids, 1-based, as the brokers know them.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn index(&self, id: u32) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .with_context(|| format!("no kafka node {id}"))
    }

    pub fn is_running(&mut self, id: u32) -> bool {
        let Ok(i) = self.index(id) else { return false };
        match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.nodes[i].child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL: the node stops at once, mid-write, as in a power cut.
    pub fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        let i = self.index(id)?;
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// A clean shutdown (SIGTERM: leadership moves away first), SIGKILL after 60 s.
    pub fn stop(&mut self, id: u32) -> anyhow::Result<()> {
        let i = self.index(id)?;
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Starts a stopped node on its old data and waits until it answers.
    pub fn restart(&mut self, id: u32) -> anyhow::Result<()> {
        let i = self.index(id)?;
        // Its log so far: the started line of the new run is the one to wait for.
        let log = self.nodes[i].log_file();
        if log.exists() {
            let n = (1..)
                .find(|k| !log.with_extension(format!("log.{k}")).exists())
                .unwrap_or(1);
            std::fs::rename(&log, log.with_extension(format!("log.{n}")))?;
        }
        self.spawn(i)?;
        self.wait_ready(Instant::now())
    }

    /// The proxy in front of node `id` (a proxied cluster only).
    pub fn proxy(&self, id: u32) -> anyhow::Result<&NetProxy> {
        let i = self.index(id)?;
        self.proxies
            .get(i)
            .context("this cluster was started without proxies")
    }

    /// The directory of node `id`'s data (topic partitions are folders `topic-partition`).
    pub fn data_dir(&self, id: u32) -> anyhow::Result<PathBuf> {
        Ok(self.nodes[self.index(id)?].dir.join("data"))
    }

    pub fn java(&self) -> &Path {
        &self.java
    }

    pub fn classpath(&self) -> &str {
        &self.classpath
    }

    /// Keeps the brokers' logs when the cluster goes (a failed test or run).
    pub fn keep_logs(&mut self) -> PathBuf {
        self.keep = true;
        let _ = std::fs::write(self.root.join("keep"), b"");
        self.root.clone()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if self.keep || std::thread::panicking() {
            // The watchdog removes the whole folder when the process ends unless told.
            let _ = std::fs::write(self.root.join("keep"), b"");
            for n in &self.nodes {
                let _ = std::fs::remove_dir_all(n.dir.join("data"));
            }
            eprintln!(
                "kafka: the brokers' logs are kept in {}",
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
