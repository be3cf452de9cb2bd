//! `local-stack`: the whole gateway as local processes' worth of services, without
//! Docker: an Apache Kafka 4.4 broker (KRaft) from the jars `make kafka` caches, a throwaway
//! PostgreSQL from the system's binaries, the provider simulator, and the API, worker and
//! sink. Prints where everything is and runs until Ctrl-C.
//!
//! The web test client (`payctl ui`, when built) is also the demo merchant's notification
//! endpoint: the merchant's `notify_secrets` from config/merchants.toml, its notify_url
//! replaced by the client's `/notify`.

use base64::Engine as _;
use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use testkit::stack::{Stack, StackOptions, DEMO_KEY, OTHER_KEY, SHIPPED_POLICY};

#[derive(Debug, Parser)]
#[command(
    name = "local-stack",
    about = "Run the payment gateway locally, with an Apache Kafka broker and a throwaway PostgreSQL"
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

/// `payctl` beside this binary, if it was built.
fn payctl() -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name("payctl");
    path.exists().then_some(path)
}

/// Starts `payctl ui`, verifying notifications with `secrets` (`whsec_…`) if any.
fn start_ui(
    payctl: &Path,
    api: SocketAddr,
    listen: SocketAddr,
    secrets: &[String],
) -> Option<std::process::Child> {
    std::process::Command::new(payctl)
        .args([
            "--api",
            &format!("http://{api}"),
            "ui",
            "--listen",
            &listen.to_string(),
        ])
        // In the environment, not the arguments, which every local user can read.
        .env("PAYCTL_NOTIFY_SECRETS", secrets.join(","))
        .stdin(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// The demo merchant's notification endpoint of config/merchants.toml, delivering to the
/// web test client at `ui` instead: the endpoint, and its secrets as `whsec_…`.
fn demo_endpoint(
    ui: SocketAddr,
) -> anyhow::Result<Option<(sinks::notifier::Endpoint, Vec<String>)>> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/merchants.toml");
    let Some(mut endpoint) = gateway::load_endpoints(&file)?.remove("demo") else {
        return Ok(None);
    };
    endpoint.url = format!("http://{ui}/notify");
    let secrets = endpoint
        .secrets
        .iter()
        .map(|s| {
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        })
        .collect();
    Ok(Some((endpoint, secrets)))
}

/// Refuses to start when a port the stack would listen on is taken, naming the port and
/// the part: a part that cannot start is never announced.
fn ensure_free(ports: &[(SocketAddr, &str, &str)]) -> anyhow::Result<()> {
    for (addr, part, flag) in ports {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!(
                "{addr}, the port of {part}, cannot be listened on ({e}): stop what holds it, or pass {flag} <another address>"
            );
        }
    }
    Ok(())
}

/// Waits until the web test client answers on `listen`; an error naming it if it exited
/// or did not answer within 10 s.
async fn ensure_ui_up(child: &mut std::process::Child, listen: SocketAddr) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the web test client (payctl ui) exited at start ({status}); is {listen} free? (--ui <another address>)"
            );
        }
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the web test client (payctl ui) did not answer on {listen} within 10 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    telemetry::init(&telemetry::Config::from_env("gateway-local", false))?;
    let defaults = StackOptions::default();
    let payctl = payctl();
    let mut ports = vec![
        (a.api, "the API", "--api"),
        (a.provider, "the provider simulator", "--provider"),
    ];
    if payctl.is_some() {
        ports.push((a.ui, "the web test client", "--ui"));
    }
    ensure_free(&ports)?;
    // Notifications only when there is a client to receive them.
    let demo = match &payctl {
        Some(_) => demo_endpoint(a.ui)?,
        None => None,
    };
    let (merchant_endpoints, secrets) = match demo {
        Some((endpoint, secrets)) => (HashMap::from([("demo".to_owned(), endpoint)]), secrets),
        None => (HashMap::new(), Vec::new()),
    };
    let opts = StackOptions {
        partitions: a.partitions,
        api_listen: a.api,
        sim_listen: a.provider,
        policy: if a.fast {
            defaults.policy.clone()
        } else {
            SHIPPED_POLICY.to_owned()
        },
        merchant_endpoints,
        ..defaults
    };
    let stack = Stack::start(opts).await?;
    let mut ui = payctl
        .as_deref()
        .and_then(|p| start_ui(p, stack.api, a.ui, &secrets));
    if let Some(child) = ui.as_mut() {
        if let Err(e) = ensure_ui_up(child, a.ui).await {
            stack.shutdown().await?;
            return Err(e);
        }
    }
    let ui_line = match &ui {
        Some(_) if !secrets.is_empty() => format!(
            "http://{ui}   (the demo merchant's notifications: http://{ui}/notify)",
            ui = a.ui
        ),
        Some(_) => format!(
            "http://{}   (no notifications: config/merchants.toml gives demo no notify_url)",
            a.ui
        ),
        None => "not started (build it: cargo build -p payment-client)".to_owned(),
    };
    println!(
        "\nlocal stack ready\n  test client   {ui_line}\n  API           http://{api}   (Authorization: Bearer {DEMO_KEY} | {OTHER_KEY})\n  OpenAPI       http://{api}/openapi.json\n  metrics       http://{ops}/metrics\n  topology      http://{ops}/topology\n  provider sim  http://{sim}   (ledger: http://{sim}/ledger)\n  Kafka         {brokers}   (Apache Kafka {kafka_version}; topics {cmd}, {evt}, {dlq})\n  PostgreSQL    {db}\n\ntry:\n  curl -s -X POST http://{api}/v1/payments -H 'Authorization: Bearer {DEMO_KEY}' \\\n    -H 'Idempotency-Key: demo-1' -H 'Content-Type: application/json' -d '{{\"amount\": 1000, \"currency\": \"EUR\"}}'\n\nCtrl-C stops everything.",
        api = stack.api,
        ops = stack.ops,
        sim = stack.sim_addr,
        brokers = stack.kafka.brokers(),
        kafka_version = testkit::kafka::KAFKA_VERSION,
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
