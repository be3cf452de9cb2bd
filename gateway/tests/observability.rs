//! The project's Prometheus configuration, alert rules and Grafana dashboards, checked
//! against a real Prometheus (Debian package `prometheus`) scraping a running stack.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testkit::jaeger::{Jaeger, Span, Trace};
use testkit::merchant::{MerchantEndpoint, Mode};
use testkit::netproxy::{NetMode, NetProxy};
use testkit::stack::{Stack, StackOptions, DEMO_KEY, OTHER_KEY};

// Counts the heap the test process holds, to bound what the span exporter keeps.
#[global_allocator]
static HEAP: telemetry::heap::Counting<std::alloc::System> =
    telemetry::heap::Counting(std::alloc::System);

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
    let port = testkit::ports::free_port().unwrap();
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

/// The exporter's queue in this test (`OTEL_BSP_MAX_QUEUE_SIZE`): small, so that a
/// Jaeger that is down while a few hundred payments run is many queues' worth of spans.
const MAX_QUEUE: usize = 256;

/// The most spans the exporter holds: its queue and the batch it is sending.
const HELD: usize = MAX_QUEUE + telemetry::MAX_EXPORT_BATCH;

/// Sends this test process's spans to Jaeger through `proxy`, a TCP proxy in front of
/// Jaeger's OTLP/HTTP port that can hold every byte (a collector that accepts and never
/// answers). Every role runs in-process here, so one exporter carries the API's, the
/// worker's, the sink's and the notifier's spans, under one service name.
fn trace_to(proxy: &NetProxy) {
    let mut cfg = telemetry::Config::from_env("gateway-test", false);
    cfg.otlp_endpoint = Some(format!("http://{}", proxy.listen));
    cfg.export_interval = Duration::from_millis(200);
    cfg.max_queue = MAX_QUEUE;
    cfg.logs = std::env::var_os("TEST_LOG").is_some();
    telemetry::init(&cfg).unwrap();
}

fn flush_spans() {
    tokio::task::block_in_place(telemetry::flush);
}

const DEMO_NOTIFY_SECRET: &str = "whsec_bWVyY2hhbnQtbm90aWZpY2F0aW9uLXNlY3JldA==";

/// A notification endpoint for a merchant, and the stack's entry for it.
async fn merchant_endpoint() -> (MerchantEndpoint, sinks::notifier::Endpoint) {
    let secret = payments::webhook::secret_bytes(DEMO_NOTIFY_SECRET).unwrap();
    let endpoint = MerchantEndpoint::start(vec![secret.clone()], std::future::pending())
        .await
        .unwrap();
    let entry = sinks::notifier::Endpoint {
        url: endpoint.url(),
        secrets: vec![secret],
    };
    (endpoint, entry)
}

/// One traced payment: what it went through, and what its trace must show besides what
/// every payment's trace shows ([`check_payment_trace`]).
struct Traced {
    label: &'static str,
    id: String,
    /// Names (prefixes) of spans its complete trace holds.
    spans: &'static [&'static str],
    /// Root span names of the request traces (callbacks, cancels, refunds) it links.
    linked: &'static [&'static str],
    /// Callback requests that repeat a webhook already applied: the worker drops the
    /// repeat before it is a step of the payment, so nothing links its trace.
    repeated_callbacks: usize,
    check: fn(&Trace),
}

const CALLBACK: &str = "POST /v1/callbacks/{provider}";
const CANCEL: &str = "POST /v1/payments/{id}/cancel";
const REFUND: &str = "POST /v1/payments/{id}/refunds";

fn tag<'a>(s: &'a Span, key: &str) -> &'a str {
    s.tags.get(key).map_or("", String::as_str)
}

fn with_command<'a>(t: &'a Trace, command: &str) -> Vec<&'a Span> {
    t.named("process ")
        .into_iter()
        .filter(|s| tag(s, "command") == command)
        .collect()
}

async fn create(api: &testkit::client::Api, key: &str, amount: i64) -> String {
    let r = api.create(key, amount, "EUR").await.unwrap();
    assert_eq!(r.status, 202, "{key}: {}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    // A traceparent in the answer, when the API gives one, names the payment's trace:
    // checked against Jaeger with the rest of the trace.
    if let Some(tp) = r.headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let trace = telemetry::trace_id(tp).unwrap_or_else(|| panic!("{key}: traceparent {tp}"));
        ANSWERED.lock().unwrap().insert(id.clone(), trace);
    }
    id
}

