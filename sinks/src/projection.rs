//! Applies batches of topic records to PostgreSQL, in one transaction per batch.
//!
//! - `payment_events` gets every event once: `(payment_id, seq)` is the primary key and
//!   inserts are `ON CONFLICT DO NOTHING`, so redelivery changes nothing.
//! - `payments` is the fold of each payment's events with the domain's own
//!   [`payments::evolve`], applied strictly in `seq` order: an event that arrives before
//!   its predecessor is stored, listed in `projection_waiting`, and folded when the gap
//!   is filled; the row never moves to a lower `seq`. The fold takes the batch's events
//!   from the batch itself and reads from the database only the rows it updates and the
//!   waiting events of their payments.
//! - `sink_progress` records the next offset per partition in the same transaction.

use deadpool_postgres::Transaction;
use payments::machine::PaymentState;
use payments::wire::{self, DeadLetter};
use payments::{CommandBody, Event};
use std::collections::{BTreeMap, HashMap};
use telemetry::now_ms;

/// Which topic carries what.
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub dead_letters: String,
    pub commands: String,
    /// Merchant notifications, when the topology makes them.
    pub notifications: Option<String>,
}

impl Topics {
    pub fn all(&self) -> Vec<&str> {
        let mut all = vec![
            self.events.as_str(),
            self.dead_letters.as_str(),
            self.commands.as_str(),
        ];
        all.extend(self.notifications.as_deref());
        all
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
    pub notifications: usize,
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
        self.notifications += other.notifications;
        self.event_times_ms.extend(other.event_times_ms);
    }
}

