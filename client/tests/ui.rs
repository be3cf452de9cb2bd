//! The web test client in a real browser (headless Chromium): the page creates a payment
//! through its form and shows it reaching a terminal state.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::stack::{Stack, StackOptions, DEMO_KEY};

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
    dom.split("<tr")
        .find(|r| r.contains(&format!("data-id=\"{id}\"")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_created_through_the_page_reaches_a_terminal_state_on_it() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
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

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _ui = Killed(
        Command::new(env!("CARGO_BIN_EXE_payctl"))
            .args([
                "--api",
                &format!("http://{}", stack.api),
                "ui",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
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
    stack.shutdown().await.unwrap();
}
