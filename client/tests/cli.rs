//! `payctl` against a running stack (in-process services, Apache Kafka, throwaway
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
    // Creates pile up in the commands topic until admission control refuses them on
    // every partition (it refuses a create only when the create's own partition is over
    // the bound, and a new payment's partition is drawn at random): with the stack's four
    // partitions, 80 refusals in a row leave one with room unhit with a chance of
    // (3/4)^80, about 1e-10.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut refused_in_a_row = 0;
    for i in 0.. {
        assert!(
            std::time::Instant::now() < deadline,
            "creates still accepted on some partition after 90 s with the worker stopped"
        );
        let r = client
            .create(&format!("pile-{i}"), 1000, "EUR")
            .await
            .unwrap();
        if r.status == 503 {
            refused_in_a_row += 1;
            if refused_in_a_row == 80 {
                break;
            }
            continue;
        }
        refused_in_a_row = 0;
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

/// The demo merchant's notification secrets in this test: the stack signs with the
/// second; `payctl listen` is given both, as during a rotation.
const OLD_SECRET: &str = "whsec_b2xkLXNlY3JldC1iZWluZy1yb3RhdGVkLW91dA==";
const NOTIFY_SECRET: &str = "whsec_Y2xpLXRlc3Qtbm90aWZpY2F0aW9uLXNlY3JldA==";

/// The text after `label` up to the next whitespace or quote.
fn word_after<'a>(out: &'a str, label: &str) -> &'a str {
    let rest = &out[out
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{out}"))
        + label.len()..];
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .unwrap_or_default()
}