pub async fn apply_batch(
    tx: &Transaction<'_>,
    topics: &Topics,
    batch: &[InRecord],
) -> Result<Applied, tokio_postgres::Error> {
    let mut applied = Applied::default();
    let mut events: BTreeMap<(String, u64), BatchEvent<'_>> = BTreeMap::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut webhooks: Vec<(String, String, serde_json::Value, i64)> = Vec::new();
    let mut progress: HashMap<(String, i32), i64> = HashMap::new();
    // Each with its record's trace context, which its delivery attempts continue.
    let mut notes: Vec<(payments::notify::Notification, Option<&str>)> = Vec::new();

    for r in batch {
        let next = progress
            .entry((r.topic.clone(), r.partition))
            .or_insert(r.offset + 1);
        *next = (*next).max(r.offset + 1);
        if r.topic == topics.events {
            match wire::decode_event(r.key.as_deref(), r.payload.as_deref()) {
                Ok(e) => {
                    applied.event_times_ms.push(e.occurred_at_ms);
                    // The first copy wins, as it does across batches (`ON CONFLICT DO
                    // NOTHING`).
                    events
                        .entry((e.payment_id.to_string(), e.seq))
                        .or_insert(BatchEvent {
                            json: r
                                .payload
                                .as_deref()
                                .and_then(|p| std::str::from_utf8(p).ok()),
                            event: e,
                            partition: r.partition,
                            offset: r.offset,
                        });
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
        } else if Some(&r.topic) == topics.notifications.as_ref() {
            match r
                .payload
                .as_deref()
                .map(serde_json::from_slice::<payments::notify::Notification>)
            {
                Some(Ok(n)) => {
                    let traced = r
                        .traceparent
                        .as_deref()
                        .filter(|t| telemetry::parse(t).is_some());
                    notes.push((n, traced));
                }
                _ => {
                    applied.undecodable += 1;
                    tracing::warn!(
                        partition = r.partition,
                        offset = r.offset,
                        "undecodable notification dead-lettered"
                    );
                    dead.push(set_aside(
                        r,
                        "undecodable_notification",
                        "not a notification",
                    ));
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

    // Two round trips of pipelined statements: the writes that depend on nothing, with
    // the reads the fold needs; then the fold's writes.
    let ids = payment_ids(events.keys());
    let (inserted, states, waiting, dead_letters, hooks, (), notified) = futures::try_join!(
        insert_events(tx, &events),
        read_states(tx, &ids),
        read_waiting(tx, &ids),
        insert_dead_letters(tx, &dead),
        insert_webhooks(tx, &webhooks),
        save_progress(tx, &progress),
        insert_notifications(tx, &notes),
    )?;
    applied.notifications = notified;
    applied.events = inserted;
    applied.dead_letters = dead_letters;
    applied.webhooks = hooks;
    applied.payments_updated = fold_payments(tx, &events, states, waiting).await?;
    Ok(applied)
}

/// Each notification once (a replayed one is the same row), pending delivery.
async fn insert_notifications(
    tx: &Transaction<'_>,
    notes: &[(payments::notify::Notification, Option<&str>)],
) -> Result<usize, tokio_postgres::Error> {
    if notes.is_empty() {
        return Ok(0);
    }
    let (mut id, mut merchant, mut payment, mut seq, mut kind, mut body, mut trace) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (n, traceparent) in notes {
        id.push(n.id.as_str());
        merchant.push(n.merchant_id.as_str());
        payment.push(n.payment_id.to_string());
        seq.push(n.seq as i64);
        kind.push(n.kind.as_str());
        body.push(pg_text(&payments::notify::delivered_body(n)));
        trace.push(*traceparent);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO webhook_deliveries (webhook_id, merchant_id, payment_id, seq, type, body, traceparent)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[])
             ON CONFLICT (webhook_id) DO NOTHING",
        )
        .await?;
    let n = tx
        .execute(
            &stmt,
            &[&id, &merchant, &payment, &seq, &kind, &body, &trace],
        )
        .await?;
    Ok(n as usize)
}

/// An event of the batch: decoded, with its record's position and JSON text.
struct BatchEvent<'a> {
    event: Event,
    partition: i32,
    offset: i64,
    /// The record's payload, stored as the event's `jsonb` as it was published.
    json: Option<&'a str>,
}

async fn insert_events(
    tx: &Transaction<'_>,
    events: &BTreeMap<(String, u64), BatchEvent<'_>>,
) -> Result<usize, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut pid = Vec::with_capacity(events.len());
    let mut seq = Vec::with_capacity(events.len());
    let mut kind = Vec::with_capacity(events.len());
    let mut at = Vec::with_capacity(events.len());
    let mut cause = Vec::with_capacity(events.len());
    let mut body: Vec<std::borrow::Cow<'_, str>> = Vec::with_capacity(events.len());
    let mut part = Vec::with_capacity(events.len());
    let mut off = Vec::with_capacity(events.len());
    for ((p, s), e) in events {
        pid.push(p.as_str());
        seq.push(*s as i64);
        kind.push(e.event.body.kind());
        at.push(e.event.occurred_at_ms);
        cause.push(e.event.caused_by.as_str());
        body.push(match e.json {
            Some(j) => j.into(),
            None => serde_json::to_string(&e.event).unwrap_or_default().into(),
        });
        part.push(e.partition);
        off.push(e.offset);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO payment_events (payment_id, seq, type, occurred_at, caused_by, event, kafka_partition, kafka_offset)
             SELECT p, s, t, to_timestamp(o / 1000.0), c, e::jsonb, kp, ko
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::int4[], $8::int8[])
                  AS u(p, s, t, o, c, e, kp, ko)
             ON CONFLICT (payment_id, seq) DO NOTHING",
        )
        .await?;
    let n = tx
        .execute(&stmt, &[&pid, &seq, &kind, &at, &cause, &body, &part, &off])
        .await?;
    Ok(n as usize)
}

/// The distinct payment ids of `(payment_id, seq)` keys in key order.
fn payment_ids<'a>(keys: impl Iterator<Item = &'a (String, u64)>) -> Vec<&'a str> {
    let mut v: Vec<&str> = keys.map(|(p, _)| p.as_str()).collect();
    v.dedup();
    v
}

/// The current state of the rows of `ids`, locked until the batch commits.
async fn read_states(
    tx: &Transaction<'_>,
    ids: &[&str],
) -> Result<HashMap<String, PaymentState>, tokio_postgres::Error> {
    let mut states = HashMap::new();
    if ids.is_empty() {
        return Ok(states);
    }
    let stmt = tx
        .prepare_cached(
            "SELECT payment_id, state::text FROM payments WHERE payment_id = ANY($1) FOR UPDATE",
        )
        .await?;
    for row in tx.query(&stmt, &[&ids]).await? {
        let id: String = row.get(0);
        match serde_json::from_str::<PaymentState>(row.get(1)) {
            Ok(s) => {
                states.insert(id, s);
            }
            Err(e) => {
                tracing::error!(payment_id = %id, error = %e, "stored state unreadable; rebuild the projection")
            }
        }
    }
    Ok(states)
}

