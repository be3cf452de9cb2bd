//! A merchant's notification endpoint for tests and demos: it verifies every delivery's
//! Standard Webhooks signature, records what it received, and can be told to fail (5xx),
//! to be slow (answer after a delay), or to work.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::Filter;

/// How the endpoint answers the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    /// `500` without reading the body.
    Fail,
    /// `200`, after this long.
    Slow(Duration),
}

/// One delivery received with a valid signature.
#[derive(Debug, Clone)]
pub struct Received {
    pub webhook_id: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    mode: Option<Mode>,
    received: Vec<Received>,
    /// Requests whose signature did not verify.
    forged: usize,
    requests: usize,
}

#[derive(Clone)]
pub struct MerchantEndpoint {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl MerchantEndpoint {
    /// Serves on a free loopback port until `shutdown`, verifying with `secrets`.
    pub async fn start(
        secrets: Vec<Vec<u8>>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<MerchantEndpoint> {
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let state = inner.clone();
        let route = warp::post()
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(move |h: warp::http::HeaderMap, body: Bytes| {
                let (inner, secrets) = (state.clone(), secrets.clone());
                async move {
                    let header =
                        |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let mode = {
                        let mut g = lock(&inner);
                        g.requests += 1;
                        g.mode.unwrap_or(Mode::Ok)
                    };
                    match mode {
                        Mode::Fail => {
                            return warp::http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Mode::Slow(d) => tokio::time::sleep(d).await,
                        Mode::Ok => {}
                    }
                    let id = header("webhook-id");
                    let verified = payments::webhook::verify(
                        &secrets,
                        id.as_deref(),
                        header("webhook-timestamp").as_deref(),
                        header("webhook-signature").as_deref(),
                        &body,
                        telemetry::now_ms() / 1000,
                    );
                    let parsed = serde_json::from_slice::<serde_json::Value>(&body);
                    let mut g = lock(&inner);
                    match (verified, parsed, id) {
                        (Ok(()), Ok(body), Some(webhook_id)) => {
                            g.received.push(Received { webhook_id, body });
                            warp::http::StatusCode::OK
                        }
                        _ => {
                            g.forged += 1;
                            warp::http::StatusCode::UNAUTHORIZED
                        }
                    }
                }
            });
        let (addr, _join) =
            gateway_http::spawn_server(route, SocketAddr::from(([127, 0, 0, 1], 0)), shutdown)
                .await?;
        Ok(MerchantEndpoint { addr, inner })
    }

    pub fn url(&self) -> String {
        format!("http://{}/notifications", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        lock(&self.inner).mode = Some(mode);
    }

    /// Every verified delivery, in the order received (duplicates included).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner).received.clone()
    }

    /// Deliveries per webhook-id.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in &lock(&self.inner).received {
            *counts.entry(r.webhook_id.clone()).or_default() += 1;
        }
        counts
    }

    /// Requests whose signature did not verify.
    pub fn forged(&self) -> usize {
        lock(&self.inner).forged
    }

    pub fn requests(&self) -> usize {
        lock(&self.inner).requests
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
