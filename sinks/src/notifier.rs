//! The notifier: delivers merchant notifications to the merchants' endpoints, at least
//! once, signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`, one signature per configured secret while one is rotated).
//!
//! The sink writes every notification to `webhook_deliveries` (once, whatever its
//! redeliveries); the notifier takes the due ones from there. A delivery is *claimed* by
//! moving its next attempt past the request timeout in the same statement that picks it
//! (`FOR UPDATE SKIP LOCKED`), so several notifiers share the work and a notifier that
//! dies mid-request leaves the delivery to be tried again once its claim runs out. Each
//! failed attempt is recorded and retried with exponential back-off until the
//! notification is `max_age` old (Stripe retries for three days), then it is `failed`.
//!
//! A slow or dead endpoint holds at most `per_merchant` requests, each for at most
//! `request_timeout`; everything waiting is a row in PostgreSQL, not memory; and each
//! pick takes of a merchant only what its free slots hold, so a merchant at its limit
//! never delays another merchant's deliveries or the processing of payments, which never
//! waits for this. A request that ends frees its slot at once: the next pick follows it
//! without waiting for the poll.
//!
//! Each attempt is a `notify <type>` span in the trace of the payment it is about (a
//! child of the span that published the notification, whose context the sink kept with
//! the delivery), and the request carries its `traceparent`.

use crate::Pool;
use prometheus::{
    register_int_counter, register_int_counter_vec, register_int_gauge, IntCounter, IntCounterVec,
    IntGauge,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use telemetry::now_ms;
use tracing::Instrument;

struct NotifierMetrics {
    delivered: IntCounter,
    attempts: IntCounterVec,
    given_up: IntCounter,
    pending: IntGauge,
    oldest_pending: IntGauge,
}

#[allow(clippy::expect_used)]
static METRICS: LazyLock<NotifierMetrics> = LazyLock::new(|| {
    (|| -> Result<NotifierMetrics, prometheus::Error> {
        Ok(NotifierMetrics {
            delivered: register_int_counter!(
                "gateway_notifications_delivered_total",
                "Merchant notifications delivered (answered 2xx)"
            )?,
            attempts: register_int_counter_vec!(
                "gateway_notification_attempts_total",
                "Delivery attempts of merchant notifications, by outcome (delivered, failed)",
                &["outcome"]
            )?,
            given_up: register_int_counter!(
                "gateway_notifications_given_up_total",
                "Merchant notifications still undelivered after the retry period"
            )?,
            pending: register_int_gauge!(
                "gateway_notifications_pending",
                "Merchant notifications waiting for delivery"
            )?,
            oldest_pending: register_int_gauge!(
                "gateway_notifications_oldest_pending_seconds",
                "Age of the oldest merchant notification not delivered yet (0: none)"
            )?,
        })
    })()
    .expect("notifier metrics register once")
});

/// Where a merchant wants its notifications, and the secrets that sign them.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// Raw secret bytes; every one signs (the merchant verifies with any).
    pub secrets: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct NotifierSettings {
    /// Merchant id → endpoint. Notifications of other merchants are `skipped`.
    pub endpoints: HashMap<String, Endpoint>,
    /// How long a notification is retried before it is given up (`failed`).
    pub max_age: Duration,
    /// One attempt's limit; an endpoint slower than this failed the attempt.
    pub request_timeout: Duration,
    /// The first retry's delay; each next one doubles, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Requests in flight to one merchant, and in all.
    pub per_merchant: usize,
    pub max_in_flight: usize,
    /// How often due deliveries are looked for.
    pub poll: Duration,
    /// How long a settled delivery (delivered, failed or skipped) and its attempts stay
    /// readable before they are deleted. Keep it longer than the notifications topic's
    /// retention: a notification replayed from the topic after its row is gone is
    /// delivered again.
    pub keep: Duration,
    /// What the notifier tells its watchdog: each pick it made, a database it waits on.
    pub progress: Arc<telemetry::progress::Progress>,
}

impl NotifierSettings {
    pub fn new(endpoints: HashMap<String, Endpoint>) -> Self {
        NotifierSettings {
            endpoints,
            max_age: Duration::from_secs(3 * 24 * 3600),
            request_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            per_merchant: 8,
            max_in_flight: 64,
            poll: Duration::from_millis(200),
            keep: Duration::from_secs(30 * 24 * 3600),
            progress: telemetry::progress::Progress::new("notifier"),
        }
    }

    /// The delay before the attempt after `attempts` failed ones.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(0);
        self.backoff_base
            .saturating_mul(1 << shift)
            .min(self.backoff_max)
    }
}

