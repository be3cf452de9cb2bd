//! # gateway-http — the HTTP API (warp)
//!
//! Layout:
//! - [`routes`]: every route, the shared `recover`, request metrics.
//! - [`payments`], [`callbacks`], [`health`]: what each route does, one file per
//!   resource — validate, authenticate, publish a command or read the projection.
//! - [`commands`]: `publish`, the API's only write path.
//! - [`admission`]: creates refused at once while the workers' backlog is over a bound.
//! - [`request`]: what the handlers share (the merchant, JSON bodies, identifiers).
//! - [`recent`]: creates this instance accepted and the projection may not hold yet:
//!   one answer per Idempotency-Key, and reads of a payment or refund just accepted,
//!   alone and in its lists.
//! - [`auth`]: merchant API keys (hashed, constant-time).
//! - [`error`]: the one JSON error shape and the catalogue of its codes.
//! - [`openapi`]: the OpenAPI 3 document served at `/openapi.json`.
//!
//! The API **never changes payment state**: writes become commands on Kafka, reads come
//! from the PostgreSQL projection and, for what this instance accepted and the projection
//! does not show yet, from [`recent`].

pub mod admission;
pub mod auth;
pub mod callbacks;
pub mod commands;
pub mod cursor;
pub mod deliveries;
pub mod error;
pub mod health;
pub mod openapi;
pub mod payments;
pub mod recent;
pub mod refunds;
pub mod request;
pub mod routes;

use auth::MerchantKey;
use rdkafka::producer::FutureProducer;
use recent::RecentCreates;
use sinks::Pool;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub merchants: Vec<MerchantKey>,
    /// Webhook secrets per provider name (`/v1/callbacks/{provider}`); several during a
    /// rotation.
    pub webhook_secrets: HashMap<String, Vec<Vec<u8>>>,
    pub commands_topic: String,
    pub max_body_bytes: u64,
    /// How long a create or cancel may wait for Kafka before answering 503.
    pub publish_timeout: Duration,
    /// Requests per merchant; `None` disables the limit.
    pub rate_limit: Option<RateLimit>,
    /// Refuse creates while the workers' backlog is over a bound; `None` admits all.
    pub admission: Option<admission::AdmissionConfig>,
    /// Creates handled at once by this instance; one more is refused (503 overloaded).
    /// 0: no limit.
    pub max_creates_in_flight: usize,
    /// How long after a payment completed it may be refunded, if the topology has a
    /// refund processor; `None`: refund requests are answered `501 refunds_not_enabled`.
    pub refund_window: Option<Duration>,
}

/// A token bucket per merchant: `per_second` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// Token buckets by merchant id.
#[derive(Default)]
pub struct Buckets {
    map: Mutex<HashMap<String, (f64, std::time::Instant)>>,
}

impl Buckets {
    /// Takes one token for `merchant`, or says in how many whole seconds one is back.
    pub fn take(&self, merchant: &str, limit: RateLimit) -> Result<(), u32> {
        let now = std::time::Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = map.entry(merchant.to_owned()).or_insert((limit.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * limit.per_second).min(limit.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / limit.per_second).ceil().max(1.0) as u32)
        }
    }
}

impl ApiConfig {
    pub fn new(commands_topic: &str) -> Self {
        ApiConfig {
            merchants: vec![],
            webhook_secrets: HashMap::new(),
            commands_topic: commands_topic.to_owned(),
            max_body_bytes: 16 * 1024,
            publish_timeout: Duration::from_secs(5),
            rate_limit: Some(RateLimit {
                per_second: 5000.0,
                burst: 10_000.0,
            }),
            admission: None,
            max_creates_in_flight: 0,
            refund_window: None,
        }
    }
}

