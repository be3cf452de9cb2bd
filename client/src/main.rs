//! `payctl`: a command-line client of the payment gateway's API.
//!
//! `create`, `get`, `watch` (follow a payment until it is terminal), `list`, `refund`
//! (and follow it with `--wait`), `refunds`, and `load` (N payments at a target rate,
//! with progress, a summary of throughput, latency percentiles and final statuses, and a
//! check that none was lost).
//!
//! # Layout
//! - `main.rs`: the commands and the API calls they make.
//! - `ui.rs` + `ui.html`: `payctl ui`, the web test client (the page, and `/api/*`
//!   forwarded to the API).
//! - `inbox.rs`: the demo merchant endpoint (`POST /notify`, `GET /notifications`) that
//!   `payctl listen` serves alone and `payctl ui` beside its page.

mod inbox;
mod ui;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "payctl", about = "Command-line client of the payment gateway")]
struct Cli {
    /// Base URL of the API.
    #[arg(
        long,
        env = "PAYCTL_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    api: String,
    /// The merchant's API key.
    #[arg(
        long,
        env = "PAYCTL_KEY",
        default_value = "sk_test_demo",
        global = true
    )]
    key: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a payment (amounts in minor units; the simulator's magic endings apply).
    Create {
        #[arg(long)]
        amount: i64,
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Idempotency-Key (default: a new random one).
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        reference: Option<String>,
        /// How many times a create refused for overload (503, 429) is sent again, with
        /// the same Idempotency-Key, after the `Retry-After` the API asks for.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// Show a payment.
    Get { id: String },
    /// Refund (part of) a COMPLETED payment; prints the refund (202 PENDING) and the
    /// Idempotency-Key to send it again with.
    Refund {
        payment_id: String,
        /// Minor units; without it, what is left to refund.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        amount: Option<i64>,
        /// Why, kept with the refund (at most 256 characters).
        #[arg(long)]
        reason: Option<String>,
        /// Idempotency-Key (default: a new random one). The same key and body are the
        /// same refund: sending it again never refunds twice.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Follow the refund until it is SUCCEEDED or FAILED (exit status 1 if FAILED).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// How many times a refusal for overload (503, 429) is sent again, with the same
        /// Idempotency-Key, after the `Retry-After` the API asks for.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// List a payment's refunds, in the order requested, and what was refunded.
    Refunds { payment_id: String },
    /// Follow a payment until it is terminal, printing each change.
    Watch {
        id: String,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// List payments, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Serve the web test client (it talks to the API through this server).
    Ui {
        #[arg(long, env = "PAYCTL_UI_LISTEN", default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        #[arg(
            long,
            env = "PAYCTL_GRAFANA_URL",
            default_value = "http://127.0.0.1:3000"
        )]
        grafana_url: String,
        #[arg(
            long,
            env = "PAYCTL_JAEGER_URL",
            default_value = "http://127.0.0.1:16686"
        )]
        jaeger_url: String,
        /// With secrets, the server also receives the merchant's notifications
        /// (`/notify`) and the page shows them.
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Receive a merchant's notifications (`POST /notify`), verify their signatures,
    /// print one line for each, and list them at `GET /notifications`.
    Listen {
        #[arg(long, env = "PAYCTL_NOTIFY_LISTEN", default_value = "127.0.0.1:8091")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        notify: NotifyArgs,
    },
    /// Send N payments and check that every accepted one reaches a terminal state.
    Load {
        #[arg(long, default_value_t = 500)]
        payments: usize,
        /// Payments per second; 0 = as fast as `--concurrency` clients go.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// How long to wait for terminal states after the last request.
        #[arg(long, default_value_t = 180)]
        timeout_s: u64,
        /// `mixed` cycles through the simulator's outcomes; `approve` approves all.
        #[arg(long, default_value = "mixed")]
        amounts: String,
    },
}

/// The demo merchant endpoint's options (`payctl listen`, `payctl ui`).
#[derive(Debug, clap::Args)]
struct NotifyArgs {
    /// A secret the merchant's notifications are signed with (`whsec_…`, as its
    /// notify_secrets in config/merchants.toml). Repeat it, or comma-separate the
    /// variable, while one is rotated: a delivery signed with any of them is accepted.
    #[arg(
        long = "secret",
        env = "PAYCTL_NOTIFY_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    secrets: Vec<String>,
    /// How many notifications are kept (the oldest go first).
    #[arg(long, default_value_t = inbox::DEFAULT_KEEP, value_parser = keep_parser)]
    keep: usize,
}