/// Payment id → the trace id of the `traceparent` its create was answered with.
static ANSWERED: std::sync::Mutex<BTreeMap<String, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// The payments of issue 32's list, each through its path to the end.
async fn traced_payments(stack: &Stack, globex: &MerchantEndpoint) -> Vec<Traced> {
    let api = stack.client(DEMO_KEY);
    let wait = Duration::from_secs(30);
    let mut out = Vec::new();

    let id = create(&api, "traced-approved", 1000).await;
    api.wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    out.push(Traced {
        label: "approved at once",
        id,
        spans: &[
            "process create",
            "provider charge",
            "process provider_reply",
        ],
        linked: &[],
        repeated_callbacks: 0,
        check: |t| {
            let calls = t.named("provider charge");
            assert_eq!(calls.len(), 1, "one charge");
            assert_eq!(tag(calls[0], "attempt"), "1");
            assert!(with_command(t, "provider_reply")
                .iter()
                .any(|s| tag(s, "transition") == "PROCESSING->COMPLETED"));
        },
    });

    let id = create(&api, "traced-503", 1002).await;
    api.wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    out.push(Traced {
        label: "provider 503, then a retry",
        id,
        spans: &["provider charge", "process timer"],
        linked: &[],
        repeated_callbacks: 0,
        check: |t| {
            let calls = t.named("provider charge");
            let attempts: HashSet<&str> = calls.iter().map(|c| tag(c, "attempt")).collect();
            assert_eq!(attempts, HashSet::from(["1", "2"]), "{calls:#?}");
            assert!(calls.iter().any(|c| tag(c, "outcome") == "transient"));
            // The retry's timer starts the second charge.
            assert!(calls.iter().any(|c| tag(c, "attempt") == "2"
                && t.parent_of(c).is_some_and(|p| tag(p, "command") == "timer")));
        },
    });

    let id = create(&api, "traced-pending", 1003).await;
    api.wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    out.push(Traced {
        label: "pending, then a webhook",
        id,
        spans: &["provider charge", "process webhook"],
        linked: &[CALLBACK],
        repeated_callbacks: 0,
        check: |t| {
            assert!(t
                .named("provider charge")
                .iter()
                .any(|c| tag(c, "outcome") == "pending"));
            assert!(with_command(t, "webhook")
                .iter()
                .any(|s| tag(s, "transition") == "PROCESSING->COMPLETED"));
        },
    });

    let id = create(&api, "traced-webhook-first", 1009).await;
    api.wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    out.push(Traced {
        label: "webhook before the synchronous answer",
        id,
        spans: &[
            "provider charge",
            "process webhook",
            "process provider_reply",
        ],
        linked: &[CALLBACK],
        // The simulator sends this webhook twice.
        repeated_callbacks: 1,
        check: |t| {
            assert!(!with_command(t, "webhook").is_empty());
        },
    });

    // Amounts ending in 07 settle late (10 webhook delays and 0.5 s): a window in which
    // the payment is PROCESSING and can be canceled.
    let id = create(&api, "traced-cancel", 1007).await;
    api.wait_for_status(&id, &["PROCESSING"], wait)
        .await
        .unwrap();
    let c = api.cancel(&id).await.unwrap();
    assert_eq!(c.status, 202, "{}", c.body);
    api.wait_for_status(&id, &["CANCELED"], wait).await.unwrap();
    out.push(Traced {
        label: "a cancel",
        id,
        spans: &["process cancel", "provider cancel"],
        linked: &[CANCEL],
        repeated_callbacks: 0,
        check: |t| {
            assert!(t
                .spans
                .iter()
                .any(|s| tag(s, "transition").ends_with("->CANCELED")));
            for p in t.named("provider cancel") {
                assert_eq!(tag(p, "op"), "cancel");
            }
        },
    });

    let id = create(&api, "traced-refund", 1000).await;
    api.wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    for (key, amount) in [("traced-rf-part", Some(400)), ("traced-rf-rest", None)] {
        let r = api.refund(&id, key, amount).await.unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        let refund = r.body["id"].as_str().unwrap().to_owned();
        api.wait_for_refund(&refund, &["SUCCEEDED"], wait)
            .await
            .unwrap();
    }
    out.push(Traced {
        label: "a refund in part, then the rest",
        id,
        spans: &["process refund", "provider refund"],
        linked: &[REFUND, REFUND],
        repeated_callbacks: 0,
        check: |t| {
            let calls = t.named("provider refund");
            assert!(calls.len() >= 2, "a provider call per refund: {calls:#?}");
            for c in calls {
                assert_eq!(tag(c, "op"), "refund");
                assert!(t
                    .parent_of(c)
                    .is_some_and(|p| p.name.starts_with("process refund")));
            }
        },
    });

    // The other merchant's endpoint fails until it has refused one delivery.
    globex.set_mode(Mode::Fail);
    let id = create(&stack.client(OTHER_KEY), "traced-notify", 1000).await;
    let deadline = Instant::now() + wait;
    while globex.requests() == 0 {
        assert!(Instant::now() < deadline, "no notification reached globex");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    globex.set_mode(Mode::Ok);
    stack
        .client(OTHER_KEY)
        .wait_for_status(&id, &["COMPLETED"], wait)
        .await
        .unwrap();
    out.push(Traced {
        label: "a notification through an endpoint that fails once",
        id,
        spans: &["notify "],
        linked: &[],
        repeated_callbacks: 0,
        check: |t| {
            let notify = t.named("notify ");
            let failed: Vec<&&Span> = notify
                .iter()
                .filter(|s| tag(s, "outcome") == "failed")
                .collect();
            assert!(!failed.is_empty(), "an attempt failed: {notify:#?}");
            for f in failed {
                assert!(
                    notify
                        .iter()
                        .any(|s| tag(s, "webhook_id") == tag(f, "webhook_id")
                            && tag(s, "outcome") == "delivered"
                            && tag(s, "attempt").parse::<u32>().unwrap_or(0)
                                > tag(f, "attempt").parse::<u32>().unwrap_or(0)),
                    "a failed delivery was attempted again and delivered: {notify:#?}"
                );
            }
        },
    });
    out
}

/// The notifier's attempts at a payment's notifications, once every one is delivered
/// (`None` while one is still pending or none was made yet).
async fn delivered_attempts(pool: &sinks::Pool, id: &str) -> Option<usize> {
    let c = pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'delivered'),
                    coalesce(sum(attempts), 0)::int8
               FROM webhook_deliveries WHERE payment_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (n, open, attempts): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    (n >= 2 && open == 0).then_some(attempts as usize)
}

