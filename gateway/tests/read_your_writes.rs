//! Read your writes in the lists: what the API instance accepted is listed at once, by
//! every filter, ordered and paged like the projection's rows, while the projection does
//! not have it yet (its sink is stopped); and when the projection catches up, each item
//! is listed once, on the same page. Webhook deliveries are the projection's alone.

use serde_json::Value;
use std::time::{Duration, Instant};
use testkit::client::{wait_all_terminal, Api, Reply};
use testkit::stack::{Stack, StackOptions, DEMO_KEY, OTHER_KEY};

/// A stack whose projection stays empty until the test starts the sink.
async fn without_sink() -> Stack {
    Stack::start(StackOptions {
        sink: false,
        ..StackOptions::default()
    })
    .await
    .expect("stack")
}

/// A create's body: 10.00 (which completes) in `currency`, with `reference` if given.
fn payment(currency: &str, reference: Option<&str>) -> Value {
    serde_json::json!({"amount": 1000, "currency": currency, "reference": reference})
}

/// Creates a payment of `body`; returns its id.
async fn create(api: &Api, key: &str, body: Value) -> String {
    let r = api
        .send(
            api.request(reqwest::Method::POST, "/v1/payments")
                .header("Idempotency-Key", key)
                .json(&body),
        )
        .await
        .expect("create");
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Creation times a millisecond apart: the newest-first order is the reverse of it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    r.body["id"].as_str().expect("id").to_owned()
}

/// A 200 list answer's items.
fn data(r: &Reply) -> &Vec<Value> {
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["data"].as_array().expect("data")
}

fn ids(r: &Reply) -> Vec<&str> {
    data(r)
        .iter()
        .map(|p| p["id"].as_str().expect("id"))
        .collect()
}

async fn list(api: &Api, query: &str) -> Reply {
    api.list(query).await.expect("list")
}

/// A bad query parameter keeps its clear 400, whatever was just accepted.
async fn assert_invalid(api: &Api, query: &str) {
    let r = list(api, query).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_request"),
        "{query}: {:?}",
        r.body
    );
}

/// Pages through a list `limit` at a time; returns the pages' ids and the cursor each
/// page was asked for with.
async fn pages(api: &Api, query: &str, limit: usize) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = list(api, &format!("{query}&limit={limit}&cursor={cursor}")).await;
        let page: Vec<String> = ids(&r).into_iter().map(str::to_owned).collect();
        assert!(page.len() <= limit, "{:?}", r.body);
        out.push((cursor.clone(), page));
        match r.body["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return out,
        }
    }
}

/// The pages of two (and the cursors they were asked for with) are still `before`: no
/// item moved to another page.
async fn assert_same_pages(api: &Api, query: &str, before: &[(String, Vec<String>)]) {
    assert_eq!(
        pages(api, query, 2).await,
        before,
        "an item moved to another page"
    );
}

/// Starts the sink and waits until the projection holds `ids`, each finished.
async fn catch_up(stack: &mut Stack, ids: &[String]) {
    stack.start_sink().expect("sink");
    let pool = stack.pool().await.expect("pool");
    wait_all_terminal(&pool, ids, Duration::from_secs(60))
        .await
        .expect("projected");
}

/// The first page without filters lists what was just accepted, newest first, each as
/// its single read shows it, paged by the same cursors before and after the projection
/// has it; another merchant lists none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_page_lists_what_was_just_accepted() {
    let mut stack = without_sink().await;
    let api = stack.client(DEMO_KEY);
    let mut created = Vec::new();
    for i in 0..3 {
        created.push(create(&api, &format!("first-{i}"), payment("EUR", None)).await);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let r = list(&api, "").await;
    assert_eq!(ids(&r), newest_first, "{:?}", r.body);
    assert!(r.body["next_cursor"].is_null(), "{:?}", r.body);
    for p in data(&r) {
        let id = p["id"].as_str().expect("id");
        let single = api.get(id).await.expect("get");
        assert_eq!(single.status, 200);
        assert_eq!(*p, single.body, "the list and the single read disagree");
    }
    let before = pages(&api, "", 2).await;
    assert_eq!(
        before.iter().map(|(_, p)| p.len()).collect::<Vec<_>>(),
        [2, 1]
    );
    let other = stack.client(OTHER_KEY);
    assert!(
        ids(&list(&other, "").await).is_empty(),
        "another merchant's list"
    );

    catch_up(&mut stack, &created).await;
    let r = list(&api, "").await;
    assert_eq!(ids(&r), newest_first, "once projected: {:?}", r.body);
    assert!(
        data(&r).iter().all(|p| p["status"] == "COMPLETED"),
        "{:?}",
        r.body
    );
    assert_same_pages(&api, "", &before).await;
    stack.shutdown().await.expect("shutdown");
}