fn keep_parser(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err("a whole number from 1 to 1000000".to_owned()),
    }
}

struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let (status, body, _) = self.send(req).await?;
        Ok((status, body))
    }

    /// The answer's status, body and `Retry-After` (seconds), if it has one.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<(u16, Value, Option<u64>)> {
        let res = req
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = res.json().await.unwrap_or(Value::Null);
        Ok((status, body, retry_after))
    }

    fn create_request(
        &self,
        key: &str,
        amount: i64,
        currency: &str,
        reference: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let body = json!({ "amount": amount, "currency": currency, "reference": reference });
        self.http
            .post(format!("{}/v1/payments", self.base))
            .header("Idempotency-Key", key)
            .json(&body)
    }

    async fn create(
        &self,
        key: &str,
        amount: i64,
        currency: &str,
        reference: Option<&str>,
    ) -> anyhow::Result<(u16, Value, Option<u64>)> {
        self.send(self.create_request(key, amount, currency, reference))
            .await
    }

    /// `amount: None` refunds what is left.
    fn refund_request(
        &self,
        payment_id: &str,
        key: &str,
        amount: Option<i64>,
        reason: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut body = json!({});
        if let Some(a) = amount {
            body["amount"] = a.into();
        }
        if let Some(r) = reason {
            body["reason"] = r.into();
        }
        self.http
            .post(format!("{}/v1/payments/{payment_id}/refunds", self.base))
            .header("Idempotency-Key", key)
            .json(&body)
    }

    async fn get(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        self.call(self.http.get(format!("{}/v1/payments/{id}", self.base)))
            .await
    }
}

fn ok(status: u16, body: &Value) -> anyhow::Result<()> {
    if status >= 400 {
        bail!("{}", error_text(status, body));
    }
    Ok(())
}

/// An error answer as `<status> <code>: <message>`.
fn error_text(status: u16, body: &Value) -> String {
    format!(
        "{status} {}: {}",
        body["error"]["code"].as_str().unwrap_or("error"),
        body["error"]["message"].as_str().unwrap_or("")
    )
}

/// Sends a request that carries Idempotency-Key `key` (`make` builds it afresh for each
/// attempt) and sends it again with the same key after the `Retry-After` of each
/// refusal for overload (429, 503), up to `retries` times. `what` names it in messages.
/// An error answer is an error that names the key when sending it again is the way on.
async fn send_keyed(
    api: &Api,
    what: &str,
    key: &str,
    retries: u32,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<Value> {
    let mut attempt = 0;
    let (s, b) = loop {
        let (s, b, retry_after) = api.send(make()).await.with_context(|| {
            format!("the {what} may have been accepted: send it again with --idempotency-key {key}")
        })?;
        match retry_after {
            Some(wait) if matches!(s, 429 | 503) && attempt < retries => {
                attempt += 1;
                eprintln!(
                    "refused ({s} {}); retrying in {wait} s with the same Idempotency-Key {key} ({attempt} of {retries})",
                    b["error"]["code"].as_str().unwrap_or("error")
                );
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 60))).await;
            }
            _ => break (s, b),
        }
    };
    if matches!(s, 429 | 503) {
        bail!(
            "{}; nothing was queued: send it again later with --idempotency-key {key}",
            error_text(s, &b)
        );
    }
    if matches!(s, 500 | 502 | 504) {
        bail!(
            "{}; the {what} may have been accepted: send it again with --idempotency-key {key}",
            error_text(s, &b)
        );
    }
    ok(s, &b)?;
    Ok(b)
}

