//! Separate OS processes for the harnesses that kill and measure them (`make chaos`,
//! `make soak`): a child process that can be killed and started again, free loopback
//! addresses, the binaries built beside the harness, and a client load that retries a
//! create with its Idempotency-Key as a real client must.

use crate::stack::DEMO_KEY;
use anyhow::Context as _;
use payments::retry::Backoff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One child process the harness can kill and start again.
pub struct Proc {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Proc {
    /// `program args`, not started yet, logging to `<log_dir>/<name>.log`.
    pub fn new(name: &str, program: &Path, args: Vec<String>, log_dir: &Path) -> Proc {
        Proc {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            log: log_dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks the process to stop (SIGTERM) and waits for it, up to `grace`; SIGKILL after.
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + grace;
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process exited on its own (a crash-only restart is due).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            _ => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `gateway` arguments every role of a harness's stack shares: its brokers,
/// topology, topics and database.
pub struct GatewayArgs {
    common: Vec<String>,
}

impl GatewayArgs {
    pub fn new(
        brokers: &str,
        topology_file: &Path,
        events: &str,
        dlq: &str,
        database_url: &str,
    ) -> GatewayArgs {
        let common = [
            "--brokers",
            brokers,
            "--topology",
            &topology_file.display().to_string(),
            "--events-topic",
            events,
            "--dlq-topic",
            dlq,
            "--database-url",
            database_url,
        ]
        .map(str::to_owned)
        .to_vec();
        GatewayArgs { common }
    }

    /// The shared arguments followed by `extra` (a role and its own arguments).
    pub fn with(&self, extra: &[&str]) -> Vec<String> {
        let mut v = self.common.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// `gateway api` as the harnesses run it: on `listen`, its operational endpoints on
    /// any free port, the merchants of `merchants`, and no rate limit.
    pub fn api(&self, listen: &str, merchants: &Path) -> Vec<String> {
        self.with(&[
            "api",
            "--listen",
            listen,
            "--ops-listen",
            "127.0.0.1:0",
            "--merchants",
            &merchants.display().to_string(),
            "--rate-limit",
            "0",
        ])
    }
}

pub use crate::ports::free_addr;

pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("the harness has no directory")?
        .join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build every binary first (cargo build --workspace --bins)",
        path.display()
    );
    Ok(path)
}

/// What the load generator saw.
#[derive(Default)]
pub struct Load {
    /// Idempotency key → payment id, for every create answered 202.
    pub accepted: Mutex<HashMap<String, String>>,
    pub duplicates: AtomicUsize,
    pub retries: AtomicUsize,
    pub refused: Mutex<Vec<String>>,
    /// The longest a create was refused (`503 overloaded`) without a break, from its
    /// first refusal to its acceptance or to giving up, in milliseconds.
    pub max_refusal_ms: AtomicU64,
}

/// How a write ended once retrying it no longer helped.
enum Answer {
    /// 202, with the id of what it created.
    Accepted(String),
    /// A 4xx other than 408 and 429: status and body.
    Refused(reqwest::StatusCode, String),
    /// No 202 and no refusal within two minutes.
    GaveUp,
}

/// Posts `body` to `url` with `key` as Idempotency-Key, retrying with the same key (as a
/// client must) through API restarts and broker outages, for up to two minutes; a
/// refusal's `Retry-After` is waited out before the next try. Counts the retries.
async fn post_until_answered(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    retries: &AtomicUsize,
    max_refusal_ms: &AtomicU64,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut refused_since: Option<Instant> = None;
    let note_refusal = |since: Option<Instant>| {
        if let Some(since) = since {
            let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
            max_refusal_ms.fetch_max(ms, Ordering::Relaxed);
        }
    };
    loop {
        let mut wait = backoff.next_delay();
        let res = http
            .post(url)
            .bearer_auth(DEMO_KEY)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                if let Ok(body) = r.json::<serde_json::Value>().await {
                    if let Some(id) = body["id"].as_str() {
                        note_refusal(refused_since);
                        return Answer::Accepted(id.to_owned());
                    }
                }
            }
            Ok(r) if r.status().is_client_error() && r.status() != 429 && r.status() != 408 => {
                let status = r.status();
                return Answer::Refused(status, r.text().await.unwrap_or_default());
            }
            Ok(r) => {
                if r.status() == 503 {
                    refused_since.get_or_insert_with(Instant::now);
                }
                if let Some(s) = crate::client::retry_after(r.headers()) {
                    wait = wait.max(Duration::from_secs(s));
                }
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            note_refusal(refused_since);
            return Answer::GaveUp;
        }
        retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
    }
}

/// Creates one payment (see [`post_until_answered`]).
pub async fn create(http: reqwest::Client, api: String, key: String, amount: i64, load: Arc<Load>) {
    let body = serde_json::json!({ "amount": amount, "currency": "EUR", "reference": key });
    let url = format!("http://{api}/v1/payments");
    match post_until_answered(
        &http,
        &url,
        &key,
        &body,
        &load.retries,
        &load.max_refusal_ms,
    )
    .await
    {
        Answer::Accepted(id) => {
            lock(&load.accepted).insert(key, id);
        }
        Answer::Refused(status, body) => {
            lock(&load.refused).push(format!("{key}: {status} {body}"))
        }
        Answer::GaveUp => lock(&load.refused).push(format!("{key}: not accepted within 120 s")),
    }
}

/// What the refund load saw.
#[derive(Default)]
pub struct RefundLoad {
    /// Refund id → payment id, for every refund request answered 202.
    pub accepted: Mutex<HashMap<String, String>>,
    /// Requests answered `409 amount_exceeds_refundable`: expected when two race for
    /// more than is left.
    pub conflicts: AtomicUsize,
    pub duplicates: AtomicUsize,
    pub retries: AtomicUsize,
    /// Answers no request of the load should get.
    pub refused: Mutex<Vec<String>>,
}

/// Asks to refund `amount` of `payment` (`None`: what is left; see
/// [`post_until_answered`]).
pub async fn refund(
    http: reqwest::Client,
    api: String,
    payment: String,
    key: String,
    amount: Option<i64>,
    load: Arc<RefundLoad>,
) {
    let body = match amount {
        Some(a) => serde_json::json!({ "amount": a }),
        None => serde_json::json!({}),
    };
    let url = format!("http://{api}/v1/payments/{payment}/refunds");
    let unmeasured = AtomicU64::new(0);
    match post_until_answered(&http, &url, &key, &body, &load.retries, &unmeasured).await {
        Answer::Accepted(id) => {
            lock(&load.accepted).insert(id, payment);
        }
        Answer::Refused(status, body)
            if status == 409 && body.contains("amount_exceeds_refundable") =>
        {
            load.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        Answer::Refused(status, body) => {
            lock(&load.refused).push(format!("refund {key}: {status} {body}"));
        }
        Answer::GaveUp => {
            lock(&load.refused).push(format!("refund {key}: not accepted within 120 s"));
        }
    }
}

/// `n` in base 26 with the letters a–z: the seed in an idempotency key without a digit
/// run that the API's card-data check could take for a card number.
pub fn in_letters(mut n: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    out.iter().rev().map(|&b| char::from(b)).collect()
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