/// Reads a payment's traces back from Jaeger (every trace with a span tagged with its
/// id) until its own trace holds every step: the expected spans, a projection write per
/// event, a notifier span per attempt, the links to the requests that acted on it.
/// Returns its trace and the other traces found (the requests').
async fn read_back(
    jaeger: &Jaeger,
    stack: &Stack,
    pool: &sinks::Pool,
    t: &Traced,
) -> (Trace, Vec<Trace>) {
    // The payment is the demo merchant's, or the other's (the notified one).
    let events = match stack.client(DEMO_KEY).event_types(&t.id).await {
        Ok(kinds) => kinds.len(),
        Err(_) => stack
            .client(OTHER_KEY)
            .event_types(&t.id)
            .await
            .unwrap()
            .len(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let attempts = loop {
        if let Some(n) = delivered_attempts(pool, &t.id).await {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "{}: notifications not delivered",
            t.label
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let project = format!("{} project", stack.events_topic());
    let complete = |found: &[Trace]| {
        let Some(own) = found.iter().find(|x| !with_command(x, "create").is_empty()) else {
            return false;
        };
        let links: HashSet<&str> = own
            .spans
            .iter()
            .flat_map(|s| &s.links)
            .map(|(trace, _)| trace.as_str())
            .collect();
        // Whole: each process exports its spans in batches of its own, so a child can
        // arrive before its parent from another process does.
        own.orphans().is_empty()
            && t.spans.iter().all(|n| !own.named(n).is_empty())
            && own.named(&project).len() >= events
            && own.named("notify ").len() >= attempts
            && links.len() >= t.linked.len()
            && found.len() > t.linked.len() + t.repeated_callbacks
    };
    let found = jaeger
        .wait_for("payment_id", &t.id, Duration::from_secs(30), |f| {
            flush_spans();
            complete(f)
        })
        .await
        .unwrap();
    assert!(
        complete(&found),
        "{}: the payment's trace did not arrive whole in Jaeger within 30 s (events {events}, \
         notifier attempts {attempts}): {found:#?}",
        t.label
    );
    let (own, others): (Vec<Trace>, Vec<Trace>) = found
        .into_iter()
        .partition(|x| !with_command(x, "create").is_empty());
    assert_eq!(own.len(), 1, "{}: one trace holds the create", t.label);
    let own = own.into_iter().next().unwrap();
    // Read by id as well: the same trace.
    let by_id = jaeger.trace(&own.id).await.unwrap().unwrap();
    assert_eq!(by_id.spans.len(), own.spans.len(), "{}", t.label);
    (own, others)
}

/// What every payment's trace shows: one root (the create request), no orphan, each
/// step under the step that caused it, every request that acted on the payment a trace
/// of its own linked from it, and the attributes the README names.
fn check_payment_trace(stack: &Stack, t: &Traced, own: &Trace, others: &[Trace]) {
    let label = t.label;
    if let Some(answered) = ANSWERED.lock().unwrap().get(&t.id) {
        assert_eq!(
            answered, &own.id,
            "{label}: the 202's traceparent names another trace"
        );
    }
    let roots = own.roots();
    assert_eq!(roots.len(), 1, "{label}: one root: {roots:#?}");
    assert_eq!(roots[0].name, "POST /v1/payments", "{label}");
    assert_eq!(tag(roots[0], "http.response.status_code"), "202");
    assert!(
        own.orphans().is_empty(),
        "{label}: orphans {:#?}",
        own.orphans()
    );
    let commands = format!("{} publish", stack.commands_topic());
    let events_publish = format!("{} publish", stack.events_topic());
    let project = format!("{} project", stack.events_topic());
    let notifications = format!(
        "{} publish",
        testkit::stack::notifications_topic(&stack.events_topic())
    );
    let parent = |s: &Span| own.parent_of(s).map_or("", |p| p.name.as_str()).to_owned();
    for s in &own.spans {
        if s.name.starts_with("process ") {
            assert_eq!(tag(s, "payment_id"), t.id, "{label}: {s:#?}");
            assert!(!tag(s, "command").is_empty(), "{label}: {s:#?}");
            if !s.name.starts_with("process refund") {
                assert!(!tag(s, "decision").is_empty(), "{label}: {s:#?}");
            }
        }
        if s.name.starts_with("provider ") {
            for key in ["payment_id", "op", "attempt", "outcome"] {
                assert!(!tag(s, key).is_empty(), "{label}: {key} of {s:#?}");
            }
            assert!(parent(s).starts_with("process "), "{label}: {s:#?}");
        }
        if s.name.starts_with("notify ") {
            for key in ["payment_id", "attempt", "outcome"] {
                assert!(!tag(s, key).is_empty(), "{label}: {key} of {s:#?}");
            }
            assert_eq!(parent(s), notifications, "{label}: {s:#?}");
        }
        if s.name == project {
            assert_eq!(parent(s), events_publish, "{label}: {s:#?}");
        }
        if tag(s, "command") == "provider_reply" {
            assert!(parent(s).starts_with("provider "), "{label}: {s:#?}");
        }
    }
    let create = with_command(own, "create");
    assert_eq!(create.len(), 1, "{label}");
    assert_eq!(parent(create[0]), commands, "{label}");
    assert_eq!(
        own.parent_of(create[0])
            .and_then(|p| own.parent_of(p))
            .map(|p| p.name.as_str()),
        Some("POST /v1/payments"),
        "{label}"
    );
    assert!(
        own.spans.iter().any(|s| !tag(s, "transition").is_empty()),
        "{label}: no step records a transition"
    );
    assert!(
        !own.named("notify ").is_empty(),
        "{label}: no notifier span"
    );
    // The requests that acted on the payment later: each a trace of its own, linked.
    let linked: HashSet<&str> = own
        .spans
        .iter()
        .flat_map(|s| &s.links)
        .map(|(trace, _)| trace.as_str())
        .collect();
    let mut request_roots: Vec<&str> = Vec::new();
    let mut repeated = 0;
    for o in others {
        assert!(
            o.named("process ").is_empty(),
            "{label}: a step of the payment outside its trace: {o:#?}"
        );
        let r = o.roots();
        assert_eq!(r.len(), 1, "{label}: {o:#?}");
        if linked.contains(o.id.as_str()) {
            request_roots.push(r[0].name.as_str());
        } else {
            assert_eq!(
                r[0].name, CALLBACK,
                "{label}: trace {} has a span of the payment and is not linked from its trace: {o:#?}",
                o.id
            );
            repeated += 1;
        }
    }
    assert_eq!(
        repeated, t.repeated_callbacks,
        "{label}: callback traces not linked from the payment's"
    );
    request_roots.sort();
    let mut expected = t.linked.to_vec();
    expected.sort();
    assert_eq!(
        request_roots, expected,
        "{label}: the request traces linked"
    );
    (t.check)(own);
}

/// What the checked traces add up to.
#[derive(Default)]
struct Summary {
    sizes: Vec<usize>,
    orphans: usize,
    services: BTreeSet<String>,
}

/// Reads `t`'s traces back from Jaeger, checks them, and adds them to `summary`.
async fn read_and_check(jaeger: &Jaeger, stack: &Stack, t: &Traced, summary: &mut Summary) {
    let pool = stack.pool().await.unwrap();
    let (own, others) = read_back(jaeger, stack, &pool, t).await;
    summary.orphans += own.orphans().len();
    summary
        .services
        .extend(own.spans.iter().map(|s| s.service.clone()));
    summary.sizes.push(own.spans.len());
    if std::env::var_os("PRINT_TRACE").is_some() {
        println!("trace {} ({}): {}", own.id, t.label, t.id);
        for s in &own.spans {
            println!(
                "  {:<16} {:<48} parent {:<48} links {} {}",
                s.service,
                s.name,
                own.parent_of(s).map_or("-", |p| p.name.as_str()),
                s.links.len(),
                ["transition", "outcome", "attempt"]
                    .iter()
                    .filter(|k| s.tags.contains_key(**k))
                    .map(|k| format!("{k}={}", s.tags[*k]))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    check_payment_trace(stack, t, &own, &others);
}

/// A payment through a stack whose worker is a process of its own exporting to the same
/// Jaeger (as `gateway-worker`, the deployed worker's name): its trace crosses processes
/// through Kafka headers, the provider request and the callback, as deployed.
async fn across_processes(
    jaeger: &Jaeger,
    demo: &sinks::notifier::Endpoint,
    summary: &mut Summary,
) {
    let stack = Stack::start(StackOptions {
        gateway_bin: Some(env!("CARGO_BIN_EXE_gateway").into()),
        worker_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), jaeger.otlp_endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
        merchant_endpoints: [("demo".to_owned(), demo.clone())].into(),
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let api = stack.client(DEMO_KEY);
    let id = create(&api, "traced-worker-process", 1003).await;
    api.wait_for_status(&id, &["COMPLETED"], Duration::from_secs(60))
        .await
        .unwrap();
    let t = Traced {
        label: "pending, then a webhook, with the worker a process of its own",
        id,
        spans: &["process create", "provider charge", "process webhook"],
        linked: &[CALLBACK],
        repeated_callbacks: 0,
        check: |t| {
            // The worker's steps and provider calls come from its process; the API's
            // requests, the sink's writes and the notifier's attempts from this one.
            for s in &t.spans {
                let n = s.name.as_str();
                if n.starts_with("process ") || n.starts_with("provider ") {
                    assert_eq!(s.service, "gateway-worker", "{n}");
                }
                if n.starts_with("POST ") || n.ends_with(" project") || n.starts_with("notify ") {
                    assert_eq!(s.service, "gateway-test", "{n}");
                }
            }
        },
    };
    read_and_check(jaeger, &stack, &t, summary).await;
    stack.shutdown().await.unwrap();
}

/// Every payment of [`traced_payments`], and one [`across_processes`], read back from
/// Jaeger and checked; prints the `jaeger:` line.
async fn every_payment_is_one_trace_in_jaeger(
    jaeger: &Jaeger,
    stack: &Stack,
    globex: &MerchantEndpoint,
    demo: &sinks::notifier::Endpoint,
) {
    let traced = traced_payments(stack, globex).await;
    let mut summary = Summary::default();
    for t in &traced {
        read_and_check(jaeger, stack, t, &mut summary).await;
    }
    across_processes(jaeger, demo, &mut summary).await;
    let sizes = &summary.sizes;
    println!(
        "jaeger: payments={} traces={} orphans={} services={} spans_min={} spans_max={}",
        traced.len() + 1,
        sizes.len(),
        summary.orphans,
        summary
            .services
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(","),
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap()
    );
    assert_eq!(summary.orphans, 0);
    assert_eq!(sizes.len(), traced.len() + 1);
}

/// `n` payments approved at once, to the end; returns their ids.
async fn approved_payments(stack: &Stack, label: &str, n: usize) -> Vec<String> {
    let api = stack.client(DEMO_KEY);
    let mut ids = Vec::new();
    // A hundred at a time: well within the creates the API takes at once.
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let creates = chunk.iter().map(|i| {
            let api = api.clone();
            let key = format!("{label}-{i}");
            async move { create(&api, &key, 1000).await }
        });
        ids.extend(futures::future::join_all(creates).await);
    }
    let statuses = testkit::client::wait_all_terminal(
        &stack.pool().await.unwrap(),
        &ids,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: payments did not complete: {e}"));
    assert!(
        statuses.values().all(|s| s == "COMPLETED"),
        "{label}: {statuses:?}"
    );
    ids
}

fn heap() -> i64 {
    telemetry::heap::live_bytes().unwrap() as i64
}

/// Jaeger killed while payments run: every payment completes, the process holds no
/// more than the export queue's worth of spans more than the same load with Jaeger up,
/// and once Jaeger is back (same ports, empty storage) a new payment's trace reaches it.
async fn jaeger_killed_costs_no_payment(jaeger: &mut Jaeger, stack: &Stack) {
    const N: usize = 300;
    // One queued span, in bytes: a bound well above what one holds (its name, ids, times
    // and a dozen short attributes). The killed run makes some 20 spans a payment, over
    // ten queues' worth: kept, they would be several times the bound.
    const SPAN_BYTES: i64 = 4096;
    // How much the heap growth of the same load differs from run to run (caches, pools):
    // measured at up to 3.7 MiB either way.
    const NOISE: i64 = 4 << 20;
    // A first run warms what grows once (stores, connection pools), then the same load
    // with Jaeger up and with it killed.
    approved_payments(stack, "jaeger-warm", N).await;
    flush_spans();
    let mut growth = Vec::new();
    let mut timings = Vec::new();
    let mut killed_ids = HashSet::new();
    for (label, killed) in [("jaeger-up", false), ("jaeger-killed", true)] {
        if killed {
            jaeger.kill().unwrap();
        }
        let before = heap();
        let started = Instant::now();
        let ids = approved_payments(stack, label, N).await;
        if killed {
            killed_ids.extend(ids);
        }
        timings.push(format!("{label}={:.2}s", started.elapsed().as_secs_f64()));
        // What the exporter still has queued goes (to Jaeger, or nowhere) in a few
        // export intervals.
        tokio::time::sleep(Duration::from_secs(1)).await;
        growth.push(heap() - before);
    }
    let bound = HELD as i64 * SPAN_BYTES;
    println!(
        "traces: {N} payments each with Jaeger up and killed: {}; heap growth up={} KiB killed={} KiB (exporter bound {} KiB)",
        timings.join(" "),
        growth[0] / 1024,
        growth[1] / 1024,
        bound / 1024
    );
    assert!(
        growth[1] <= growth[0].max(0) + bound + NOISE,
        "with Jaeger killed the process kept {} KiB more than with it up, over the exporter's bound of {} KiB",
        (growth[1] - growth[0]) / 1024,
        bound / 1024
    );

    let restarted_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    jaeger.restart().await.unwrap();
    // The queue the outage filled drains first; then a new payment's trace arrives whole.
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let ids = approved_payments(stack, &format!("jaeger-back-{attempt}"), 1).await;
        let found = jaeger
            .wait_for("payment_id", &ids[0], Duration::from_secs(5), |found| {
                flush_spans();
                found.iter().any(|t| {
                    !with_command(t, "create").is_empty()
                        && !t.named("provider charge").is_empty()
                        && t.orphans().is_empty()
                })
            })
            .await
            .unwrap();
        if found.iter().any(|t| {
            !with_command(t, "create").is_empty() && !t.named("provider charge").is_empty()
        }) {
            println!(
                "traces: a payment's trace reached Jaeger again, payment {} after its restart",
                attempt + 1
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no trace reached Jaeger after it came back: {found:#?}"
        );
    }
    // Of the spans that ended while Jaeger was down, what reached the new one is at most
    // what the exporter held (its queue and the batch it was sending).
    let mut from_outage = 0;
    for service in jaeger.services().await.unwrap() {
        for t in jaeger.search(&service, &[]).await.unwrap() {
            from_outage += t
                .spans
                .iter()
                .filter(|s| {
                    killed_ids.contains(tag(s, "payment_id"))
                        && s.start_us + s.duration_us < restarted_us
                })
                .count();
        }
    }
    println!("traces: spans of the outage that reached Jaeger once back: {from_outage}");
    assert!(
        from_outage <= HELD,
        "{from_outage} spans outlived the outage, more than the exporter holds ({HELD})"
    );
}

/// With the collector hanging (it accepts and never answers), payments complete as
/// before: spans are dropped, the data path does not wait for the exporter.
async fn collector_hanging_does_not_slow_payments(proxy: &NetProxy, stack: &Stack) {
    let mut timings = Vec::new();
    for (label, mode) in [("up", NetMode::Pass), ("hanging", NetMode::Stall)] {
        proxy.set_mode(mode);
        let started = Instant::now();
        approved_payments(stack, &format!("collector-{label}"), 40).await;
        timings.push(format!("{label}={:.2}s", started.elapsed().as_secs_f64()));
    }
    proxy.set_mode(NetMode::Pass);
    println!(
        "traces: 40 payments to terminal with the collector {}",
        timings.join(" ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_returns_data_and_every_rule_evaluates() {
    telemetry::heap::counting();
    let mut jaeger = Jaeger::start().await.unwrap();
    let otlp = format!("127.0.0.1:{}", jaeger.ports.otlp_http)
        .parse()
        .unwrap();
    let proxy = NetProxy::start("127.0.0.1:0".parse().unwrap(), otlp).unwrap();
    trace_to(&proxy);
    let (demo, demo_entry) = merchant_endpoint().await;
    let (globex, globex_entry) = merchant_endpoint().await;
    let defaults = StackOptions::default();
    let stack = Stack::start(StackOptions {
        // Amounts ending in 07 settle after 3.5 s: time to cancel them.
        sim: simulator::SimConfig {
            webhook_delay_ms: 300,
            ..defaults.sim.clone()
        },
        merchant_endpoints: [
            ("demo".to_owned(), demo_entry.clone()),
            ("globex".to_owned(), globex_entry),
        ]
        .into(),
        ..defaults
    })
    .await
    .unwrap();
    let started = Instant::now();
    every_payment_is_one_trace_in_jaeger(&jaeger, &stack, &globex, &demo_entry).await;
    let traced_in = started.elapsed();
    collector_hanging_does_not_slow_payments(&proxy, &stack).await;
    jaeger_killed_costs_no_payment(&mut jaeger, &stack).await;
    println!(
        "traces: checked in Jaeger in {:.1}s, outages in {:.1}s",
        traced_in.as_secs_f64(),
        (started.elapsed() - traced_in).as_secs_f64()
    );
    assert!(demo.forged() == 0 && globex.forged() == 0);
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
        "observability: panels={panels} panels_with_data={with_data} rules={} rules_valid={valid}",
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
