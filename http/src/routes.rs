//! Every route of the API, request metrics by route template, and the shared `recover`
//! that gives warp's own rejections the one error shape.

use crate::callbacks::{self, WebhookHeaders};
use crate::error::{ApiError, ErrorCode};
use crate::ApiState;
use crate::{deliveries, health, payments, refunds, request};
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Instant;
use tracing::Instrument;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

struct HttpMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

#[allow(clippy::expect_used)]
static METRICS: LazyLock<HttpMetrics> = LazyLock::new(|| {
    (|| -> Result<HttpMetrics, prometheus::Error> {
        Ok(HttpMetrics {
            requests: register_int_counter_vec!(
                "gateway_http_requests_total",
                "HTTP requests by route and status",
                &["route", "method", "status"]
            )?,
            seconds: register_histogram_vec!(
                "gateway_http_request_duration_seconds",
                "HTTP request latency by route",
                &["route", "method"],
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
            )?,
        })
    })()
    .expect("http metrics register once")
});

/// Runs a handler, converts its error, and records the request under `route` (a template,
/// never a concrete path: payment ids must not become label values).
///
/// Each request is a span (`<METHOD> <route>`); a `traceparent` sent by the client
/// makes it part of the client's trace.
async fn timed(
    route: &'static str,
    method: &'static str,
    traceparent: Option<String>,
    f: impl Future<Output = request::Result<Response>>,
) -> Response {
    let started = Instant::now();
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.route = route,
        http.request.method = method,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, traceparent.as_deref(), &[]);
    let res = match f.instrument(span.clone()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    span.record("http.response.status_code", res.status().as_u16());
    let status = res.status().as_u16().to_string();
    METRICS
        .requests
        .with_label_values(&[route, method, &status])
        .inc();
    METRICS
        .seconds
        .with_label_values(&[route, method])
        .observe(started.elapsed().as_secs_f64());
    res
}

/// The request body, at most `max` bytes, whether or not a Content-Length was sent
/// (a chunked body is counted as it arrives, never buffered past the limit).
fn limited_body(
    max: u64,
) -> impl Filter<Extract = (Result<bytes::Bytes, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .then(move |len, body| collect_limited(len, body, max))
}

/// How long a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn collect_limited<S, B>(
    len: Option<u64>,
    body: S,
    max: u64,
) -> Result<bytes::Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures::StreamExt;
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body exceeds {max} bytes"),
        )
    };
    if len.is_some_and(|l| l > max) {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    // A client that trickles its body does not hold a connection and a task for long.
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} s",
                        BODY_TIMEOUT.as_secs()
                    ),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        if buf.len() as u64 + chunk.remaining() as u64 > max {
            return Err(too_large());
        }
        buf.extend_from_slice(chunk.chunk());
    }
    Ok(buf.freeze())
}

/// A known path asked with a method it does not serve: 405 with `Allow` (RFC 9110).
#[derive(Debug)]
struct WrongMethod {
    allow: String,
}
impl warp::reject::Reject for WrongMethod {}

fn method_guard() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::full()
        .and(warp::method())
        .and_then(
            |path: warp::path::FullPath, method: warp::http::Method| async move {
                match crate::openapi::allowed_methods(path.as_str()) {
                    Some(allowed)
                        if !allowed
                            .iter()
                            .any(|m| m.eq_ignore_ascii_case(method.as_str())) =>
                    {
                        let allow = allowed
                            .iter()
                            .map(|m| m.to_uppercase())
                            .collect::<Vec<_>>()
                            .join(", ");
                        Err(warp::reject::custom(WrongMethod { allow }))
                    }
                    _ => Ok(()),
                }
            },
        )
        .untuple_one()
}

