//! Logging and tracing: an EnvFilter'd fmt layer (text or JSON), and when an
//! OTLP endpoint is configured, an OpenTelemetry layer exporting spans over
//! OTLP/gRPC. W3C trace context is the propagator.
//!
//! Log lines go to stderr: stdout belongs to the output of one-shot commands
//! (`verdict export`, `verdict keys create`). Whatever `RUST_LOG` says, the
//! database driver and pool log at `info` at most: their `debug` lines carry
//! statement parameter values.

use crate::config::{Config, LogFormat};
use crate::observability::SpanDrop;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{self, FilterExt, Targets};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Spans buffered for export before new ones are dropped. A busy minute
/// ends well over the SDK's default of 2,048 (22,843 were dropped once).
pub const SPAN_QUEUE: usize = 65_536;

/// How long one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The span queue: `VERDICT_OTEL_SPAN_QUEUE_SIZE`, else
/// `OTEL_BSP_MAX_QUEUE_SIZE`, else [`SPAN_QUEUE`].
fn span_queue(config: &Config) -> usize {
    config
        .otel_span_queue_size
        .map(|n| n as usize)
        .or_else(|| {
            std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
                .ok()?
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
        })
        .unwrap_or(SPAN_QUEUE)
}

/// Keeps the exporters alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
    /// How long `shutdown` may take flushing: the shutdown grace period.
    grace: Duration,
}

