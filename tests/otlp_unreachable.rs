//! An unreachable collector never blocks or fails RPCs, and the spans it
//! never got are counted (`verdict_telemetry_dropped_spans_total` with
//! `error_type="export_failed"`). Its own test binary, because the tracing
//! subscriber is process-global.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{adopt, create_database, test_config};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verdict::observability::{SpanDrop, dropped_spans};
use verdict::proto::CreateSessionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_succeed_while_the_collector_is_unreachable() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.otlp_endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let telemetry = verdict::telemetry::init(&config).unwrap();
    let app = verdict::Application::build(config).await.unwrap();
    let metrics_port = app.metrics_port().expect("metrics enabled");
    let app = adopt(app).await;

    for i in 0..50 {
        let mut request = tonic::Request::new(CreateSessionRequest {
            request_id: format!("r{i}"),
            source_technology: "cobol".into(),
            target_technology: "java".into(),
            validation_scope: "full".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(2));
        app.sessions.clone().create_session(request).await.unwrap();
    }
    // Flushing to a dead collector gives up within the exporter's timeout.
    tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || telemetry.flush()),
    )
    .await
    .expect("flush to an unreachable collector returns")
    .unwrap();

    // Every span of those calls went with a failed export (at least the
    // calls' spans before the last one's, which may end after the flush):
    // counted, and on /metrics; none was dropped from the queue.
    let failed = dropped_spans(SpanDrop::ExportFailed);
    assert!(
        failed >= 49 * 2,
        "{failed} spans of 50 calls counted as export_failed"
    );
    assert_eq!(dropped_spans(SpanDrop::QueueFull), 0);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    let scraped: u64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("verdict_telemetry_dropped_spans_total{error_type=\"export_failed\"} ")
        })
        .unwrap_or_else(|| panic!("dropped spans on /metrics: {body}"))
        .parse()
        .unwrap();
    assert!(scraped >= failed, "{scraped} on /metrics, {failed} counted");
    app.stop().await.unwrap();
}
