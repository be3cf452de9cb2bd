//! The projection against a real PostgreSQL: events that arrive out of order, late,
//! twice, or in a replayed batch leave each payment's row equal to the in-order fold of
//! its events, and a stored event waits for its predecessor instead of being lost.

use payments::ids::{CommandId, IdempotencyKey, MerchantId, PaymentId};
use payments::machine::PaymentState;
use payments::money::{Amount, Currency};
use payments::{Event, EventBody};
use sinks::projection::{apply_batch, InRecord, Topics};
use std::collections::BTreeMap;

fn topics() -> Topics {
    Topics {
        events: "evt".into(),
        dead_letters: "dlq".into(),
        commands: "cmd".into(),
        notifications: None,
    }
}

/// The four events of a payment that completes.
fn history(key: &str) -> Vec<Event> {
    let merchant = MerchantId::parse("acme").unwrap();
    let key = IdempotencyKey::parse(key).unwrap();
    let payment_id = PaymentId::derive(&merchant, &key);
    let bodies = [
        EventBody::Created {
            merchant_id: merchant,
            amount: Amount::new(1250).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            idempotency_key: key,
            request_hash: "h".into(),
            reference: None,
            description: None,
            traceparent: None,
            metadata: BTreeMap::new(),
        },
        EventBody::ProcessingStarted,
        EventBody::ChargeRequested { attempt: 1 },
        EventBody::Completed {
            provider_ref: "ch_1".into(),
        },
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event {
            payment_id,
            seq: i as u64 + 1,
            occurred_at_ms: 1_700_000_000_000 + i as i64,
            caused_by: CommandId::parse(&format!("cmd-{i}")).unwrap(),
            body,
        })
        .collect()
}

/// Records of the events topic for `events`, at offsets from `first_offset`.
fn records(events: &[&Event], first_offset: i64) -> Vec<InRecord> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| InRecord {
            topic: "evt".into(),
            partition: 0,
            offset: first_offset + i as i64,
            key: Some(e.payment_id.to_string().into_bytes()),
            payload: Some(payments::wire::encode_event(e)),
            traceparent: None,
        })
        .collect()
}

async fn apply(pool: &sinks::Pool, batch: &[InRecord]) {
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    apply_batch(&tx, &topics(), batch).await.unwrap();
    tx.commit().await.unwrap();
}

/// `(seq, state)` of each payment's row.
async fn rows(pool: &sinks::Pool) -> BTreeMap<String, (i64, PaymentState)> {
    let c = pool.get().await.unwrap();
    c.query("SELECT payment_id, seq, state::text FROM payments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let state: PaymentState = serde_json::from_str(r.get(2)).unwrap();
            (r.get(0), (r.get(1), state))
        })
        .collect()
}

async fn waiting(pool: &sinks::Pool) -> Vec<(String, i64)> {
    let c = pool.get().await.unwrap();
    c.query(
        "SELECT payment_id, seq FROM projection_waiting ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn fold(events: &[Event]) -> PaymentState {
    events.iter().fold(None, payments::evolve).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_out_of_order_wait_for_their_predecessors_and_fold_in_seq_order() {
    let pool = testkit::pg::server()
        .unwrap()
        .migrated_pool(2)
        .await
        .unwrap();
    let a = history("order-a");
    let b = history("order-b");
    let (ida, idb) = (a[0].payment_id.to_string(), b[0].payment_id.to_string());

    // A: 1 and 3 (a gap); B: only 2 (its first event is missing).
    apply(&pool, &records(&[&a[0], &a[2], &b[1]], 0)).await;
    let r = rows(&pool).await;
    assert_eq!(r[&ida].0, 1, "A stops at the gap");
    assert!(!r.contains_key(&idb), "B has no row before its first event");
    assert_eq!(
        waiting(&pool).await,
        {
            let mut w = vec![(ida.clone(), 3), (idb.clone(), 2)];
            w.sort();
            w
        },
        "the events beyond a gap wait"
    );

    // A: 4 arrives, still behind the gap; B: 1 arrives and releases 2.
    apply(&pool, &records(&[&a[3], &b[0]], 3)).await;
    let r = rows(&pool).await;
    assert_eq!(r[&ida].0, 1);
    assert_eq!(r[&idb], (2, fold(&b[..2])));
    assert_eq!(
        waiting(&pool).await,
        vec![(ida.clone(), 3), (ida.clone(), 4)]
    );

    // A: 2 fills the gap, in the same batch as a duplicate of 3 and B's 3 and 4.
    apply(&pool, &records(&[&a[1], &a[2], &b[2], &b[3]], 5)).await;
    let r = rows(&pool).await;
    assert_eq!(r[&ida], (4, fold(&a)), "A folded 1..4 in order");
    assert_eq!(r[&idb], (4, fold(&b)));
    assert!(waiting(&pool).await.is_empty(), "nothing waits any more");

    // A replay of every batch (a sink restarted before committing its offsets)
    // changes nothing.
    let before = rows(&pool).await;
    apply(&pool, &records(&[&a[0], &a[2], &b[1]], 0)).await;
    apply(&pool, &records(&[&a[3], &b[0]], 3)).await;
    assert_eq!(rows(&pool).await, before);
    assert!(waiting(&pool).await.is_empty());
    let events: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM payment_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 8, "each (payment_id, seq) is stored once");
}

/// Every index on `payments` costs a write on each insert and each status change (those
/// are never HOT updates), so each one is there for a query: the primary key (reads by
/// id, the API's idempotency look-up), a merchant's list newest first, the list by
/// status, and the open payments. (merchant_id, idempotency_key) needs no index of its
/// own: the id is derived from both, so the primary key keeps them unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payments_table_keeps_only_the_indexes_its_queries_use() {
    let pool = testkit::pg::server()
        .unwrap()
        .migrated_pool(2)
        .await
        .unwrap();
    let c = pool.get().await.unwrap();
    let indexes: Vec<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'payments' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "payments_by_merchant",
            "payments_by_status",
            "payments_open",
            "payments_pkey"
        ]
    );

    // The same merchant and key always name the same payment: a second history under
    // that key is the same row, and another merchant's same key is another payment.
    let a = history("order-a");
    assert_eq!(
        a[0].payment_id,
        PaymentId::derive(
            &MerchantId::parse("acme").unwrap(),
            &IdempotencyKey::parse("order-a").unwrap()
        )
    );
    assert_ne!(
        a[0].payment_id,
        PaymentId::derive(
            &MerchantId::parse("other").unwrap(),
            &IdempotencyKey::parse("order-a").unwrap()
        )
    );
    apply(&pool, &records(&a.iter().collect::<Vec<_>>(), 0)).await;
    apply(
        &pool,
        &records(&history("order-a").iter().collect::<Vec<_>>(), 4),
    )
    .await;
    let r = rows(&pool).await;
    assert_eq!(r.len(), 1, "one row for one merchant's key");
    assert_eq!(r[&a[0].payment_id.to_string()], (4, fold(&a)));
}