impl Telemetry {
    /// Exports every finished span now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
        if let Some(m) = &self.meters
            && let Err(e) = m.force_flush()
        {
            tracing::warn!(error = %e, "flushing metrics failed");
        }
    }

    /// Exports what is buffered, within the shutdown grace period: spans
    /// first (the ones still queued when it ends count as dropped), then
    /// the metrics, so the last export carries the spans dropped.
    pub fn shutdown(self) {
        let started = Instant::now();
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(self.grace)
        {
            tracing::warn!(error = %e, "shutting the span exporter down failed");
        }
        let dropped: Vec<(&str, u64)> = SpanDrop::ALL
            .iter()
            .map(|r| (r.as_str(), crate::observability::dropped_spans(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if !dropped.is_empty() {
            let total: u64 = dropped.iter().map(|(_, n)| n).sum();
            tracing::warn!(
                total,
                by_reason = ?dropped,
                "{total} spans never reached the collector (verdict.telemetry.dropped_spans)"
            );
        }
        let left = self
            .grace
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if let Some(m) = &self.meters
            && let Err(e) = m.shutdown_with_timeout(left)
        {
            tracing::warn!(error = %e, "shutting the metric exporter down failed");
        }
    }
}

/// Spans between their end and the collector's answer: how many are
/// queued or being exported, and whether the exporter has shut down (after
/// which nothing is counted any more: what was left is counted once, as
/// dropped at shutdown).
#[derive(Debug, Default)]
struct SpanLedger {
    pending: AtomicUsize,
    closed: Mutex<bool>,
}

/// The SDK's batch processor, with its queue bound kept here so that every
/// span it would drop is counted: a span is admitted while fewer than
/// `capacity` are queued or being exported (the SDK's own queue, of the
/// same size, then never fills), else dropped as `queue_full`.
#[derive(Debug)]
struct CountingProcessor {
    inner: BatchSpanProcessor,
    ledger: Arc<SpanLedger>,
    capacity: usize,
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.ledger.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.ledger.pending.fetch_sub(1, Ordering::AcqRel);
            crate::observability::spans_dropped(SpanDrop::QueueFull, 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.inner.shutdown_with_timeout(timeout);
        let mut closed = self.ledger.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !*closed {
            *closed = true;
            let left = self.ledger.pending.swap(0, Ordering::AcqRel);
            crate::observability::spans_dropped(SpanDrop::Shutdown, left as u64);
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP span exporter, settling each batch in the [`SpanLedger`]: a
/// batch the collector did not take counts as dropped (`export_failed`).
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    ledger: Arc<SpanLedger>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        let closed = self.ledger.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !*closed {
            let _ = self
                .ledger
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(n))
                });
            if result.is_err() {
                crate::observability::spans_dropped(SpanDrop::ExportFailed, n as u64);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn shutdown(&self) -> OTelSdkResult {
        self.inner.shutdown()
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Exports the SDK's aggregated metrics over OTLP/gRPC with the gateway's
/// histogram exemplars added ([`crate::observability::attach_exemplars`]):
/// the SDK (0.33) collects none, and its data points cannot be built or
/// changed outside it, so the export request is built from them here and
/// sent with the same endpoint, headers (`OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_METRICS_HEADERS`) and timeout as the span exporter.
struct OtlpMetricExporter {
    client: MetricsServiceClient<tonic::transport::Channel>,
    metadata: tonic::metadata::MetadataMap,
}

impl OtlpMetricExporter {
    /// Connects lazily (call inside the Tokio runtime).
    fn new(endpoint: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}"))?
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let mut metadata = tonic::metadata::MetadataMap::new();
        let headers = std::env::var("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
            .unwrap_or_default();
        for (key, value) in parse_headers(&headers) {
            let key = tonic::metadata::MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                .map_err(|_| anyhow::anyhow!("OTLP header name {key:?} is not valid"))?;
            let value = value
                .parse()
                .map_err(|_| anyhow::anyhow!("the value of OTLP header {key} is not valid"))?;
            metadata.insert(key, value);
        }
        Ok(OtlpMetricExporter {
            client: MetricsServiceClient::new(channel),
            metadata,
        })
    }
}

/// `key=value` pairs separated by commas, percent-decoded (the
/// `OTEL_EXPORTER_OTLP_HEADERS` format).
fn parse_headers(text: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.trim().as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let Some(b) = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

impl PushMetricExporter for OtlpMetricExporter {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let mut request = ExportMetricsServiceRequest::from(metrics);
        crate::observability::attach_exemplars(&mut request);
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.metadata.clone();
        async move {
            client.export(request).await.map(|_| ()).map_err(|status| {
                OTelSdkError::InternalFailure(format!(
                    "the collector did not take the metrics: {:?}",
                    status.code()
                ))
            })
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

/// Targets whose `debug` and `trace` lines may hold secrets: tokio-postgres
/// logs every statement's parameter values at `debug`; the pool and the
/// PostgreSQL wire protocol crates are capped with it.
fn is_capped_target(target: &str) -> bool {
    [
        "tokio_postgres",
        "postgres_protocol",
        "deadpool",
        "deadpool_postgres",
    ]
    .iter()
    .any(|capped| {
        target
            .strip_prefix(capped)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Installs the global subscriber. Call inside the Tokio runtime (the OTLP
/// exporter's channel spawns a task). A second call (tests) keeps the first
/// subscriber.
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_new(&config.log_filter).map_err(|e| {
        anyhow::anyhow!(
            "RUST_LOG {:?} is not a valid filter: {e}",
            config.log_filter
        )
    })?;
    // The cap restricts no level by itself: say so (a filter without a
    // level hint makes the combined hint "anything", and then every span of
    // every crate, h2's and hyper's `trace` spans included, is built on
    // every call even when `RUST_LOG=warn` logs none of them).
    let filter = filter.and(
        filter::filter_fn(|meta| *meta.level() <= Level::INFO || !is_capped_target(meta.target()))
            .with_max_level_hint(filter::LevelFilter::TRACE),
    );
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(JsonLines)
            .boxed(),
    }
    .with_filter(filter);

    // One id per process, unless OTEL_RESOURCE_ATTRIBUTES names one (the
    // resource builder reads that variable; an attribute set here wins).
    let instance = (!env_names_attribute("service.instance.id"))
        .then(|| KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()));
    let resource = || {
        let mut resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(instance) = &instance {
            resource = resource.with_attribute(instance.clone());
        }
        resource.build()
    };
    let meters = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = OtlpMetricExporter::new(endpoint)?;
            let meters = SdkMeterProvider::builder()
                .with_periodic_exporter(exporter)
                .with_resource(resource())
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            Some(meters)
        }
        None => None,
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?;
            // OTEL_BSP_* settings apply, but the queue is span_queue's,
            // counted by CountingProcessor.
            let capacity = span_queue(config);
            let ledger = Arc::new(SpanLedger::default());
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(capacity)
                .build();
            let exporter = CountingExporter {
                inner: exporter,
                ledger: ledger.clone(),
            };
            let batches = CountingProcessor {
                inner: BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
                ledger,
                capacity,
            };
            Some(
                SdkTracerProvider::builder()
                    .with_span_processor(batches)
                    .with_resource(resource())
                    .build(),
            )
        }
        None => None,
    };
    // Only the gateway's own spans are exported: the exporter's transport
    // (tonic, hyper, h2) must not trace itself.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("verdict"))
            // Only what the conventions name: no busy/idle times, thread,
            // source location or module path on every span.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_filter(Targets::new().with_target("verdict", Level::INFO))
    });

    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        tracing::debug!("a global subscriber was already installed; keeping it");
    }
    Ok(Telemetry {
        provider,
        meters,
        grace: config.shutdown_grace().max(Duration::from_secs(1)),
    })
}

/// Whether `OTEL_RESOURCE_ATTRIBUTES` sets `key`.
fn env_names_attribute(key: &str) -> bool {
    std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
        v.split(',')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == key))
    })
}

/// One JSON object per line: `timestamp`, `level`, `target`, the event's
/// fields (`message` among them), `span` (the name of the current span) and,
/// inside a traced span, its OpenTelemetry `trace_id` and `span_id` (hex), so
/// a log line leads to its trace and back.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        let context = tracing::Span::current().context();
        let otel = context.span();
        let ids = otel.span_context();
        if ids.is_valid() {
            line.insert("trace_id".into(), ids.trace_id().to_string().into());
            line.insert("span_id".into(), ids.span_id().to_string().into());
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into a JSON object.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::parse_headers;

    #[test]
    fn otlp_headers_are_percent_decoded_pairs() {
        assert_eq!(
            parse_headers("api-key=abc%20def, X-Tenant = t1,broken,=x"),
            vec![
                ("api-key".to_owned(), "abc def".to_owned()),
                ("X-Tenant".to_owned(), "t1".to_owned()),
            ]
        );
        assert!(parse_headers("").is_empty());
    }
}
