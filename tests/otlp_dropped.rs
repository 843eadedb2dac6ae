//! Spans that never reach the collector are counted, as
//! `verdict.telemetry.dropped_spans` over OTLP and
//! `verdict_telemetry_dropped_spans_total` on /metrics, by `error.type`:
//! `queue_full` while a slow collector holds an export and the span queue
//! (`VERDICT_OTEL_SPAN_QUEUE_SIZE`) is full, `shutdown` for what is still
//! queued when the shutdown grace period ends. Its own test binary, because
//! the tracing subscriber is process-global.

#[path = "api/helpers.rs"]
mod helpers;
#[path = "support/otlp_receiver.rs"]
mod otlp_receiver;

use helpers::{TestApp, adopt, create_database, test_config};
use otlp_receiver::{Receiver, hex};
use std::time::Duration;
use verdict::observability::{SpanDrop, dropped_spans};
use verdict::proto::CreateSessionRequest;

/// Spans queued or being exported at most.
const QUEUE: usize = 16;
/// Calls made while the collector holds an export.
const CALLS: usize = 30;

/// The trace id of call `i` (a fresh trace per call).
fn trace_hex(i: usize) -> String {
    format!(
        "{:032x}",
        0x5eed_0000_0000_0000_0000_0000_0000_0000u128 + i as u128
    )
}

async fn traced_call(app: &TestApp, i: usize) {
    let mut request = tonic::Request::new(CreateSessionRequest {
        request_id: format!("dropped-{i}"),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{}-00f067aa0ba902b7-01", trace_hex(i))
            .parse()
            .unwrap(),
    );
    app.sessions.clone().create_session(request).await.unwrap();
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of `verdict_telemetry_dropped_spans_total{error_type=reason}`
/// on /metrics.
async fn scraped_drops(port: u16, reason: SpanDrop) -> u64 {
    let body = scrape(port).await;
    let prefix = format!(
        "verdict_telemetry_dropped_spans_total{{error_type=\"{}\"}} ",
        reason.as_str()
    );
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} in /metrics: {body}"))
        .parse()
        .unwrap()
}

/// Spans of `trace` the collector has.
fn received(receiver: &Receiver, trace: &[u8]) -> usize {
    receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_lost_to_a_full_queue_and_at_shutdown_are_counted_on_otlp_and_metrics() {
    let receiver = Receiver::default();
    let collector_port = receiver.start().await;
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.otlp_endpoint = Some(format!("http://127.0.0.1:{collector_port}"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.otel_span_queue_size = Some(QUEUE as u32);
    config.shutdown_grace_ms = 1000;
    let telemetry = verdict::telemetry::init(&config).unwrap();
    let app = verdict::Application::build(config).await.unwrap();
    let metrics_port = app.metrics_port().expect("metrics enabled");
    let app = adopt(app).await;

    // Every series is there before anything is dropped.
    for reason in SpanDrop::ALL {
        assert_eq!(scraped_drops(metrics_port, reason).await, 0, "{reason:?}");
    }

    // With the collector answering, one call's spans all arrive (the queue
    // is emptied first) and nothing is dropped: how many spans a call makes.
    telemetry.flush();
    traced_call(&app, 0).await;
    let first = hex(&trace_hex(0));
    let per_call = receiver
        .wait_until("the first call's RPC span", |spans| {
            spans
                .iter()
                .any(|s| s.trace_id == first && s.parent_span_id == hex("00f067aa0ba902b7"))
                .then(|| spans.iter().filter(|s| s.trace_id == first).count())
        })
        .await;
    assert!(
        (3..QUEUE).contains(&per_call),
        "a call's spans fit the queue: {per_call}"
    );
    assert_eq!(dropped_spans(SpanDrop::QueueFull), 0);

    // A collector that holds every export: the first batch of QUEUE spans
    // waits for its answer and every span after it is dropped.
    receiver.hold_spans.send_replace(true);
    for i in 1..=CALLS {
        traced_call(&app, i).await;
    }
    // At most QUEUE spans are held; the rest were dropped (or, should the
    // held export time out, went with it).
    let dropped_while_held =
        dropped_spans(SpanDrop::QueueFull) + dropped_spans(SpanDrop::ExportFailed);
    assert!(
        dropped_while_held >= (CALLS * per_call - QUEUE) as u64,
        "{dropped_while_held} of {} spans dropped with {QUEUE} queued",
        CALLS * per_call
    );
    receiver.hold_spans.send_replace(false);

    // Once the collector answers, every span of those calls has either
    // arrived or been counted as dropped (by the queue, or with its
    // export if the held one timed out). Background work may drop spans
    // of its own too, so the count is at least the missing spans and at
    // most them plus what was held.
    let produced = CALLS * per_call;
    let (arrived, dropped) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let notified = receiver.arrived.notified();
            let arrived: usize = (1..=CALLS)
                .map(|i| received(&receiver, &hex(&trace_hex(i))))
                .sum();
            let dropped = dropped_spans(SpanDrop::QueueFull)
                + dropped_spans(SpanDrop::ExportFailed);
            if arrived + dropped as usize >= produced {
                return (arrived, dropped as usize);
            }
            telemetry.flush();
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "spans of the calls arrived or were counted: {produced} made, {} queue_full, {} export_failed",
            dropped_spans(SpanDrop::QueueFull),
            dropped_spans(SpanDrop::ExportFailed)
        )
    });
    let missing = produced - arrived;
    eprintln!(
        "{per_call} spans per call; of {produced}: {arrived} arrived, {missing} missing, {dropped} counted dropped"
    );
    assert!(missing > 0, "{arrived} of {produced} arrived");
    assert!(
        (missing..=missing + QUEUE).contains(&dropped),
        "{dropped} counted for {missing} missing spans"
    );

    // The same counts on /metrics and over OTLP.
    let queue_full = dropped_spans(SpanDrop::QueueFull);
    assert_eq!(
        scraped_drops(metrics_port, SpanDrop::QueueFull).await,
        queue_full
    );
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let notified = receiver.arrived.notified();
            if receiver.sum("verdict.telemetry.dropped_spans", "error.type", "queue_full")
                == Some(queue_full as i64)
            {
                return;
            }
            telemetry.flush();
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "verdict.telemetry.dropped_spans{{error.type=queue_full}} = {queue_full} over OTLP: {:?}",
            receiver.sums.lock().unwrap()
        )
    });

    // Shutdown: spans still queued when the grace period (1 s) ends, with
    // the collector holding the export, are counted, and the count goes out
    // with the last metrics export.
    receiver.hold_spans.send_replace(true);
    for i in CALLS + 1..=CALLS + 3 {
        traced_call(&app, i).await;
    }
    assert_eq!(dropped_spans(SpanDrop::Shutdown), 0);
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let at_shutdown = dropped_spans(SpanDrop::Shutdown);
    eprintln!("{at_shutdown} spans still queued at shutdown");
    assert!(
        (1..=QUEUE as u64).contains(&at_shutdown),
        "{at_shutdown} spans counted as lost at shutdown"
    );
    assert_eq!(
        receiver.sum("verdict.telemetry.dropped_spans", "error.type", "shutdown"),
        Some(at_shutdown as i64),
        "the last metrics export carries the spans lost at shutdown"
    );
    receiver.hold_spans.send_replace(false);
    app.stop().await.unwrap();
}