/// A status filter lists a payment just accepted by the status its single read reports:
/// NEW until the projection knows better.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_filter_lists_what_was_just_accepted_by_its_read_status() {
    let mut stack = without_sink().await;
    let api = stack.client(DEMO_KEY);
    let id = create(&api, "status-1", payment("EUR", None)).await;
    assert_eq!(api.get(&id).await.expect("get").body["status"], "NEW");
    assert_eq!(ids(&list(&api, "status=NEW").await), [id.as_str()]);
    for other in ["PROCESSING", "COMPLETED", "FAILED", "CANCELED"] {
        assert!(
            ids(&list(&api, &format!("status={other}")).await).is_empty(),
            "{other}"
        );
    }
    assert_invalid(&api, "status=new").await;

    catch_up(&mut stack, std::slice::from_ref(&id)).await;
    assert_eq!(api.get(&id).await.expect("get").body["status"], "COMPLETED");
    assert!(ids(&list(&api, "status=NEW").await).is_empty());
    assert_eq!(ids(&list(&api, "status=COMPLETED").await), [id.as_str()]);
    stack.shutdown().await.expect("shutdown");
}

/// A reference filter lists a payment just accepted with that reference, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reference_filter_lists_what_was_just_accepted() {
    let mut stack = without_sink().await;
    let api = stack.client(DEMO_KEY);
    let a = create(&api, "ref-1", payment("EUR", Some("ref-a"))).await;
    let b = create(&api, "ref-2", payment("EUR", Some("ref-b"))).await;
    let _none = create(&api, "ref-3", payment("EUR", None)).await;
    let r = list(&api, "reference=ref-a").await;
    assert_eq!(ids(&r), [a.as_str()], "{:?}", r.body);
    assert_eq!(data(&r)[0]["reference"], "ref-a");
    assert_eq!(ids(&list(&api, "reference=ref-b").await), [b.as_str()]);
    assert!(ids(&list(&api, "reference=ref-c").await).is_empty());
    assert_invalid(&api, &format!("reference={}", "r".repeat(129))).await;

    catch_up(&mut stack, &[a.clone(), b]).await;
    assert_eq!(ids(&list(&api, "reference=ref-a").await), [a.as_str()]);
    stack.shutdown().await.expect("shutdown");
}

/// A currency filter lists a payment just accepted in that currency, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_currency_filter_lists_what_was_just_accepted() {
    let mut stack = without_sink().await;
    let api = stack.client(DEMO_KEY);
    let eur = create(&api, "cur-1", payment("EUR", None)).await;
    let usd = create(&api, "cur-2", payment("USD", None)).await;
    assert_eq!(ids(&list(&api, "currency=EUR").await), [eur.as_str()]);
    assert_eq!(
        ids(&list(&api, "currency=USD&status=NEW").await),
        [usd.as_str()]
    );
    assert!(ids(&list(&api, "currency=GBP").await).is_empty());

    catch_up(&mut stack, &[eur.clone(), usd]).await;
    assert_eq!(ids(&list(&api, "currency=EUR").await), [eur.as_str()]);
    stack.shutdown().await.expect("shutdown");
}

