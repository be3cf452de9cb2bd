//! The project's Prometheus configuration, alert rules and Grafana dashboards, checked
//! against a real Prometheus (Debian package `prometheus`) scraping a running stack.

use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::otlp::{Receiver, SpanRecord};
use testkit::stack::{Stack, StackOptions, DEMO_KEY};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "`{name}` not found: install the Debian package `prometheus` (apt-get install prometheus)"
    );
    PathBuf::from(path)
}

fn promtool(args: &[&str]) {
    let out = Command::new(tool("promtool")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped config with its targets pointed at `target` (all roles run in-process
/// here and share one registry) and a 1 s scrape interval.
fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("prometheus/prometheus.yml")).unwrap();
    let config = shipped
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("evaluation_interval: 5s", "evaluation_interval: 1s")
        .replace("\"api:9100\"", &format!("\"{target}\""))
        .replace(
            "    dns_sd_configs:\n      - names: [\"worker\"]\n        type: A\n        port: 9101\n        refresh_interval: 15s\n",
            &format!("    static_configs:\n      - targets: [\"{target}\"]\n"),
        )
        .replace("\"sink:9102\"", &format!("\"{target}\""))
        .replace("\"notifier:9103\"", &format!("\"{target}\""))
        .replace(
            "  - alerts.yml",
            &format!("  - {}", repo().join("prometheus/alerts.yml").display()),
        );
    assert!(
        ["dns_sd_configs", "api:9100", "sink:9102", "notifier:9103"]
            .iter()
            .all(|t| !config.contains(t)),
        "a scrape target of prometheus/prometheus.yml was not pointed at the test's metrics: {config}"
    );
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    promtool(&["check", "config", file.to_str().unwrap()]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

async fn query(http: &reqwest::Client, prom: &str, expr: &str) -> Value {
    http.get(format!("{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[test]
fn rules_and_dashboards_are_valid() {
    promtool(&[
        "check",
        "rules",
        repo().join("prometheus/alerts.yml").to_str().unwrap(),
    ]);
    promtool(&[
        "check",
        "config",
        repo().join("prometheus/prometheus.yml").to_str().unwrap(),
    ]);
    let datasources =
        std::fs::read_to_string(repo().join("grafana/provisioning/datasources/datasources.yml"))
            .unwrap();
    let known: HashSet<String> = datasources
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uid:"))
        .map(|u| u.trim().to_owned())
        .collect();
    let mut uids = HashSet::new();
    for d in dashboards() {
        let uid = d["uid"].as_str().unwrap().to_owned();
        assert!(uids.insert(uid.clone()), "dashboard uid {uid} used twice");
        let mut ids = HashSet::new();
        for p in d["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{uid}: panel id {} used twice",
                p["id"]
            );
            for ds in std::iter::once(&p["datasource"]).chain(
                p["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| &t["datasource"]),
            ) {
                let ds_uid = ds["uid"].as_str().unwrap();
                assert!(
                    known.contains(ds_uid),
                    "{uid}: datasource {ds_uid} is not provisioned"
                );
            }
        }
    }
}

fn dashboards() -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join("grafana/dashboards")).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        out.push(serde_json::from_str(&text).unwrap());
    }
    assert!(!out.is_empty());
    out
}

/// Sends spans of this test process to `receiver` (every role runs in-process here, so
/// one exporter carries the API's, the worker's and the sink's spans).
fn trace_to(receiver: &Receiver) {
    let mut cfg = telemetry::Config::from_env("gateway-test", false);
    cfg.otlp_endpoint = Some(receiver.endpoint.clone());
    cfg.export_interval = Duration::from_millis(200);
    cfg.logs = std::env::var_os("TEST_LOG").is_some();
    telemetry::init(&cfg).unwrap();
}

fn flush_spans() {
    tokio::task::block_in_place(telemetry::flush);
}

fn named<'a>(spans: &'a [SpanRecord], name_prefix: &str) -> Vec<&'a SpanRecord> {
    spans
        .iter()
        .filter(|s| s.name.starts_with(name_prefix))
        .collect()
}

fn process_spans<'a>(spans: &'a [SpanRecord], command: &str) -> Vec<&'a SpanRecord> {
    spans
        .iter()
        .filter(|s| s.name.starts_with("process ") && s.attributes["command"] == command)
        .collect()
}

