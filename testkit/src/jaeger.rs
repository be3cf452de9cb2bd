//! A real Jaeger for tests: the all-in-one binary `make jaeger` builds from the Go module
//! `github.com/jaegertracing/jaeger` (jaeger/go.mod), with in-memory storage, every port
//! on 127.0.0.1 and free, started per test and killed when dropped; and a client for its
//! HTTP query API that reads a payment's traces back as Jaeger stored them.
//!
//! Its log is a file; a failed test (or [`Jaeger::keep_logs`]) keeps it and says where.
//! [`Jaeger::kill`] and [`Jaeger::restart`] play a collector that dies and comes back on
//! the same ports (with empty storage, as an in-memory Jaeger does).

use anyhow::{bail, Context as _};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Jaeger release the tests build and the compose file runs, as one pair: Jaeger
/// tags every release twice, `v1.x` for the Go module (what jaeger/go.mod requires) and
/// `v2.y` for its binaries and images (what docker-compose.yml's image names), and the
/// two numbers move together (v1.74.0 is v2.11.0, v1.75.0 is v2.12.0). Change both, or
/// the compose check fails.
pub const JAEGER_RELEASE: JaegerRelease = JaegerRelease {
    go_module: "v1.75.0",
    image: "2.12.0",
};

/// One Jaeger release under its two tags.
#[derive(Debug, Clone, Copy)]
pub struct JaegerRelease {
    /// `github.com/jaegertracing/jaeger` in jaeger/go.mod.
    pub go_module: &'static str,
    /// `jaegertracing/jaeger:<tag>` in docker-compose.yml.
    pub image: &'static str,
}

/// How long Jaeger may take to report healthy after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `make jaeger` puts the binary: `JAEGER_BIN`, else the user's cache.
pub fn binary() -> PathBuf {
    let version = JAEGER_RELEASE.go_module.trim_start_matches('v');
    crate::cached("JAEGER_BIN", &format!("jaeger-{version}/jaeger"))
}

/// The ports one Jaeger listens on, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub query_http: u16,
    pub query_grpc: u16,
    pub health: u16,
}

impl Ports {
    /// Five distinct free ports (see [`crate::ports`]).
    fn free() -> anyhow::Result<Ports> {
        let p = (0..5)
            .map(|_| crate::ports::free_port())
            .collect::<anyhow::Result<Vec<u16>>>()?;
        Ok(Ports {
            otlp_grpc: p[0],
            otlp_http: p[1],
            query_http: p[2],
            query_grpc: p[3],
            health: p[4],
        })
    }
}

/// The whole configuration: only the OTLP receivers, the query API, the health check
/// and in-memory storage. The collector's own metrics are off, so nothing else listens;
/// so is the query service's tracing of itself, which would send to a fixed
/// localhost:4317 (another Jaeger's, or nobody's).
fn config(p: &Ports) -> String {
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query_http}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
",
        health = p.health,
        query_http = p.query_http,
        query_grpc = p.query_grpc,
        otlp_grpc = p.otlp_grpc,
        otlp_http = p.otlp_http,
    )
}

/// One running Jaeger.
pub struct Jaeger {
    pub ports: Ports,
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    keep: bool,
    http: reqwest::Client,
}

impl Jaeger {
    /// Starts Jaeger from [`binary`] and waits until it reports healthy.
    pub async fn start() -> anyhow::Result<Jaeger> {
        let bin = binary();
        if !bin.is_file() {
            bail!(
                "Jaeger is not built at {}: run `make jaeger` (it builds github.com/jaegertracing/jaeger \
                 {} from the Go module proxy with jaeger/go.mod; needs Go 1.26 or newer), or set JAEGER_BIN",
                bin.display(),
                JAEGER_RELEASE.go_module
            );
        }
        let dir = tempfile::Builder::new().prefix("jaeger-").tempdir()?;
        let ports = Ports::free()?;
        std::fs::write(dir.path().join("config.yaml"), config(&ports))?;
        let mut jaeger = Jaeger {
            ports,
            bin,
            dir: Some(dir),
            child: None,
            keep: false,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        jaeger.spawn().await?;
        Ok(jaeger)
    }

    fn dir(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_owned())
            .unwrap_or_default()
    }

