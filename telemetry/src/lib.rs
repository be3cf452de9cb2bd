//! Logs and traces for every gateway process.
//!
//! One `tracing` subscriber writes the log lines and, through `tracing-opentelemetry`,
//! turns spans into OpenTelemetry spans. When an OTLP endpoint is configured they are
//! exported over OTLP/HTTP by a batch processor on its own thread with a bounded queue:
//! a slow or absent collector costs dropped spans, never a slower payment.
//!
//! Trace context crosses process boundaries as W3C `traceparent` strings: in Kafka
//! headers, in the create command (kept in the payment's state, so every later step of
//! the payment joins the same trace) and in provider requests. [`adopt`] is the one
//! place a span takes a remote parent, gets links and records its `trace_id` field, which
//! is how log lines inside the span carry the trace id.

pub mod heap;
pub mod progress;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How a process logs and traces.
#[derive(Debug, Clone)]
pub struct Config {
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// OTLP/HTTP base URL (`http://jaeger:4318`); spans go to `<base>/v1/traces`.
    /// `None`: spans still get ids (logs carry trace ids, context still propagates)
    /// but are not exported.
    pub otlp_endpoint: Option<String>,
    /// How often queued spans are exported.
    pub export_interval: Duration,
    /// Spans waiting for export beyond this are dropped.
    pub max_queue: usize,
    /// Write log lines (to stdout).
    pub logs: bool,
    /// Machine-readable log lines.
    pub json_logs: bool,
    /// `RUST_LOG`-style filter used when `RUST_LOG` is not set.
    pub default_filter: String,
}

impl Config {
    /// Reads the standard variables: `OTEL_SERVICE_NAME` (default `service`),
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (unset or empty: no export),
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms, default 1000), `OTEL_BSP_MAX_QUEUE_SIZE`
    /// (default 8192).
    pub fn from_env(service: &str, json_logs: bool) -> Config {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Config {
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_owned()),
            otlp_endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            export_interval: Duration::from_millis(
                var("OTEL_BSP_SCHEDULE_DELAY")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
            ),
            max_queue: var("OTEL_BSP_MAX_QUEUE_SIZE")
                .and_then(|v| v.parse().ok())
                .unwrap_or(8192),
            logs: true,
            json_logs,
            default_filter: "info,rdkafka=warn".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {source}; check OTEL_EXPORTER_OTLP_ENDPOINT")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Spans sent in one export request. The exporter holds at most the queue
/// ([`Config::max_queue`]) and the batch being sent: what a collector that is down costs.
pub const MAX_EXPORT_BATCH: usize = 512;

/// Installs the process-wide subscriber. A second call (tests start several stacks in
/// one process) keeps the first subscriber and returns `Ok`.
pub fn init(cfg: &Config) -> Result<(), TelemetryError> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &cfg.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(cfg.export_interval)
            .with_max_queue_size(cfg.max_queue)
            .with_max_export_batch_size(MAX_EXPORT_BATCH)
            .build();
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        );
    }
    let provider = builder.build();
    let tracer = provider.tracer("gateway");
    if PROVIDER.set(provider).is_err() {
        return Ok(());
    }
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let logs = cfg.logs.then(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| cfg.default_filter.as_str().into());
        if cfg.json_logs {
            tracing_subscriber::fmt::layer()
                .json()
                .with_target(false)
                .with_filter(filter)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_filter(filter)
                .boxed()
        }
    });
    // An already installed subscriber (a test harness) keeps precedence.
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(logs)
        .try_init();
    Ok(())
}

/// Exports what is queued, waiting at most for the exporter's timeout.
/// Milliseconds since the Unix epoch by the wall clock (0 for a clock set before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// Flushes and stops the exporter (at process exit).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version) || !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The `traceparent` naming `sc`.
pub fn format(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// The trace id in a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<String> {
    parse(traceparent).map(|sc| sc.trace_id().to_string())
}

/// Gives a new span its remote parent (none: the span starts a trace) and links, records
/// its trace id in the span's `trace_id` field, and returns its own `traceparent` to pass
/// on. Call before the span is entered. Returns `None` when no tracing layer is installed.
pub fn adopt(span: &tracing::Span, parent: Option<&str>, links: &[&str]) -> Option<String> {
    if let Some(sc) = parent.and_then(parse) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
    for sc in links.iter().filter_map(|l| parse(l)) {
        span.add_link(sc);
    }
    let own = traceparent(span)?;
    if let Some(id) = trace_id(&own) {
        span.record("trace_id", tracing::field::display(&id));
    }
    Some(own)
}

/// The `traceparent` of `span`, if it is traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format(&sc))
}

/// The `traceparent` of the span the caller is in.
pub fn current() -> Option<String> {
    traceparent(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(tp).expect("valid traceparent");
        assert_eq!(format(&sc), tp);
        assert_eq!(
            trace_id(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} must be refused");
        }
    }

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_span_joins_its_remote_parent_and_log_lines_carry_the_trace_id() {
        let provider = SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let link = "00-11111111111111111111111111111111-2222222222222222-01";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("step", trace_id = tracing::field::Empty);
            let own = adopt(&span, Some(parent), &[link]).expect("traced");
            assert!(own.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert_ne!(own, parent, "the span has its own id");
            span.in_scope(|| tracing::info!("inside"));
            let root = tracing::info_span!("root", trace_id = tracing::field::Empty);
            let fresh = adopt(&root, None, &[]).expect("traced");
            assert_ne!(trace_id(&fresh), trace_id(parent), "no parent: a new trace");
        });
        let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736") && logs.contains("inside"),
            "{logs}"
        );
    }

    #[test]
    fn without_a_tracing_layer_nothing_is_invented() {
        let span = tracing::info_span!("x", trace_id = tracing::field::Empty);
        assert_eq!(
            adopt(
                &span,
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                &[]
            ),
            None
        );
    }
}
