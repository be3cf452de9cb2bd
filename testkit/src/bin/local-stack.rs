//! `local-stack`: the whole gateway as local processes' worth of services, without
//! Docker or a Kafka installation: Kafka through librdkafka's mock cluster, a throwaway
//! PostgreSQL from the system's binaries, the provider simulator, and the API, worker and
//! sink. Prints where everything is and runs until Ctrl-C.

use clap::Parser;
use std::net::SocketAddr;
use testkit::stack::{Stack, StackOptions, DEMO_KEY, OTHER_KEY, SHIPPED_POLICY};

#[derive(Debug, Parser)]
#[command(
    name = "local-stack",
    about = "Run the payment gateway locally, with a mock Kafka and a throwaway PostgreSQL"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9090")]
    provider: SocketAddr,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Where the web test client listens (`payctl ui`, started when built).
    #[arg(long, default_value = "127.0.0.1:8090")]
    ui: SocketAddr,
    /// Use the test suite's short timeouts instead of the shipped policy.
    #[arg(long)]
    fast: bool,
}

/// Starts `payctl ui` from beside this binary, if it was built.
fn start_ui(api: SocketAddr, listen: SocketAddr) -> Option<std::process::Child> {
    let payctl = std::env::current_exe().ok()?.with_file_name("payctl");
    std::process::Command::new(payctl)
        .args([
            "--api",
            &format!("http://{api}"),
            "ui",
            "--listen",
            &listen.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    telemetry::init(&telemetry::Config::from_env("gateway-local", false))?;
    let defaults = StackOptions::default();
    let opts = StackOptions {
        partitions: a.partitions,
        api_listen: a.api,
        sim_listen: a.provider,
        policy: if a.fast {
            defaults.policy.clone()
        } else {
            SHIPPED_POLICY.to_owned()
        },
        ..defaults
    };
    let stack = Stack::start(opts).await?;
    let mut ui = start_ui(stack.api, a.ui);
    let ui_line = match &ui {
        Some(_) => format!("http://{}", a.ui),
        None => "not started (build it: cargo build -p payment-client)".to_owned(),
    };
    println!(
        "\nlocal stack ready\n  test client   {ui_line}\n  API           http://{api}   (Authorization: Bearer {DEMO_KEY} | {OTHER_KEY})\n  OpenAPI       http://{api}/openapi.json\n  metrics       http://{ops}/metrics\n  topology      http://{ops}/topology\n  provider sim  http://{sim}   (ledger: http://{sim}/ledger)\n  Kafka         {brokers}   (mock cluster; topics {cmd}, {evt}, {dlq})\n  PostgreSQL    {db}\n\ntry:\n  curl -s -X POST http://{api}/v1/payments -H 'Authorization: Bearer {DEMO_KEY}' \\\n    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{{\"amount\": 1000, \"currency\": \"EUR\"}}'\n\nCtrl-C stops everything.",
        api = stack.api,
        ops = stack.ops,
        sim = stack.sim_addr,
        brokers = stack.kafka.brokers(),
        cmd = stack.commands_topic(),
        evt = stack.common.events_topic,
        dlq = stack.common.dlq_topic,
        db = stack.database_url,
    );
    gateway::shutdown_signal().await;
    if let Some(child) = ui.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    stack.shutdown().await
}
