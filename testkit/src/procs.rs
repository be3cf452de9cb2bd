//! Separate OS processes for the harnesses that kill and measure them (`make chaos`,
//! `make soak`): a child process that can be killed and started again, free loopback
//! addresses, the binaries built beside the harness, and a client load that retries a
//! create with its Idempotency-Key as a real client must.

use crate::stack::DEMO_KEY;
use anyhow::Context as _;
use payments::retry::Backoff;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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

pub fn free_addr() -> anyhow::Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

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
}

/// Creates one payment, retrying (with the same Idempotency-Key, as a client must)
/// through API restarts and broker outages, for up to two minutes; a refusal's
/// `Retry-After` is waited out before the next try.
pub async fn create(http: reqwest::Client, api: String, key: String, amount: i64, load: Arc<Load>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let mut wait = backoff.next_delay();
        let res = http
            .post(format!("http://{api}/v1/payments"))
            .bearer_auth(DEMO_KEY)
            .header("idempotency-key", &key)
            .json(&serde_json::json!({ "amount": amount, "currency": "EUR", "reference": key }))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                if let Ok(body) = r.json::<serde_json::Value>().await {
                    if let Some(id) = body["id"].as_str() {
                        lock(&load.accepted).insert(key, id.to_owned());
                        return;
                    }
                }
            }
            Ok(r) if r.status().is_client_error() && r.status() != 429 && r.status() != 408 => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                lock(&load.refused).push(format!("{key}: {status} {body}"));
                return;
            }
            Ok(r) => {
                if let Some(s) = crate::client::retry_after(r.headers()) {
                    wait = wait.max(Duration::from_secs(s));
                }
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            lock(&load.refused).push(format!("{key}: not accepted within 120 s"));
            return;
        }
        load.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
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

/// Asks to refund `amount` of `payment` (`None`: what is left), retrying with the same
/// Idempotency-Key through API restarts and broker outages for up to two minutes.
pub async fn refund(
    http: reqwest::Client,
    api: String,
    payment: String,
    key: String,
    amount: Option<i64>,
    load: Arc<RefundLoad>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let body = match amount {
        Some(a) => serde_json::json!({ "amount": a }),
        None => serde_json::json!({}),
    };
    loop {
        let mut wait = backoff.next_delay();
        let res = http
            .post(format!("http://{api}/v1/payments/{payment}/refunds"))
            .bearer_auth(DEMO_KEY)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                if let Ok(body) = r.json::<serde_json::Value>().await {
                    if let Some(id) = body["id"].as_str() {
                        lock(&load.accepted).insert(id.to_owned(), payment);
                        return;
                    }
                }
            }
            Ok(r) if r.status() == 409 => {
                let body = r.text().await.unwrap_or_default();
                if body.contains("amount_exceeds_refundable") {
                    load.conflicts.fetch_add(1, Ordering::Relaxed);
                } else {
                    lock(&load.refused).push(format!("refund {key}: 409 {body}"));
                }
                return;
            }
            Ok(r) if r.status().is_client_error() && r.status() != 429 && r.status() != 408 => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                lock(&load.refused).push(format!("refund {key}: {status} {body}"));
                return;
            }
            Ok(r) => {
                if let Some(s) = crate::client::retry_after(r.headers()) {
                    wait = wait.max(Duration::from_secs(s));
                }
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            lock(&load.refused).push(format!("refund {key}: not accepted within 120 s"));
            return;
        }
        load.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
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
