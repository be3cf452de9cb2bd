//! `provider-sim`: runs the provider simulator. Every knob is a flag or an environment
//! variable (`SIM_*`).

use anyhow::Context as _;
use clap::Parser;
use simulator::{SimConfig, Simulator};
use std::net::SocketAddr;

#[derive(Debug, Parser)]
#[command(
    name = "provider-sim",
    about = "A payment provider simulator with a ledger, magic amounts and signed webhooks"
)]
struct Args {
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    #[arg(long, env = "SIM_MIN_LATENCY_MS", default_value_t = 0)]
    min_latency_ms: u64,
    #[arg(long, env = "SIM_MAX_LATENCY_MS", default_value_t = 0)]
    max_latency_ms: u64,
    #[arg(long, env = "SIM_DECLINE_RATE", default_value_t = 0.0)]
    decline_rate: f64,
    #[arg(long, env = "SIM_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    #[arg(long, env = "SIM_TIMEOUT_RATE", default_value_t = 0.0)]
    timeout_rate: f64,
    #[arg(long, env = "SIM_LOST_RESPONSE_RATE", default_value_t = 0.0)]
    lost_response_rate: f64,
    #[arg(long, env = "SIM_ASYNC_RATE", default_value_t = 0.0)]
    async_rate: f64,
    #[arg(long, env = "SIM_HANG_MS", default_value_t = 5000)]
    hang_ms: u64,
    /// Where webhooks go, e.g. http://127.0.0.1:8080/v1/callbacks/sim
    #[arg(long, env = "SIM_WEBHOOK_URL")]
    webhook_url: Option<String>,
    #[arg(
        long,
        env = "SIM_WEBHOOK_SECRET",
        default_value = "whsec_c2ltdWxhdG9yLXdlYmhvb2stc2VjcmV0"
    )]
    webhook_secret: String,
    #[arg(long, env = "SIM_WEBHOOK_DELAY_MS", default_value_t = 50)]
    webhook_delay_ms: u64,
    #[arg(long, env = "SIM_DUPLICATE_WEBHOOK_RATE", default_value_t = 0.0)]
    duplicate_webhook_rate: f64,
    #[arg(long, env = "SIM_WEBHOOK_JITTER_MS", default_value_t = 0)]
    webhook_jitter_ms: u64,
    /// Disable the magic amounts (all amounts follow the rates).
    #[arg(long, env = "SIM_NO_MAGIC", default_value_t = false)]
    no_magic: bool,
    #[arg(long, env = "SIM_SEED")]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let cfg = SimConfig {
        min_latency_ms: a.min_latency_ms,
        max_latency_ms: a.max_latency_ms,
        decline_rate: a.decline_rate,
        error_rate: a.error_rate,
        timeout_rate: a.timeout_rate,
        lost_response_rate: a.lost_response_rate,
        async_rate: a.async_rate,
        hang_ms: a.hang_ms,
        webhook_url: a.webhook_url,
        webhook_secret: a.webhook_secret,
        webhook_delay_ms: a.webhook_delay_ms,
        duplicate_webhook_rate: a.duplicate_webhook_rate,
        webhook_jitter_ms: a.webhook_jitter_ms,
        magic_amounts: !a.no_magic,
        seed: a.seed,
    };
    let problems = cfg.problems();
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "provider simulator listening");
    warp::serve(Simulator::new(cfg).routes())
        .incoming(listener)
        .graceful(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .run()
        .await;
    Ok(())
}
