//! Logging and tracing: an EnvFilter'd fmt layer (text or JSON), and when an
//! OTLP endpoint is configured, an OpenTelemetry layer exporting spans over
//! OTLP/gRPC. W3C trace context is the propagator.
//!
//! Log lines go to stderr: stdout belongs to the output of one-shot commands
//! (`verdict export`, `verdict keys create`). Whatever `RUST_LOG` says, the
//! database driver and pool log at `info` at most: their `debug` lines carry
//! statement parameter values.

use crate::config::{Config, LogFormat};
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use std::io::IsTerminal as _;
use std::time::Duration;
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

    /// Exports what is buffered, within the shutdown grace period (the
    /// SDK logs the number of spans it had to drop, if any).
    pub fn shutdown(self) {
        if let Some(m) = &self.meters
            && let Err(e) = m.shutdown_with_timeout(self.grace)
        {
            tracing::warn!(error = %e, "shutting the metric exporter down failed");
        }
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(self.grace)
        {
            tracing::warn!(error = %e, "shutting the span exporter down failed");
        }
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
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(3))
                .build()?;
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
                .with_timeout(Duration::from_secs(3))
                .build()?;
            // OTEL_BSP_* settings apply; the queue is SPAN_QUEUE unless
            // OTEL_BSP_MAX_QUEUE_SIZE says otherwise.
            let mut batch = BatchConfigBuilder::default();
            if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
                batch = batch.with_max_queue_size(SPAN_QUEUE);
            }
            let batches = BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch.build())
                .build();
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