/// Stored events of `ids` waiting for a predecessor.
async fn read_waiting(
    tx: &Transaction<'_>,
    ids: &[&str],
) -> Result<BTreeMap<(String, u64), Event>, tokio_postgres::Error> {
    let mut stored = BTreeMap::new();
    if ids.is_empty() {
        return Ok(stored);
    }
    let stmt = tx
        .prepare_cached(
            "SELECT e.payment_id, e.event::text FROM projection_waiting w
             JOIN payment_events e ON e.payment_id = w.payment_id AND e.seq = w.seq
             WHERE w.payment_id = ANY($1)",
        )
        .await?;
    for row in tx.query(&stmt, &[&ids]).await? {
        let id: String = row.get(0);
        match serde_json::from_str::<Event>(row.get(1)) {
            Ok(e) => {
                stored.insert((id, e.seq), e);
            }
            Err(e) => {
                tracing::error!(payment_id = %id, error = %e, "stored event unreadable; rebuild the projection")
            }
        }
    }
    Ok(stored)
}

/// Folds the batch's events, and the waiting events of the same payments (`stored`:
/// the stored copy wins over the batch's), into their rows in `seq` order, stopping at
/// the first gap; events beyond a gap are (still) listed as waiting.
async fn fold_payments(
    tx: &Transaction<'_>,
    events: &BTreeMap<(String, u64), BatchEvent<'_>>,
    states: HashMap<String, PaymentState>,
    stored: BTreeMap<(String, u64), Event>,
) -> Result<usize, tokio_postgres::Error> {
    let had_waiting = payment_ids(stored.keys());
    let mut merged: BTreeMap<(&str, u64), &Event> = events
        .iter()
        .map(|((p, s), e)| ((p.as_str(), *s), &e.event))
        .collect();
    merged.extend(stored.iter().map(|((p, s), e)| ((p.as_str(), *s), e)));

    let mut changed: BTreeMap<&str, PaymentState> = BTreeMap::new();
    let (mut waiting_id, mut waiting_seq): (Vec<&str>, Vec<i64>) = (vec![], vec![]);
    for ((id, seq), event) in merged {
        let current = changed.get(id).or_else(|| states.get(id));
        let expected = current.map_or(1, |s| s.seq + 1);
        if seq < expected {
            continue; // applied already (a replayed batch)
        }
        if seq > expected {
            waiting_id.push(id);
            waiting_seq.push(seq as i64);
            continue; // a gap: wait for the missing event
        }
        match payments::evolve(current.cloned(), event) {
            Some(next) => {
                changed.insert(id, next);
            }
            None => {
                tracing::error!(payment_id = %id, seq, "event does not follow its payment's state; the row stays at the previous event")
            }
        }
    }
    let forget = async {
        if had_waiting.is_empty() {
            return Ok(0);
        }
        let stmt = tx
            .prepare_cached("DELETE FROM projection_waiting WHERE payment_id = ANY($1)")
            .await?;
        tx.execute(&stmt, &[&had_waiting]).await
    };
    let wait = async {
        if waiting_id.is_empty() {
            return Ok(0);
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO projection_waiting (payment_id, seq)
                 SELECT * FROM UNNEST($1::text[], $2::int8[]) ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&stmt, &[&waiting_id, &waiting_seq]).await
    };
    // The delete, then the insert (whose rows must survive it), beside the upsert.
    let waiting = async {
        forget.await?;
        wait.await
    };
    let (_, updated, _) = futures::try_join!(
        waiting,
        upsert_payments(tx, changed.values()),
        upsert_refunds(tx, changed.values())
    )?;
    Ok(updated)
}