/// The range of creation times a cursor opens (everything created before the last item
/// of a page) holds the payments just accepted in it beside the projected ones, in one
/// order; the same cursors page alike once the projection has them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_after_a_cursor_lists_what_was_just_accepted_in_its_range() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    let api = stack.client(DEMO_KEY);
    let mut created = Vec::new();
    for i in 0..2 {
        created.push(create(&api, &format!("range-{i}"), payment("EUR", Some("range"))).await);
    }
    let pool = stack.pool().await.expect("pool");
    wait_all_terminal(&pool, &created, Duration::from_secs(60))
        .await
        .expect("projected");
    stack.stop_sink().await.expect("stop sink");
    for i in 2..5 {
        created.push(create(&api, &format!("range-{i}"), payment("EUR", Some("range"))).await);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    // Two projected, three not: pages of two straddle the boundary.
    let before = pages(&api, "reference=range", 2).await;
    let paged: Vec<String> = before.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(paged, newest_first, "{before:?}");
    assert_eq!(before.len(), 3, "{before:?}");
    let (cursor, second) = &before[1];
    let r = list(&api, &format!("reference=range&limit=3&cursor={cursor}")).await;
    assert_eq!(
        ids(&r),
        newest_first[2..],
        "the range after {second:?}'s cursor"
    );

    catch_up(&mut stack, &created).await;
    assert_same_pages(&api, "reference=range", &before).await;
    stack.shutdown().await.expect("shutdown");
}

/// A payment's refunds list a refund just accepted, as its single read shows it, after
/// the projected ones and in the order requested; once projected, each is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payments_refunds_list_what_was_just_accepted() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    let api = stack.client(DEMO_KEY);
    let id = create(&api, "refunded-1", payment("EUR", None)).await;
    api.wait_for_status(&id, &["COMPLETED"], Duration::from_secs(60))
        .await
        .expect("completed");
    let first = api.refund(&id, "rf-1", Some(100)).await.expect("refund");
    assert_eq!(first.status, 202, "{:?}", first.body);
    let first = first.body["id"].as_str().expect("id").to_owned();
    api.wait_for_refund(&first, &["SUCCEEDED"], Duration::from_secs(60))
        .await
        .expect("first refund");
    stack.stop_sink().await.expect("stop sink");
    let mut accepted = Vec::new();
    for (key, amount) in [("rf-2", 300), ("rf-3", 200)] {
        let r = api.refund(&id, key, Some(amount)).await.expect("refund");
        assert_eq!(r.status, 202, "{:?}", r.body);
        accepted.push(r.body["id"].as_str().expect("id").to_owned());
    }
    let expected: Vec<&str> = [first.as_str()]
        .into_iter()
        .chain(accepted.iter().map(String::as_str))
        .collect();
    let r = api.refunds(&id).await.expect("refunds");
    assert_eq!(ids(&r), expected, "{:?}", r.body);
    for refund_id in &accepted {
        let single = api.get_refund(refund_id).await.expect("refund");
        assert_eq!(single.status, 200);
        let listed = data(&r).iter().find(|x| x["id"] == *refund_id.as_str());
        assert_eq!(
            listed,
            Some(&single.body),
            "the list and the single read disagree"
        );
    }
    let other = stack.client(OTHER_KEY);
    assert_eq!(other.refunds(&id).await.expect("refunds").status, 404);

    stack.start_sink().expect("sink");
    for refund_id in &accepted {
        api.wait_for_refund(refund_id, &["SUCCEEDED"], Duration::from_secs(60))
            .await
            .expect("projected");
    }
    let r = api.refunds(&id).await.expect("refunds");
    assert_eq!(ids(&r), expected, "once projected: {:?}", r.body);
    stack.shutdown().await.expect("shutdown");
}

/// Webhook deliveries are made by the worker and written by the sink, never accepted by
/// the API: a payment just accepted has none listed until the projection has its
/// `created` event, and then its `payment.created` delivery is listed (once) within the
/// projection's lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_deliveries_are_listed_once_the_projection_has_them() {
    let mut stack = without_sink().await;
    let api = stack.client(DEMO_KEY);
    let id = create(&api, "hooks-1", payment("EUR", None)).await;
    let deliveries = |api: Api, id: String| async move {
        let path = format!("/v1/webhook-deliveries?payment_id={id}&limit=100");
        api.send(api.request(reqwest::Method::GET, &path))
            .await
            .expect("deliveries")
    };
    assert!(data(&deliveries(api.clone(), id.clone()).await).is_empty());
    stack.start_sink().expect("sink");
    let started = Instant::now();
    loop {
        let r = deliveries(api.clone(), id.clone()).await;
        let created: Vec<&Value> = data(&r)
            .iter()
            .filter(|d| d["type"] == "payment.created")
            .collect();
        if !created.is_empty() {
            assert_eq!(created.len(), 1, "{:?}", r.body);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no payment.created delivery 30 s after the sink started: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.shutdown().await.expect("shutdown");
}
