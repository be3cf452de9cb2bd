//! `payctl` against a running stack (in-process services, mock-cluster Kafka, throwaway
//! PostgreSQL, provider simulator).

use testkit::stack::{Stack, StackOptions};

async fn payctl(api: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_payctl"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_watch_get_list_and_a_load_of_500_that_loses_nothing() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let api = format!("http://{}", stack.api);

    let (ok, out) = payctl(
        &api,
        &["create", "--amount", "1003", "--reference", "cli-1"],
    )
    .await;
    assert!(ok, "{out}");
    let created: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let id = created["id"].as_str().unwrap();
    let (ok, out) = payctl(&api, &["watch", id, "--timeout-s", "60"]).await;
    assert!(
        ok && out.contains("COMPLETED") && out.contains("charge_pending"),
        "{out}"
    );
    let (ok, out) = payctl(&api, &["get", id]).await;
    assert!(ok && out.contains("\"COMPLETED\""), "{out}");
    let (ok, out) = payctl(&api, &["list", "--status", "COMPLETED"]).await;
    assert!(ok && out.contains(id), "{out}");
    let (ok, out) = payctl(&api, &["--key", "wrong", "get", id]).await;
    assert!(!ok && out.contains("unauthorized"), "{out}");

    let (ok, out) = payctl(
        &api,
        &[
            "load",
            "--payments",
            "500",
            "--rate",
            "250",
            "--timeout-s",
            "120",
        ],
    )
    .await;
    let summary = out
        .lines()
        .find(|l| l.starts_with("load:"))
        .unwrap_or_default()
        .to_owned();
    println!("{summary}");
    assert!(ok, "{out}");
    assert!(
        summary.contains("accepted=500 terminal=500 lost=0"),
        "{summary}"
    );
    stack.shutdown().await.unwrap();
}

/// Overload: `payctl create` refused by admission control (503 `overloaded`) says so and
/// names the key to send again with when it has no retries left; with retries it waits
/// out each `Retry-After` and sends the same key again until it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_waits_out_overload_refusals_and_is_accepted_with_the_same_key() {
    let opts = StackOptions {
        admission_min_backlog: 20,
        ..StackOptions::default()
    };
    let mut stack = Stack::start(opts).await.unwrap();
    let api = format!("http://{}", stack.api);
    let client = stack.client(testkit::stack::DEMO_KEY);
    stack.stop_worker().await.unwrap();
    // Creates pile up in the commands topic until admission control refuses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for i in 0.. {
        assert!(
            std::time::Instant::now() < deadline,
            "no create refused with the worker stopped"
        );
        let r = client
            .create(&format!("pile-{i}"), 1000, "EUR")
            .await
            .unwrap();
        if r.status == 503 {
            break;
        }
        assert_eq!(r.status, 202, "{}", r.body);
        if i >= 25 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    let create = [
        "create",
        "--amount",
        "1000",
        "--idempotency-key",
        "cli-overload",
    ];
    let (ok, out) = payctl(&api, &[&create[..], &["--retries", "0"]].concat()).await;
    assert!(
        !ok && out.contains("503 overloaded")
            && out.contains("nothing was queued")
            && out.contains("--idempotency-key cli-overload"),
        "{out}"
    );

    let with_retries = [&create[..], &["--retries", "60"]].concat();
    let (retried, started) = tokio::join!(payctl(&api, &with_retries), async {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        stack.start_worker()
    });
    started.unwrap();
    let (ok, out) = retried;
    assert!(
        ok && out.contains("refused (503 overloaded); retrying in")
            && out.contains("with the same Idempotency-Key cli-overload"),
        "{out}"
    );
    // stdout (the 202 body), then stderr (the retries), which holds no brace.
    let body = &out[out.find('{').expect("the 202 body")..=out.rfind('}').expect("the 202 body")];
    let created: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    // The key payctl sent is the one the payment was created with: a replay of it
    // answers the same payment.
    let replay = loop {
        let r = client.create("cli-overload", 1000, "EUR").await.unwrap();
        if r.status != 503 {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(replay.body["id"], created["id"], "{}", replay.body);
    stack.shutdown().await.unwrap();
}