fn terminal(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED" | "CANCELED")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let api = Api {
        base: cli.api.trim_end_matches('/').to_owned(),
        key: cli.key,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default(),
    };
    if let Err(e) = run(&api, cli.cmd).await {
        eprintln!("payctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(api: &Api, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Create {
            amount,
            currency,
            idempotency_key,
            reference,
            retries,
        } => {
            let key = idempotency_key.unwrap_or_else(|| format!("payctl-{}", letters_id()));
            let b = send_keyed(api, "create", &key, retries, || {
                api.create_request(&key, amount, &currency, reference.as_deref())
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&b)?);
        }
        Cmd::Get { id } => {
            let (s, b) = api.get(&id).await?;
            ok(s, &b)?;
            println!("{}", serde_json::to_string_pretty(&b)?);
        }
        Cmd::Refund {
            payment_id,
            amount,
            reason,
            idempotency_key,
            wait,
            timeout_s,
            retries,
        } => {
            let key = idempotency_key.unwrap_or_else(|| format!("payctl-refund-{}", letters_id()));
            // Before anything can go wrong: the key is how this refund is sent again.
            eprintln!(
                "Idempotency-Key {key} (send this refund again with --idempotency-key {key}; it never refunds twice)"
            );
            let b = send_keyed(api, "refund", &key, retries, || {
                api.refund_request(&payment_id, &key, amount, reason.as_deref())
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&b)?);
            if wait {
                let refund_id = b["id"]
                    .as_str()
                    .context("the API's answer has no refund id")?;
                follow_refund(api, refund_id, Duration::from_secs(timeout_s)).await?;
            }
        }
        Cmd::Refunds { payment_id } => {
            let (s, b) = api
                .call(
                    api.http
                        .get(format!("{}/v1/payments/{payment_id}/refunds", api.base)),
                )
                .await?;
            ok(s, &b)?;
            let refunds = b["data"].as_array().map(Vec::as_slice).unwrap_or_default();
            for r in refunds {
                println!("{}", refund_line(r));
            }
            let (s, p) = api.get(&payment_id).await?;
            ok(s, &p)?;
            println!(
                "{}: {} refund(s); refunded {} of {} {}{}",
                payment_id,
                refunds.len(),
                p["amount_refunded"].as_i64().unwrap_or(0),
                p["amount"],
                p["currency"].as_str().unwrap_or(""),
                if p["refunded"].as_bool() == Some(true) {
                    " (fully refunded)"
                } else {
                    ""
                }
            );
        }
        Cmd::Watch { id, timeout_s } => watch(api, &id, Duration::from_secs(timeout_s)).await?,
        Cmd::List { status, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(s) = status {
                q.push(("status", s));
            }
            let (s, b) = api
                .call(api.http.get(format!("{}/v1/payments", api.base)).query(&q))
                .await?;
            ok(s, &b)?;
            for p in b["data"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<10}  {:>12} {}  {}",
                    p["id"].as_str().unwrap_or(""),
                    p["status"].as_str().unwrap_or(""),
                    p["amount"],
                    p["currency"].as_str().unwrap_or(""),
                    p["created_at"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Ui {
            listen,
            grafana_url,
            jaeger_url,
            notify,
        } => {
            let inbox = if notify.secrets.iter().all(|s| s.trim().is_empty()) {
                None
            } else {
                Some(inbox::Inbox::new(
                    inbox::Secrets::parse(&notify.secrets)?,
                    notify.keep,
                ))
            };
            ui::serve(api.base.clone(), listen, &grafana_url, &jaeger_url, inbox).await?
        }
        Cmd::Listen { listen, notify } => {
            let inbox = inbox::Inbox::new(inbox::Secrets::parse(&notify.secrets)?, notify.keep)
                .on_receive(|outcome| match outcome {
                    inbox::Outcome::Stored(n) => println!("{}", n.summary()),
                    inbox::Outcome::Redelivered(n) => println!(
                        "{}  (delivery {} of {}: shown once)",
                        n.summary(),
                        n.deliveries,
                        n.webhook_id
                    ),
                    inbox::Outcome::Refused(r) => eprintln!(
                        "refused a delivery: {} {}: {r}",
                        r.status().as_u16(),
                        r.code()
                    ),
                });
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}: choose another --listen"))?;
            let addr = listener.local_addr()?;
            eprintln!(
                "receiving notifications at http://{addr}/notify (the merchant's notify_url); the last {} at http://{addr}/notifications",
                notify.keep
            );
            warp::serve(inbox.routes()).incoming(listener).run().await;
        }
        Cmd::Load {
            payments,
            rate,
            concurrency,
            timeout_s,
            amounts,
        } => {
            load(
                api,
                payments,
                rate,
                concurrency,
                Duration::from_secs(timeout_s),
                &amounts,
            )
            .await?
        }
    }
    Ok(())
}

