//! Applies batches of topic records to PostgreSQL, in one transaction per batch.
//!
//! - `payment_events` gets every event once: `(payment_id, seq)` is the primary key and
//!   inserts are `ON CONFLICT DO NOTHING`, so redelivery changes nothing.
//! - `payments` is the fold of each payment's events with the domain's own
//!   [`payments::evolve`], applied strictly in `seq` order: an event that arrives before
//!   its predecessor is stored and waits; the row never moves to a lower `seq`.
//! - `sink_progress` records the next offset per partition in the same transaction.

use payments::machine::PaymentState;
use payments::wire::{self, DeadLetter};
use payments::{CommandBody, Event};
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::Transaction;

/// Which topic carries what.
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub dead_letters: String,
    pub commands: String,
}

impl Topics {
    pub fn all(&self) -> [&str; 3] {
        [&self.events, &self.dead_letters, &self.commands]
    }
}

/// One record read from a topic.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The record's W3C `traceparent` header.
    pub traceparent: Option<String>,
}

/// What a batch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub events: usize,
    pub payments_updated: usize,
    pub dead_letters: usize,
    pub webhooks: usize,
    pub undecodable: usize,
    /// `occurred_at_ms` of every event in the batch (for the projection-lag metric).
    pub event_times_ms: Vec<i64>,
}

impl Applied {
    /// Adds another batch's counts to these.
    pub fn absorb(&mut self, other: Applied) {
        self.events += other.events;
        self.payments_updated += other.payments_updated;
        self.dead_letters += other.dead_letters;
        self.webhooks += other.webhooks;
        self.undecodable += other.undecodable;
        self.event_times_ms.extend(other.event_times_ms);
    }
}

pub async fn apply_batch(
    tx: &Transaction<'_>,
    topics: &Topics,
    batch: &[InRecord],
) -> Result<Applied, tokio_postgres::Error> {
    let mut applied = Applied::default();
    let mut events: BTreeMap<(String, u64), (Event, i32, i64)> = BTreeMap::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut webhooks: Vec<(String, String, serde_json::Value, i64)> = Vec::new();
    let mut progress: HashMap<(String, i32), i64> = HashMap::new();

    for r in batch {
        let next = progress
            .entry((r.topic.clone(), r.partition))
            .or_insert(r.offset + 1);
        *next = (*next).max(r.offset + 1);
        if r.topic == topics.events {
            match wire::decode_event(r.key.as_deref(), r.payload.as_deref()) {
                Ok(e) => {
                    applied.event_times_ms.push(e.occurred_at_ms);
                    events.insert(
                        (e.payment_id.to_string(), e.seq),
                        (e, r.partition, r.offset),
                    );
                }
                Err(e) => {
                    applied.undecodable += 1;
                    tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, error = %e, "undecodable event dead-lettered");
                    dead.push(set_aside(r, "undecodable_event", &e.to_string()));
                }
            }
        } else if r.topic == topics.dead_letters {
            match r
                .payload
                .as_deref()
                .map(serde_json::from_slice::<DeadLetter>)
            {
                Some(Ok(d)) => dead.push(d),
                _ => {
                    applied.undecodable += 1;
                    tracing::warn!(
                        partition = r.partition,
                        offset = r.offset,
                        "unreadable dead letter skipped"
                    );
                }
            }
        } else if r.topic == topics.commands {
            // Only verified webhooks are recorded; the worker dead-letters bad commands.
            if let Ok(cmd) = wire::decode_command(r.key.as_deref(), r.payload.as_deref()) {
                if let CommandBody::Webhook { outcome, .. } = &cmd.body {
                    let outcome = serde_json::to_value(outcome).unwrap_or_default();
                    webhooks.push((
                        cmd.command_id.to_string(),
                        cmd.payment_id.to_string(),
                        outcome,
                        cmd.issued_at_ms,
                    ));
                }
            }
        }
    }

    if !events.is_empty() {
        applied.events = insert_events(tx, &events).await?;
        let ids: Vec<String> = {
            let mut v: Vec<String> = events.keys().map(|(p, _)| p.clone()).collect();
            v.dedup();
            v
        };
        applied.payments_updated = fold_payments(tx, &ids).await?;
    }
    if !dead.is_empty() {
        applied.dead_letters = insert_dead_letters(tx, &dead).await?;
    }
    if !webhooks.is_empty() {
        applied.webhooks = insert_webhooks(tx, &webhooks).await?;
    }
    save_progress(tx, &progress).await?;
    Ok(applied)
}