    /// Jaeger's log (every start appends to it).
    pub fn log_file(&self) -> PathBuf {
        self.dir().join("jaeger.log")
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())?;
        let child = Command::new(&self.bin)
            .arg(format!(
                "--config={}",
                self.dir().join("config.yaml").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let health = format!("http://127.0.0.1:{}/status", self.ports.health);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "Jaeger exited at start ({status}); its log ends:\n{}",
                        self.log_tail(30)
                    );
                }
            }
            if let Ok(r) = self.http.get(&health).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "Jaeger did not report healthy on {health} within {START_TIMEOUT:?}; its log ends:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills Jaeger (SIGKILL): what it stored is gone, its ports refuse connections.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts Jaeger again on the same ports (after [`Jaeger::kill`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn().await
    }

    /// The OTLP/HTTP base URL (the gateway's `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.otlp_http)
    }

    /// The query API's base URL.
    pub fn query_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.query_http)
    }

    /// Keeps Jaeger's log when it goes; returns its folder.
    pub fn keep_logs(&mut self) -> PathBuf {
        self.keep = true;
        self.dir()
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.query_url());
        let r = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status();
        let body: serde_json::Value = r
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(body)
    }

    /// The services Jaeger has spans of (`GET /api/services`).
    pub async fn services(&self) -> anyhow::Result<Vec<String>> {
        let body = self.get("/api/services", &[]).await?;
        let mut names: Vec<String> = body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        Ok(names)
    }

    /// The traces of `service` of the last hour (`GET /api/traces`), those with a span
    /// carrying every one of `tags` when there are any.
    pub async fn search(&self, service: &str, tags: &[(&str, &str)]) -> anyhow::Result<Vec<Trace>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
        let hour = 3_600_000_000u128;
        let mut query = vec![
            ("service", service.to_owned()),
            ("start", (now - hour).to_string()),
            ("end", (now + 60_000_000).to_string()),
            ("limit", "10000".to_owned()),
        ];
        if !tags.is_empty() {
            let tags: serde_json::Map<String, serde_json::Value> = tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                .collect();
            query.push(("tags", serde_json::Value::Object(tags).to_string()));
        }
        let body = self.get("/api/traces", &query).await?;
        traces(&body)
    }

    /// The traces with a span tagged `key=value`, whatever service it came from.
    pub async fn search_all(&self, key: &str, value: &str) -> anyhow::Result<Vec<Trace>> {
        let mut found: BTreeMap<String, Trace> = BTreeMap::new();
        for service in self.services().await? {
            for t in self.search(&service, &[(key, value)]).await? {
                found.insert(t.id.clone(), t);
            }
        }
        Ok(found.into_values().collect())
    }

    /// One trace by id (`GET /api/traces/{id}`); `None` when Jaeger has none.
    pub async fn trace(&self, id: &str) -> anyhow::Result<Option<Trace>> {
        let url = format!("{}/api/traces/{id}", self.query_url());
        let r = self.http.get(&url).send().await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = r.status();
        let body: serde_json::Value = r.json().await?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(traces(&body)?.into_iter().next())
    }

    /// Searches ([`Jaeger::search_all`]) until `done` holds for what was found (spans
    /// reach storage after a batch step), or `timeout`: returns the last answer.
    pub async fn wait_for(
        &self,
        key: &str,
        value: &str,
        timeout: Duration,
        done: impl Fn(&[Trace]) -> bool,
    ) -> anyhow::Result<Vec<Trace>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.search_all(key, value).await?;
            if done(&found) || Instant::now() > deadline {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.kill();
        if self.keep || std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("jaeger: its log is kept in {}", dir.keep().display());
            }
        }
    }
}

/// One span as Jaeger's query API returns it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub name: String,
    pub service: String,
    /// The span's parent (its `CHILD_OF` reference in the same trace); `None` for a root.
    pub parent: Option<String>,
    /// `(trace_id, span_id)` of each linked span (`FOLLOWS_FROM` references).
    pub links: Vec<(String, String)>,
    /// Tags, every value as text.
    pub tags: BTreeMap<String, String>,
    /// When it started and how long it took, in microseconds (since the Unix epoch).
    pub start_us: u64,
    pub duration_us: u64,
}

/// One trace as Jaeger's query API returns it.
#[derive(Debug, Clone)]
pub struct Trace {
    pub id: String,
    pub spans: Vec<Span>,
}

impl Trace {
    pub fn span(&self, span_id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.span_id == span_id)
    }

    pub fn parent_of(&self, s: &Span) -> Option<&Span> {
        s.parent.as_deref().and_then(|p| self.span(p))
    }

    /// Spans whose parent is not in the trace.
    pub fn orphans(&self) -> Vec<&Span> {
        self.spans
            .iter()
            .filter(|s| s.parent.is_some() && self.parent_of(s).is_none())
            .collect()
    }

    /// Spans without a parent.
    pub fn roots(&self) -> Vec<&Span> {
        self.spans.iter().filter(|s| s.parent.is_none()).collect()
    }

    /// Spans whose name starts with `prefix`.
    pub fn named(&self, prefix: &str) -> Vec<&Span> {
        self.spans
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect()
    }
}