/// `payctl refund` prints the Idempotency-Key and the refund and, with `--wait`, follows
/// it to SUCCEEDED; the same key replays the same refund; `payctl refunds` lists it;
/// every refusal exits non-zero with the API's code and message, and a FAILED refund
/// with its reason. `payctl listen`, the merchant's endpoint, prints one line per
/// notification it verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refund_refunds_and_listen_against_a_stack() {
    use tokio::io::AsyncBufReadExt as _;
    let listen_at = testkit::procs::free_addr().unwrap();
    let opts = StackOptions {
        merchant_endpoints: std::collections::HashMap::from([(
            "demo".to_owned(),
            sinks::notifier::Endpoint {
                url: format!("http://{listen_at}/notify"),
                secrets: vec![payments::webhook::secret_bytes(NOTIFY_SECRET).unwrap()],
            },
        )]),
        ..StackOptions::default()
    };
    let stack = Stack::start(opts).await.unwrap();
    let api = format!("http://{}", stack.api);
    let client = stack.client(testkit::stack::DEMO_KEY);

    let mut listen = tokio::process::Command::new(env!("CARGO_BIN_EXE_payctl"))
        .args(["listen", "--listen", &listen_at])
        .env(
            "PAYCTL_NOTIFY_SECRETS",
            format!("{OLD_SECRET},{NOTIFY_SECRET}"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut lines = tokio::io::BufReader::new(listen.stdout.take().unwrap()).lines();
    tokio::spawn({
        let printed = printed.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                printed.lock().unwrap().push(line);
            }
        }
    });

    let paid = client.create("cli-refund-1", 1000, "EUR").await.unwrap();
    let paid = paid.body["id"].as_str().unwrap().to_owned();
    client
        .wait_for_status(&paid, &["COMPLETED"], std::time::Duration::from_secs(30))
        .await
        .unwrap();

    // A refund followed to SUCCEEDED, with the key to send it again.
    let (ok, out) = payctl(&api, &["refund", &paid, "--amount", "400", "--wait"]).await;
    assert!(ok, "{out}");
    let key = word_after(&out, "Idempotency-Key ");
    assert!(key.starts_with("payctl-refund-"), "{out}");
    let refund_id = word_after(&out, "\"id\": \"");
    assert!(refund_id.starts_with("re_"), "{out}");
    assert!(
        out.contains("  SUCCEEDED\n") && out.contains(&format!("{paid}: refunded 400 of 1000 EUR")),
        "{out}"
    );
    // The same key and body: the same refund, not a second one.
    let (ok, again) = payctl(
        &api,
        &["refund", &paid, "--amount", "400", "--idempotency-key", key],
    )
    .await;
    assert!(
        ok && again.contains(&format!("\"id\": \"{refund_id}\"")),
        "{again}"
    );

    // A refund the provider declines (amount ending in 01) is FAILED, exit status 1.
    let (ok, out) = payctl(&api, &["refund", &paid, "--amount", "101", "--wait"]).await;
    assert!(
        !ok && out.contains("FAILED: refund_declined"),
        "a declined refund must fail the command: {out}"
    );

    let (ok, out) = payctl(&api, &["refunds", &paid]).await;
    assert!(ok, "{out}");
    let listed: Vec<&str> = out.lines().filter(|l| l.starts_with("re_")).collect();
    assert_eq!(listed.len(), 2, "{out}");
    assert!(
        listed[0].starts_with(refund_id)
            && listed[0].contains("SUCCEEDED")
            && listed[0].contains("400 EUR"),
        "{out}"
    );
    assert!(
        listed[1].contains("FAILED") && listed[1].contains("failed: refund_declined"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{paid}: 2 refund(s); refunded 400 of 1000 EUR")),
        "{out}"
    );

    // Refusals: the API's status, code and message, and a non-zero exit.
    let unknown = "pay_0123456789abcdef0123456789abcdef";
    for (args, expected) in [
        (
            vec!["refund", unknown],
            "404 payment_not_found: no such payment",
        ),
        (
            vec!["refund", &paid, "--amount", "700"],
            "409 amount_exceeds_refundable: 700 exceeds the 600 left to refund",
        ),
        (
            vec!["refund", &paid, "--amount", "100", "--idempotency-key", key],
            "422 idempotency_key_reused",
        ),
        (vec!["refunds", unknown], "404 payment_not_found"),
        (
            vec!["refund", &paid, "--amount", "0"],
            "invalid value '0' for '--amount",
        ),
    ] {
        let (ok, out) = payctl(&api, &args).await;
        assert!(!ok && out.contains(expected), "{args:?}: {out}");
    }

    // `payctl listen` printed the payment's and the refunds' notifications, each once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let wanted = [
        format!("payment.completed   {paid}"),
        format!("refund.succeeded    {paid}"),
        format!("refund.failed       {paid}"),
    ];
    loop {
        let lines = printed.lock().unwrap().clone();
        if wanted
            .iter()
            .all(|w| lines.iter().any(|l| l.contains(w.as_str())))
        {
            let succeeded: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains(wanted[1].as_str()))
                .collect();
            assert_eq!(succeeded.len(), 1, "{lines:#?}");
            assert!(
                succeeded[0].contains("SUCCEEDED")
                    && succeeded[0].contains(&format!("{refund_id}  400 EUR")),
                "{lines:#?}"
            );
            assert!(lines.iter().all(|l| l.contains(" seq=")), "{lines:#?}");
            println!("listen printed:\n{}", lines.join("\n"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "payctl listen did not print {wanted:?}:\n{lines:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let kept: serde_json::Value = reqwest::get(format!("http://{listen_at}/notifications"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["refused"], 0, "{kept}");
    stack.shutdown().await.unwrap();
}

/// The web client's own server answers what it does not take in the API's error shape:
/// an oversized body, an unknown path, a wrong method.
#[tokio::test]
async fn the_web_client_refuses_bad_requests_with_json_errors() {
    let at = testkit::procs::free_addr().unwrap();
    let _ui = tokio::process::Command::new(env!("CARGO_BIN_EXE_payctl"))
        .args(["--api", "http://127.0.0.1:9", "ui", "--listen", &at])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A connection per request: the server closes one after refusing a body unread.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http.get(format!("http://{at}/")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "payctl ui never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let answers = [
        http.post(format!("http://{at}/api/v1/payments"))
            .body(vec![b'x'; 70 * 1024]),
        http.get(format!("http://{at}/nowhere")),
        http.delete(format!("http://{at}/")),
    ];
    let mut seen = Vec::new();
    for req in answers {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.expect("a JSON error");
        seen.push((
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        ));
    }
    assert_eq!(
        seen,
        [
            (413, "body_too_large".to_owned()),
            (404, "not_found".to_owned()),
            (405, "method_not_allowed".to_owned())
        ]
    );
}
