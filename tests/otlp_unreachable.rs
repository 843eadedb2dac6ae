//! An unreachable collector never blocks or fails RPCs. Its own test
//! binary, because the tracing subscriber is process-global.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{create_database, spawn_app_with, test_config};
use std::time::Duration;
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
    let telemetry = verdict::telemetry::init(&config).unwrap();
    let app = spawn_app_with(config).await;

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
    app.stop().await.unwrap();
}
