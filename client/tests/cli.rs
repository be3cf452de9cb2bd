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
