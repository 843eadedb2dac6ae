//! Tracing end to end: an in-test OTLP/gRPC receiver gets the RPC span and
//! its SQL child spans with their attributes, in the caller's trace. Its own
//! test binary, because the tracing subscriber is process-global.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{create_database, spawn_app_with, test_config};
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
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use verdict::proto::CreateSessionRequest;

/// Collects every exported span, and the names of exported metrics.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<String>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let names = request
            .into_inner()
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics)
            .map(|m| m.name);
        self.metrics.lock().unwrap().extend(names);
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
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Waits until a span named `name` with `trace_id` has arrived.
    async fn wait_for(&self, name: &str, trace_id: &[u8]) -> Vec<Span> {
        let found = || {
            let spans = self.spans.lock().unwrap();
            spans
                .iter()
                .any(|s| s.name == name && s.trace_id == trace_id)
                .then(|| spans.clone())
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.arrived.notified();
                if let Some(spans) = found() {
                    return spans;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("span {name} never arrived"))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_span_and_its_sql_spans_reach_the_collector_in_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.otlp_endpoint = Some(format!("http://127.0.0.1:{collector_port}"));
    let telemetry = verdict::telemetry::init(&config).unwrap();
    let app = spawn_app_with(config).await;

    let trace_id_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span_hex = "00f067aa0ba902b7";
    let secret_value = "request-id-that-must-not-appear-in-spans";
    let mut request = tonic::Request::new(CreateSessionRequest {
        request_id: secret_value.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id_hex}-{caller_span_hex}-01")
            .parse()
            .unwrap(),
    );
    app.sessions.clone().create_session(request).await.unwrap();

    telemetry.flush();
    let trace_id = hex(trace_id_hex);
    let spans = receiver
        .wait_for("verdict.v1.SessionService/CreateSession", &trace_id)
        .await;

    let rpc = spans
        .iter()
        .find(|s| s.name == "verdict.v1.SessionService/CreateSession" && s.trace_id == trace_id)
        .unwrap();
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(
        rpc.parent_span_id,
        hex(caller_span_hex),
        "child of the caller's span"
    );
    assert_eq!(text(rpc, "rpc.system"), "grpc");
    assert_eq!(text(rpc, "rpc.service"), "verdict.v1.SessionService");
    assert_eq!(text(rpc, "rpc.method"), "CreateSession");
    assert_eq!(int(rpc, "rpc.grpc.status_code"), 0);

    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id && s.parent_span_id == rpc.span_id)
        .collect();
    let insert = children
        .iter()
        .find(|s| s.name == "INSERT sessions")
        .unwrap_or_else(|| panic!("no SQL span among {:?}", names(&children)));
    assert_eq!(insert.kind, SpanKind::Client as i32);
    assert_eq!(text(insert, "db.system.name"), "postgresql");
    assert_eq!(text(insert, "db.operation.name"), "INSERT");
    let sql = text(insert, "db.query.text");
    assert!(
        sql.contains("INSERT INTO sessions") && sql.contains("$2"),
        "{sql}"
    );
    assert_eq!(int(insert, "db.response.returned_rows"), 1);
    assert!(
        children.iter().any(|s| s.name == "db.pool.acquire"),
        "pool wait recorded: {:?}",
        names(&children)
    );

    // The RPC metrics went out over OTLP too.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let notified = receiver.arrived.notified();
            let names = receiver.metrics.lock().unwrap().clone();
            if names.iter().any(|n| n == "rpc.server.duration")
                && names.iter().any(|n| n == "verdict.db.pool.size")
            {
                return;
            }
            telemetry.flush();
            notified.await;
        }
    })
    .await
    .expect("RPC duration and pool metrics exported");

    // Parameter values never appear in any exported attribute.
    for span in &spans {
        for kv in &span.attributes {
            if let Some(Value::StringValue(s)) = kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                assert!(
                    !s.contains(secret_value),
                    "{} leaks a value in {}",
                    span.name,
                    kv.key
                );
            }
        }
    }
    app.stop().await.unwrap();
}

fn names(spans: &[&Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
