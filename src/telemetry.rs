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
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;
use tracing::Level;
use tracing_subscriber::filter::{self, FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporters alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
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

    pub fn shutdown(self) {
        if let Some(m) = &self.meters
            && let Err(e) = m.shutdown()
        {
            tracing::warn!(error = %e, "shutting the metric exporter down failed");
        }
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
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
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    }
    .with_filter(filter);

    let resource = || {
        Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build()
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
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
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
    Ok(Telemetry { provider, meters })
}
