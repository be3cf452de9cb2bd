//! The notifier against a real PostgreSQL and real HTTP endpoints: a merchant whose
//! endpoint hangs holds no more than its slots and leaves the other merchants their
//! deliveries; settled deliveries go after their keep time, pending ones never.

use sinks::notifier::{run_notifier, Endpoint, NotifierSettings};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::merchant::MerchantEndpoint;

const SECRET: &str = "whsec_bm90aWZpZXItdGVzdC1zZWNyZXQ=";

async fn fresh_pool() -> sinks::Pool {
    testkit::pg::server()
        .expect("PostgreSQL for the test (apt-get install postgresql)")
        .migrated_pool(4)
        .await
        .expect("a fresh database with the projection's schema")
}

/// Inserts a pending delivery of `merchant` as the sink would.
async fn pending(pool: &sinks::Pool, merchant: &str, n: usize) {
    let id = format!("evt_{merchant}_{n}");
    let body = serde_json::json!({"id": id, "type": "payment.created", "seq": n}).to_string();
    pool.get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO webhook_deliveries (webhook_id, merchant_id, payment_id, seq, type, body)
             VALUES ($1, $2, $3, $4, 'payment.created', $5)",
            &[
                &id,
                &merchant,
                &format!("pay_{merchant}"),
                &(n as i64),
                &body,
            ],
        )
        .await
        .unwrap();
}

async fn count(pool: &sinks::Pool, sql: &str) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// An endpoint that holds every request until released, counting those it holds.
#[derive(Default)]
struct Held {
    now: AtomicUsize,
    most: AtomicUsize,
    answered: AtomicUsize,
    release: tokio::sync::Notify,
    released: std::sync::atomic::AtomicBool,
}

async fn hanging_endpoint(held: Arc<Held>) -> std::net::SocketAddr {
    use warp::Filter;
    let route = warp::post().then(move || {
        let held = held.clone();
        async move {
            let now = held.now.fetch_add(1, Ordering::SeqCst) + 1;
            held.most.fetch_max(now, Ordering::SeqCst);
            while !held.released.load(Ordering::SeqCst) {
                held.release.notified().await;
            }
            held.now.fetch_sub(1, Ordering::SeqCst);
            held.answered.fetch_add(1, Ordering::SeqCst);
            warp::http::StatusCode::OK
        }
    });
    let (addr, _join) = gateway_http::spawn_server(
        route,
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        std::future::pending(),
    )
    .await
    .unwrap();
    addr
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_whose_endpoint_hangs_holds_only_its_slots_and_delays_no_other() {
    let pool = fresh_pool().await;
    let secret = payments::webhook::secret_bytes(SECRET).unwrap();
    let held = Arc::new(Held::default());
    let slow = hanging_endpoint(held.clone()).await;
    let fast = MerchantEndpoint::start(vec![secret.clone()], std::future::pending())
        .await
        .unwrap();
    for n in 0..12 {
        pending(&pool, "slow", n).await;
    }
    for n in 0..20 {
        pending(&pool, "fast", n).await;
    }
    let endpoint = |url: String| Endpoint {
        url,
        secrets: vec![secret.clone()],
    };
    let mut settings = NotifierSettings::new(HashMap::from([
        ("slow".to_owned(), endpoint(format!("http://{slow}/"))),
        ("fast".to_owned(), endpoint(fast.url())),
    ]));
    settings.per_merchant = 2;
    settings.request_timeout = Duration::from_secs(300);
    // Far beyond the test: a delivery is only picked again when its slot frees.
    settings.poll = Duration::from_secs(3600);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let notifier = tokio::spawn(run_notifier(pool.clone(), settings, async {
        let _ = stopped.await;
    }));
    until("the fast merchant's 20 deliveries arrive", async || {
        fast.counts().len() == 20
    })
    .await;
    // They arrived while the slow merchant's two requests were held.
    assert_eq!(held.now.load(Ordering::SeqCst), 2);
    assert_eq!(held.answered.load(Ordering::SeqCst), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM webhook_deliveries WHERE merchant_id = 'fast' AND status = 'delivered'").await,
        20
    );
    // Without the poll, each freed slot was picked again at once.
    held.released.store(true, Ordering::SeqCst);
    held.release.notify_waiters();
    until("the slow merchant's 12 deliveries are delivered", async || {
        held.release.notify_waiters();
        count(&pool, "SELECT count(*) FROM webhook_deliveries WHERE merchant_id = 'slow' AND status = 'delivered'").await
            == 12
    })
    .await;
    assert_eq!(
        held.most.load(Ordering::SeqCst),
        2,
        "never more than its slots"
    );
    assert_eq!(fast.forged(), 0);
    let _ = stop.send(());
    notifier.await.unwrap().unwrap();
}

#[tokio::test]
async fn settled_deliveries_go_after_their_keep_time_and_pending_ones_stay() {
    let pool = fresh_pool().await;
    for n in 0..3 {
        pending(&pool, "m", n).await;
    }
    let c = pool.get().await.unwrap();
    // 0: delivered 40 days ago, with its attempt; 1: still pending after 40 days;
    // 2: delivered today.
    c.batch_execute(
        "UPDATE webhook_deliveries SET created_at = now() - interval '40 days'
           WHERE webhook_id IN ('evt_m_0', 'evt_m_1');
         UPDATE webhook_deliveries SET status = 'delivered'
           WHERE webhook_id IN ('evt_m_0', 'evt_m_2');
         INSERT INTO webhook_attempts (webhook_id, attempt, at, status_code, duration_ms)
           VALUES ('evt_m_0', 1, now(), 200, 3), ('evt_m_2', 1, now(), 200, 3);",
    )
    .await
    .unwrap();
    let keep = Duration::from_secs(30 * 24 * 3600);
    assert_eq!(sinks::notifier::prune(&pool, keep).await.unwrap(), 1);
    let left: Vec<String> = c
        .query(
            "SELECT webhook_id FROM webhook_deliveries ORDER BY webhook_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["evt_m_1", "evt_m_2"]);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM webhook_attempts WHERE webhook_id = 'evt_m_0'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM webhook_attempts").await,
        1
    );
    assert_eq!(sinks::notifier::prune(&pool, keep).await.unwrap(), 0);
}
