//! WatchSession: committed changes reach watchers, across replicas.

use crate::helpers::{connect, spawn_app, spawn_app_with, test_config};
use crate::sessions::{create, set_status};
use std::time::Duration;
use tonic::Code;
use tonic::Streaming;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::watch_session_response::Event;
use verdict::proto::{
    AppendSessionLogRequest, DeleteSessionRequest, LogLevel, SessionStatus, WatchSessionRequest,
    WatchSessionResponse,
};

async fn next(stream: &mut Streaming<WatchSessionResponse>) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no watch event within 10 s")
        .expect("watch stream failed")
        .map(|m| m.event.expect("event set"))
}

fn status_of(event: Option<Event>) -> SessionStatus {
    match event {
        Some(Event::Session(s)) => SessionStatus::try_from(s.status).unwrap(),
        other => panic!("expected a session event, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_session_streams_changes_made_through_another_client_and_ends_when_final() {
    let app = spawn_app().await;
    let s = create(&app, "watched").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);

    let mut other = SessionServiceClient::new(connect(app.port).await);
    other
        .append_session_log(AppendSessionLogRequest {
            session_id: s.id.clone(),
            level: LogLevel::Info as i32,
            message: "parsing sources".into(),
            fields: None,
        })
        .await
        .unwrap();
    match next(&mut stream).await {
        Some(Event::LogEntry(e)) => assert_eq!(e.message, "parsing sources"),
        other => panic!("expected the log entry, got {other:?}"),
    }
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    assert_eq!(
        status_of(next(&mut stream).await),
        SessionStatus::Processing
    );
    set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Completed);
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends after a final status"
    );
}

#[tokio::test]
async fn watch_session_sees_changes_committed_through_another_replica() {
    let app = spawn_app().await;
    let replica = spawn_app_with(test_config(&app.database_url)).await;
    let s = create(&app, "replicated").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);
    set_status(&replica, &s.id, SessionStatus::Cancelled)
        .await
        .unwrap();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Cancelled);
    assert!(next(&mut stream).await.is_none());
}

#[tokio::test]
async fn watching_a_missing_or_deleted_session_is_not_found() {
    let app = spawn_app().await;
    let err = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let s = create(&app, "deleted").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await;
    app.sessions
        .clone()
        .delete_session(DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no end within 10 s")
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