/// A claimed delivery.
struct Due {
    webhook_id: String,
    merchant: String,
    payment_id: String,
    kind: String,
    body: String,
    attempts: i32,
    created_at_ms: i64,
    /// The trace context of the notification's record (the payment's trace).
    traceparent: Option<String>,
}

/// Requests in flight per merchant.
type InFlight = Arc<Mutex<HashMap<String, usize>>>;

fn lock(m: &InFlight) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delivers until `shutdown`; a PostgreSQL outage pauses it (and loses nothing).
pub async fn run_notifier(
    pool: Pool,
    settings: NotifierSettings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::migrate(&pool).await?;
    let http = reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.request_timeout.min(Duration::from_secs(3)))
        .pool_max_idle_per_host(settings.per_merchant)
        .build()?;
    let settings = Arc::new(settings);
    let in_flight: InFlight = Arc::default();
    // A request that ended: a slot is free, pick again now.
    let slot_freed = Arc::new(tokio::sync::Notify::new());
    // The first pick is at once.
    slot_freed.notify_one();
    let configured: Vec<String> = settings.endpoints.keys().cloned().collect();
    tracing::info!(merchants = configured.len(), "notifier delivering");
    let _pruning = AbortOnDrop(tokio::spawn(prune_every_minute(
        pool.clone(),
        settings.keep,
    )));
    tokio::pin!(shutdown);
    let mut last_gauges = Instant::now() - Duration::from_secs(60);
    // Set while PostgreSQL refuses the claims (see `Progress::busy`).
    let mut waiting = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(settings.poll) => {}
            _ = slot_freed.notified() => {}
        }
        // Housekeeping every few seconds, not on every pick: both read every pending row.
        if last_gauges.elapsed() > Duration::from_secs(5) {
            last_gauges = Instant::now();
            let kept = async {
                skip_unconfigured(&pool, &configured).await?;
                update_gauges(&pool).await
            };
            if let Err(e) = kept.await {
                tracing::warn!(error = %format!("{e:#}"), "notifier housekeeping failed; retrying");
            }
        }
        // Each merchant's free slots, within the notifier's room.
        let (open, free): (Vec<String>, Vec<i64>) = {
            let busy = lock(&in_flight);
            let mut room = settings
                .max_in_flight
                .saturating_sub(busy.values().sum::<usize>());
            let mut open = (Vec::new(), Vec::new());
            for m in &configured {
                let slots = settings
                    .per_merchant
                    .saturating_sub(busy.get(m).copied().unwrap_or(0))
                    .min(room);
                if slots > 0 {
                    room -= slots;
                    open.0.push(m.clone());
                    open.1.push(i64::try_from(slots).unwrap_or(i64::MAX));
                }
            }
            open
        };
        if open.is_empty() {
            // Every slot is taken: the merchants' endpoints are the limit, not the notifier.
            settings.progress.beat();
            continue;
        }
        let due = match claim(&pool, &open, &free, &settings).await {
            Ok(d) => {
                waiting = None;
                settings.progress.beat();
                d
            }
            Err(e) => {
                waiting.get_or_insert_with(|| {
                    settings
                        .progress
                        .busy("PostgreSQL refuses the notifier's claims")
                });
                tracing::warn!(error = %format!("{e:#}"), "notifier cannot claim deliveries; retrying");
                continue;
            }
        };
        for d in due {
            {
                let mut busy = lock(&in_flight);
                let n = busy.entry(d.merchant.clone()).or_default();
                if *n >= settings.per_merchant {
                    // Its claim runs out and it is picked again later.
                    continue;
                }
                *n += 1;
            }
            let (pool, http, settings, in_flight, slot_freed) = (
                pool.clone(),
                http.clone(),
                settings.clone(),
                in_flight.clone(),
                slot_freed.clone(),
            );
            let span = attempt_span(&d);
            tokio::spawn(async move {
                deliver(&pool, &http, &settings, &d).instrument(span).await;
                if let Some(n) = lock(&in_flight).get_mut(&d.merchant) {
                    *n = n.saturating_sub(1);
                }
                slot_freed.notify_one();
            });
        }
    }
}