pub struct ApiState {
    pub cfg: ApiConfig,
    pub producer: FutureProducer,
    pub pool: Pool,
    pub recent: Mutex<RecentCreates<crate::payments::AcceptedPayment>>,
    /// Refund requests this instance accepted recently (keyed by payment and key).
    pub recent_refunds: Mutex<RecentCreates<crate::refunds::AcceptedRefund>>,
    pub buckets: Buckets,
    pub admission: Arc<admission::Admission>,
    /// Permits for creates in flight (`ApiConfig::max_creates_in_flight`).
    pub creates_in_flight: Option<tokio::sync::Semaphore>,
}

impl ApiState {
    /// The API's state; with `cfg.admission`, it starts reading the workers' backlog.
    pub fn new(cfg: ApiConfig, producer: FutureProducer, pool: Pool) -> anyhow::Result<Arc<Self>> {
        let admission = match &cfg.admission {
            Some(a) => admission::Admission::start(a.clone())?,
            None => admission::Admission::open(),
        };
        let creates_in_flight = (cfg.max_creates_in_flight > 0)
            .then(|| tokio::sync::Semaphore::new(cfg.max_creates_in_flight));
        Ok(Arc::new(ApiState {
            creates_in_flight,
            cfg,
            producer,
            pool,
            recent: Mutex::new(RecentCreates::default()),
            recent_refunds: Mutex::new(RecentCreates::default()),
            buckets: Buckets::default(),
            admission,
        }))
    }
}

/// Serves the API on `addr` until `shutdown`; returns the bound address at once.
pub async fn serve(
    state: Arc<ApiState>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    spawn_server(routes::routes(state), addr, shutdown).await
}

/// Binds `addr` (port 0 picks a free one) and serves `filter` on a task until
/// `shutdown`; returns the bound address at once.
pub async fn spawn_server<F>(
    filter: F,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)>
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        warp::serve(filter)
            .incoming(listener)
            .graceful(shutdown)
            .run()
            .await;
    });
    Ok((local, handle))
}

/// Heap held by the process's Rust code, read at each scrape.
static HEAP_LIVE: std::sync::LazyLock<prometheus::IntGauge> = std::sync::LazyLock::new(|| {
    let g = prometheus::IntGauge::new(
        "gateway_heap_live_bytes",
        "Heap bytes the process's Rust code holds (allocated and not freed; librdkafka's own allocations are not counted)",
    )
    .expect("a valid metric");
    // Registered once; a second registration of the same name only fails.
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

/// Operational endpoints of every role, on their own port, apart from the merchant API:
/// `/metrics`, `/health/live` and, when the process knows its topology, `/topology`.
pub async fn serve_ops(
    addr: SocketAddr,
    topology: Option<serde_json::Value>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use warp::{Filter, Reply};
    let metrics = warp::path!("metrics").and(warp::get()).map(|| {
        if let Some(bytes) = telemetry::heap::live_bytes() {
            HEAP_LIVE.set(bytes as i64);
        }
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .unwrap_or_default();
        warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4").into_response()
    });
    let live = warp::path!("health" / "live")
        .map(|| warp::reply::json(&serde_json::json!({"status": "live"})).into_response());
    // Ready while every role of the process makes progress (see the gateway's watchdog).
    let ready = warp::path!("health" / "ready").map(|| {
        let stalled = telemetry::progress::not_ready();
        if stalled.is_empty() {
            warp::reply::json(&serde_json::json!({"status": "ready"})).into_response()
        } else {
            warp::reply::with_status(
                warp::reply::json(&serde_json::json!({"status": "stalled", "stalled": stalled})),
                warp::http::StatusCode::SERVICE_UNAVAILABLE,
            )
            .into_response()
        }
    });
    let topo = warp::path!("topology").map(move || match &topology {
        Some(t) => warp::reply::json(t).into_response(),
        None => warp::http::StatusCode::NOT_FOUND.into_response(),
    });
    spawn_server(
        metrics.or(live).unify().or(ready).unify().or(topo).unify(),
        addr,
        shutdown,
    )
    .await
}
