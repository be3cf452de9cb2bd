//! An API client for tests, and the checks they share.

use crate::kafka::Kafka;
use anyhow::Context as _;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Api {
    pub base: String,
    key: String,
    pub http: reqwest::Client,
}

/// Status code, headers and JSON body (Null when empty).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(addr: SocketAddr, key: &str) -> Self {
        Api {
            base: format!("http://{addr}"),
            key: key.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn with_key(&self, key: &str) -> Self {
        Api {
            key: key.to_owned(),
            ..self.clone()
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        let res = req.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    pub async fn create(
        &self,
        idempotency_key: &str,
        amount: i64,
        currency: &str,
    ) -> anyhow::Result<Reply> {
        let body = serde_json::json!({ "amount": amount, "currency": currency });
        self.send(
            self.request(reqwest::Method::POST, "/v1/payments")
                .header("Idempotency-Key", idempotency_key)
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/payments/{id}")))
            .await
    }

    /// The `type` of each event in a payment's history, in order.
    pub async fn event_types(&self, id: &str) -> anyhow::Result<Vec<String>> {
        let r = self.events(id).await?;
        let events = r.body["events"]
            .as_array()
            .with_context(|| format!("no events in {}", r.body))?;
        Ok(events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    pub async fn events(&self, id: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/payments/{id}/events")))
            .await
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::POST, &format!("/v1/payments/{id}/cancel")))
            .await
    }

    /// Asks to refund `amount` of payment `id` (`None`: what is left).
    pub async fn refund(
        &self,
        id: &str,
        idempotency_key: &str,
        amount: Option<i64>,
    ) -> anyhow::Result<Reply> {
        let body = match amount {
            Some(a) => serde_json::json!({ "amount": a }),
            None => serde_json::json!({}),
        };
        self.send(
            self.request(reqwest::Method::POST, &format!("/v1/payments/{id}/refunds"))
                .header("Idempotency-Key", idempotency_key)
                .json(&body),
        )
        .await
    }

    pub async fn get_refund(&self, refund_id: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/refunds/{refund_id}")))
            .await
    }

    pub async fn refunds(&self, id: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/payments/{id}/refunds")))
            .await
    }

    /// Polls until the refund is visible with one of `statuses`.
    pub async fn wait_for_refund(
        &self,
        refund_id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get_refund(refund_id).await?;
            if r.status == 200 && statuses.iter().any(|s| r.body["status"] == *s) {
                return Ok(r);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "refund {refund_id} not in {statuses:?} after {timeout:?}: {} {}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn list(&self, query: &str) -> anyhow::Result<Reply> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/payments?{query}")))
            .await
    }

    /// Polls until the payment is visible with one of `statuses`.
    pub async fn wait_for_status(
        &self,
        id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get(id).await?;
            if r.status == 200 && statuses.contains(&r.body["status"].as_str().unwrap_or("")) {
                return Ok(r);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "payment {id} did not reach {statuses:?}; last: {} {}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls the projection until every id is terminal; returns id → status.
pub async fn wait_all_terminal(
    pool: &sinks::Pool,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<HashMap<String, String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = pool.get().await?;
        let rows = c
            .query(
                "SELECT payment_id, status FROM payments WHERE payment_id = ANY($1)",
                &[&ids],
            )
            .await?;
        let found: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let open: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !matches!(
                    found.get(*id).map(String::as_str),
                    Some("COMPLETED" | "FAILED" | "CANCELED")
                )
            })
            .collect();
        if open.is_empty() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            let sample: Vec<_> = open
                .iter()
                .take(5)
                .map(|id| (id.to_string(), found.get(*id).cloned()))
                .collect();
            anyhow::bail!(
                "{} of {} payments not terminal after {timeout:?}; e.g. {sample:?}",
                open.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events by `(payment_id, seq)`.
pub type History = BTreeMap<(String, i64), Value>;

/// Every event in the projection, `(payment_id, seq) → event`.
pub async fn projected_events(
    pool: &sinks::Pool,
) -> anyhow::Result<BTreeMap<(String, i64), Value>> {
    let c = pool.get().await?;
    let rows = c
        .query("SELECT payment_id, seq, event FROM payment_events", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Every event on the topic, `(payment_id, seq) → event`. Fails if two records for the
/// same `(payment_id, seq)` differ: replays must be identical.
pub fn topic_events(kafka: &Kafka, topic: &str) -> anyhow::Result<(History, usize)> {
    let read = first_topic_events(kafka, topic)?;
    if let Some(d) = read.first_differing {
        anyhow::bail!("two different events for {d}");
    }
    Ok((read.events, read.records))
}

/// The events topic read whole, each `(payment_id, seq)` by its first copy.
pub struct TopicEvents {
    pub events: History,
    pub records: usize,
    /// Later copies that differ from the first.
    pub differing: usize,
    pub first_differing: Option<String>,
}

/// Every event on the topic by its first copy, counting the copies that differ.
pub fn first_topic_events(kafka: &Kafka, topic: &str) -> anyhow::Result<TopicEvents> {
    let mut out = TopicEvents {
        events: History::new(),
        records: 0,
        differing: 0,
        first_differing: None,
    };
    for r in kafka.read_all(topic)? {
        out.records += 1;
        let v: Value = serde_json::from_slice(r.payload.as_deref().unwrap_or_default())
            .with_context(|| format!("undecodable event at {}:{}", r.partition, r.offset))?;
        let key = (
            v["payment_id"].as_str().unwrap_or_default().to_owned(),
            v["seq"].as_i64().unwrap_or(-1),
        );
        match out.events.get(&key) {
            Some(prev) if prev != &v => {
                out.differing += 1;
                out.first_differing
                    .get_or_insert_with(|| format!("{key:?}:\n{prev}\n{v}"));
            }
            Some(_) => {}
            None => {
                out.events.insert(key, v);
            }
        }
    }
    Ok(out)
}

/// The seconds an answer's `Retry-After` asks a client to wait, if it has one.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
