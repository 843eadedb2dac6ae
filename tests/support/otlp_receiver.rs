//! An in-test OTLP/gRPC collector: keeps every exported span, the resource
//! attributes they came with, the name and attribute keys of every
//! exported metric, the latest value of every sum and the latest exemplars
//! of every histogram series. Span exports can be held (not answered, not
//! kept) to play a slow collector.

#![allow(dead_code)]

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
pub use opentelemetry_proto::tonic::metrics::v1::Exemplar;
#[allow(unused_imports)]
pub use opentelemetry_proto::tonic::metrics::v1::exemplar::Value as ExemplarValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

/// Collects every exported span, and the names of exported metrics.
#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<Span>>>,
    /// Resource attributes of every export, as key and string value.
    pub resources: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
    /// Metric name to the attribute keys of its data points.
    pub metrics: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    /// The latest value of every sum series, by metric name and attributes.
    pub sums: Arc<Mutex<BTreeMap<Series, i64>>>,
    /// The latest exemplars of every histogram series.
    pub exemplars: Arc<Mutex<BTreeMap<Series, Vec<Exemplar>>>>,
    /// While true, span exports wait (unanswered, not kept) until it is
    /// false again.
    pub hold_spans: Arc<tokio::sync::watch::Sender<bool>>,
    pub arrived: Arc<Notify>,
}

/// A metric name and a data point's attributes (string values).
pub type Series = (String, BTreeMap<String, String>);

fn series(name: &str, attributes: &[KeyValue]) -> Series {
    (
        name.to_owned(),
        attributes
            .iter()
            .map(|kv| {
                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), value)
            })
            .collect(),
    )
}

fn keys(attributes: &[KeyValue]) -> impl Iterator<Item = String> + '_ {
    attributes.iter().map(|kv| kv.key.clone())
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for m in request
            .into_inner()
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics)
        {
            let entry = metrics.entry(m.name.clone()).or_default();
            match m.data {
                Some(Data::Histogram(h)) => {
                    let mut exemplars = self.exemplars.lock().unwrap();
                    for p in h.data_points {
                        entry.extend(keys(&p.attributes));
                        exemplars.insert(series(&m.name, &p.attributes), p.exemplars);
                    }
                }
                Some(Data::Sum(s)) => {
                    let mut sums = self.sums.lock().unwrap();
                    for p in s.data_points {
                        entry.extend(keys(&p.attributes));
                        let value = match p.value {
                            Some(number_data_point::Value::AsInt(i)) => i,
                            Some(number_data_point::Value::AsDouble(d)) => d as i64,
                            None => 0,
                        };
                        sums.insert(series(&m.name, &p.attributes), value);
                    }
                }
                Some(Data::Gauge(g)) => g
                    .data_points
                    .iter()
                    .for_each(|p| entry.extend(keys(&p.attributes))),
                _ => {}
            }
        }
        drop(metrics);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        // A held export is dropped, unkept, if the exporter gives up first.
        let _ = self.hold_spans.subscribe().wait_for(|held| !*held).await;
        for r in request.into_inner().resource_spans {
            if let Some(resource) = &r.resource {
                let attrs = resource
                    .attributes
                    .iter()
                    .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                        _ => None,
                    })
                    .collect();
                self.resources.lock().unwrap().push(attrs);
            }
            self.spans
                .lock()
                .unwrap()
                .extend(r.scope_spans.into_iter().flat_map(|s| s.spans));
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// The latest value of sum `name` with attribute `key` = `value`.
    pub fn sum(&self, name: &str, key: &str, value: &str) -> Option<i64> {
        self.sums
            .lock()
            .unwrap()
            .iter()
            .find(|((n, attrs), _)| n == name && attrs.get(key).is_some_and(|v| v == value))
            .map(|(_, v)| *v)
    }

    /// Serves the receiver on a loopback port; returns its port.
    pub async fn start(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .add_service(MetricsServiceServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        port
    }

    /// Waits (at most 30 s) until `found` picks something out of the spans
    /// received so far.
    pub async fn wait_until<T>(&self, what: &str, found: impl Fn(&[Span]) -> Option<T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let notified = self.arrived.notified();
                if let Some(t) = found(&self.spans.lock().unwrap()) {
                    return t;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} never arrived"))
    }

    /// Waits until a span named `name` with `trace_id` has arrived; returns
    /// every span received by then.
    pub async fn wait_for(&self, name: &str, trace_id: &[u8]) -> Vec<Span> {
        self.wait_until(&format!("span {name}"), |spans| {
            spans
                .iter()
                .any(|s| s.name == name && s.trace_id == trace_id)
                .then(|| spans.to_vec())
        })
        .await
    }
}

pub fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

pub fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

pub fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