/// A payment whose first charge attempt gets a 503, whose retry is answered "pending"
/// and which completes by webhook: every span of it — API request, command produce,
/// each processing step, both provider calls, event produce, projection writes — is in
/// one trace, rooted at the API request, each with its parent in the trace; the
/// webhook's own request (a trace of its own) is linked from the step that applied it.
/// Returns the number of spans in the payment's trace.
async fn one_trace_per_payment(stack: &Stack, receiver: &Receiver) -> usize {
    let api = stack.client(DEMO_KEY);
    let r = api.create("traced-1", 1010, "EUR").await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let pool = stack.pool().await.unwrap();
    testkit::client::wait_all_terminal(&pool, std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .unwrap();
    let kinds = api.event_types(&id).await.unwrap();
    assert!(
        kinds.iter().any(|k| k == "retry_scheduled")
            && kinds.last().map(String::as_str) == Some("completed"),
        "the traced payment must go through a retry and complete: {kinds:?}"
    );
    let events = kinds.len();

    // Spans arrive in export batches; wait until the trace is complete.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (trace, all) = loop {
        flush_spans();
        let all = receiver.spans();
        let trace_id = all
            .iter()
            .find(|s| {
                s.attributes.get("payment_id") == Some(&id)
                    && s.attributes.get("command").map(String::as_str) == Some("create")
            })
            .map(|s| s.trace_id.clone());
        if let Some(t) = trace_id {
            let trace: Vec<SpanRecord> = all.iter().filter(|s| s.trace_id == t).cloned().collect();
            let projected = named(&trace, &format!("{} project", stack.events_topic())).len();
            if projected >= events && !process_spans(&trace, "webhook").is_empty() {
                break (trace, all);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the payment's spans did not all arrive; received {} spans",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let by_id: std::collections::HashMap<&str, &SpanRecord> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &SpanRecord| by_id.get(s.parent_span_id.as_str()).copied();

    // One root: the API request that created the payment.
    let roots: Vec<&SpanRecord> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {roots:#?}");
    assert_eq!(roots[0].name, "POST /v1/payments");
    assert_eq!(roots[0].attributes["http.response.status_code"], "202");
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || parent_of(s).is_some(),
            "span {:?} has a parent outside the trace",
            s.name
        );
    }
    // API: request → command produce → processing of the create.
    let produce = named(&trace, &format!("{} publish", stack.commands_topic()));
    assert!(produce
        .iter()
        .any(|p| parent_of(p).is_some_and(|r| r.name == "POST /v1/payments")));
    let creates = process_spans(&trace, "create");
    assert_eq!(creates.len(), 1);
    assert!(parent_of(creates[0]).is_some_and(|p| produce.iter().any(|q| q.span_id == p.span_id)));
    // No dispatch delay (the shipped policy): the create starts processing and sends the
    // first charge itself.
    assert_eq!(creates[0].attributes["transition"], "none->PROCESSING");
    // Two provider calls (the 503, then the pending retry), each a child of the step that
    // decided it, each answered by a reply processed as its child.
    let calls = named(&trace, "provider charge");
    let attempts: HashSet<&str> = calls
        .iter()
        .map(|c| c.attributes["attempt"].as_str())
        .collect();
    assert_eq!(attempts, HashSet::from(["1", "2"]), "{calls:#?}");
    let outcomes: HashSet<&str> = calls
        .iter()
        .map(|c| c.attributes["outcome"].as_str())
        .collect();
    assert!(
        outcomes.contains("transient") && outcomes.contains("pending"),
        "{outcomes:?}"
    );
    for c in &calls {
        assert!(parent_of(c).is_some_and(|p| p.name.starts_with("process ")));
    }
    assert!(
        calls.iter().any(|c| c.attributes["attempt"] == "1"
            && parent_of(c).is_some_and(|p| p.span_id == creates[0].span_id)),
        "the first charge is a child of the create's step"
    );
    let replies = process_spans(&trace, "provider_reply");
    assert!(replies.len() >= 2);
    for r in &replies {
        assert!(
            parent_of(r).is_some_and(|p| p.name == "provider charge"),
            "a reply's parent is its provider call; this one's is {:?}",
            parent_of(r).map(|p| &p.name)
        );
    }
    // The retry timer joined the payment's trace.
    assert!(!process_spans(&trace, "timer").is_empty());
    // The webhook: applied in the payment's trace, linked to its own request's trace.
    let webhook = process_spans(&trace, "webhook");
    assert!(webhook.iter().any(
        |w| w.attributes.get("transition").map(String::as_str) == Some("PROCESSING->COMPLETED")
    ));
    let linked: Vec<&SpanRecord> = webhook
        .iter()
        .flat_map(|w| &w.links)
        .filter_map(|(t, s)| all.iter().find(|x| &x.trace_id == t && &x.span_id == s))
        .collect();
    assert!(
        !linked.is_empty(),
        "the webhook step links its request: {webhook:#?}"
    );
    for l in &linked {
        assert_ne!(l.trace_id, roots[0].trace_id);
        let request = all
            .iter()
            .find(|x| x.trace_id == l.trace_id && x.parent_span_id.is_empty())
            .unwrap();
        assert_eq!(request.name, "POST /v1/callbacks/{provider}");
    }
    // Every event was published and projected in the trace: projection writes are
    // children of the event's produce span.
    let writes = named(&trace, &format!("{} project", stack.events_topic()));
    assert!(writes.len() >= events, "a projection write per event");
    for w in writes {
        assert!(parent_of(w).is_some_and(|p| p.name.ends_with(" publish")));
    }
    if std::env::var_os("PRINT_TRACE").is_some() {
        for s in &trace {
            let parent = parent_of(s).map_or("-", |p| p.name.as_str());
            println!(
                "span {:<40} parent {:<40} {:?}",
                s.name,
                parent,
                s.attributes.get("transition")
            );
        }
    }
    trace.len()
}

/// With the collector down (requests hang unanswered), payments complete as before:
/// spans are dropped, the data path does not wait for the exporter.
async fn collector_down_does_not_slow_payments(stack: &Stack, receiver: &Receiver) {
    let api = stack.client(DEMO_KEY);
    let pool = stack.pool().await.unwrap();
    let mut timings = Vec::new();
    for (label, down) in [("up", false), ("down", true)] {
        receiver.set_down(down);
        let before = receiver.requests();
        let started = Instant::now();
        let mut ids = Vec::new();
        for i in 0..40 {
            let r = api
                .create(&format!("collector-{label}-{i}"), 1000 + 100 * i, "EUR")
                .await
                .unwrap();
            assert_eq!(r.status, 202, "collector {label}: {}", r.body);
            ids.push(r.body["id"].as_str().unwrap().to_owned());
        }
        testkit::client::wait_all_terminal(&pool, &ids, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("collector {label}: payments did not complete: {e}"));
        timings.push(format!("{label}={:.2}s", started.elapsed().as_secs_f64()));
        if down {
            assert!(
                receiver.requests() > before,
                "the exporter must have tried the hanging collector"
            );
        }
    }
    receiver.set_down(false);
    println!(
        "traces: 40 payments to terminal with the collector {}",
        timings.join(" ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_returns_data_and_every_rule_evaluates() {
    let receiver = Receiver::start().await.unwrap();
    trace_to(&receiver);
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let trace_spans = one_trace_per_payment(&stack, &receiver).await;
    collector_down_does_not_slow_payments(&stack, &receiver).await;
    let prom = start_prometheus(&stack.ops.to_string());
    let api = stack.client(DEMO_KEY);
    let http = reqwest::Client::new();

    // Traffic that exercises every metric the panels use: successes, declines, retries,
    // webhooks, a timeout resolved by a status check, duplicates, a rejected command,
    // bad requests and a poison record.
    let mut ids = Vec::new();
    for round in 0..3 {
        for (i, amount) in [1000, 1001, 1002, 1003, 1005, 1100].iter().enumerate() {
            let r = api
                .create(&format!("obs-{round}-{i}"), *amount, "EUR")
                .await
                .unwrap();
            ids.push(r.body["id"].as_str().unwrap().to_owned());
        }
        api.create("obs-0-0", 1000, "EUR").await.unwrap();
        api.create("bad", 0, "EUR").await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let topic = stack.commands_topic();
    stack
        .kafka
        .produce(&topic, Some(b"pay_x"), b"not a command")
        .await
        .unwrap();
    let unknown = payments::Command {
        command_id: payments::CommandId::parse("cancel-unknown").unwrap(),
        payment_id: payments::PaymentId::parse("pay_00000000000000000000000000000001").unwrap(),
        issued_at_ms: 0,
        body: payments::CommandBody::Cancel {
            merchant_id: payments::MerchantId::parse("demo").unwrap(),
        },
    };
    let key = unknown.payment_id.to_string();
    let bytes = payments::wire::encode_command(&unknown);
    for _ in 0..2 {
        stack
            .kafka
            .produce(&topic, Some(key.as_bytes()), &bytes)
            .await
            .unwrap();
    }
    let statuses = testkit::client::wait_all_terminal(
        &stack.pool().await.unwrap(),
        &ids,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    // A provider webhook that repeats the outcome of a completed payment: handled and
    // ignored (`after_terminal`), whatever order the other traffic's replies arrived in.
    let completed = statuses
        .iter()
        .find(|(_, status)| status.as_str() == "COMPLETED")
        .map(|(id, _)| id.clone())
        .expect("the traffic above completes at least one payment");
    let late = payments::Command {
        command_id: payments::CommandId::parse("webhook-after-terminal").unwrap(),
        payment_id: payments::PaymentId::parse(&completed).unwrap(),
        issued_at_ms: 0,
        body: payments::CommandBody::Webhook {
            webhook_id: "wh-after-terminal".into(),
            outcome: payments::WebhookOutcome::Succeeded {
                provider_ref: "late".into(),
            },
        },
    };
    stack
        .kafka
        .produce(
            &topic,
            Some(completed.as_bytes()),
            &payments::wire::encode_command(&late),
        )
        .await
        .unwrap();

    // Evaluate every panel query until each returns data (scrapes take a few seconds).
    let exprs: Vec<(String, String)> = dashboards()
        .iter()
        .flat_map(|d| {
            d["panels"].as_array().unwrap().iter().flat_map(|p| {
                let title = p["title"].as_str().unwrap().to_owned();
                p["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_owned()))
            })
        })
        .collect();
    let panels: usize = dashboards()
        .iter()
        .map(|d| d["panels"].as_array().unwrap().len())
        .sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<(String, String)>;
    loop {
        empty = Vec::new();
        for (title, expr) in &exprs {
            let v = query(&http, &prom.url, expr).await;
            assert_eq!(
                v["status"], "success",
                "panel {title:?}: {expr} does not evaluate: {v}"
            );
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                empty.push((title.clone(), expr.clone()));
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let empty_panels: HashSet<&String> = empty.iter().map(|(t, _)| t).collect();
    let with_data = panels - empty_panels.len();

    // Every alert rule has been evaluated without error.
    let rules: Value = http
        .get(format!("{}/api/v1/rules", prom.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let all: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let valid = all.iter().filter(|r| r["health"] == "ok").count();
    println!(
        "observability: panels={panels} panels_with_data={with_data} rules={} rules_valid={valid} trace_spans={trace_spans}",
        all.len()
    );
    assert!(empty.is_empty(), "panels without data: {empty:#?}");
    assert_eq!(valid, all.len(), "rules not healthy: {rules}");
    let shipped = std::fs::read_to_string(repo().join("prometheus/alerts.yml")).unwrap();
    let declared = shipped
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(
        all.len(),
        declared,
        "Prometheus loaded a different number of rules than alerts.yml declares"
    );
    stack.shutdown().await.unwrap();
}
