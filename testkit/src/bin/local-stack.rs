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
    /// Use the test suite's short timeouts instead of the shipped policy.
    #[arg(long)]
    fast: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    gateway::init_logging(false);
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
    println!(
        "\nlocal stack ready\n  API           http://{api}   (Authorization: Bearer {DEMO_KEY} | {OTHER_KEY})\n  OpenAPI       http://{api}/openapi.json\n  metrics       http://{api}/metrics\n  topology      http://{api}/topology\n  provider sim  http://{sim}   (ledger: http://{sim}/ledger)\n  Kafka         {brokers}   (mock cluster; topics {cmd}, {evt}, {dlq})\n  PostgreSQL    {db}\n\ntry:\n  curl -s -X POST http://{api}/v1/payments -H 'Authorization: Bearer {DEMO_KEY}' \\\n    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{{\"amount\": 1000, \"currency\": \"EUR\"}}'\n\nCtrl-C stops everything.",
        api = stack.api,
        sim = stack.sim_addr,
        brokers = stack.kafka.brokers(),
        cmd = stack.commands_topic(),
        evt = stack.common.events_topic,
        dlq = stack.common.dlq_topic,
        db = stack.database_url,
    );
    gateway::shutdown_signal().await;
    stack.shutdown().await
}