async fn insert_events(
    tx: &Transaction<'_>,
    events: &BTreeMap<(String, u64), (Event, i32, i64)>,
) -> Result<usize, tokio_postgres::Error> {
    let mut pid = Vec::with_capacity(events.len());
    let mut seq = Vec::with_capacity(events.len());
    let mut kind = Vec::with_capacity(events.len());
    let mut at = Vec::with_capacity(events.len());
    let mut cause = Vec::with_capacity(events.len());
    let mut body = Vec::with_capacity(events.len());
    let mut part = Vec::with_capacity(events.len());
    let mut off = Vec::with_capacity(events.len());
    for ((p, s), (e, kp, ko)) in events {
        pid.push(p.as_str());
        seq.push(*s as i64);
        kind.push(e.body.kind());
        at.push(e.occurred_at_ms);
        cause.push(e.caused_by.as_str());
        body.push(serde_json::to_value(e).unwrap_or_default());
        part.push(*kp);
        off.push(*ko);
    }
    let n = tx
        .execute(
            "INSERT INTO payment_events (payment_id, seq, type, occurred_at, caused_by, event, kafka_partition, kafka_offset)
             SELECT p, s, t, to_timestamp(o / 1000.0), c, e, kp, ko
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::jsonb[], $7::int4[], $8::int8[])
                  AS u(p, s, t, o, c, e, kp, ko)
             ON CONFLICT (payment_id, seq) DO NOTHING",
            &[&pid, &seq, &kind, &at, &cause, &body, &part, &off],
        )
        .await?;
    Ok(n as usize)
}

/// Folds every stored-but-unapplied event of `ids` into their rows, in `seq` order,
/// stopping at the first gap.
async fn fold_payments(
    tx: &Transaction<'_>,
    ids: &[String],
) -> Result<usize, tokio_postgres::Error> {
    let mut states: HashMap<String, PaymentState> = HashMap::new();
    for row in tx
        .query(
            "SELECT payment_id, state FROM payments WHERE payment_id = ANY($1) FOR UPDATE",
            &[&ids],
        )
        .await?
    {
        let id: String = row.get(0);
        let state: serde_json::Value = row.get(1);
        match serde_json::from_value::<PaymentState>(state) {
            Ok(s) => {
                states.insert(id, s);
            }
            Err(e) => {
                tracing::error!(payment_id = %id, error = %e, "stored state unreadable; rebuild the projection")
            }
        }
    }
    let pending = tx
        .query(
            "SELECT e.payment_id, e.event FROM payment_events e
             LEFT JOIN payments p ON p.payment_id = e.payment_id
             WHERE e.payment_id = ANY($1) AND e.seq > COALESCE(p.seq, 0)
             ORDER BY e.payment_id, e.seq",
            &[&ids],
        )
        .await?;
    let mut changed: BTreeMap<String, PaymentState> = BTreeMap::new();
    for row in pending {
        let id: String = row.get(0);
        let Ok(event) = serde_json::from_value::<Event>(row.get(1)) else {
            continue;
        };
        let current = changed.get(&id).or_else(|| states.get(&id)).cloned();
        let expected = current.as_ref().map_or(1, |s| s.seq + 1);
        if event.seq != expected {
            continue; // a gap: wait for the missing event
        }
        if let Some(next) = payments::evolve(current, &event) {
            changed.insert(id, next);
        }
    }
    if changed.is_empty() {
        return Ok(0);
    }
    upsert_payments(tx, changed.values()).await
}

