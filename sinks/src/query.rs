//! The read side: what the HTTP API asks of the projection. Every query is scoped to a
//! merchant; another merchant's payment is indistinguishable from a missing one.

use crate::Pool;
use payments::Status;
use serde::Serialize;
use tokio_postgres::Row;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentView {
    pub id: String,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub reference: Option<String>,
    pub description: Option<String>,
    pub metadata: serde_json::Value,
    pub provider_reference: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub cancel_requested: bool,
    pub stuck: bool,
    pub attempts: i32,
    /// What succeeded refunds returned; `refunded` once it is the whole amount.
    pub amount_refunded: i64,
    pub refunded: bool,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip)]
    pub idempotency_key: String,
    #[serde(skip)]
    pub request_hash: String,
    #[serde(skip)]
    pub created_at_us: i64,
}

const COLUMNS: &str = "payment_id, status, amount, currency::text, reference, description, provider_ref, failure_code,
    failure_message, cancel_requested, stuck, attempts, seq,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    idempotency_key, request_hash, (extract(epoch FROM created_at) * 1000000)::int8,
    coalesce(state->'metadata', '{}'::jsonb), amount_refunded";

fn view(r: &Row) -> PaymentView {
    PaymentView {
        id: r.get(0),
        status: r.get(1),
        amount: r.get(2),
        currency: r.get(3),
        reference: r.get(4),
        description: r.get(5),
        provider_reference: r.get(6),
        failure_code: r.get(7),
        failure_message: r.get(8),
        cancel_requested: r.get(9),
        stuck: r.get(10),
        attempts: r.get(11),
        version: r.get(12),
        created_at: r.get(13),
        updated_at: r.get(14),
        idempotency_key: r.get(15),
        request_hash: r.get(16),
        created_at_us: r.get(17),
        metadata: r.get(18),
        amount_refunded: r.get(19),
        refunded: r.get::<_, i64>(19) >= r.get::<_, i64>(2),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefundView {
    pub id: String,
    pub payment_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub reason: Option<String>,
    pub provider_reference: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip)]
    pub request_hash: String,
}

const REFUND_COLUMNS: &str =
    "refund_id, payment_id, amount, currency::text, status, reason, provider_ref,
    failure_code, failure_message,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    request_hash";

fn refund_view(r: &Row) -> RefundView {
    RefundView {
        id: r.get(0),
        payment_id: r.get(1),
        amount: r.get(2),
        currency: r.get(3),
        status: r.get(4),
        reason: r.get(5),
        provider_reference: r.get(6),
        failure_code: r.get(7),
        failure_message: r.get(8),
        created_at: r.get(9),
        updated_at: r.get(10),
        request_hash: r.get(11),
    }
}

