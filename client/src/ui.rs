//! The web test client: one page (`ui.html`), and `/api/*` forwarded to the gateway's API
//! so the browser talks to a single origin. With notification secrets, the same server is
//! the merchant's demo endpoint too (`/notify`, `/notifications`: `inbox.rs`), and the
//! page shows what it received.

use crate::inbox::{self, Inbox};
use bytes::Bytes;
use std::net::SocketAddr;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::{Filter, Reply};

const PAGE: &str = include_str!("ui.html");
/// Request headers passed on to the API.
const FORWARDED: &[&str] = &["authorization", "idempotency-key", "content-type"];

/// Bodies up to 64 KiB; a request without Content-Length (a browser's GET) is fine.
fn small_body() -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|len: Option<u64>| async move {
            match len {
                Some(n) if n > 64 * 1024 => Err(warp::reject::custom(TooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
}

#[derive(Debug)]
struct TooLarge;
impl warp::reject::Reject for TooLarge {}

pub async fn serve(
    api: String,
    listen: SocketAddr,
    grafana: &str,
    jaeger: &str,
    notifications: Option<Inbox>,
) -> anyhow::Result<()> {
    let page = PAGE
        .replace("GRAFANA_URL", grafana.trim_end_matches('/'))
        .replace("JAEGER_URL", jaeger.trim_end_matches('/'))
        .replace(
            "NOTIFICATIONS_ON",
            if notifications.is_some() {
                "true"
            } else {
                "false"
            },
        );
    let notify = match &notifications {
        Some(inbox) => inbox.routes(),
        None => inbox::disabled_routes(),
    };
    let index = warp::get()
        .and(warp::path::end())
        .map(move || warp::reply::html(page.clone()));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let proxy = warp::path("api")
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(small_body())
        .and(warp::body::bytes())
        .then(move |tail: warp::path::Tail, method: Method, headers: HeaderMap, query: String, body: Bytes| {
            let http = http.clone();
            let api = api.clone();
            async move {
                let mut url = format!("{api}/{}", tail.as_str());
                if !query.is_empty() {
                    url = format!("{url}?{query}");
                }
                let mut req = http.request(method, url).body(body);
                for name in FORWARDED {
                    if let Some(v) = headers.get(*name) {
                        req = req.header(*name, v);
                    }
                }
                match req.send().await {
                    Ok(res) => {
                        let status = res.status();
                        let retry_after = res.headers().get(warp::http::header::RETRY_AFTER).cloned();
                        let body = res.bytes().await.unwrap_or_default();
                        let mut reply = warp::reply::with_status(
                            warp::reply::with_header(body.to_vec(), "content-type", "application/json"),
                            status,
                        )
                        .into_response();
                        // A refusal's Retry-After reaches the page as the API sent it.
                        if let Some(v) = retry_after {
                            reply.headers_mut().insert(warp::http::header::RETRY_AFTER, v);
                        }
                        reply
                    }
                    Err(e) => warp::reply::with_status(
                        warp::reply::json(&serde_json::json!({"error": {"code": "unavailable", "message": format!("API unreachable: {e}")}})),
                        StatusCode::BAD_GATEWAY,
                    )
                    .into_response(),
                }
            }
        });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    eprintln!("web test client on http://{addr}");
    if notifications.is_some() {
        eprintln!("receiving the merchant's notifications at http://{addr}/notify");
    }
    warp::serve(index.or(notify).or(proxy).recover(refused))
        .incoming(listener)
        .run()
        .await;
    Ok(())
}

/// Requests no route takes, answered in the API's error shape.
async fn refused(r: warp::Rejection) -> Result<warp::reply::Response, std::convert::Infallible> {
    let (status, code, message) = if r.find::<TooLarge>().is_some()
        || r.find::<warp::reject::PayloadTooLarge>().is_some()
    {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request bodies are limited to 64 KiB".to_owned(),
        )
    } else if r.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such page: the client serves /, /api/… and, with notifications on, /notify and /notifications".to_owned(),
        )
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here".to_owned(),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the request could not be read: {r:?}"),
        )
    };
    Ok(warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"error": {"code": code, "message": message}})),
        status,
    )
    .into_response())
}
