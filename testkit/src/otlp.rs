//! An OTLP/HTTP trace receiver for tests: it accepts what the gateway's exporter sends
//! (`POST /v1/traces`, protobuf `ExportTraceServiceRequest`) and keeps the spans.
//! It can play a collector that is down: requests are held unanswered (a black hole,
//! the worst case for an exporter) until it is up again, then refused with 503.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warp::Filter;

/// One received span; ids in lowercase hex, an empty `parent_span_id` for a root.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// `(trace_id, span_id)` of each linked span.
    pub links: Vec<(String, String)>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<SpanRecord>>,
    down: AtomicBool,
    requests: AtomicUsize,
}

pub struct Receiver {
    /// Base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn decode(body: &[u8]) -> Result<Vec<SpanRecord>, prost::DecodeError> {
    let req = ExportTraceServiceRequest::decode(body)?;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(SpanRecord {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                    attributes: attributes(&s.attributes),
                });
            }
        }
    }
    Ok(out)
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Receiver> {
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let route = warp::path!("v1" / "traces")
            .and(warp::post())
            .and(warp::body::bytes())
            .then(move |body: bytes::Bytes| {
                let state = state.clone();
                async move {
                    state.requests.fetch_add(1, Ordering::Relaxed);
                    if state.down.load(Ordering::Relaxed) {
                        while state.down.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        return warp::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    match decode(&body) {
                        Ok(spans) => {
                            state
                                .spans
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .extend(spans);
                            warp::http::StatusCode::OK
                        }
                        Err(_) => warp::http::StatusCode::BAD_REQUEST,
                    }
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(warp::serve(route).incoming(listener).run());
        Ok(Receiver {
            endpoint: format!("http://{addr}"),
            shared,
            server,
        })
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.shared
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<SpanRecord> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Down: export requests hang unanswered until the receiver is up again.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// Export requests received (answered or not).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }
}