/// When the payment completed (ms since the epoch), if it did.
pub async fn completed_at_ms(pool: &Pool, payment_id: &str) -> anyhow::Result<Option<i64>> {
    let c = pool.get().await?;
    let row = c
        .query_opt(
            "SELECT (extract(epoch FROM occurred_at) * 1000)::int8 FROM payment_events
             WHERE payment_id = $1 AND type = 'completed' LIMIT 1",
            &[&payment_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// A merchant's refund by its id.
pub async fn refund(pool: &Pool, merchant: &str, id: &str) -> anyhow::Result<Option<RefundView>> {
    let c = pool.get().await?;
    let sql =
        format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_id = $1 AND merchant_id = $2");
    Ok(c.query_opt(&sql, &[&id, &merchant])
        .await?
        .as_ref()
        .map(refund_view))
}

/// The refunds of a merchant's payment in the order requested; `None` if the merchant
/// has no such payment.
pub async fn refunds_of(
    pool: &Pool,
    merchant: &str,
    payment_id: &str,
) -> anyhow::Result<Option<Vec<RefundView>>> {
    let c = pool.get().await?;
    let owned = c
        .query_opt(
            "SELECT 1 FROM payments WHERE payment_id = $1 AND merchant_id = $2",
            &[&payment_id, &merchant],
        )
        .await?;
    if owned.is_none() {
        return Ok(None);
    }
    let sql = format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE payment_id = $1 ORDER BY refund_number"
    );
    let rows = c.query(&sql, &[&payment_id]).await?;
    Ok(Some(rows.iter().map(refund_view).collect()))
}

pub async fn get_payment(
    pool: &Pool,
    merchant: &str,
    id: &str,
) -> anyhow::Result<Option<PaymentView>> {
    let c = pool.get().await?;
    let sql = format!("SELECT {COLUMNS} FROM payments WHERE payment_id = $1 AND merchant_id = $2");
    Ok(c.query_opt(&sql, &[&id, &merchant])
        .await?
        .as_ref()
        .map(view))
}

/// The request hash a merchant's payment was created with, if the projection has it
/// (the idempotency check of a create: one indexed lookup, a statement prepared once per
/// connection).
pub async fn request_hash(pool: &Pool, merchant: &str, id: &str) -> anyhow::Result<Option<String>> {
    let c = pool.get().await?;
    // By primary key alone: a plan cached while the table was small must not scan it.
    let stmt = c
        .prepare_cached("SELECT merchant_id, request_hash FROM payments WHERE payment_id = $1")
        .await?;
    Ok(c.query_opt(&stmt, &[&id])
        .await?
        .filter(|r| r.get::<_, &str>(0) == merchant)
        .map(|r| r.get(1)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventView {
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub occurred_at: String,
    pub data: serde_json::Value,
}

/// The payment's history in `seq` order; `None` if the merchant has no such payment.
pub async fn events(
    pool: &Pool,
    merchant: &str,
    id: &str,
) -> anyhow::Result<Option<Vec<EventView>>> {
    let c = pool.get().await?;
    let owned = c
        .query_opt(
            "SELECT 1 FROM payments WHERE payment_id = $1 AND merchant_id = $2",
            &[&id, &merchant],
        )
        .await?;
    if owned.is_none() {
        return Ok(None);
    }
    let rows = c
        .query(
            "SELECT seq, type, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), event -> 'body'
             FROM payment_events WHERE payment_id = $1 ORDER BY seq",
            &[&id],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| EventView {
                seq: r.get(0),
                kind: r.get(1),
                occurred_at: r.get(2),
                data: r.get(3),
            })
            .collect(),
    ))
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub currency: Option<String>,
    pub reference: Option<String>,
    pub limit: i64,
    /// Position after which to continue: `(created_at in µs, payment_id)`.
    pub after: Option<(i64, String)>,
}

/// Newest first, keyset-paginated. Returns the page and the cursor of its last row when
/// more rows may follow.
pub async fn list(
    pool: &Pool,
    merchant: &str,
    f: &ListFilter,
) -> anyhow::Result<(Vec<PaymentView>, Option<(i64, String)>)> {
    let c = pool.get().await?;
    let (after_us, after_id) = match &f.after {
        Some((us, id)) => (Some(*us), Some(id.clone())),
        None => (None, None),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM payments
         WHERE merchant_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR currency = $3)
           AND ($4::text IS NULL OR reference = $4)
           AND ($5::int8 IS NULL OR (created_at, payment_id) < ('epoch'::timestamptz + $5 * interval '1 microsecond', $6::text))
         ORDER BY created_at DESC, payment_id DESC
         LIMIT $7"
    );
    let status = f.status.map(|s| s.as_str().to_owned());
    let limit = f.limit + 1;
    let rows = c
        .query(
            &sql,
            &[
                &merchant,
                &status,
                &f.currency,
                &f.reference,
                &after_us,
                &after_id,
                &limit,
            ],
        )
        .await?;
    let mut page: Vec<PaymentView> = rows.iter().map(view).collect();
    let more = page.len() as i64 > f.limit;
    page.truncate(f.limit.max(0) as usize);
    let cursor = if more {
        page.last().map(|p| (p.created_at_us, p.id.clone()))
    } else {
        None
    };
    Ok((page, cursor))
}

/// Whether the projection's database answers (readiness).
pub async fn ping(pool: &Pool) -> anyhow::Result<()> {
    let c = pool.get().await?;
    c.query_one("SELECT 1", &[]).await?;
    Ok(())
}

/// One attempt to deliver a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    pub attempt: i32,
    pub at: String,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

/// A merchant notification and its delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payment_id: String,
    pub seq: i64,
    /// `pending`, `delivered`, `failed` (given up) or `skipped` (no endpoint configured).
    pub status: String,
    pub attempts: i32,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    /// What was (or is to be) delivered.
    pub body: serde_json::Value,
    /// The latest attempts, newest last (at most [`MAX_ATTEMPTS_SHOWN`]).
    pub attempt_log: Vec<AttemptView>,
    #[serde(skip)]
    pub created_at_us: i64,
}

/// Which of a merchant's notifications to list: one payment's, of one status, the page
/// after a cursor (creation time in µs, payment id, seq of the last one of a page).
#[derive(Debug, Clone, Default)]
pub struct DeliveriesFilter {
    pub payment_id: Option<String>,
    pub status: Option<String>,
    pub limit: i64,
    pub after: Option<(i64, String, i64)>,
}

pub const MAX_ATTEMPTS_SHOWN: i64 = 20;

const TS: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

/// A page of a merchant's notifications, newest first (a payment's by `seq`, newest
/// first), and the cursor of the next page if there is one.
pub async fn deliveries(
    pool: &Pool,
    merchant: &str,
    f: &DeliveriesFilter,
) -> anyhow::Result<(Vec<DeliveryView>, Option<(i64, String, i64)>)> {
    let c = pool.get().await?;
    let sql = format!(
        "SELECT webhook_id, type, payment_id, seq, status, attempts,
                to_char(created_at AT TIME ZONE 'UTC', {TS}),
                to_char(delivered_at AT TIME ZONE 'UTC', {TS}),
                CASE WHEN status = 'pending' THEN to_char(next_attempt_at AT TIME ZONE 'UTC', {TS}) END,
                last_error, body::jsonb,
                (extract(epoch FROM created_at) * 1000000)::int8
         FROM webhook_deliveries
         WHERE merchant_id = $1 AND ($2::text IS NULL OR payment_id = $2)
           AND ($3::text IS NULL OR status = $3)
           AND ($4::int8 IS NULL OR (created_at, payment_id, seq)
                < ('epoch'::timestamptz + $4 * interval '1 microsecond', $5::text, $6::int8))
         ORDER BY created_at DESC, payment_id DESC, seq DESC LIMIT $7"
    );
    let (after_us, after_payment, after_seq) = match &f.after {
        Some((us, p, seq)) => (Some(*us), Some(p.clone()), Some(*seq)),
        None => (None, None, None),
    };
    let rows = c
        .query(
            &sql,
            &[
                &merchant,
                &f.payment_id,
                &f.status,
                &after_us,
                &after_payment,
                &after_seq,
                &(f.limit + 1),
            ],
        )
        .await?;
    let more = rows.len() as i64 > f.limit;
    let rows = &rows[..rows.len().min(f.limit.max(0) as usize)];
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let attempts = c
        .query(
            &format!(
                "SELECT webhook_id, attempt, to_char(at AT TIME ZONE 'UTC', {TS}), status_code, error, duration_ms
                 FROM (SELECT *, row_number() OVER (PARTITION BY webhook_id ORDER BY attempt DESC) AS newest
                       FROM webhook_attempts WHERE webhook_id = ANY($1)) a
                 WHERE newest <= $2 ORDER BY webhook_id, attempt"
            ),
            &[&ids, &MAX_ATTEMPTS_SHOWN],
        )
        .await?;
    let mut log: std::collections::HashMap<String, Vec<AttemptView>> = Default::default();
    for a in &attempts {
        log.entry(a.get(0)).or_default().push(AttemptView {
            attempt: a.get(1),
            at: a.get(2),
            status_code: a.get(3),
            error: a.get(4),
            duration_ms: a.get(5),
        });
    }
    let page: Vec<DeliveryView> = rows
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            DeliveryView {
                attempt_log: log.remove(&id).unwrap_or_default(),
                id,
                kind: r.get(1),
                payment_id: r.get(2),
                seq: r.get(3),
                status: r.get(4),
                attempts: r.get(5),
                created_at: r.get(6),
                delivered_at: r.get(7),
                next_attempt_at: r.get(8),
                last_error: r.get(9),
                body: r.get(10),
                created_at_us: r.get(11),
            }
        })
        .collect();
    let cursor = if more {
        page.last()
            .map(|d| (d.created_at_us, d.payment_id.clone(), d.seq))
    } else {
        None
    };
    Ok((page, cursor))
}

/// What asking for a redelivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    Scheduled,
    /// The notification was skipped: the merchant had no endpoint configured.
    NoEndpoint,
    NotFound,
}

/// Schedules a merchant's notification for delivery now, whatever its status (a
/// delivered one is sent again, under the same `webhook-id`).
pub async fn redeliver(
    pool: &Pool,
    merchant: &str,
    webhook_id: &str,
) -> anyhow::Result<Redelivery> {
    let c = pool.get().await?;
    let status: Option<String> = c
        .query_opt(
            "UPDATE webhook_deliveries d SET status = CASE WHEN d.status = 'skipped' THEN 'skipped' ELSE 'pending' END,
                    next_attempt_at = now()
             WHERE webhook_id = $1 AND merchant_id = $2
             RETURNING status",
            &[&webhook_id, &merchant],
        )
        .await?
        .map(|r| r.get(0));
    Ok(match status.as_deref() {
        None => Redelivery::NotFound,
        Some("skipped") => Redelivery::NoEndpoint,
        Some(_) => Redelivery::Scheduled,
    })
}
