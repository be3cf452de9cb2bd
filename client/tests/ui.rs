//! The web test client in a real browser (headless Chromium): the page creates a payment
//! through its form and shows it reaching a terminal state, then refunds it through its
//! refund form and shows the refund SUCCEEDED and the notifications the server, as the
//! merchant's demo endpoint, received for it.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::stack::{Stack, StackOptions, DEMO_KEY};

/// The test merchant's notification secret (the stack signs with it, the page's server
/// verifies with it).
const NOTIFY_SECRET: &str = "whsec_dWktdGVzdC1ub3RpZmljYXRpb24tc2VjcmV0";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> String {
    for c in ["chromium", "chromium-browser"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_owned();
        }
    }
    panic!("Chromium not found: apt-get install chromium");
}

/// The page's DOM after it ran for `virtual_ms` of (virtual) time.
fn dump_dom(url: &str, virtual_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={virtual_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn row_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    rows_with(dom, &format!("data-id=\"{id}\""))
        .first()
        .copied()
}

/// The table rows (`<tr …>…`) holding `needle`.
fn rows_with<'a>(dom: &'a str, needle: &str) -> Vec<&'a str> {
    dom.split("<tr").filter(|r| r.contains(needle)).collect()
}

/// The value of `data-<name>` on `<body>`, which the page sets after a press.
fn body_data(dom: &str, name: &str) -> Option<String> {
    dom.split(&format!("data-{name}=\""))
        .nth(1)
        .and_then(|s| s.split('"').next())
        .map(str::to_owned)
}

/// The page's DOM, reloaded (3 s of page time each) until `done` holds for it.
async fn dump_until(url: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dom = tokio::task::spawn_blocking({
            let url = url.to_owned();
            move || dump_dom(&url, 3_000)
        })
        .await
        .unwrap();
        if done(&dom) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}:\n{dom}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_created_and_refunded_through_the_page_shows_its_refund_and_notifications() {
    let listen = testkit::procs::free_addr().unwrap();
    let base = format!("http://{listen}");
    // The demo merchant's notifications go to the page's server.
    let opts = StackOptions {
        merchant_endpoints: HashMap::from([(
            "demo".to_owned(),
            sinks::notifier::Endpoint {
                url: format!("{base}/notify"),
                secrets: vec![payments::webhook::secret_bytes(NOTIFY_SECRET).unwrap()],
            },
        )]),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = stack.client(DEMO_KEY);
    // Warm up: consumer groups joined.
    let w = api.create("ui-warmup", 1000, "EUR").await.unwrap();
    api.wait_for_status(
        w.body["id"].as_str().unwrap(),
        &["COMPLETED"],
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    let _ui = Killed(
        Command::new(env!("CARGO_BIN_EXE_payctl"))
            .args([
                "--api",
                &format!("http://{}", stack.api),
                "ui",
                "--listen",
                &listen,
                "--secret",
                NOTIFY_SECRET,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(&base).await.is_err() {
        assert!(Instant::now() < deadline, "the web client did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The page fills its form and presses "Create payment" (`?e2e=12`: 12.00 EUR, approved).
    let dom = tokio::task::spawn_blocking({
        let url = format!("{base}/?e2e=12");
        move || dump_dom(&url, 60_000)
    })
    .await
    .unwrap();
    let id = dom
        .split("data-created=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("the page created no payment:\n{dom}"))
        .to_owned();
    // The page shows it terminal (reloading the page until it does).
    let mut dom = dom;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !row_of(&dom, &id).is_some_and(|r| r.contains("status COMPLETED")) {
        assert!(
            Instant::now() < deadline,
            "payment {id} never shown COMPLETED; last row: {:?}",
            row_of(&dom, &id)
        );
        let url = format!("{base}/");
        dom = tokio::task::spawn_blocking(move || dump_dom(&url, 3_000))
            .await
            .unwrap();
    }
    assert!(row_of(&dom, &id).unwrap().contains("12.00 EUR"));
    let r = api.get(&id).await.unwrap();
    assert_eq!(
        (r.body["status"].as_str(), r.body["amount"].as_i64()),
        (Some("COMPLETED"), Some(1200))
    );
    println!("ui: payment {id} created through the page and shown COMPLETED");

    // The page opens the payment, fills its refund form with 5.00 and presses "Refund".
    let dom = tokio::task::spawn_blocking({
        let url = format!("{base}/?select={id}&e2e_refund=5");
        move || dump_dom(&url, 20_000)
    })
    .await
    .unwrap();
    let refund_id =
        body_data(&dom, "refunded").unwrap_or_else(|| panic!("the page refunded nothing:\n{dom}"));
    assert!(refund_id.starts_with("re_"), "{refund_id}");

    // It shows the refund SUCCEEDED, the amount refunded, and the notifications its server
    // received for the payment, the refund's among them.
    let refund_row = format!("data-refund-id=\"{refund_id}\"");
    let payment_cell = format!("data-payment=\"{id}\"");
    let dom = dump_until(
        &format!("{base}/?select={id}"),
        "the refund SUCCEEDED and its notification",
        |dom| {
            rows_with(dom, &refund_row)
                .iter()
                .any(|r| r.contains("status SUCCEEDED"))
                && rows_with(dom, &payment_cell)
                    .iter()
                    .any(|r| r.contains("data-type=\"refund.succeeded\""))
        },
    )
    .await;
    let row = rows_with(&dom, &refund_row)[0];
    assert!(row.contains("5.00 EUR"), "{row}");
    assert!(
        dom.contains("<b id=\"d-refunded\">5.00 EUR</b>"),
        "amount_refunded not shown"
    );
    let form = dom
        .split("<form id=\"refund\"")
        .nth(1)
        .and_then(|f| f.split('>').next())
        .unwrap();
    assert!(
        !form.contains("hidden"),
        "the refund form is hidden though 7.00 EUR is left: {form}"
    );
    let shown: Vec<&str> = rows_with(&dom, &payment_cell)
        .into_iter()
        .filter_map(|r| r.split("data-type=\"").nth(1)?.split('"').next())
        .collect();
    for kind in ["payment.completed", "refund.pending", "refund.succeeded"] {
        assert!(shown.contains(&kind), "{kind} not shown: {shown:?}");
    }
    // Each notification once, however often it was delivered; every one verified.
    let received: serde_json::Value = reqwest::get(format!("{base}/notifications?payment_id={id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = received["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["webhook_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<HashSet<_>>().len(),
        "{received}"
    );
    assert_eq!(received["refused"], 0, "{received}");
    let succeeded = received["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "refund.succeeded")
        .unwrap();
    assert_eq!(
        (&succeeded["refund_id"], &succeeded["amount"]),
        (&serde_json::json!(refund_id), &serde_json::json!(500))
    );
    let r = api.get_refund(&refund_id).await.unwrap();
    assert_eq!(
        (r.body["status"].as_str(), r.body["amount"].as_i64()),
        (Some("SUCCEEDED"), Some(500))
    );
    println!(
        "ui: refund {refund_id} made through the page, shown SUCCEEDED with {} notifications of the payment: {shown:?}",
        ids.len()
    );
    stack.shutdown().await.unwrap();
}