/// The refunds of the changed payments, as rows (a payment holds a bounded number).
async fn upsert_refunds<'a>(
    tx: &Transaction<'_>,
    states: impl Iterator<Item = &'a PaymentState>,
) -> Result<u64, tokio_postgres::Error> {
    #[derive(Default)]
    struct Cols {
        id: Vec<String>,
        payment: Vec<String>,
        merchant: Vec<String>,
        number: Vec<i32>,
        amount: Vec<i64>,
        currency: Vec<String>,
        status: Vec<&'static str>,
        key: Vec<String>,
        hash: Vec<String>,
        reason: Vec<Option<String>>,
        provider_ref: Vec<Option<String>>,
        failure_code: Vec<Option<String>>,
        failure_message: Vec<Option<String>>,
        seq: Vec<i64>,
        created: Vec<i64>,
        updated: Vec<i64>,
    }
    let mut c = Cols::default();
    for s in states {
        for (n, r) in s.refunds.iter().enumerate() {
            c.id.push(r.refund_id.to_string());
            c.payment.push(s.payment_id.to_string());
            c.merchant.push(s.merchant_id.to_string());
            c.number.push(n as i32);
            c.amount.push(r.amount);
            c.currency.push(s.currency.to_string());
            c.status.push(r.status.as_str());
            c.key.push(r.idempotency_key.to_string());
            c.hash.push(r.request_hash.clone());
            c.reason.push(r.reason.clone());
            c.provider_ref.push(r.provider_ref.clone());
            c.failure_code.push(r.failure_code.clone());
            c.failure_message.push(r.failure_message.clone());
            c.seq.push(s.seq as i64);
            c.created.push(r.created_at_ms);
            c.updated.push(r.updated_at_ms);
        }
    }
    if c.id.is_empty() {
        return Ok(0);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refunds (refund_id, payment_id, merchant_id, refund_number, amount, currency, status,
                                  idempotency_key, request_hash, reason, provider_ref, failure_code, failure_message,
                                  payment_seq, created_at, updated_at)
             SELECT id, p, m, n, a, cur, st, k, h, r, pr, fc, fm, sq, to_timestamp(ca / 1000.0), to_timestamp(ua / 1000.0)
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::int8[], $15::int8[], $16::int8[])
                  AS u(id, p, m, n, a, cur, st, k, h, r, pr, fc, fm, sq, ca, ua)
             ON CONFLICT (refund_id) DO UPDATE SET
                status = EXCLUDED.status, provider_ref = EXCLUDED.provider_ref,
                failure_code = EXCLUDED.failure_code, failure_message = EXCLUDED.failure_message,
                payment_seq = EXCLUDED.payment_seq, updated_at = EXCLUDED.updated_at
             WHERE refunds.payment_seq < EXCLUDED.payment_seq",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &c.id,
            &c.payment,
            &c.merchant,
            &c.number,
            &c.amount,
            &c.currency,
            &c.status,
            &c.key,
            &c.hash,
            &c.reason,
            &c.provider_ref,
            &c.failure_code,
            &c.failure_message,
            &c.seq,
            &c.created,
            &c.updated,
        ],
    )
    .await
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
        refunded: Vec<i64>,
        state: Vec<String>,
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
        c.refunded.push(s.amount_refunded());
        c.state.push(serde_json::to_string(s).unwrap_or_default());
    }
    if c.id.is_empty() {
        return Ok(0);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO payments (payment_id, merchant_id, status, amount, currency, idempotency_key, request_hash,
                                   reference, description, provider_ref, failure_code, failure_message, attempts,
                                   cancel_requested, stuck, seq, created_at, updated_at, amount_refunded, state)
             SELECT id, m, st, a, cur, k, h, r, d, pr, fc, fm, at, cr, sk, sq, to_timestamp(ca / 1000.0), to_timestamp(ua / 1000.0), rf, js::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::text[], $11::text[], $12::text[], $13::int4[], $14::bool[], $15::bool[],
                         $16::int8[], $17::int8[], $18::int8[], $19::int8[], $20::text[])
                  AS u(id, m, st, a, cur, k, h, r, d, pr, fc, fm, at, cr, sk, sq, ca, ua, rf, js)
             ON CONFLICT (payment_id) DO UPDATE SET
                status = EXCLUDED.status, provider_ref = EXCLUDED.provider_ref,
                failure_code = EXCLUDED.failure_code, failure_message = EXCLUDED.failure_message,
                attempts = EXCLUDED.attempts, cancel_requested = EXCLUDED.cancel_requested,
                stuck = EXCLUDED.stuck, seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at,
                amount_refunded = EXCLUDED.amount_refunded, state = EXCLUDED.state, projected_at = now()
             WHERE payments.seq < EXCLUDED.seq",
        )
        .await?;
    let n = tx
        .execute(
            &stmt,
            &[
                &c.id,
                &c.merchant,
                &c.status,
                &c.amount,
                &c.currency,
                &c.key,
                &c.hash,
                &c.reference,
                &c.description,
                &c.provider_ref,
                &c.failure_code,
                &c.failure_message,
                &c.attempts,
                &c.cancel,
                &c.stuck,
                &c.seq,
                &c.created,
                &c.updated,
                &c.refunded,
                &c.state,
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
    if dead.is_empty() {
        return Ok(0);
    }
    let mut n = 0;
    let stmt = tx
        .prepare_cached(
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
    if hooks.is_empty() {
        return Ok(0);
    }
    let mut n = 0;
    let stmt = tx
        .prepare_cached(
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
    let stmt = tx
        .prepare_cached(
            "INSERT INTO sink_progress (topic, partition, next_offset)
             SELECT * FROM UNNEST($1::text[], $2::int4[], $3::int8[])
             ON CONFLICT (topic, partition) DO UPDATE
               SET next_offset = GREATEST(sink_progress.next_offset, EXCLUDED.next_offset), updated_at = now()",
        )
        .await?;
    tx.execute(&stmt, &[&topic, &part, &next]).await?;
    Ok(())
}
