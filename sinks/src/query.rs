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