/// Polls `path` until its `status` is one `done` accepts, printing each change (a 404,
/// accepted by another API instance and not projected yet, is waited out). Returns the
/// final body, or the last status seen (empty: none) once `timeout` has passed.
async fn follow(
    api: &Api,
    path: &str,
    timeout: Duration,
    done: fn(&str) -> bool,
) -> anyhow::Result<Result<Value, String>> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let (s, b) = api
            .call(api.http.get(format!("{}{path}", api.base)))
            .await?;
        if s != 404 {
            ok(s, &b)?;
            let status = b["status"].as_str().unwrap_or("").to_owned();
            if status != last {
                println!("{}  {status}", b["updated_at"].as_str().unwrap_or(""));
                last = status;
            }
            if done(&last) {
                return Ok(Ok(b));
            }
        }
        if Instant::now() > deadline {
            return Ok(Err(last));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn watch(api: &Api, id: &str, timeout: Duration) -> anyhow::Result<()> {
    if let Err(last) = follow(api, &format!("/v1/payments/{id}"), timeout, terminal).await? {
        bail!("{id} is still {last} after {timeout:?}");
    }
    let (_, h) = api
        .call(
            api.http
                .get(format!("{}/v1/payments/{id}/events", api.base)),
        )
        .await?;
    for e in h["events"].as_array().into_iter().flatten() {
        println!(
            "  #{} {} {}",
            e["seq"],
            e["occurred_at"].as_str().unwrap_or(""),
            e["type"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Polls a refund until it is SUCCEEDED or FAILED, printing each change; FAILED is an
/// error naming why.
async fn follow_refund(api: &Api, refund_id: &str, timeout: Duration) -> anyhow::Result<()> {
    let path = format!("/v1/refunds/{refund_id}");
    let b = match follow(api, &path, timeout, |s| matches!(s, "SUCCEEDED" | "FAILED")).await? {
        Ok(b) => b,
        Err(last) => bail!(
            "refund {refund_id} is still {} after {timeout:?}: it goes on without payctl; see it with `payctl refunds <payment id>`",
            if last.is_empty() { "not visible" } else { &last }
        ),
    };
    if b["status"] == "FAILED" {
        bail!(
            "refund {refund_id} FAILED: {}: {}",
            b["failure_code"].as_str().unwrap_or("unknown"),
            b["failure_message"].as_str().unwrap_or("")
        );
    }
    let payment_id = b["payment_id"].as_str().unwrap_or("");
    let (s, p) = api.get(payment_id).await?;
    ok(s, &p)?;
    println!(
        "{payment_id}: refunded {} of {} {}",
        p["amount_refunded"].as_i64().unwrap_or(0),
        p["amount"],
        p["currency"].as_str().unwrap_or("")
    );
    Ok(())
}

/// `re_…  STATUS  amount currency  created_at  reason / failure`.
fn refund_line(r: &Value) -> String {
    let amount = r["amount"]
        .as_i64()
        .map_or_else(|| "(the rest)".to_owned(), |a| a.to_string());
    let mut line = format!(
        "{}  {:<9}  {:>12} {}  {}",
        r["id"].as_str().unwrap_or(""),
        r["status"].as_str().unwrap_or(""),
        amount,
        r["currency"].as_str().unwrap_or(""),
        r["created_at"].as_str().unwrap_or("")
    );
    if let Some(reason) = r["reason"].as_str() {
        line.push_str(&format!("  reason: {reason}"));
    }
    if let Some(code) = r["failure_code"].as_str() {
        line.push_str(&format!(
            "  failed: {code}: {}",
            r["failure_message"].as_str().unwrap_or("")
        ));
    }
    line
}

async fn load(
    api: &Api,
    n: usize,
    rate: u64,
    concurrency: usize,
    timeout: Duration,
    amounts: &str,
) -> anyhow::Result<()> {
    let endings: &[i64] = match amounts {
        "mixed" => &[0, 1, 2, 3, 4, 5, 6, 9],
        "approve" => &[0],
        other => bail!("--amounts {other:?}: use mixed or approve"),
    };
    let run = letters_id();
    let started = Instant::now();
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(Option<String>, Instant, f64, u16)> = stream::iter(0..n)
        .map(|i| {
            let sent = &sent;
            let run = &run;
            async move {
                if let Some(iv) = interval {
                    tokio::time::sleep_until((started + iv * i as u32).into()).await;
                }
                let at = Instant::now();
                let amount = 1000
                    + (i as i64 / endings.len() as i64 % 90) * 100
                    + endings[i % endings.len()];
                let r = api
                    .create(&format!("load-{run}-{i}"), amount, "EUR", None)
                    .await;
                let ms = at.elapsed().as_secs_f64() * 1000.0;
                let done = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if done.is_multiple_of(50) || done == n {
                    eprint!("\rsent {done}/{n}");
                    let _ = std::io::stderr().flush();
                }
                match r {
                    Ok((202, b, _)) => (b["id"].as_str().map(str::to_owned), at, ms, 202),
                    Ok((s, _, _)) => (None, at, ms, s),
                    Err(_) => (None, at, ms, 0),
                }
            }
        })
        .buffer_unordered(if rate == 0 {
            concurrency
        } else {
            concurrency.max(1024)
        })
        .collect()
        .await;
    eprintln!();
    let accepted: Vec<(String, Instant)> = results
        .iter()
        .filter_map(|r| r.0.clone().map(|id| (id, r.1)))
        .collect();
    let mut refused: BTreeMap<u16, usize> = BTreeMap::new();
    for r in results.iter().filter(|r| r.3 != 202) {
        *refused.entry(r.3).or_default() += 1;
    }

    // Follow every accepted payment until it is terminal (or the timeout).
    let mut open: HashMap<String, Instant> = accepted.iter().cloned().collect();
    let mut finished: HashMap<String, (String, f64)> = HashMap::new();
    let deadline = Instant::now() + timeout;
    while !open.is_empty() && Instant::now() < deadline {
        let ids: Vec<String> = open.keys().cloned().collect();
        let polled: Vec<(String, Option<String>)> = stream::iter(ids)
            .map(|id| async move {
                let s = api
                    .get(&id)
                    .await
                    .ok()
                    .and_then(|(_, b)| b["status"].as_str().map(str::to_owned));
                (id, s)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (id, status) in polled {
            if let Some(s) = status.filter(|s| terminal(s)) {
                if let Some(at) = open.remove(&id) {
                    finished.insert(id, (s, at.elapsed().as_secs_f64() * 1000.0));
                }
            }
        }
        eprint!("\rterminal {}/{}", finished.len(), accepted.len());
        let _ = std::io::stderr().flush();
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let mut post: Vec<f64> = results.iter().map(|r| r.2).collect();
    post.sort_by(f64::total_cmp);
    let mut e2e: Vec<f64> = finished.values().map(|v| v.1).collect();
    e2e.sort_by(f64::total_cmp);
    let count = |s: &str| finished.values().filter(|v| v.0 == s).count();
    let lost = open.len();
    println!(
        "load: payments={n} accepted={} terminal={} lost={lost} completed={} failed={} canceled={} refused={refused:?} throughput={:.0}/s post_p50_ms={:.1} post_p99_ms={:.1} e2e_p50_ms={:.0} e2e_p99_ms={:.0}",
        accepted.len(),
        finished.len(),
        count("COMPLETED"),
        count("FAILED"),
        count("CANCELED"),
        finished.len() as f64 / elapsed,
        pct(&post, 0.5),
        pct(&post, 0.99),
        pct(&e2e, 0.5),
        pct(&e2e, 0.99),
    );
    if lost > 0 {
        bail!("{lost} accepted payments did not reach a terminal state within {timeout:?}");
    }
    if accepted.len() < n {
        bail!("{} of {n} requests were not accepted", n - accepted.len());
    }
    Ok(())
}

/// A random UUID written in letters only (hex digits 0–9 become g–p), for idempotency
/// keys: a key built from it never holds a digit run the API's card-data check refuses.
fn letters_id() -> String {
    uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .map(|c| match c.to_digit(10) {
            Some(d) => char::from(b'g' + d as u8),
            None => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_ids_are_letters_only_and_distinct() {
        let a = super::letters_id();
        let b = super::letters_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_lowercase()), "{a}");
        assert_ne!(a, b);
    }
}