/// Aborts the task when the notifier returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn prune_every_minute(pool: Pool, keep: Duration) {
    loop {
        match prune(&pool, keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                "settled notifications past their keep time deleted"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "deleting old notifications failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Deletes the settled deliveries (delivered, failed, skipped) created more than `keep`
/// ago, with their attempts, a batch at a time; returns how many. Pending ones stay
/// whatever their age (the retry period settles them first).
pub async fn prune(pool: &Pool, keep: Duration) -> anyhow::Result<u64> {
    const BATCH: i64 = 5_000;
    let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let c = pool.get().await?;
        let stmt = c
            .prepare_cached(
                "WITH gone AS (
                     DELETE FROM webhook_deliveries WHERE webhook_id IN (
                         SELECT webhook_id FROM webhook_deliveries
                         WHERE status <> 'pending'
                           AND created_at < now() - make_interval(secs => $1::int8 / 1000.0)
                         LIMIT $2)
                     RETURNING webhook_id),
                 attempts AS (
                     DELETE FROM webhook_attempts a USING gone WHERE a.webhook_id = gone.webhook_id)
                 SELECT count(*) FROM gone",
            )
            .await?;
        let n: i64 = c.query_one(&stmt, &[&keep_ms, &BATCH]).await?.get(0);
        total += u64::try_from(n).unwrap_or(0);
        if n < BATCH {
            return Ok(total);
        }
    }
}

/// Marks the pending notifications of merchants without an endpoint `skipped`.
async fn skip_unconfigured(pool: &Pool, configured: &[String]) -> anyhow::Result<()> {
    let c = pool.get().await?;
    let stmt = c
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = 'skipped'
             WHERE status = 'pending' AND NOT (merchant_id = ANY($1))",
        )
        .await?;
    c.execute(&stmt, &[&configured]).await?;
    Ok(())
}

async fn update_gauges(pool: &Pool) -> anyhow::Result<()> {
    let c = pool.get().await?;
    let row = c
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::int8
             FROM webhook_deliveries WHERE status = 'pending'",
            &[],
        )
        .await?;
    METRICS.pending.set(row.get(0));
    METRICS.oldest_pending.set(row.get(1));
    Ok(())
}

/// Picks the due deliveries of the `open` merchants, at most `free[i]` of `open[i]`'s
/// (oldest due first), and claims them for one request's time.
async fn claim(
    pool: &Pool,
    open: &[String],
    free: &[i64],
    settings: &NotifierSettings,
) -> anyhow::Result<Vec<Due>> {
    let c = pool.get().await?;
    let lease_ms = i64::try_from(settings.request_timeout.as_millis()).unwrap_or(i64::MAX) + 5_000;
    let stmt = c
        .prepare_cached(
            "UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $3::int8 / 1000.0)
             FROM (SELECT w.webhook_id
                   FROM unnest($1::text[], $2::int8[]) AS m(merchant_id, free)
                   CROSS JOIN LATERAL (
                       SELECT webhook_id FROM webhook_deliveries
                       WHERE status = 'pending' AND next_attempt_at <= now()
                         AND merchant_id = m.merchant_id
                       ORDER BY next_attempt_at LIMIT m.free FOR UPDATE SKIP LOCKED) w) due
             WHERE d.webhook_id = due.webhook_id
             RETURNING d.webhook_id, d.merchant_id, d.payment_id, d.type, d.body, d.attempts,
                       (extract(epoch FROM d.created_at) * 1000)::int8, d.traceparent",
        )
        .await?;
    let rows = c.query(&stmt, &[&open, &free, &lease_ms]).await?;
    Ok(rows
        .iter()
        .map(|r| Due {
            webhook_id: r.get(0),
            merchant: r.get(1),
            payment_id: r.get(2),
            kind: r.get(3),
            body: r.get(4),
            attempts: r.get(5),
            created_at_ms: r.get(6),
            traceparent: r.get(7),
        })
        .collect())
}

