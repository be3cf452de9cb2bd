//! The project's Prometheus configuration, alert rules and Grafana dashboards, checked
//! against a real Prometheus (Debian package `prometheus`) scraping a running stack.

use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
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
        .replace("\"api:8080\"", &format!("\"{target}\""))
        .replace("\"worker:9101\"", &format!("\"{target}\""))
        .replace("\"sink:9102\"", &format!("\"{target}\""))
        .replace(
            "  - alerts.yml",
            &format!("  - {}", repo().join("prometheus/alerts.yml").display()),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_returns_data_and_every_rule_evaluates() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let prom = start_prometheus(&stack.api.to_string());
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
    testkit::client::wait_all_terminal(&stack.pool().await.unwrap(), &ids, Duration::from_secs(60))
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
    assert_eq!(all.len(), 7);
    stack.shutdown().await.unwrap();
}