async fn upsert_payments<'a>(
    tx: &Transaction<'_>,
    states: impl Iterator<Item = &'a PaymentState>,
) -> Result<usize, tokio_postgres::Error> {
    #[derive(Default)]
    struct Cols {
        id: Vec<String>,
        merchant: Vec<String>,
        status: Vec<&'static str>,
        amount: Vec<i64>,
        currency: Vec<String>,
        key: Vec<String>,
        hash: Vec<String>,
        reference: Vec<Option<String>>,
        description: Vec<Option<String>>,
        provider_ref: Vec<Option<String>>,
        failure_code: Vec<Option<String>>,
        failure_message: Vec<Option<String>>,
        attempts: Vec<i32>,
        cancel: Vec<bool>,
        stuck: Vec<bool>,
        seq: Vec<i64>,
        created: Vec<i64>,
        updated: Vec<i64>,
        state: Vec<serde_json::Value>,
    }
    let mut c = Cols::default();
    for s in states {
        c.id.push(s.payment_id.to_string());
        c.merchant.push(s.merchant_id.to_string());
        c.status.push(s.status.as_str());
        c.amount.push(s.amount.minor_units());
        c.currency.push(s.currency.to_string());
        c.key.push(s.idempotency_key.to_string());
        c.hash.push(s.request_hash.clone());
        c.reference.push(s.reference.clone());
        c.description.push(s.description.clone());
        c.provider_ref.push(s.provider_ref.clone());
        c.failure_code.push(s.failure_code.clone());
        c.failure_message.push(s.failure_message.clone());
        c.attempts.push(s.attempt as i32);
        c.cancel.push(s.cancel_requested);
        c.stuck.push(s.stuck);
        c.seq.push(s.seq as i64);
        c.created.push(s.created_at_ms);
        c.updated.push(s.updated_at_ms);
        c.state.push(serde_json::to_value(s).unwrap_or_default());
    }
    let n = tx
        .execute(
            "INSERT INTO payments (payment_id, merchant_id, status, amount, currency, idempotency_key, request_hash,
                                   reference, description, provider_ref, failure_code, failure_message, attempts,
                                   cancel_requested, stuck, seq, created_at, updated_at, state)
             SELECT id, m, st, a, cur, k, h, r, d, pr, fc, fm, at, cr, sk, sq, to_timestamp(ca / 1000.0), to_timestamp(ua / 1000.0), js
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::bool[], $15::bool[],
                         $16::int8[], $17::int8[], $18::int8[], $19::jsonb[])
                  AS u(id, m, st, a, cur, k, h, r, d, pr, fc, fm, at, cr, sk, sq, ca, ua, js)
             ON CONFLICT (payment_id) DO UPDATE SET
                status = EXCLUDED.status, provider_ref = EXCLUDED.provider_ref,
                failure_code = EXCLUDED.failure_code, failure_message = EXCLUDED.failure_message,
                attempts = EXCLUDED.attempts, cancel_requested = EXCLUDED.cancel_requested,
                stuck = EXCLUDED.stuck, seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at,
                state = EXCLUDED.state, projected_at = now()
             WHERE payments.seq < EXCLUDED.seq",
            &[
                &c.id, &c.merchant, &c.status, &c.amount, &c.currency, &c.key, &c.hash, &c.reference, &c.description,
                &c.provider_ref, &c.failure_code, &c.failure_message, &c.attempts, &c.cancel, &c.stuck, &c.seq,
                &c.created, &c.updated, &c.state,
            ],
        )
        .await?;
    Ok(n as usize)
}

/// PostgreSQL text cannot hold NUL; a dead letter keeps everything else.
fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// A dead letter, written by the projection, for a record it cannot apply.
pub fn set_aside(r: &InRecord, reason: &str, detail: &str) -> DeadLetter {
    DeadLetter {
        reason: reason.to_owned(),
        detail: detail.to_owned(),
        source_topic: r.topic.clone(),
        source_partition: r.partition,
        source_offset: r.offset,
        processor: "projection".into(),
        key: r
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: r
            .payload
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        failed_at_ms: now_ms(),
    }
}

pub(crate) async fn insert_dead_letters(
    tx: &Transaction<'_>,
    dead: &[DeadLetter],
) -> Result<usize, tokio_postgres::Error> {
    let mut n = 0;
    let stmt = tx
        .prepare(
            "INSERT INTO dead_letters (source_topic, source_partition, source_offset, reason, detail, processor, record_key, payload, failed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9::int8 / 1000.0))
             ON CONFLICT DO NOTHING",
        )
        .await?;
    for d in dead {
        n += tx
            .execute(
                &stmt,
                &[
                    &pg_text(&d.source_topic),
                    &d.source_partition,
                    &d.source_offset,
                    &pg_text(&d.reason),
                    &pg_text(&d.detail),
                    &pg_text(&d.processor),
                    &d.key.as_deref().map(pg_text),
                    &d.payload.as_deref().map(pg_text),
                    &d.failed_at_ms,
                ],
            )
            .await?;
    }
    Ok(n as usize)
}

async fn insert_webhooks(
    tx: &Transaction<'_>,
    hooks: &[(String, String, serde_json::Value, i64)],
) -> Result<usize, tokio_postgres::Error> {
    let mut n = 0;
    let stmt = tx
        .prepare(
            "INSERT INTO webhooks_received (command_id, payment_id, outcome, received_at)
             VALUES ($1, $2, $3, to_timestamp($4::int8 / 1000.0)) ON CONFLICT DO NOTHING",
        )
        .await?;
    for (id, pid, outcome, at) in hooks {
        n += tx.execute(&stmt, &[id, pid, outcome, at]).await?;
    }
    Ok(n as usize)
}

async fn save_progress(
    tx: &Transaction<'_>,
    progress: &HashMap<(String, i32), i64>,
) -> Result<(), tokio_postgres::Error> {
    if progress.is_empty() {
        return Ok(());
    }
    let (mut topic, mut part, mut next) = (vec![], vec![], vec![]);
    for ((t, p), o) in progress {
        topic.push(t.as_str());
        part.push(*p);
        next.push(*o);
    }
    tx.execute(
        "INSERT INTO sink_progress (topic, partition, next_offset)
         SELECT * FROM UNNEST($1::text[], $2::int4[], $3::int8[])
         ON CONFLICT (topic, partition) DO UPDATE
           SET next_offset = GREATEST(sink_progress.next_offset, EXCLUDED.next_offset), updated_at = now()",
        &[&topic, &part, &next],
    )
    .await?;
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