/// Jaeger writes a trace id of 16 hex digits when its upper half is zero: in W3C form,
/// always 32.
fn w3c_id(id: &str) -> String {
    format!("{id:0>32}")
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The traces of a query API answer (`{"data": [trace, …]}`).
fn traces(body: &serde_json::Value) -> anyhow::Result<Vec<Trace>> {
    let Some(data) = body["data"].as_array() else {
        return Ok(Vec::new());
    };
    data.iter().map(trace_of).collect()
}

fn trace_of(t: &serde_json::Value) -> anyhow::Result<Trace> {
    let id = w3c_id(t["traceID"].as_str().context("a trace without traceID")?);
    let services: HashMap<&str, &str> = t["processes"]
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(k, v)| (k.as_str(), v["serviceName"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let mut spans = Vec::new();
    for s in t["spans"].as_array().into_iter().flatten() {
        let mut parent = None;
        let mut links = Vec::new();
        for r in s["references"].as_array().into_iter().flatten() {
            let rt = w3c_id(r["traceID"].as_str().unwrap_or(""));
            let rs = r["spanID"].as_str().unwrap_or("").to_owned();
            if r["refType"] == "CHILD_OF" && rt == id && parent.is_none() {
                parent = Some(rs);
            } else {
                links.push((rt, rs));
            }
        }
        spans.push(Span {
            trace_id: id.clone(),
            span_id: s["spanID"]
                .as_str()
                .context("a span without spanID")?
                .to_owned(),
            name: s["operationName"].as_str().unwrap_or("").to_owned(),
            service: services
                .get(s["processID"].as_str().unwrap_or(""))
                .copied()
                .unwrap_or("")
                .to_owned(),
            parent,
            links,
            tags: s["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|kv| Some((kv["key"].as_str()?.to_owned(), text(&kv["value"]))))
                .collect(),
            start_us: s["startTime"].as_u64().unwrap_or(0),
            duration_us: s["duration"].as_u64().unwrap_or(0),
        });
    }
    Ok(Trace { id, spans })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_answer_reads_as_traces() {
        let body = serde_json::json!({"data": [{
            "traceID": "0af7651916cd43dd8448eb211c80319c",
            "spans": [
                {"traceID": "0af7651916cd43dd8448eb211c80319c", "spanID": "b7ad6b7169203331",
                 "operationName": "POST /v1/payments", "references": [], "processID": "p1",
                 "startTime": 1765000000000000u64, "duration": 1500,
                 "tags": [{"key": "http.response.status_code", "type": "int64", "value": 202}]},
                {"traceID": "0af7651916cd43dd8448eb211c80319c", "spanID": "00f067aa0ba902b7",
                 "operationName": "process webhook", "processID": "p2",
                 "references": [
                    {"refType": "CHILD_OF", "traceID": "0af7651916cd43dd8448eb211c80319c", "spanID": "b7ad6b7169203331"},
                    {"refType": "FOLLOWS_FROM", "traceID": "11111111111111112222222222222222", "spanID": "3333333333333333"}],
                 "tags": [{"key": "payment_id", "type": "string", "value": "pay_1"}]},
                {"traceID": "0af7651916cd43dd8448eb211c80319c", "spanID": "1111111111111111",
                 "operationName": "lost", "processID": "p2",
                 "references": [{"refType": "CHILD_OF", "traceID": "0af7651916cd43dd8448eb211c80319c", "spanID": "9999999999999999"}],
                 "tags": []}
            ],
            "processes": {"p1": {"serviceName": "gateway-api"}, "p2": {"serviceName": "gateway-worker"}}
        }]});
        let t = traces(&body).unwrap().remove(0);
        assert_eq!(t.spans.len(), 3);
        assert_eq!(t.roots().len(), 1);
        let hook = &t.spans[1];
        assert_eq!(hook.service, "gateway-worker");
        assert_eq!(t.parent_of(hook).unwrap().name, "POST /v1/payments");
        assert_eq!(
            hook.links,
            vec![(
                "11111111111111112222222222222222".to_owned(),
                "3333333333333333".to_owned()
            )]
        );
        assert_eq!(t.spans[0].tags["http.response.status_code"], "202");
        assert_eq!(
            (t.spans[0].start_us, t.spans[0].duration_us),
            (1765000000000000, 1500)
        );
        assert_eq!(t.orphans().len(), 1);
        assert_eq!(
            w3c_id("8448eb211c80319c"),
            "00000000000000008448eb211c80319c"
        );
    }

    #[test]
    fn every_port_is_on_loopback() {
        let p = Ports::free().unwrap();
        let cfg = config(&p);
        let endpoints: Vec<&str> = cfg
            .lines()
            .filter_map(|l| l.trim().strip_prefix("endpoint: "))
            .collect();
        assert_eq!(endpoints.len(), 5, "{cfg}");
        assert!(
            endpoints.iter().all(|e| e.starts_with("127.0.0.1:")),
            "{cfg}"
        );
    }
}
