//! The gateway itself: health, reflection, migrations, the embedded
//! default, start-up against a database that is not there yet, limits.

use crate::helpers::{
    create_database, spawn_app, spawn_app_with, start_app, temp_pg_dir, test_config,
};
use crate::sessions::{create, new_session};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1 as refl;
use tonic_reflection::pb::v1alpha as refl_alpha;
use verdict::Application;
use verdict::config::Config;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::proto::GetSessionRequest;
use verdict::proto::get_session_request::Lookup;

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let app = spawn_app().await;
    for service in ["", "verdict.v1.SessionService"] {
        let reply = app.health_check(service).await.unwrap();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = app.health_check("verdict.v1.Nope").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_verdict_and_health_in_v1_and_v1alpha() {
    let app = spawn_app().await;
    let mut v1 = refl::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = v1
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"verdict.v1.SessionService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut alpha =
        refl_alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = refl_alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl_alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "verdict.v1.SessionService".into(),
            ),
        ),
    };
    let mut replies = alpha
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert!(matches!(
        reply.message_response,
        Some(refl_alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

#[tokio::test]
async fn two_gateways_migrating_one_database_at_once_both_come_up() {
    let (_, url) = create_database().await;
    let (a, b) = tokio::join!(
        spawn_app_with(test_config(&url)),
        spawn_app_with(test_config(&url))
    );
    let applied: i64 = a
        .sql()
        .await
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied as usize,
        verdict::db::migrate::known_versions().len()
    );
    let s = create(&a, "through-a").await;
    let seen = b
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(s.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.session.unwrap().id, s.id);
}

#[tokio::test]
async fn a_database_holding_unknown_migrations_is_refused() {
    let app = spawn_app().await;
    app.sql()
        .await
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (9999, 'from_the_future', '2030-01-01T00:00:00Z', '1')",
            &[],
        )
        .await
        .unwrap();
    let url = app.database_url.clone();
    app.stop().await.unwrap();
    let refused = start_app(test_config(&url)).await;
    let err = refused.outcome().await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("V9999") && text.contains("does not know"),
        "{text}"
    );
}