/// The span of one delivery attempt, a child of the notification's record's span: in
/// the trace of the payment the notification is about.
fn attempt_span(d: &Due) -> tracing::Span {
    let span = tracing::info_span!(
        "notify.deliver",
        otel.name = %format_args!("notify {}", d.kind),
        otel.kind = "client",
        payment_id = %d.payment_id,
        webhook_id = %d.webhook_id,
        attempt = d.attempts + 1,
        outcome = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, d.traceparent.as_deref(), &[]);
    span
}

/// One attempt (in its [`attempt_span`]): sends, records the attempt, and settles or
/// reschedules the delivery.
async fn deliver(pool: &Pool, http: &reqwest::Client, settings: &NotifierSettings, d: &Due) {
    let Some(endpoint) = settings.endpoints.get(&d.merchant) else {
        return;
    };
    let span = tracing::Span::current();
    let ts = now_ms() / 1000;
    let signature = endpoint
        .secrets
        .iter()
        .map(|s| payments::webhook::sign(s, &d.webhook_id, ts, d.body.as_bytes()))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let mut req = http
        .post(&endpoint.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.webhook_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature);
    if let Some(tp) = telemetry::traceparent(&span) {
        req = req.header("traceparent", tp);
    }
    let res = req.body(d.body.clone()).send().await;
    let (code, error) = match res {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => (
            Some(r.status().as_u16()),
            Some(format!("endpoint answered {}", r.status())),
        ),
        Err(e) if e.is_timeout() => (
            None,
            Some(format!(
                "no answer within {} ms",
                settings.request_timeout.as_millis()
            )),
        ),
        Err(e) => (None, Some(format!("request failed: {e}"))),
    };
    let took = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
    let attempt = d.attempts + 1;
    let delivered = error.is_none();
    span.record("outcome", if delivered { "delivered" } else { "failed" });
    if let Some(code) = code {
        span.record("http.response.status_code", code);
    }
    let too_old = now_ms().saturating_sub(d.created_at_ms)
        >= i64::try_from(settings.max_age.as_millis()).unwrap_or(i64::MAX);
    let status = match (delivered, too_old) {
        (true, _) => "delivered",
        (false, true) => "failed",
        (false, false) => "pending",
    };
    let retry_ms = i64::try_from(settings.backoff(attempt).as_millis()).unwrap_or(i64::MAX);
    METRICS
        .attempts
        .with_label_values(&[if delivered { "delivered" } else { "failed" }])
        .inc();
    match status {
        "delivered" => METRICS.delivered.inc(),
        "failed" => {
            METRICS.given_up.inc();
            tracing::error!(webhook_id = %d.webhook_id, merchant = %d.merchant, attempts = attempt, "notification given up after the retry period");
        }
        _ => {
            tracing::debug!(webhook_id = %d.webhook_id, merchant = %d.merchant, attempt, error = ?error, "notification attempt failed; retrying");
        }
    }
    // Recorded until PostgreSQL takes it: an attempt made is never forgotten.
    let mut backoff =
        payments::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    for _ in 0..20 {
        match record(
            pool,
            d,
            attempt,
            code,
            error.as_deref(),
            took,
            status,
            retry_ms,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "recording a delivery attempt failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn record(
    pool: &Pool,
    d: &Due,
    attempt: i32,
    code: Option<u16>,
    error: Option<&str>,
    took_ms: i32,
    status: &str,
    retry_ms: i64,
) -> anyhow::Result<()> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    tx.execute(
        "INSERT INTO webhook_attempts (webhook_id, attempt, at, status_code, error, duration_ms)
         VALUES ($1, $2, now(), $3, $4, $5) ON CONFLICT DO NOTHING",
        &[
            &d.webhook_id,
            &attempt,
            &code.map(i32::from),
            &error,
            &took_ms,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE webhook_deliveries SET attempts = $2, status = $3, last_error = $4,
                delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END,
                next_attempt_at = now() + make_interval(secs => $5::int8 / 1000.0)
         WHERE webhook_id = $1 AND status = 'pending'",
        &[&d.webhook_id, &attempt, &status, &error, &retry_ms],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let s = NotifierSettings::new(HashMap::new());
        let secs: Vec<u64> = (1..=12).map(|a| s.backoff(a).as_secs()).collect();
        assert_eq!(
            secs,
            [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
        assert_eq!(s.backoff(0), s.backoff_base);
    }
}