/// The `traceparent` request header, if any and readable (a bad one is ignored, as W3C
/// Trace Context asks).
fn traceparent() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::headers_cloned().map(|h: warp::http::HeaderMap| {
        h.get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

pub fn routes(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let max = state.cfg.max_body_bytes;
    let st = warp::any().map(move || state.clone());
    let auth = warp::header::optional::<String>("authorization");

    let create = warp::path!("v1" / "payments")
        .and(warp::post())
        .and(st.clone())
        .and(auth)
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(warp::header::optional::<String>("content-type"))
        .and(limited_body(max))
        .and(traceparent())
        .then(|s, a, k, ct, b, tp| {
            timed(
                "/v1/payments",
                "POST",
                tp,
                payments::create_payment(s, a, k, ct, b),
            )
        })
        .boxed();
    let list = warp::path!("v1" / "payments")
        .and(warp::get())
        .and(st.clone())
        .and(warp::query::<payments::ListQuery>())
        .and(auth)
        .and(traceparent())
        .then(|s, q, a, tp| timed("/v1/payments", "GET", tp, payments::list_payments(s, q, a)))
        .boxed();
    let get = warp::path!("v1" / "payments" / String)
        .and(warp::get())
        .and(st.clone())
        .and(auth)
        .and(traceparent())
        .then(|id, s, a, tp| {
            timed(
                "/v1/payments/{id}",
                "GET",
                tp,
                payments::get_payment(s, id, a),
            )
        })
        .boxed();
    let events = warp::path!("v1" / "payments" / String / "events")
        .and(warp::get())
        .and(st.clone())
        .and(auth)
        .and(traceparent())
        .then(|id, s, a, tp| {
            timed(
                "/v1/payments/{id}/events",
                "GET",
                tp,
                payments::payment_events(s, id, a),
            )
        })
        .boxed();
    let cancel = warp::path!("v1" / "payments" / String / "cancel")
        .and(warp::post())
        .and(st.clone())
        .and(auth)
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(traceparent())
        .then(|id, s, a, k, tp| {
            timed(
                "/v1/payments/{id}/cancel",
                "POST",
                tp,
                payments::cancel_payment(s, id, a, k),
            )
        })
        .boxed();
    let refund = warp::path!("v1" / "payments" / String / "refunds")
        .and(warp::post())
        .and(st.clone())
        .and(auth)
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(warp::header::optional::<String>("content-type"))
        .and(limited_body(max))
        .and(traceparent())
        .then(|id, s, a, k, ct, b, tp| {
            timed(
                "/v1/payments/{id}/refunds",
                "POST",
                tp,
                refunds::create_refund(s, id, a, k, ct, b),
            )
        })
        .boxed();
    let list_refunds = warp::path!("v1" / "payments" / String / "refunds")
        .and(warp::get())
        .and(st.clone())
        .and(auth)
        .and(traceparent())
        .then(|id, s, a, tp| {
            timed(
                "/v1/payments/{id}/refunds",
                "GET",
                tp,
                refunds::list_refunds(s, id, a),
            )
        })
        .boxed();
    let get_refund = warp::path!("v1" / "refunds" / String)
        .and(warp::get())
        .and(st.clone())
        .and(auth)
        .and(traceparent())
        .then(|id, s, a, tp| timed("/v1/refunds/{id}", "GET", tp, refunds::get_refund(s, id, a)))
        .boxed();
    let deliveries = warp::path!("v1" / "webhook-deliveries")
        .and(warp::get())
        .and(st.clone())
        .and(warp::query::<deliveries::DeliveriesQuery>())
        .and(auth)
        .and(traceparent())
        .then(|s, q, a, tp| {
            timed(
                "/v1/webhook-deliveries",
                "GET",
                tp,
                deliveries::list_deliveries(s, q, a),
            )
        })
        .boxed();
    let redeliver = warp::path!("v1" / "webhook-deliveries" / String / "redeliver")
        .and(warp::post())
        .and(st.clone())
        .and(auth)
        .and(traceparent())
        .then(|id, s, a, tp| {
            timed(
                "/v1/webhook-deliveries/{id}/redeliver",
                "POST",
                tp,
                deliveries::redeliver(s, id, a),
            )
        })
        .boxed();
    let callback = warp::path!("v1" / "callbacks" / String)
        .and(warp::post())
        .and(st.clone())
        .and(warp::header::optional::<String>("webhook-id"))
        .and(warp::header::optional::<String>("webhook-timestamp"))
        .and(warp::header::optional::<String>("webhook-signature"))
        .and(limited_body(64 * 1024))
        .and(traceparent())
        .then(|p, s, id, ts, sig, b, tp| {
            let h = WebhookHeaders {
                id,
                timestamp: ts,
                signature: sig,
            };
            timed(
                "/v1/callbacks/{provider}",
                "POST",
                tp,
                callbacks::callback(s, p, h, b),
            )
        })
        .boxed();
    let live = warp::path!("health" / "live")
        .and(warp::get())
        .then(|| {
            timed("/health/live", "GET", None, async {
                Ok(warp::reply::json(&serde_json::json!({"status": "live"})).into_response())
            })
        })
        .boxed();
    let ready = warp::path!("health" / "ready")
        .and(warp::get())
        .and(st.clone())
        .then(|s| timed("/health/ready", "GET", None, health::ready(s)))
        .boxed();
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(|| warp::reply::json(&crate::openapi::document()).into_response())
        .boxed();

    let all = create
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(events)
        .unify()
        .or(cancel)
        .unify()
        .or(refund)
        .unify()
        .or(list_refunds)
        .unify()
        .or(get_refund)
        .unify()
        .or(deliveries)
        .unify()
        .or(redeliver)
        .unify()
        .or(callback)
        .unify()
        .or(live)
        .unify()
        .or(ready)
        .unify()
        .or(openapi)
        .unify()
        .boxed();
    method_guard()
        .and(all)
        .recover(recover)
        .unify()
        .map(|mut res: Response| {
            // Every answer: JSON or an error, never content to sniff.
            res.headers_mut().insert(
                "x-content-type-options",
                warp::http::HeaderValue::from_static("nosniff"),
            );
            res
        })
}

async fn recover(r: Rejection) -> Result<Response, Infallible> {
    if let Some(w) = r.find::<WrongMethod>() {
        let mut res = ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("this route serves {}", w.allow),
        )
        .into_response();
        if let Ok(v) = w.allow.parse() {
            res.headers_mut().insert("allow", v);
        }
        METRICS
            .requests
            .with_label_values(&["unmatched", "any", "405"])
            .inc();
        return Ok(res);
    }
    let e = if r.is_not_found() {
        ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.json")
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large")
    } else if r.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(ErrorCode::LengthRequired, "send a Content-Length header")
    } else if let Some(q) = r.find::<warp::reject::InvalidQuery>() {
        ApiError::invalid(format!("query string: {q}"))
    } else if let Some(h) = r.find::<warp::reject::InvalidHeader>() {
        ApiError::invalid(format!("{h}"))
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            "this route does not take that method",
        )
    } else {
        tracing::debug!(rejection = ?r, "unhandled rejection");
        ApiError::invalid("the request could not be understood")
    };
    let status = e.status().as_u16().to_string();
    METRICS
        .requests
        .with_label_values(&["unmatched", "any", &status])
        .inc();
    Ok(e.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openapi::{document, OPERATIONS};
    use crate::{ApiConfig, ApiState};

    /// Tracing caches, per call site, whether any subscriber wants it: a request served
    /// by one test while another installs its capturing subscriber can leave a call site
    /// marked "never" for both. Tests that serve requests share this lock; the one that
    /// captures takes it alone.
    static TRACING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

    fn state() -> Arc<ApiState> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .unwrap();
        let pool = sinks::connect("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
        let mut cfg = ApiConfig::new("commands");
        cfg.webhook_secrets
            .insert("sim".into(), vec![b"secret".to_vec()]);
        ApiState::new(cfg, producer, pool).expect("API state")
    }

    #[test]
    fn the_document_lists_exactly_the_operations() {
        let doc = document();
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        documented.sort();
        let mut declared: Vec<(String, String)> = OPERATIONS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        declared.sort();
        assert_eq!(documented, declared);
    }

    #[tokio::test]
    async fn operational_endpoints_are_not_on_the_merchant_port() {
        let _tracing = TRACING.read().await;
        let routes = routes(state());
        for path in ["/metrics", "/topology"] {
            let res = warp::test::request().path(path).reply(&routes).await;
            assert_eq!(
                res.status(),
                404,
                "{path} must be served on the ops port only"
            );
        }
    }

    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let _tracing = TRACING.read().await;
        let routes = routes(state());
        for (method, path) in OPERATIONS {
            let concrete = path
                .replace("{id}", "pay_0123456789abcdef0123456789abcdef")
                .replace("{provider}", "sim");
            let res = warp::test::request()
                .method(&method.to_uppercase())
                .path(&concrete)
                .body("{}")
                .reply(&routes)
                .await;
            let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap_or_default();
            assert!(
                !(res.status() == 404 && body["error"]["code"] == "not_found")
                    && res.status() != 405,
                "{method} {path} is documented but not routed ({})",
                res.status()
            );
        }
        let res = warp::test::request()
            .path("/v1/nowhere")
            .reply(&routes)
            .await;
        assert_eq!(res.status(), 404);
        let res = warp::test::request()
            .method("TRACE")
            .path("/v1/payments")
            .reply(&routes)
            .await;
        assert_eq!(res.status(), 405);
        assert_eq!(res.headers()["allow"], "POST, GET");
    }

    #[tokio::test]
    async fn merchants_are_rate_limited_with_retry_after() {
        let _tracing = TRACING.read().await;
        let mut s = state();
        if let Some(st) = Arc::get_mut(&mut s) {
            st.cfg.rate_limit = Some(crate::RateLimit {
                per_second: 0.5,
                burst: 2.0,
            });
            st.cfg.merchants = vec![crate::auth::MerchantKey::from_plain("acme", "sk").unwrap()];
        }
        let routes = routes(s);
        let get = || {
            warp::test::request()
                .path("/v1/payments/pay_0123456789abcdef0123456789abcdef")
                .header("authorization", "Bearer sk")
        };
        for _ in 0..2 {
            assert_ne!(get().reply(&routes).await.status(), 429);
        }
        let res = get().reply(&routes).await;
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "2");
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
    }

    /// Keys and card-like data never reach logs, spans or metric labels, even at TRACE
    /// level.
    #[tokio::test]
    async fn secrets_and_card_data_are_not_logged() {
        let _tracing = TRACING.write().await;
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut s = state();
        if let Some(st) = Arc::get_mut(&mut s) {
            st.cfg.merchants =
                vec![crate::auth::MerchantKey::from_plain("acme", "sk_live_TOPSECRET").unwrap()];
        }
        let routes = routes(s);
        let pan = "4111111111111111";
        for key in ["sk_live_TOPSECRET", "sk_wrong_SECRET2"] {
            warp::test::request()
                .method("POST")
                .path("/v1/payments")
                .header("authorization", format!("Bearer {key}"))
                .header("idempotency-key", "k1")
                .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .body(format!(
                    r#"{{"amount": 100, "currency": "EUR", "reference": "{pan}", "metadata": {{"card": "{pan}"}}}}"#
                ))
                .reply(&routes)
                .await;
        }
        warp::test::request()
            .method("POST")
            .path("/v1/callbacks/sim")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", "1")
            .header("webhook-signature", "v1,AAAA")
            .body(format!(r#"{{"data": {{"reference": "{pan}"}}}}"#))
            .reply(&routes)
            .await;
        let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("webhook refused"),
            "logs were not captured: {logs}"
        );
        let metrics = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .unwrap();
        let finished = spans.get_finished_spans().unwrap();
        assert!(
            finished.iter().any(
                |s| s.span_context.trace_id().to_string() == "4bf92f3577b34da6a3ce929d0e0e4736"
            ),
            "spans were not captured: {finished:#?}"
        );
        let spans_text = format!("{finished:?}");
        for secret in ["TOPSECRET", "SECRET2", pan] {
            assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
            assert!(!metrics.contains(secret), "{secret} in the metrics");
            assert!(!spans_text.contains(secret), "{secret} in the spans");
        }
    }

    #[tokio::test]
    async fn card_numbers_are_refused() {
        let _tracing = TRACING.read().await;
        let mut s = state();
        if let Some(st) = Arc::get_mut(&mut s) {
            st.cfg.merchants = vec![crate::auth::MerchantKey::from_plain("acme", "sk").unwrap()];
        }
        let routes = routes(s);
        for (key, body) in [
            (
                "k1",
                r#"{"amount": 100, "currency": "EUR", "reference": "4111 1111 1111 1111"}"#,
            ),
            (
                "k2",
                r#"{"amount": 100, "currency": "EUR", "description": "card 5500-0055-5555-5559"}"#,
            ),
            ("4111111111111111", r#"{"amount": 100, "currency": "EUR"}"#),
            (
                "k3",
                r#"{"amount": 100, "currency": "EUR", "metadata": {"card": "4111-1111-1111-1111"}}"#,
            ),
            (
                "k4",
                r#"{"amount": 100, "currency": "EUR", "metadata": {"4111111111111111": "x"}}"#,
            ),
        ] {
            let res = warp::test::request()
                .method("POST")
                .path("/v1/payments")
                .header("authorization", "Bearer sk")
                .header("idempotency-key", key)
                .body(body)
                .reply(&routes)
                .await;
            let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
            assert_eq!(
                (res.status().as_u16(), v["error"]["code"].as_str()),
                (400, Some("card_data_rejected")),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn metadata_is_bounded() {
        let _tracing = TRACING.read().await;
        let mut s = state();
        if let Some(st) = Arc::get_mut(&mut s) {
            st.cfg.merchants = vec![crate::auth::MerchantKey::from_plain("acme", "sk").unwrap()];
        }
        let routes = routes(s);
        let many: serde_json::Map<String, serde_json::Value> = (0..21)
            .map(|i| (format!("k{i}"), serde_json::json!("v")))
            .collect();
        for (metadata, why) in [
            (serde_json::json!(many), "21 keys"),
            (
                serde_json::json!({ "k".repeat(41): "v" }),
                "41-character key",
            ),
            (serde_json::json!({ "": "v" }), "empty key"),
            (serde_json::json!({ "a b": "v" }), "space in key"),
            (
                serde_json::json!({ "k": "v".repeat(201) }),
                "201-character value",
            ),
            (
                serde_json::json!({ "k": "line\nbreak" }),
                "control character",
            ),
            (serde_json::json!({ "k": 1 }), "number value"),
            (serde_json::json!(["k"]), "array"),
        ] {
            let res = warp::test::request()
                .method("POST")
                .path("/v1/payments")
                .header("authorization", "Bearer sk")
                .header("idempotency-key", "meta")
                .json(
                    &serde_json::json!({ "amount": 100, "currency": "EUR", "metadata": metadata }),
                )
                .reply(&routes)
                .await;
            let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
            assert_eq!(
                (res.status().as_u16(), v["error"]["code"].as_str()),
                (400, Some("invalid_request")),
                "{why}: {v}"
            );
            assert!(
                v["error"]["message"].as_str().unwrap().contains("metadata"),
                "{why}: {v}"
            );
        }
    }
}