#[tokio::test]
async fn a_gateway_waits_for_its_database_and_follows_it_down_and_up() {
    let dir = temp_pg_dir();
    // The gateway starts first, pointed at a server that is not there yet.
    let url = format!(
        "host={} port=5432 user=verdict dbname=verdict",
        dir.display()
    );
    let app = start_app(test_config(&url)).await;
    let early = app.health_check("").await.unwrap();
    assert_eq!(early.status, ServingStatus::NotServing as i32);
    let err = app
        .sessions
        .clone()
        .create_session(new_session("too-early"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    app.wait_for_health("", ServingStatus::Serving).await;
    create(&app, "first").await;

    pg.stop_immediately().await;
    app.wait_for_health("verdict.v1.SessionService", ServingStatus::NotServing)
        .await;
    let err = app
        .sessions
        .clone()
        .create_session(new_session("while-down"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    pg.restart().await.unwrap();
    app.wait_for_health("", ServingStatus::Serving).await;
    create(&app, "after-restart").await;
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_embedded_default_keeps_data_across_restarts_and_refuses_a_busy_folder() {
    let dir = temp_pg_dir();
    let mut config = Config::for_database(None);
    config.data_dir = dir.clone();
    config.listen = "127.0.0.1:0".parse().unwrap();

    let first = spawn_embedded(config.clone()).await;
    create(&first, "persisted").await;

    // The folder's server is running: a second gateway must refuse it.
    let busy = Application::build(config.clone()).await;
    let message = format!("{:#}", busy.err().expect("a busy folder is refused"));
    assert!(
        message.contains("in use by another running PostgreSQL"),
        "{message}"
    );

    first.stop().await.unwrap();
    assert!(
        !dir.join("pgdata/postmaster.pid").exists(),
        "the embedded server was stopped cleanly"
    );

    let second = spawn_embedded(config).await;
    let found = second
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("persisted".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(found.into_inner().session.is_some());
    second.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway on the embedded default (no DATABASE_URL).
async fn spawn_embedded(config: Config) -> crate::helpers::TestApp {
    let app = Application::build(config)
        .await
        .expect("build on the embedded default");
    crate::helpers::adopt(app).await
}

#[tokio::test]
async fn oversized_messages_are_refused_before_reaching_the_database() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.max_message_bytes = 16 * 1024;
    let app = spawn_app_with(config).await;
    let mut req = new_session("big");
    req.validation_scope = "s".repeat(20 * 1024);
    let err = app.sessions.clone().create_session(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let count: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}

/// Holds the row lock of a session from outside the gateway, so calls that
/// update it wait (holding their pooled connection) until released.
async fn lock_session(app: &crate::helpers::TestApp, id: &str) -> tokio_postgres::Client {
    let blocker = app.sql().await;
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker
        .execute(
            "SELECT 1 FROM sessions WHERE id = $1::text::uuid FOR UPDATE",
            &[&id],
        )
        .await
        .unwrap();
    blocker
}

/// Resolves once a gateway statement is waiting on a lock.
async fn until_a_call_waits_on_the_lock(app: &crate::helpers::TestApp) {
    let sql = app.sql().await;
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let waiting: i64 = sql
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the call never reached PostgreSQL");
}

#[tokio::test]
async fn a_call_that_cannot_get_a_connection_in_time_is_resource_exhausted() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.pool_size = 1;
    config.pool_wait_timeout_ms = 200;
    let app = spawn_app_with(config).await;
    let s = create(&app, "busy").await;
    let blocker = lock_session(&app, &s.id).await;

    let mut waiting = app.sessions.clone();
    let id = s.id.clone();
    let stuck = tokio::spawn(async move {
        crate::sessions::set_status_with(
            &mut waiting,
            &id,
            verdict::proto::SessionStatus::Processing,
        )
        .await
    });
    until_a_call_waits_on_the_lock(&app).await;

    // A write needs a pooled connection: there is none within the wait.
    let err = app
        .sessions
        .clone()
        .create_session(new_session("while-busy"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    use tonic_types::StatusExt;
    assert!(
        err.get_details_retry_info().is_some(),
        "retry advice attached"
    );
    // Short reads share connections outside the pool: they are answered
    // meanwhile (a row lock does not hold up a plain read).
    let read = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(s.id.clone())),
            ..Default::default()
        })
        .await
        .expect("a read is served while the pool is exhausted")
        .into_inner();
    assert_eq!(read.session.unwrap().id, s.id);
    let stored: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id = 'while-busy'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the refused write stored nothing");

    blocker.batch_execute("COMMIT").await.unwrap();
    stuck
        .await
        .unwrap()
        .expect("the waiting call completes once the lock is released");
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish() {
    let app = spawn_app().await;
    let s = create(&app, "in-flight").await;
    let blocker = lock_session(&app, &s.id).await;
    let mut client = app.sessions.clone();
    let id = s.id.clone();
    let in_flight = tokio::spawn(async move {
        crate::sessions::set_status_with(
            &mut client,
            &id,
            verdict::proto::SessionStatus::Processing,
        )
        .await
    });
    until_a_call_waits_on_the_lock(&app).await;

    let port = app.port;
    let sql = app.sql().await;
    let stopping = tokio::spawn(app.stop());
    // The gateway now drains: the in-flight call is still waiting on the lock.
    blocker.batch_execute("COMMIT").await.unwrap();
    let updated = in_flight
        .await
        .unwrap()
        .expect("the in-flight call finishes");
    assert_eq!(updated.version, 2);
    stopping.await.unwrap().expect("a clean stop");

    let stored: String = sql
        .query_one(
            "SELECT status FROM sessions WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "processing");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn migrate_status_lists_pending_then_applied_migrations() {
    let (_, url) = create_database().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(args)
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run verdict");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let before = run(&["migrate", "--status"]);
    assert!(before.lines().count() >= 2, "{before}");
    assert!(before.lines().all(|l| l.contains("pending")), "{before}");
    let applied = run(&["migrate"]);
    assert!(applied.contains("applied V1"), "{applied}");
    let after = run(&["migrate", "--status"]);
    assert!(after.lines().all(|l| l.contains("applied 2")), "{after}");
    assert_eq!(run(&["migrate"]).trim(), "no pending migrations");
}

#[tokio::test]
async fn the_prometheus_endpoint_reports_rpcs_pool_and_ingest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let app = Application::build(config).await.unwrap();
    let metrics_port = app.metrics_port().expect("metrics enabled");
    let app = crate::helpers::adopt(app).await;
    create(&app, "counted").await;
    let _ = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("missing".into())),
            ..Default::default()
        })
        .await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains(
            "rpc_server_call_duration_seconds_count{rpc_system_name=\"grpc\",rpc_method=\"verdict.v1.SessionService/CreateSession\",rpc_response_status_code=\"OK\"}"
        ),
        "{body}"
    );
    assert!(
        body.contains(
            "rpc_method=\"verdict.v1.SessionService/GetSession\",rpc_response_status_code=\"NOT_FOUND\""
        ),
        "NOT_FOUND counted under its code"
    );
    assert!(
        body.contains("db_client_connection_max{db_client_connection_pool_name=\"verdict\"} 8"),
        "{body}"
    );
    assert!(body.contains("# TYPE verdict_db_statement_timeouts_total counter"));
    assert!(body.contains("# TYPE verdict_db_reads_batched_total counter"));
    assert!(body.contains("# TYPE verdict_db_reads_sent_again_total counter"));
}
